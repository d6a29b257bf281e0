"""A driving training run on the trainer path the DAG's train step runs, for
benchmarks/drive_memory.py:

    torchrun --standalone --nproc-per-node 2 -m benchmarks._drive_run MANIFEST_URI [--batch 128] [--epochs 1]

The real family (train split streamed by ShardLoader, scenarios cut into samples per batch),
the generic loop with DDP, the per-epoch valid evaluation, the epoch-end checkpoint, the final
eval evaluation and the exported model: ``trainflow.trainers.loop.run_training``. A small
forecaster (``SMALL_MODEL``: the memory question is about the data, and the model is the same
at every data size). 1 torch thread a process.

Rank 0 prints ``{"samples_per_s", "epoch_seconds", "train_seconds", "peak_rss_mb_per_rank",
"ade", "baseline_ade", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks._rec_run import gather_peak_rss

SMALL_MODEL = {"hidden_dim": 64, "num_layers": 2, "context_dim": 32, "max_neighbours": 8, "num_members": 1,
               "num_modes": 6}


def main() -> None:
    from benchmarks.common import pin_threads

    parser = argparse.ArgumentParser()
    parser.add_argument("manifest_uri")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    pin_threads()
    from trainflow.trainers.config import TrainConfig
    from trainflow.trainers.driving.config import DrivingConfig
    from trainflow.trainers.driving.family import DrivingFamily
    from trainflow.trainers.loop import run_training

    family = DrivingConfig(**SMALL_MODEL)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-drive-") as tmp:
        train = TrainConfig(manifest_uri=args.manifest_uri, run_dir=f"file://{tmp}/run", epochs=args.epochs,
                            batch_size=args.batch, learning_rate=1e-3, log_to_mlflow=False, system_metrics=False,
                            log_every_steps=50, keep_best=False, parallelism="ddp")
        result = run_training(DrivingFamily, family, train)
        wall = time.monotonic() - started
    per_rank = gather_peak_rss()
    if per_rank is None:
        return
    epoch_seconds = sum(h["seconds"] for h in result["history"])
    evaluation = result["metrics"]["eval"]
    out = {"samples_per_s": result["samples_per_s"], "samples": result["samples"],
           "epoch_seconds": round(epoch_seconds, 2), "train_seconds": result["train_seconds"],
           "wall_seconds": round(wall, 2), "world_size": result["world_size"],
           "peak_rss_mb_per_rank": [round(x) for x in per_rank], "ade": evaluation.get("ade"),
           "baseline_ade": evaluation.get("baseline_ade"), "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
