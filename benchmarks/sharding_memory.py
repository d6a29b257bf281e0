"""Peak RSS of sharding synthetic interaction logs of growing size (must stay flat).

Each size runs in a fresh process; the peak resident set size of that process is reported.
Two sweeps: interactions (1M and 10M, users and items fixed) and users (``--users-sweep``:
20k, 200k and 2M users with ``--per-user`` interactions each, items fixed). The NCF protocol
holds out each user's latest interaction and samples its negatives; the sharder does that one
block of users at a time from files on disk (split version 2), so memory is one block of rows
and one block of users plus a few numbers per user, in neither the interactions nor the
users' negatives.

    python -m benchmarks.sharding_memory                         # 1M and 10M interactions
    python -m benchmarks.sharding_memory --users-sweep           # 20k, 200k, 2M users x 10
    python -m benchmarks.sharding_memory --users-sweep 10000000 --per-user 5   # one size
    python -m benchmarks.sharding_memory --quick                 # 100k and 300k; 2k and 20k users
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
from trainflow.tasks.manifest import load_manifest
m = load_manifest(s["manifest_uri"])
nbytes = {split: sum(x.num_bytes for x in m.shards(split)) for split in m.splits}
print(json.dumps({"seconds": time.monotonic() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": s["stats"]["num_interactions"], "train_shards": s["splits"]["train"],
                  "users": s["stats"]["num_users"], "shard_bytes": nbytes}))
"""


def measure(num_interactions: int, num_users: int, num_items: int, tmp_parent: str | None = None) -> dict:
    url = f"synthetic://recommendation?num_interactions={num_interactions}&num_users={num_users}&num_items={num_items}"
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-", dir=tmp_parent) as data_dir:
        env = {**os.environ, "TRAINFLOW_DATA_DIR": data_dir, "TMPDIR": data_dir}
        env.pop("TRAINFLOW_STORAGE_ROOT", None)
        out = subprocess.run([sys.executable, "-c", CHILD, url], env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"sharding {url} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def users_sweep(sizes: list[int], per_user: int, items: int, tmp_parent: str | None) -> list[dict]:
    lines, base = [], None
    for users in sizes:
        started = time.monotonic()
        r = measure(users * per_user, users, items, tmp_parent)
        base = base or r["peak_rss_mb"]
        lines.append(emit(f"sharding_peak_rss_users_{users}", round(r["peak_rss_mb"], 1), "MB", round(base, 1), {
            "users": r["users"], "users_asked": users, "interactions": r["rows"], "items": items,
            "sharding_seconds": round(r["seconds"], 2), "wall_seconds": round(time.monotonic() - started, 2),
            "rows_per_second": round(r["rows"] / r["seconds"]),
            "shard_mb": {k: round(v / 2**20, 1) for k, v in r["shard_bytes"].items()}, "machine": machine()}))
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users-sweep", type=int, nargs="*", help="numbers of users (default 20k 200k 2M)")
    parser.add_argument("--per-user", type=int, default=10, help="interactions per user in the users sweep")
    parser.add_argument("--tmp", help="parent folder of the temporary data folders (default: the system's)")
    args = parser.parse_args(argv)
    if args.users_sweep is not None:
        return users_sweep(args.users_sweep or [20_000, 200_000, 2_000_000], args.per_user, args.items, args.tmp)
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
    if args.quick:
        lines += users_sweep([2_000, 20_000], args.per_user, args.items, args.tmp)
    return lines


if __name__ == "__main__":
    main()
