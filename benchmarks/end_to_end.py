"""End to end: wall time of the recommendation DAG under ``dag.test()``, orchestration vs compute.

A fresh Airflow home (SQLite, migrated before the clock starts) and a fresh data folder; the
DAG runs in-process with ``dag.test(run_conf=...)``: shard (synthetic interactions), train
(torchrun, 2 ranks), evaluate, register, report. From the run:

- ``compute``: the trainer's ``train_seconds`` (the epochs, their valid evaluations and
  checkpoints) plus the whole ``evaluate`` task (metrics, plots): an upper bound of compute.
- ``orchestration``: everything else (DAG run, task scheduling, the torchrun launch, process
  start-up and imports, MLflow and registry calls, the shard step): total minus compute.

    python -m benchmarks.end_to_end            # 200k interactions, 2 epochs, 2 runs
    python -m benchmarks.end_to_end --quick    # 6k interactions (the e2e test's size), 1 run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import child_env, emit, machine, median, run_json


def run_dag(conf: dict, dag_id: str = "recommendation_training") -> tuple[float, dict, dict]:
    """One ``dag.test()`` run of ``dag_id`` with ``conf`` in this process's Airflow home: its wall
    seconds, task instances by id and every task's returned value (XCom) by id; raises unless it
    succeeded."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    from trainflow.tasks.settings import PROJECT_DIR

    bag = DagBag(dag_folder=str(PROJECT_DIR / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    dag = bag.dags[dag_id]
    started = time.perf_counter()
    run = dag.test(run_conf=conf)
    total = time.perf_counter() - started
    tis = {t.task_id: t for t in run.get_task_instances()}
    if run.state != DagRunState.SUCCESS:
        raise RuntimeError(f"DAG run {run.state}: {[(k, t.state) for k, t in tis.items()]}")
    xcoms = {}
    with create_session() as session:
        for task_id in tis:
            value = session.scalar(XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id,
                                                      key="return_value").with_only_columns(XComModel.value))
            xcoms[task_id] = json.loads(value) if isinstance(value, str) else value
    return total, tis, xcoms


def child(conf: dict) -> dict:
    total, tis, xcoms = run_dag(conf)
    train = xcoms["train"]
    durations = {k: round(t.duration or 0.0, 2) for k, t in tis.items()}
    compute = float(train["train_seconds"]) + durations.get("evaluate", 0.0)
    return {"total": total, "compute": compute, "orchestration": total - compute, "train_seconds": train["train_seconds"],
            "task_seconds": durations, "samples_per_s": train.get("samples_per_s"), "world_size": train.get("world_size")}


def airflow_home(tmp: str) -> dict[str, str]:
    """The environment of a fresh Airflow home (SQLite) and data folder under ``tmp``, migrated
    and with the ``training`` pool, for a child process that runs a DAG with ``dag.test()``."""
    env = child_env(AIRFLOW_HOME=f"{tmp}/airflow", AIRFLOW__CORE__DAGS_FOLDER=str(Path(__file__).parent.parent / "dags"),
                    AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__UNIT_TEST_MODE="False",
                    TRAINFLOW_DATA_DIR=f"{tmp}/data")
    for var in ("TRAINFLOW_STORAGE_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    for cmd in ([airflow, "db", "migrate"], [airflow, "pools", "set", "training", "1", "trainflow training"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd[1:])} failed: {out.stderr[-2000:]}")
    return env


def measure(conf: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-e2e-") as tmp:
        env = airflow_home(tmp)
        return run_json([sys.executable, "-m", "benchmarks.end_to_end", "--child", json.dumps(conf)], env=env, timeout=3600)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return []
    size = args.interactions or (6_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 2)
    users, items = max(60, size // 100), max(300, size // 50)
    conf = {"source_url": f"synthetic://recommendation?num_interactions={size}&num_users={users}&num_items={items}&seed=1",
            "model": "neumf", "model_size": 16, "epochs": 2, "require_approval": "never", "batch_size": 128 if args.quick else 1024}
    runs = [measure(conf) for _ in range(rounds)]
    total = median([r["total"] for r in runs])
    common = {"conf": conf, "rounds": rounds, "machine": machine(), "runs": runs}
    return [
        emit("end_to_end_total", round(total, 1), "s", None, common),
        emit("end_to_end_orchestration", round(median([r["orchestration"] for r in runs]), 1), "s", round(total, 1),
             {"baseline_is": "total wall time", "conf": conf}),
        emit("end_to_end_compute", round(median([r["compute"] for r in runs]), 1), "s", round(total, 1),
             {"baseline_is": "total wall time", "conf": conf}),
    ]


if __name__ == "__main__":
    main()
