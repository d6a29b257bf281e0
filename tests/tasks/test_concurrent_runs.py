"""Two DAG runs training at the same time stay isolated.

The DAGs set ``max_active_runs=1``, so the scheduler never runs two runs of one DAG at once;
that is the scheduler-level guarantee. This test proves the step-level one, for two runs that do
overlap (two DAGs, or a deployment that raises the limit): two real ``train_step`` calls with
different run ids, each in its own process as Airflow runs tasks, started together behind a
barrier. Each writes its own run directory and checkpoints and logs into its own MLflow run."""

from __future__ import annotations

import json
import multiprocessing
import time
import traceback

import pytest
from mlflow import MlflowClient

from trainflow.tasks.pipeline import shard_step
from trainflow.tasks.settings import get_settings

pytestmark = pytest.mark.slow

DAG_ID = "recommendation_training"
PARAMS = {
    "source_url": "synthetic://recommendation?num_interactions=3000&num_users=40&num_items=250&seed=2",
    "model": "gmf",
    "model_size": 8,
    "epochs": 2,
    "batch_size": 128,
    "parallelism": "none",
    "nproc_per_node": 1,
    "max_restarts": 0,
}


def _train(run_id, dataset, barrier, queue):
    from trainflow.tasks.pipeline import train_step

    barrier.wait(timeout=120)
    started = time.time()
    try:
        result = train_step(PARAMS, dataset, pipeline="recommendation", dag_id=DAG_ID, run_id=run_id, try_number=1)
        queue.put((run_id, started, time.time(), result, None))
    except BaseException:  # reported to the test, not lost in the child
        queue.put((run_id, started, time.time(), None, traceback.format_exc()))


def test_two_simultaneous_runs_write_separate_run_dirs_checkpoints_and_mlflow_runs(tf_env):
    settings = get_settings()
    dataset = shard_step(PARAMS, "recommendation", settings)
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    run_ids = ["manual__concurrent_a", "manual__concurrent_b"]
    procs = [ctx.Process(target=_train, args=(rid, dataset, barrier, queue)) for rid in run_ids]
    for p in procs:
        p.start()
    try:
        reports = {r[0]: r for r in (queue.get(timeout=600) for _ in run_ids)}
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rid in run_ids:
        assert reports[rid][4] is None, f"{rid} failed:\n{reports[rid][4]}"
    (_, start_a, end_a, result_a, _), (_, start_b, end_b, result_b, _) = (reports[r] for r in run_ids)
    assert start_a < end_b and start_b < end_a, "the two trainings did not overlap"

    runs_root = tf_env / "store" / "runs" / DAG_ID
    for rid, result in zip(run_ids, (result_a, result_b)):
        run_dir = runs_root / rid
        stored = json.loads((run_dir / "result.json").read_text())
        assert stored["steps"] == result["steps"] > 0
        assert stored["mlflow_run_id"] == result["mlflow_run_id"]
        assert result["run_dir"].endswith(f"/runs/{DAG_ID}/{rid}")
        assert result["checkpoint_uri"].startswith(result["run_dir"] + "/checkpoints/step-")
        committed = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/_COMMITTED"))
        assert committed, f"no committed checkpoint in {run_dir}"
        assert result["resumed_from_step"] in (None, 0)  # neither picked up the other's checkpoint
    assert result_a["mlflow_run_id"] != result_b["mlflow_run_id"]
    client = MlflowClient(settings.mlflow_tracking_uri)
    for rid, result in zip(run_ids, (result_a, result_b)):
        run = client.get_run(result["mlflow_run_id"])
        assert run.data.tags["trainflow.training_key"] == f"{DAG_ID}/{rid}"
        assert run.data.tags["trainflow.run_id"] == rid
        runs = client.search_runs([result["mlflow_experiment_id"]],
                                  filter_string=f"tags.`trainflow.training_key` = '{DAG_ID}/{rid}'")
        assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    assert result_a["model_uri"] != result_b["model_uri"]
