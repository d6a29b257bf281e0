"""The manifest protects itself: its own checksum, consistency, and footers checked on read."""

from __future__ import annotations

import json

import pytest

from trainflow.tasks.manifest import (
    MANIFEST_NAME,
    ManifestIntegrityError,
    ShardVerificationError,
    load_manifest,
)
from trainflow.tasks.sharding import ShardingConfig, shard_dataset

SYN_REC = "synthetic://recommendation?num_interactions=6000&num_users=60&num_items=400&seed=3"
SMALL = ShardingConfig(target_shard_bytes=20_000, row_group_rows=500)
# The version id of SYN_REC with SMALL, as the code before the manifest checksum computed it
# ("de01a82d61b8dcbf"): adding the checksum must not change it (existing stores stay cache
# hits). The recommendation split version 2 (negatives per block of users) changed it on
# purpose to "bf6e863eeac35c53" (the same id rule with the split version in it).
SYN_REC_SMALL_VERSION = "bf6e863eeac35c53"


def _edit(manifest, change) -> None:
    data = json.loads(manifest.storage.read_bytes(MANIFEST_NAME))
    change(data)
    manifest.storage.write_bytes(MANIFEST_NAME, (json.dumps(data, indent=2) + "\n").encode())


def test_edited_split_num_rows_is_detected_naming_the_field(tf_env):
    summary = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    manifest = load_manifest(summary["manifest_uri"])
    assert manifest.data["checksum"]["algorithm"] == "sha256"

    def inflate(data):
        data["splits"]["train"]["num_rows"] += 1000

    _edit(manifest, inflate)
    with pytest.raises(ManifestIntegrityError) as caught:
        load_manifest(summary["manifest_uri"])
    message = str(caught.value)
    assert "splits.train.num_rows" in caught.value.fields
    assert f"splits.train.num_rows is {manifest.num_rows('train') + 1000}" in message
    assert f"sum to {manifest.num_rows('train')}" in message
    assert "shard task" in message and "python -m trainflow.tasks.cli shard 'synthetic://recommendation" in message


def test_consistent_edit_of_a_shard_is_caught_by_the_checksum_and_by_the_footer(tf_env):
    """An editor who keeps the numbers consistent (shard, its row groups, the split) is caught by
    the checksum; a manifest without one (written before it existed) by the Parquet footer."""
    summary = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    manifest = load_manifest(summary["manifest_uri"])
    recorded = manifest.data["checksum"]["content"]

    def consistent(data):
        split = data["splits"]["train"]
        shard = split["shards"][1]
        shard["num_rows"] += 7
        shard["row_groups"][-1] += 7
        split["num_rows"] += 7

    _edit(manifest, consistent)
    with pytest.raises(ManifestIntegrityError) as caught:
        load_manifest(summary["manifest_uri"])
    assert caught.value.fields == ["splits.train.num_rows", "splits.train.shards[1]"]
    message = str(caught.value)
    assert recorded in message  # the whole recorded digest, and the whole new one
    now = message.split("content sha256 is ", 1)[1].split(",", 1)[0]
    assert len(now) == 64 and now != recorded

    _edit(manifest, lambda data: data.pop("checksum"))  # as written before the checksum existed
    legacy = load_manifest(summary["manifest_uri"])
    with pytest.raises(ShardVerificationError, match=r"train/part-00001\.parquet: its Parquet footer has \d+ rows, "
                       r"the manifest's num_rows says \d+"):
        legacy.read_table("train")
    from trainflow.trainers.loader import ShardLoader

    with pytest.raises(ShardVerificationError, match="num_rows"):
        for _ in ShardLoader(legacy, "train", batch_size=64, shuffle=False):
            pass


def test_manifest_written_before_the_checksum_still_loads_and_is_a_cache_hit(tf_env, caplog):
    first = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert first["version"] == SYN_REC_SMALL_VERSION
    manifest = load_manifest(first["manifest_uri"])
    _edit(manifest, lambda data: data.pop("checksum"))
    caplog.set_level("INFO")
    again = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert again["cache_hit"] is True and again["version"] == SYN_REC_SMALL_VERSION
    assert "checksum" not in json.loads(manifest.storage.read_bytes(MANIFEST_NAME))
    assert load_manifest(first["manifest_uri"]).read_table("eval").num_rows == 60


def test_shard_checksum_mismatch_prints_both_whole_digests(tf_env):
    manifest = load_manifest(shard_dataset(SYN_REC, "recommendation", config=SMALL)["manifest_uri"])
    shard = manifest.shards("train")[0]
    data = bytearray(manifest.storage.read_bytes(shard.path))
    data[len(data) // 2] ^= 0x01
    manifest.storage.write_bytes(shard.path, bytes(data))
    with pytest.raises(ShardVerificationError) as caught:
        manifest.read_table("train")
    message = str(caught.value)
    assert f"the manifest says {shard.xxh3_128}" in message
    actual = message.split("xxh3_128 of the bytes is ", 1)[1].split(",", 1)[0]
    assert len(actual) == 32 and actual != shard.xxh3_128
    assert "python -m trainflow.tasks.cli shard" in message  # how to recover
