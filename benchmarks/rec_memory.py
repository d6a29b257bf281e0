"""Rank memory flat in the data: the recommendation trainer's largest per-rank peak RSS at two
sizes of a synthetic log with the same users and items (so the same model), 2 ranks, 1 epoch.

Runs ``benchmarks/_rec_run.py`` (the DAG's trainer path: streamed train split, DDP,
evaluation, checkpoint, export) at 0.5M and 5M interactions (20k users, 10k items) and
reports the largest rank's peak RSS (``ru_maxrss``) at each; the target is a ratio within 1.3.

    python -m benchmarks.rec_memory                   # 0.5M and 5M, NeuMF and SASRec
    python -m benchmarks.rec_memory --quick           # 20k and 200k, NeuMF
"""

from __future__ import annotations

import argparse
import sys

from benchmarks._data import cache_dir
from benchmarks.common import child_env, emit, machine, run_json

BATCH = {"neumf": 4096, "sasrec": 256}


def manifest_uri(num_interactions: int, users: int, items: int) -> str:
    from trainflow.tasks.settings import Settings
    from trainflow.tasks.sharding import shard_dataset

    url = f"synthetic://recommendation?num_interactions={num_interactions}&num_users={users}&num_items={items}"
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(cache_dir() / "recdata")})
    return shard_dataset(url, "recommendation", settings=settings)["manifest_uri"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs=2)
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args(argv)
    small, large = args.sizes or ((20_000, 200_000) if args.quick else (500_000, 5_000_000))
    users = args.users or (2_000 if args.quick else 20_000)
    items = args.items or (1_000 if args.quick else 10_000)
    models = args.models or (["neumf"] if args.quick else ["neumf", "sasrec"])
    out = []
    for model in models:
        peaks = {}
        runs = {}
        for size in (small, large):
            uri = manifest_uri(size, users, items)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "-m", "benchmarks._rec_run", uri, "--model", model, "--batch", str(BATCH[model]), "--row-sparse"]
            runs[size] = run_json(cmd, env=child_env(OMP_NUM_THREADS="1"), timeout=3600)
            peaks[size] = max(runs[size]["peak_rss_mb_per_rank"])
        common = {"model": model, "users": users, "items": items, "processes": 2, "epochs": 1,
                  "machine": machine(), "target": "ratio <= 1.3"}
        out.append(emit(f"rec_memory_{model}_peak_rss_ratio", round(peaks[large] / peaks[small], 3), "x", None,
                        {**common, "sizes": [small, large], "largest_rank_peak_rss_mb": [peaks[small], peaks[large]],
                         "runs": runs}))
    return out


if __name__ == "__main__":
    main()
