"""The committed synthetic recommendation dataset the training benchmarks train on (cached).

    python -m benchmarks._recdata 25000000 --users 162541 --items 59047   # shard ML-25M's size once
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks._data import cache_dir

# MovieLens 25M's sizes (ratings, users, items): the "ML-25M size" of issue 17.
ML25M = (25_000_095, 162_541, 59_047)
# The SASRec settings docs/benchmarks.md §8 measured: the pipeline preset before its loss became
# the sampled softmax (2026-12-03). Pinned so that its commands reproduce those rows.
MEASURED_OVERRIDES = {"sasrec": {"loss": "bce", "num_negatives": 1}}


def benchmark_preset(model: str) -> dict:
    """The recommendation pipeline's preset of ``model`` as the scaling and memory benchmarks ran it."""
    from trainflow.trainers.recommendation.pipeline import MODEL_PRESETS

    return {**MODEL_PRESETS[model], **MEASURED_OVERRIDES.get(model, {})}


def manifest_uri(num_interactions: int, num_users: int | None = None, num_items: int | None = None) -> str:
    from trainflow.tasks.settings import Settings
    from trainflow.tasks.sharding import shard_dataset

    users = num_users or max(200, num_interactions // 60)
    items = num_items or max(2000, num_interactions // 100)
    url = f"synthetic://recommendation?num_interactions={num_interactions}&num_users={users}&num_items={items}"
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(cache_dir() / "recdata")})
    return shard_dataset(url, "recommendation", settings=settings)["manifest_uri"]


def main() -> None:
    parser = argparse.ArgumentParser(description="shard (or find cached) a synthetic recommendation log")
    parser.add_argument("interactions", type=int)
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    args = parser.parse_args()
    started = time.monotonic()
    uri = manifest_uri(args.interactions, args.users, args.items)
    print(json.dumps({"manifest_uri": uri, "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
