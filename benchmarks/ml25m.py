"""ML-25M scale, end to end: the recommendation DAG on a synthetic log of ML-25M's size.

25,000,000 interactions, 162,000 users, 59,000 items (MovieLens 25M: 25,000,095 ratings,
162,541 users, 59,047 movies) from ``synthetic://recommendation``; the DAG runs in a child
process with ``dag.test(run_conf=...)`` in a fresh Airflow home (SQLite) and data folder:
shard, train (torchrun, 2 ranks, NeuMF with ``row_sparse_updates``, 1 epoch), evaluate,
register. While it runs, a sampler reads every process of the run's tree once a second
(``/proc/<pid>/status`` ``VmHWM``/``VmRSS``, ``LOCAL_RANK`` from its environment) for the peak
RSS of each rank and of the DAG process while the shard task runs (the sharder runs in it).

Printed (one JSON line each): the DAG wall time, shard time, epoch time, training samples/s
(the epoch's samples over its seconds) and the loop's own samples/s (whole run), peak RSS per
rank and of the sharder, the data folder's bytes on disk, the eval metrics, the registered
model version, and the load average (start, end, highest seen).

    python -m benchmarks.ml25m                           # 25M interactions (about an hour here)
    python -m benchmarks.ml25m --interactions 300000 --users 1950   # the same model, small log
    python -m benchmarks.ml25m --quick                   # 20k interactions (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, machine
from benchmarks.end_to_end import airflow_home, run_dag

ML25M = {"interactions": 25_000_000, "users": 162_000, "items": 59_000}


def child(conf: dict) -> dict:
    total, tis, xcoms = run_dag(conf)
    tasks = {k: {"seconds": round(t.duration or 0.0, 2), "start": t.start_date.timestamp() if t.start_date else None,
                 "end": t.end_date.timestamp() if t.end_date else None} for k, t in tis.items()}
    return {"total": total, "tasks": tasks, "xcoms": xcoms}


class _Sampler(threading.Thread):
    """Peak RSS of every process under ``root`` (by VmHWM), and the root's RSS over time."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.peaks: dict[int, dict[str, Any]] = {}
        self.root_rss: list[tuple[float, float]] = []
        self.load_max = 0.0

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [psutil.Process(self.root)] + psutil.Process(self.root).children(recursive=True)
            except psutil.Error:
                return
            for proc in procs:
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                    hwm = int(fields["VmHWM"].split()[0]) / 1024
                    rss = int(fields["VmRSS"].split()[0]) / 1024
                    entry = self.peaks.get(proc.pid)
                    if entry is None:
                        environ = proc.environ()
                        entry = self.peaks[proc.pid] = {"cmd": " ".join(proc.cmdline())[:160],
                                                        "local_rank": environ.get("LOCAL_RANK"), "peak_mb": 0.0}
                    entry["peak_mb"] = max(entry["peak_mb"], hwm)
                    if proc.pid == self.root:
                        self.root_rss.append((time.time(), rss))
                except (psutil.Error, OSError, KeyError, ValueError):
                    continue
            self.load_max = max(self.load_max, os.getloadavg()[0])
            self.stop.wait(1.0)


def _du(path: str) -> dict[str, int]:
    sizes = {}
    for entry in sorted(Path(path).iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]
        sizes[entry.name] = sum(p.stat().st_blocks * 512 for p in files)
    return sizes


def measure(conf: dict, data_dir: str | None = None, timeout: float = 4 * 3600) -> dict:
    tmp = tempfile.mkdtemp(prefix="trainflow-bench-ml25m-", dir=data_dir)
    try:
        env = airflow_home(tmp)
        load_start = os.getloadavg()[0]
        log_path = f"{tmp}/dag-test.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ml25m", "--child", json.dumps(conf)], env=env,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
            sampler = _Sampler(proc.pid)
            sampler.start()
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                sampler.stop.set()
                sampler.join()
        if proc.returncode:
            raise RuntimeError(f"the DAG run failed ({proc.returncode}):\n{Path(log_path).read_text()[-4000:]}")
        lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"the DAG run printed no JSON:\n{Path(log_path).read_text()[-4000:]}")
        result = json.loads(lines[-1])
        result_files = list(Path(f"{tmp}/data").rglob("result.json"))
        history = json.loads(result_files[0].read_text())["history"] if result_files else []
        shard = result["tasks"].get("shard", {})
        sharder_rss = [rss for t, rss in sampler.root_rss if shard.get("start") and shard["start"] <= t <= shard["end"] + 1]
        ranks = sorted((e for e in sampler.peaks.values() if e["local_rank"] is not None and "trainers" in e["cmd"]),
                       key=lambda e: int(e["local_rank"]))
        return {**result, "history": history, "disk_bytes": _du(f"{tmp}/data"),
                "peak_rss_mb_per_rank": [round(e["peak_mb"]) for e in ranks],
                "sharder_peak_rss_mb": round(max(sharder_rss)) if sharder_rss else None,
                "dag_process_peak_rss_mb": round(sampler.peaks.get(proc.pid, {}).get("peak_mb", 0)),
                "load": {"start_1m": round(load_start, 2), "end_1m": round(os.getloadavg()[0], 2),
                         "max_1m": round(sampler.load_max, 2)}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--model-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", help="parent folder of the run's temporary folder (default: the system's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return []
    size = args.interactions or (20_000 if args.quick else ML25M["interactions"])
    users = args.users or (200 if args.quick else ML25M["users"])
    items = args.items or (500 if args.quick else ML25M["items"])
    batch = 256 if args.quick else args.batch_size
    conf = {"source_url": f"synthetic://recommendation?num_interactions={size}&num_users={users}&num_items={items}&seed=1",
            "model": "neumf", "model_size": args.model_size, "model_options": {"row_sparse_updates": True},
            "epochs": args.epochs, "batch_size": batch, "learning_rate": 0.001, "nproc_per_node": 2,
            "require_approval": "never"}
    started = time.monotonic()
    run = measure(conf, args.data_dir)
    train = run["xcoms"]["train"]
    shard = run["xcoms"]["shard"] or {}
    epochs = run["history"]
    epoch_seconds = sum(h["seconds"] for h in epochs) if epochs else None
    epoch_samples = train["samples"] / max(len(epochs), 1)
    common = {"conf": conf, "machine": machine(), "load": run["load"]}
    tasks = run["task_seconds"] = {k: v["seconds"] for k, v in run["tasks"].items()}
    disk = run["disk_bytes"]
    lines = [
        emit("ml25m_dag_wall", round(run["total"], 1), "s", None,
             {**common, "task_seconds": tasks, "harness_seconds": round(time.monotonic() - started, 1)}),
        emit("ml25m_shard", tasks.get("shard"), "s", None,
             {"interactions": size, "users": users, "items": items, "shard_result": _short(shard)}),
        emit("ml25m_epoch", round(epoch_seconds, 1) if epoch_seconds else None, "s", None,
             {"epochs": [{"seconds": h["seconds"], "valid": h["valid"]} for h in epochs], "steps": train["steps"],
              "train_task_seconds": tasks.get("train"), "train_seconds": train["train_seconds"]}),
        emit("ml25m_train_samples_per_s", round(epoch_samples / epoch_seconds, 1) if epoch_seconds else None,
             "samples/s", None, {"loop_samples_per_s_whole_run": train["samples_per_s"], "samples": train["samples"],
                                 "world_size": train["world_size"], "parallelism": train.get("parallelism")}),
        emit("ml25m_peak_rss_largest_rank", max(run["peak_rss_mb_per_rank"], default=None), "MB", None,
             {"peak_rss_mb_per_rank": run["peak_rss_mb_per_rank"], "sharder_peak_rss_mb": run["sharder_peak_rss_mb"],
              "dag_process_peak_rss_mb": run["dag_process_peak_rss_mb"]}),
        emit("ml25m_disk", round(sum(disk.values()) / 2**20, 1), "MiB", None,
             {"by_folder_mib": {k: round(v / 2**20, 1) for k, v in disk.items()}}),
        emit("ml25m_eval_hr_at_10", train["metrics"]["eval"].get("hr_at_10"), "HR@10", None,
             {"eval": train["metrics"]["eval"], "evaluate": _short(run["xcoms"].get("evaluate")),
              "register": _short(run["xcoms"].get("register"))}),
    ]
    return lines


def _short(value: Any) -> Any:
    """An XCom value for a result line: scalars and short strings only, nested one level."""
    if not isinstance(value, dict):
        return value if isinstance(value, int | float | str | None) else str(value)[:200]
    out = {}
    for key, item in value.items():
        if isinstance(item, int | float | bool | None) or (isinstance(item, str) and len(item) < 200):
            out[key] = item
        elif isinstance(item, dict):
            out[key] = {k: v for k, v in item.items() if isinstance(v, int | float | bool | str | None)}
    return out


if __name__ == "__main__":
    main()
