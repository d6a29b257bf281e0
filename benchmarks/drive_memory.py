"""Rank memory flat in the data, driving family: the largest rank's peak RSS at two sizes of a
synthetic scenario set (the same model), 2 ranks, 1 epoch.

Runs ``benchmarks/_drive_run.py`` (the DAG's trainer path: streamed train split, DDP,
evaluation, checkpoint, export) at 2,000 and 20,000 scenarios and reports the largest rank's
peak RSS (``ru_maxrss``) at each; the target is a ratio within 1.3.

    python -m benchmarks.drive_memory                  # 2,000 and 20,000 scenarios
    python -m benchmarks.drive_memory --quick          # 200 and 2,000
"""

from __future__ import annotations

import argparse
import sys

from benchmarks._data import cache_dir
from benchmarks.common import child_env, emit, machine, run_json


def manifest_uri(num_sequences: int) -> str:
    from trainflow.tasks.settings import Settings
    from trainflow.tasks.sharding import shard_dataset

    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(cache_dir() / "drivedata")})
    return shard_dataset(f"synthetic://driving?num_sequences={num_sequences}", "driving", settings=settings)["manifest_uri"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs=2)
    args = parser.parse_args(argv)
    small, large = args.sizes or ((200, 2_000) if args.quick else (2_000, 20_000))
    peaks, runs = {}, {}
    for size in (small, large):
        uri = manifest_uri(size)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "benchmarks._drive_run", uri]
        runs[size] = run_json(cmd, env=child_env(OMP_NUM_THREADS="1"), timeout=3600)
        peaks[size] = max(runs[size]["peak_rss_mb_per_rank"])
    return [emit("drive_memory_peak_rss_ratio", round(peaks[large] / peaks[small], 3), "x", None,
                 {"scenarios": [small, large], "processes": 2, "epochs": 1, "machine": machine(),
                  "target": "ratio <= 1.3", "largest_rank_peak_rss_mb": [peaks[small], peaks[large]], "runs": runs})]


if __name__ == "__main__":
    main()
