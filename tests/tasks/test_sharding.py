"""The dataset contract: versions, cache hits, commit marker, verification, NCF protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import shared_dataset
from trainflow.tasks.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ShardVerificationError,
    load_manifest,
)
from trainflow.tasks.settings import get_settings
from trainflow.tasks.sharding import ShardingConfig, ShardWriter, shard_dataset, split_of
from trainflow.tasks.storage import Storage

SYN_REC = "synthetic://recommendation?num_interactions=6000&num_users=60&num_items=400&seed=3"
SYN_DRV = "synthetic://driving?num_sequences=60&seed=1"
SMALL = ShardingConfig(target_shard_bytes=20_000, row_group_rows=500)


def _all_rows(manifest, split):
    return manifest.read_table(split).to_pandas()


def test_recommendation_ncf_protocol(tf_env):
    summary = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    manifest = load_manifest(summary["manifest_uri"])
    assert summary["cache_hit"] is False
    train, valid, test = (_all_rows(manifest, s) for s in ("train", "valid", "eval"))
    stats = manifest.stats
    assert len(test) == stats["num_users"] == 60
    assert len(train) + len(test) == stats["num_interactions"]
    assert len(manifest.shards("train")) > 1  # sized by bytes: several shards
    # Source data, regenerated: each user's held-out item is the latest by (timestamp, item id).
    from trainflow.trainers.recommendation.synthetic import (
        SyntheticRecommendation,
        SyntheticRecommendationConfig,
    )

    gen = SyntheticRecommendation(SyntheticRecommendationConfig(6000, 60, 400, seed=3))
    import pyarrow as pa

    raw = pa.Table.from_batches(list(gen.iter_batches())).to_pandas()
    latest = raw.sort_values(["user_id", "timestamp", "item_id"]).groupby("user_id").tail(1)
    expected = dict(zip(latest.user_id, latest.item_id))
    assert dict(zip(test.user_id, test.item_id)) == expected
    # Negatives: 99 per user, distinct, never an item the user interacted with.
    interacted = raw.groupby("user_id").item_id.agg(set).to_dict()
    for frame in (test, valid):
        for user, negs in zip(frame.user_id, frame.neg_item_id):
            assert len(negs) == 99 and len(set(negs)) == 99
            assert not (set(negs) & interacted[user])
    # Valid positives are the second-latest interactions, kept in train and flagged.
    assert train.is_valid.sum() == len(valid)
    flagged = train[train.is_valid]
    assert set(zip(flagged.user_id, flagged.item_id)) == set(zip(valid.user_id, valid.item_id))
    # Dense indices match the vocabularies.
    users = manifest.read_file_table("users").column("user_id").to_numpy()
    items = manifest.read_file_table("items")
    assert (users[train.user_idx] == train.user_id).all()
    assert (items.column("item_id").to_numpy()[train.item_idx] == train.item_id).all()
    counts = items.column("num_train_interactions").to_numpy()
    assert counts.sum() == len(train)


def test_same_inputs_are_a_cache_hit_and_nothing_is_rewritten(tf_env, caplog):
    first = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    store = Storage(first["manifest_uri"].rsplit("/", 1)[0])
    before = {p: store.read_bytes(p) for p in store.list(recursive=True)}
    caplog.set_level("INFO")
    second = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert second["cache_hit"] is True
    assert second["version"] == first["version"]
    assert "cache hit" in caplog.text
    assert {p: store.read_bytes(p) for p in store.list(recursive=True)} == before


def test_version_changes_with_config_and_source(tf_env):
    base = shard_dataset(SYN_REC, "recommendation", config=SMALL)["version"]
    other_seed = shard_dataset(SYN_REC, "recommendation", config=ShardingConfig(20_000, 500, seed=1))["version"]
    other_source = shard_dataset(SYN_REC.replace("seed=3", "seed=4"), "recommendation", config=SMALL)["version"]
    assert len({base, other_seed, other_source}) == 3


def test_sharding_is_deterministic_across_stores(tmp_path, monkeypatch):
    digests = []
    for n in range(2):
        monkeypatch.setenv("TRAINFLOW_DATA_DIR", str(tmp_path / f"d{n}"))
        manifest = load_manifest(shard_dataset(SYN_REC, "recommendation", config=SMALL)["manifest_uri"])
        digests.append([s.sha256 for split in manifest.splits for s in manifest.shards(split)])
    assert digests[0] == digests[1]


def test_interrupted_run_leaves_no_manifest_and_next_run_completes_it(tf_env, monkeypatch):
    reference = load_manifest(shard_dataset(SYN_REC, "recommendation", config=SMALL, name="ref")["manifest_uri"])
    closes = {"n": 0}
    original = ShardWriter._close_shard

    def crash_after_two_shards(self):
        if self._writer is not None:
            closes["n"] += 1
            if closes["n"] == 3:
                raise KeyboardInterrupt("killed between shards")
        return original(self)

    monkeypatch.setattr(ShardWriter, "_close_shard", crash_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset(SYN_REC, "recommendation", config=SMALL, name="victim")
    root = Storage.from_settings(get_settings())
    version_dir = f"datasets/victim/{reference.version}"
    assert root.list(version_dir, recursive=True), "partial shards should exist"
    assert not root.exists(f"{version_dir}/{MANIFEST_NAME}")
    with pytest.raises(ManifestError, match="never finished"):
        load_manifest(root.url(version_dir))
    monkeypatch.setattr(ShardWriter, "_close_shard", original)
    resumed = shard_dataset(SYN_REC, "recommendation", config=SMALL, name="victim")
    assert resumed["cache_hit"] is False
    manifest = load_manifest(resumed["manifest_uri"])
    for split in reference.splits:
        assert [s.sha256 for s in manifest.shards(split)] == [s.sha256 for s in reference.shards(split)]


def test_corrupt_or_missing_shard_fails_with_its_name(tf_env):
    manifest = load_manifest(shard_dataset(SYN_REC, "recommendation", config=SMALL)["manifest_uri"])
    shard = manifest.shards("train")[1]
    data = bytearray(manifest.storage.read_bytes(shard.path))
    data[len(data) // 2] ^= 0xFF
    manifest.storage.write_bytes(shard.path, bytes(data))
    # Every read verifies the fast checksum; the cryptographic one on request.
    with pytest.raises(ShardVerificationError, match=r"train/part-00001\.parquet: xxh3_128 .*corrupt"):
        manifest.read_table("train")
    with pytest.raises(ShardVerificationError, match=r"train/part-00001\.parquet: sha256 .*corrupt"):
        manifest.read_shard_buffer(shard, checksum="sha256")
    # A manifest written before xxh3_128 existed is verified with sha256.
    legacy = Manifest(json.loads(json.dumps(manifest.data)), manifest.storage)
    for entry in legacy.data["splits"]["train"]["shards"]:
        del entry["xxh3_128"]
    assert legacy.shards("train")[1].xxh3_128 is None
    with pytest.raises(ShardVerificationError, match=r"train/part-00001\.parquet: sha256 .*corrupt"):
        legacy.read_table("train")
    with pytest.raises(ShardVerificationError, match=r"records no xxh3_128"):
        legacy.read_shard_buffer(first := legacy.shards("train")[0], checksum="xxh3_128")
    assert legacy.open_shard(first).metadata.num_rows > 0
    with pytest.raises(ValueError, match="checksum must be one of"):
        manifest.read_shard_buffer(first, checksum="md5")
    manifest.storage.write_bytes(shard.path, bytes(data[:-10]))
    with pytest.raises(ShardVerificationError, match=r"train/part-00001\.parquet.*size"):
        list(manifest.iter_batches("train"))
    manifest.storage.delete(shard.path)
    with pytest.raises(ShardVerificationError, match=r"train/part-00001\.parquet.*missing"):
        manifest.read_table("train")
    # Intact shards still read.
    assert manifest.open_shard(manifest.shards("train")[0]).metadata.num_rows > 0


def test_manifest_digests_are_those_of_the_stored_bytes(tf_env):
    """The writer hashes each shard on a background thread while the next is encoded: the
    digests it records must be those of the bytes that ended up in the store."""
    import hashlib

    import xxhash

    manifest = load_manifest(shard_dataset(SYN_REC, "recommendation", config=SMALL)["manifest_uri"])
    shards = [s for split in manifest.splits for s in manifest.shards(split)]
    assert len(shards) > 3
    for shard in shards:
        data = manifest.storage.read_bytes(shard.path)
        assert len(data) == shard.num_bytes
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        assert xxhash.xxh3_128_hexdigest(data) == shard.xxh3_128
    assert [s.path for s in manifest.shards("train")] == [
        f"train/part-{k:05d}.parquet" for k in range(len(manifest.shards("train")))
    ]


def test_sharding_to_s3_and_local_give_the_same_shards(storage_root, tmp_path):
    import dataclasses

    summary = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert summary["manifest_uri"].startswith(storage_root)
    manifest = load_manifest(summary["manifest_uri"])
    assert manifest.read_table("eval").num_rows == 60
    local_settings = dataclasses.replace(get_settings(), storage_root=(tmp_path / "other").as_uri())
    local = load_manifest(
        shard_dataset(SYN_REC, "recommendation", config=SMALL, settings=local_settings)["manifest_uri"],
        local_settings,
    )
    assert local.version == manifest.version
    assert [s.sha256 for s in local.shards("train")] == [s.sha256 for s in manifest.shards("train")]
    assert shard_dataset(SYN_REC, "recommendation", config=SMALL)["cache_hit"] is True


def test_driving_split_by_sequence(tf_env):
    summary = shard_dataset(SYN_DRV, "driving", config=ShardingConfig(target_shard_bytes=50_000, row_group_rows=16))
    manifest = load_manifest(summary["manifest_uri"])
    ids = {split: set(_all_rows(manifest, split).seq_id) for split in ("train", "valid", "eval")}
    assert sum(map(len, ids.values())) == 60
    assert not (ids["train"] & ids["eval"]) and not (ids["train"] & ids["valid"])
    for split, members in ids.items():
        assert all(split_of(s, ShardingConfig()) == split for s in members)
    rows = manifest.read_table("eval").slice(0, 1).to_pylist()[0]
    xy = np.asarray(rows["tracks_xy"], dtype=np.float32).reshape(rows["num_tracks"], 50, 2)
    assert rows["track_types"][0] == 0 and np.isfinite(xy[0]).all()


def _write_argoverse(folder: Path, seq: str, agent_frames: int = 50, nan_agent: bool = False) -> None:
    lines = ["TIMESTAMP,TRACK_ID,OBJECT_TYPE,X,Y,CITY_NAME"]
    for t in range(agent_frames):
        x = "nan" if nan_agent and t == 3 else f"{t * 1.0:.2f}"
        lines.append(f"{100 + t * 0.1:.1f},agent-{seq},AGENT,{x},{t * 0.5:.2f},PIT")
        lines.append(f"{100 + t * 0.1:.1f},00000000-0000-0000-0000-000000000000,AV,{t * 0.9:.2f},3.0,PIT")
        if t % 2 == 0:
            lines.append(f"{100 + t * 0.1:.1f},other-{seq},OTHERS,5.0,{t * 0.2:.2f},PIT")
    (folder / f"{seq}.csv").write_text("\n".join(lines) + "\n")


def test_argoverse_folder_rejects_unusable_scenarios_with_counts(tf_env, tmp_path):
    folder = tmp_path / "argo" / "data"
    folder.mkdir(parents=True)
    for n in range(1, 9):
        _write_argoverse(folder, str(n))
    _write_argoverse(folder, "100", agent_frames=49)
    _write_argoverse(folder, "101", nan_agent=True)
    summary = shard_dataset(str(tmp_path / "argo"), "driving")
    manifest = load_manifest(summary["manifest_uri"])
    assert manifest.stats["num_sequences"] == 8
    assert manifest.data["cleaning"]["rejected_sequences"] == {"agent_frames": 1, "non_finite": 1}
    row = manifest.read_table("train").to_pylist()[0]
    xy = np.asarray(row["tracks_xy"]).reshape(row["num_tracks"], 50, 2)
    assert row["track_types"] == [0, 1, 2]
    assert np.isnan(xy[2, 1::2]).all() and np.isfinite(xy[2, ::2]).all()  # partial OTHERS track


def test_real_movielens_split_matches_the_shared_ncf_files(tf_env):
    raw = shared_dataset("movielens_100k_raw")
    ncf = shared_dataset("ncf_movielens_100k")
    ours = load_manifest(shard_dataset(str(raw), "recommendation")["manifest_uri"])
    given = load_manifest(shard_dataset(str(ncf), "recommendation")["manifest_uri"])
    assert ours.stats["num_users"] == given.stats["num_users"] == 943
    assert ours.num_rows("train") == given.num_rows("train") == 99_057
    a, b = ours.read_table("eval").to_pandas(), given.read_table("eval").to_pandas()
    assert (a.item_idx.values == b.item_idx.values).all()
    assert given.stats["split_protocol"] == "given NCF split"
    lines = (ncf / "ml-100k.test.negative").read_text().splitlines()
    first_negs = [int(v) for v in lines[0].split("\t")[1:]]
    assert b.neg_item_idx[0].tolist() == first_negs


def test_real_argoverse_subset(tf_env):
    folder = shared_dataset("argoverse1_forecasting_subset")
    summary = shard_dataset(str(folder), "driving")
    assert summary["stats"]["num_sequences"] == 1955
    assert sum(summary["splits"].values()) == 1955
    assert summary["stats"]["cities"] == {"MIA": 1052, "PIT": 903}
    manifest = load_manifest(summary["manifest_uri"])
    assert json.loads(manifest.storage.read_bytes(MANIFEST_NAME))["source"]["reader"] == "argoverse.csv"


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_negatives"):
        ShardingConfig(num_negatives=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        ShardingConfig(eval_fraction=1.5)


def test_synthetic_defaults_shard_with_heavy_users(tf_env):
    # 50 users over 200 items by default: the heaviest users must still leave 99 negatives.
    summary = shard_dataset("synthetic://recommendation?num_interactions=5000", "recommendation")
    manifest = load_manifest(summary["manifest_uri"])
    assert all(len(n) == 99 for n in manifest.read_table("eval").column("neg_item_idx").to_pylist())


def test_exact_duplicate_interactions_are_dropped_and_counted(tf_env, tmp_path, caplog):
    """Same (user, item, timestamp) twice is one interaction: the first copy stays, the rest are
    dropped from train and from the per-user counts, and the manifest counts them."""
    rows = [(u, 100 + n, 4, 1000 * u + n) for u in range(1, 7) for n in range(6)]  # 6 users x 6
    rows += [(7, 300, 5, 7000), (7, 300, 5, 7000)]  # user 7: one interaction, written twice
    planted = [
        (1, 100, 4, 1000),  # an ordinary train row
        (1, 100, 4, 1000),  # ... three times in all
        (2, 105, 3, 2005),  # user 2's latest (the eval interaction); the rating differs: still a duplicate
        (3, 104, 4, 3004),  # user 3's second latest (the valid interaction)
        (7, 300, 5, 7000),  # user 7's interaction a third time
    ]
    kept_apart = [(4, 100, 4, 3999)]  # same user and item at another time: a re-interaction, kept
    rng = np.random.default_rng(0)
    lines = rows + planted + kept_apart
    lines = [lines[n] for n in rng.permutation(len(lines))]
    path = tmp_path / "u.data"
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in lines))
    n_planted = len(planted) + 1  # plus user 7's second copy in `rows`

    with caplog.at_level("WARNING", logger="trainflow.tasks.sharding"):
        config = ShardingConfig(target_shard_bytes=20_000, row_group_rows=500, num_negatives=1)
        summary = shard_dataset(str(path), "recommendation", config=config)
    manifest = load_manifest(summary["manifest_uri"])
    assert manifest.stats["duplicate_interactions_removed"] == n_planted
    assert summary["stats"]["duplicate_interactions_removed"] == n_planted
    assert manifest.data["cleaning"]["duplicate_interactions_removed"] == n_planted
    assert f"dropping {n_planted} exact duplicate interactions" in caplog.text
    train, valid, test = (_all_rows(manifest, s) for s in ("train", "valid", "eval"))
    assert manifest.stats["num_interactions"] == len(lines)
    assert len(train) + len(test) == len(lines) - n_planted
    assert not train.duplicated(["user_id", "item_id", "timestamp"]).any()
    assert ((train.user_id == 4) & (train.item_id == 100)).sum() == 2  # the re-interaction stays
    # Eval: each user's latest; user 7 has a single interaction after de-duplication: no eval row.
    assert dict(zip(test.user_id, test.item_id)) == {u: 105 for u in range(1, 7)}
    assert manifest.stats["users_without_eval"] == 1
    assert manifest.data["cleaning"]["duplicate_eval_interactions_removed_from_train"] == 0
    assert not ((train.user_id == 2) & (train.item_id == 105)).any()
    assert train.is_valid.sum() == len(valid) == 6
    assert set(zip(valid.user_id, valid.item_id)) == {(u, 104) for u in range(1, 7)}
    assert ((train.user_id == 3) & (train.item_id == 104)).sum() == 1


def _flip_byte(storage, path):
    data = bytearray(storage.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(path, bytes(data))


def _train_rows(manifest):
    from trainflow.trainers.loader import ShardLoader

    rows = set()
    for batch in ShardLoader(manifest, "train", batch_size=64, shuffle=False, remainder="pad", columns=["user_idx"],
                             with_row_index=True):
        rows.update(int(r) for r in batch["row_index"])
    return len(rows)


def test_rerunning_shard_repairs_a_damaged_or_missing_shard(storage_root, caplog):
    """Before: a re-run was a cache hit ("nothing to do") and training failed on the shard forever."""
    first = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    manifest = load_manifest(first["manifest_uri"])
    store = manifest.storage
    original = {p: store.read_bytes(p) for p in store.list(recursive=True) if p != MANIFEST_NAME}
    victim = manifest.shards("train")[1].path
    if store.protocol == "file":
        _flip_byte(store, victim)  # same size: found by the xxh3 check a local store gets
    else:
        store.delete(victim)  # a remote store is checked by sizes, one listing
    with pytest.raises(ShardVerificationError):
        _train_rows(manifest)
    caplog.set_level("INFO")
    repaired = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert repaired["cache_hit"] is False and repaired["version"] == first["version"]
    assert len(repaired["repaired"]) == 1 and repaired["repaired"][0].startswith(victim)
    assert f"version {first['version']} is damaged" in caplog.text and "repairing it" in caplog.text
    fixed = load_manifest(first["manifest_uri"])
    assert {p: store.read_bytes(p) for p in store.list(recursive=True) if p != MANIFEST_NAME} == original
    assert _train_rows(fixed) == fixed.num_rows("train")
    again = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert again["cache_hit"] is True and again["repaired"] == []


def test_full_rehash_flag_finds_what_sizes_cannot(tf_env):
    first = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    manifest = load_manifest(first["manifest_uri"])
    _flip_byte(manifest.storage, manifest.shards("eval")[0].path)
    assert shard_dataset(SYN_REC, "recommendation", config=SMALL, verify="sizes")["cache_hit"] is True
    repaired = shard_dataset(SYN_REC, "recommendation", config=SMALL, verify="sha256")
    assert repaired["repaired"] and "sha256" in repaired["repaired"][0] and repaired["repaired"][0].startswith("eval/")
    assert load_manifest(first["manifest_uri"]).read_table("eval").num_rows == 60
    with pytest.raises(ValueError, match="verify must be one of"):
        shard_dataset(SYN_REC, "recommendation", config=SMALL, verify="md5")


def test_edited_manifest_is_repaired_by_rerunning_shard(tf_env):
    first = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    store = load_manifest(first["manifest_uri"]).storage
    data = json.loads(store.read_bytes(MANIFEST_NAME))
    data["splits"]["train"]["num_rows"] = 10
    store.write_bytes(MANIFEST_NAME, json.dumps(data).encode())
    with pytest.raises(ManifestError, match="splits.train.num_rows"):
        load_manifest(first["manifest_uri"])
    repaired = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert repaired["repaired"] and "splits.train.num_rows" in repaired["repaired"][0]
    assert load_manifest(first["manifest_uri"]).num_rows("train") == first["splits"]["train"]


def test_training_time_verification_error_gives_the_command_that_repairs(tf_env, capsys):
    import shlex

    from trainflow.tasks.cli import main

    first = shard_dataset(SYN_REC, "recommendation")  # the default config, as the CLI shards
    manifest = load_manifest(first["manifest_uri"])
    _flip_byte(manifest.storage, manifest.shards("train")[0].path)
    with pytest.raises(ShardVerificationError) as caught:
        _train_rows(manifest)
    command = str(caught.value).split("`python -m trainflow.tasks.cli ", 1)[1].split("`", 1)[0]
    assert command == f"shard '{SYN_REC}' --kind recommendation --name synthetic-recommendation"
    assert main(shlex.split(command)) == 0
    assert json.loads(capsys.readouterr().out)["repaired"]
    assert _train_rows(load_manifest(first["manifest_uri"])) == first["splits"]["train"]


def test_negatives_are_sampled_per_block_of_users(tf_env, tmp_path, monkeypatch):
    """Split version 2: negatives come one block of users at a time (the sharder's memory is one
    block, not the number of users). With blocks of at most 8 users and 3 files of seen pairs
    (about 2,000 pairs each), 60 users make at least 9 blocks: the protocol holds across block
    and file edges, the held-out rows are in user order, and the same inputs give the same shards."""
    from trainflow.trainers.recommendation import split

    monkeypatch.setattr(split, "NEGATIVE_BLOCK_USERS", 8)
    monkeypatch.setattr(split, "SEEN_FILES_MAX", 3)
    monkeypatch.setattr(split, "SEEN_ROWS_PER_FILE", 1000)
    made = []
    original = split._SeenPairs.__init__

    def spy(self, tmp_dir, counts):
        original(self, tmp_dir, counts)
        made.append(self.files)

    monkeypatch.setattr(split._SeenPairs, "__init__", spy)
    digests = []
    for n in range(2):
        monkeypatch.setenv("TRAINFLOW_DATA_DIR", str(tmp_path / f"d{n}"))
        summary = shard_dataset(SYN_REC, "recommendation", config=SMALL)
        manifest = load_manifest(summary["manifest_uri"])
        digests.append([s.sha256 for s in manifest.shards("valid") + manifest.shards("eval")])
    assert digests[0] == digests[1]
    assert made == [3, 3]
    assert manifest.data["split_version"] == "2"
    train, valid, test = (_all_rows(manifest, s) for s in ("train", "valid", "eval"))
    interacted = (
        pd.concat([train[["user_idx", "item_idx"]], test[["user_idx", "item_idx"]]])
        .groupby("user_idx").item_idx.agg(set).to_dict()
    )
    for frame in (valid, test):
        assert (np.diff(frame.user_idx.values) > 0).all()  # one row a user, in user order
        for user, negs in zip(frame.user_idx, frame.neg_item_idx):
            assert len(negs) == 99 == len(set(negs))
            assert not set(negs) & interacted[user]
            assert all(0 <= x < manifest.stats["num_items"] for x in negs)
    assert len(test) == 60 and manifest.stats["eval_positive_among_negatives"] == 0
    # The blocks are independent draws: no two users' negatives are the same list.
    assert len({tuple(n) for n in test.neg_item_idx}) == 60


def test_a_user_who_saw_most_items_gets_exact_negatives_or_a_clear_error(tf_env, tmp_path):
    """The block's matrix of draws leaves a heavy user short of unseen items: it is drawn again
    from the exact list of the items it has not seen; with too few left the error names it."""
    items = range(1, 151)
    rows = [(1, i, 4, 10 * i) for i in items if i % 3]  # user 1: 100 of 150 items, 50 left
    rows += [(u, i, 3, 5000 + i) for u in range(2, 5) for i in items if i % 3 == u - 2]  # 50 items each
    path = tmp_path / "ok" / "u.data"
    path.parent.mkdir()
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    config = ShardingConfig(target_shard_bytes=20_000, row_group_rows=500, num_negatives=45)
    manifest = load_manifest(shard_dataset(str(path), "recommendation", config=config)["manifest_uri"])
    test = _all_rows(manifest, "eval")
    negs = set(test[test.user_id == 1].neg_item_id.iloc[0])
    assert len(negs) == 45 and not negs & {i for i in items if i % 3}
    bad = tmp_path / "bad" / "u.data"
    bad.parent.mkdir()
    bad.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows + [(1, i, 4, 10 * i) for i in items if not i % 3 and i > 20]))
    with pytest.raises(ValueError, match="user 1 interacted with 144 of 150 items"):
        shard_dataset(str(bad), "recommendation", config=config)


def test_the_split_version_is_part_of_the_dataset_version(tf_env):
    from trainflow.tasks.datasets.sources import resolve_source
    from trainflow.tasks.pipelines import get_pipeline
    from trainflow.tasks.sharding import dataset_version

    spec = get_pipeline("recommendation")
    source = resolve_source(SYN_REC, spec)
    assert spec.split_version == "2"
    ids = {dataset_version(source, SMALL, v) for v in ("", "2", "3")}
    assert len(ids) == 3
    summary = shard_dataset(SYN_REC, "recommendation", config=SMALL)
    assert summary["version"] == dataset_version(source, SMALL, "2")
