"""Peak RSS of sharding synthetic interaction logs of growing size (must stay flat).

Each size runs in a fresh process; the peak resident set size of that process is reported.
Users and items are fixed across sizes: the sharder keeps per-user state (the NCF protocol
holds out each user's latest interaction and samples its negatives), so memory is bounded by
the number of users and one block of rows, not by the number of interactions.

    python -m benchmarks.sharding_memory                 # 1M and 10M interactions
    python -m benchmarks.sharding_memory --quick         # 100k and 300k (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import emit, machine

CHILD = """
import json, resource, sys, time
from trainflow.tasks.sharding import shard_dataset
t = time.monotonic()
s = shard_dataset(sys.argv[1], "recommendation")
print(json.dumps({"seconds": time.monotonic() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": s["stats"]["num_interactions"], "train_shards": s["splits"]["train"]}))
"""


def measure(num_interactions: int, num_users: int, num_items: int) -> dict:
    url = f"synthetic://recommendation?num_interactions={num_interactions}&num_users={num_users}&num_items={num_items}"
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-") as data_dir:
        env = {**os.environ, "TRAINFLOW_DATA_DIR": data_dir}
        env.pop("TRAINFLOW_STORAGE_ROOT", None)
        out = subprocess.run([sys.executable, "-c", CHILD, url], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    args = parser.parse_args(argv)
    small, large = (100_000, 300_000) if args.quick else (1_000_000, 10_000_000)
    users = min(args.users, small // 10)
    results = {}
    for size in (small, large):
        started = time.monotonic()
        results[size] = measure(size, users, args.items)
        results[size]["wall_seconds"] = round(time.monotonic() - started, 2)
    base = results[small]["peak_rss_mb"]
    lines = []
    for size in (small, large):
        r = results[size]
        lines.append(
            emit(
                f"sharding_peak_rss_{size}",
                round(r["peak_rss_mb"], 1),
                "MB",
                round(base, 1),
                {
                    "interactions": r["rows"],
                    "users": users,
                    "items": args.items,
                    "sharding_seconds": round(r["seconds"], 2),
                    "rows_per_second": round(r["rows"] / r["seconds"]),
                    "machine": machine(),
                },
            )
        )
    return lines


if __name__ == "__main__":
    main()
