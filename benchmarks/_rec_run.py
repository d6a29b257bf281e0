"""A recommendation training run on the trainer path the DAG's train step runs, for
benchmarks/rec_scaling.py and benchmarks/rec_memory.py:

    torchrun --standalone --nproc-per-node 2 -m benchmarks._rec_run MANIFEST_URI --model neumf \\
        --batch 4096 [--row-sparse | --a2a] [--epochs 1] [--max-steps N]

The real family (train split streamed by ShardLoader, negatives in its transform), the
generic loop with DDP, the per-epoch valid evaluation, the epoch-end checkpoint, the final
eval evaluation and the exported model: ``trainflow.trainers.loop.run_training``, as ``python -m
trainflow.trainers.train`` runs it under torchrun (not through Airflow). 1 torch thread a process.

Rank 0 prints ``{"samples_per_s" (steps x global batch / whole run, evaluation and
checkpoints included), "epoch_seconds" (training steps), "other_seconds" (valid/eval
evaluation, checkpoint, export), "peak_rss_mb_per_rank", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time


def gather_peak_rss() -> list[float] | None:
    """Every rank's peak RSS (MB, ``ru_maxrss``) on rank 0, ``None`` on the others. Call after
    ``run_training``: the loop has left the process group by then, so the ranks meet in a folder."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    folder = os.path.join(tempfile.gettempdir(), f"trainflow-bench-rss-{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank-{rank}.tmp"), "w") as handle:
        handle.write(str(rss))
    os.replace(os.path.join(folder, f"rank-{rank}.tmp"), os.path.join(folder, f"rank-{rank}"))
    if rank != 0:
        return None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len([f for f in os.listdir(folder) if "tmp" not in f]) < world:
        time.sleep(0.2)
    per_rank = [float(open(os.path.join(folder, f"rank-{r}")).read()) for r in range(world)]
    for r in range(world):
        os.remove(os.path.join(folder, f"rank-{r}"))
    os.rmdir(folder)
    return per_rank


def main() -> None:
    from benchmarks.common import pin_threads

    parser = argparse.ArgumentParser()
    parser.add_argument("manifest_uri")
    parser.add_argument("--model", default="neumf", choices=["neumf", "sasrec"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--row-sparse", action="store_true")
    parser.add_argument("--a2a", action="store_true", help="parallelism='sharded_embeddings_a2a' (else ddp)")
    parser.add_argument("--max-steps", type=int, help="stop after N steps (bounded runs on large data)")
    args = parser.parse_args()
    pin_threads()
    from benchmarks._recdata import benchmark_preset
    from trainflow.trainers.config import TrainConfig
    from trainflow.trainers.loop import run_training
    from trainflow.trainers.recommendation.config import RecommendationConfig
    from trainflow.trainers.recommendation.family import RecommendationFamily

    family = RecommendationConfig(model=args.model, row_sparse_updates=args.row_sparse,
                                  **benchmark_preset(args.model))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-rec-") as tmp:
        train = TrainConfig(manifest_uri=args.manifest_uri, run_dir=f"file://{tmp}/run", epochs=args.epochs,
                            batch_size=args.batch, learning_rate=1e-3, log_to_mlflow=False, system_metrics=False,
                            log_every_steps=50, keep_best=False, max_steps=args.max_steps,
                            parallelism="sharded_embeddings_a2a" if args.a2a else "ddp")
        result = run_training(RecommendationFamily, family, train)
        wall = time.monotonic() - started
    per_rank = gather_peak_rss()
    if per_rank is None:
        return
    epoch_seconds = sum(h["seconds"] for h in result["history"])
    out = {"samples_per_s": result["samples_per_s"], "samples": result["samples"],
           "epoch_seconds": round(epoch_seconds, 2), "train_seconds": result["train_seconds"],
           "other_seconds": round(result["train_seconds"] - epoch_seconds, 2),
           "train_samples_per_s": round(result["samples"] / max(epoch_seconds, 1e-9), 1),
           "steps": result["steps"], "global_batch": args.batch,
           "wall_seconds": round(wall, 2), "world_size": result["world_size"],
           "parallelism": result["parallelism"], "peak_rss_mb_per_rank": [round(x) for x in per_rank],
           "hr_at_10": result["metrics"]["eval"].get("hr_at_10"), "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
