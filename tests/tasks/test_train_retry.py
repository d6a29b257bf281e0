"""The ``train`` step failed after a committed checkpoint and retried, as Airflow does with a
task that died: the retry resumes from the run's last committed step (not step 0), in the same
run directory and MLflow run, and its log says so.

Process-level: the real ``train_step`` (torchrun with 2 ranks, the recommendation trainer, the
serving export) is called twice with the same DAG run, as the two tries of one task instance;
the first try is failed by the trainer's test hook (``TRAINFLOW_TEST_FAIL_AFTER_COMMIT_STEP``)."""

from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

from trainflow.tasks.launch import read_result, run_dir_url
from trainflow.tasks.pipeline import shard_step, train_step
from trainflow.tasks.settings import get_settings

pytestmark = pytest.mark.slow

PARAMS = {
    "source_url": "synthetic://recommendation?num_interactions=4000&num_users=50&num_items=300&seed=1",
    "model": "gmf",
    "model_size": 8,
    "epochs": 2,
    "batch_size": 128,
    "nproc_per_node": 2,
    "max_restarts": 0,
}


def test_retried_train_resumes_from_the_last_committed_checkpoint(tf_env, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    settings = get_settings()
    dataset = shard_step(PARAMS, "recommendation", settings)
    ids = {"pipeline": "recommendation", "dag_id": "recommendation_training", "run_id": "manual__retry"}
    marker = tmp_path / "fault-happened"
    monkeypatch.setenv("TRAINFLOW_TEST_FAIL_AFTER_COMMIT_STEP", "1")  # the first commit: end of epoch 1
    monkeypatch.setenv("TRAINFLOW_TEST_FAULT_MARKER", str(marker))

    with pytest.raises(Exception, match="(?i)fail|exit"):
        train_step(PARAMS, dataset, try_number=1, settings=settings, **ids)
    committed_step = int(marker.read_text())
    assert committed_step > 0
    run_dir = run_dir_url(ids["dag_id"], ids["run_id"], settings)
    checkpoints = tf_env / "store" / "runs" / ids["dag_id"] / ids["run_id"] / "checkpoints"
    assert (checkpoints / f"step-{committed_step}" / "_COMMITTED").exists()
    assert not (tf_env / "store" / "runs" / ids["dag_id"] / ids["run_id"] / "result.json").exists()

    caplog.clear()
    result = train_step(PARAMS, dataset, try_number=2, settings=settings, **ids)
    assert result["resumed_from_step"] == committed_step
    assert result["steps"] == 2 * committed_step  # one epoch done before the fault, one after
    assert result["try_number"] == 2
    assert any(f"training resumed from the committed checkpoint at step {committed_step}" in r.getMessage()
               and "(try 2)" in r.getMessage() for r in caplog.records)
    assert read_result(run_dir, settings)["resumed_from_step"] == committed_step
    # Both tries logged into one MLflow run (found again by the DAG run's training key).
    client = MlflowClient(settings.mlflow_tracking_uri)
    runs = client.search_runs([result["mlflow_experiment_id"]],
                              filter_string="tags.`trainflow.training_key` = 'recommendation_training/manual__retry'")
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
