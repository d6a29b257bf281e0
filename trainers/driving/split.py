"""The driving split protocol: one row per scenario; ``eval``, ``valid`` and ``train`` are
assigned by a hash of the scenario id (:func:`trainflow.tasks.sharding.hash_split`), so the split is
deterministic and the eval set is never trained on. Moved unchanged from ``trainflow.tasks.sharding``
(sharder version 3): the same inputs give the same dataset version.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from trainflow.tasks.settings import redact_url
from trainflow.tasks.sharding import ShardingConfig, ShardWriter, hash_split
from trainflow.tasks.storage import Storage
from trainflow.trainers.driving import argoverse
from trainflow.trainers.driving.sources import DrivingSource

log = logging.getLogger(__name__)


def describe_split(config: dict[str, Any]) -> str:
    """The split protocol as the gate compares it (recorded in the manifest's stats; derived from
    the sharding config for manifests written before it was recorded)."""
    return (
        f"scenario hash split (eval {config.get('eval_fraction')}, valid {config.get('valid_fraction')}, "
        f"seed {config.get('seed')})"
    )


def shard_driving(source: DrivingSource, store: Storage, config: ShardingConfig, tmp_dir: str) -> dict[str, Any]:
    schema = argoverse.sequence_schema()
    writers = {split: ShardWriter(store, split, schema, config, tmp_dir) for split in ("train", "valid", "eval")}
    try:
        buffers: dict[str, list[dict[str, Any]]] = {split: [] for split in writers}
        rejected: dict[str, int] = {}
        examples: list[str] = []
        cities: dict[str, int] = {}
        tracks = 0
        done = 0
        tick = time.monotonic()
        flush_rows = min(config.row_group_rows, 256)
        for record in source.open_records():
            done += 1
            if isinstance(record, argoverse.SequenceRejected):
                rejected[record.reason] = rejected.get(record.reason, 0) + 1
                if len(examples) < 10:
                    examples.append(str(record))
                continue
            split = hash_split(record["seq_id"], config)
            buffers[split].append(record)
            cities[record["city"]] = cities.get(record["city"], 0) + 1
            tracks += int(record["tracks_xy"].shape[0])
            if len(buffers[split]) >= flush_rows:
                writers[split].write_batch(argoverse.records_to_batch(buffers[split]))
                buffers[split] = []
            if time.monotonic() - tick > 10:
                log.info("read %d of %d scenarios", done, source.num_sequences)
                tick = time.monotonic()
        splits = {}
        for split, writer in writers.items():
            if buffers[split]:
                writer.write_batch(argoverse.records_to_batch(buffers[split]))
            splits[split] = writer.close()
    finally:
        for writer in writers.values():
            writer.abort()
    kept = sum(entry["num_rows"] for entry in splits.values())
    if kept == 0:
        raise ValueError(f"{redact_url(source.url)}: no usable scenario (rejected: {rejected})")
    if rejected:
        log.warning("rejected %d scenarios: %s (first: %s)", sum(rejected.values()), rejected, examples[0])
    for split, entry in splits.items():
        if entry["num_rows"] == 0:
            log.warning("split %s is empty: too few scenarios for the configured fractions", split)
    stats = {
        "split_protocol": describe_split(dataclasses.asdict(config)),
        "num_sequences": kept,
        "num_tracks": tracks,
        "num_frames": argoverse.NUM_FRAMES,
        "frame_rate_hz": 10,
        "cities": cities,
    }
    cleaning = {"rejected_sequences": rejected, "rejected_examples": examples}
    return {"splits": splits, "files": {}, "stats": stats, "cleaning": cleaning}
