"""Whole DAG runs under ``dag.test()`` on small data: files, MLflow runs and registry state."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import get_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REC_CONF = {
    "source_url": "synthetic://recommendation?num_interactions=6000&num_users=60&num_items=300&seed=1",
    "model": "neumf",
    "model_size": 16,
    "epochs": 2,
    "batch_size": 128,
    "require_approval": "never",  # dag.test() runs are manual; the gate alone decides here
}


def _xcom(run, task_id):
    ti = next(t for t in run.get_task_instances() if t.task_id == task_id)
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = session.scalar(
            XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id, key="return_value")
            .with_only_columns(XComModel.value)
        )
    assert ti.state == "success", f"{task_id} is {ti.state}"
    return json.loads(value) if isinstance(value, str) else value


def _run(dag, conf):
    from airflow.utils.state import DagRunState

    run = dag.test(run_conf=conf)
    assert run.state == DagRunState.SUCCESS, [(t.task_id, t.state) for t in run.get_task_instances()]
    return run


def test_recommendation_pipeline_twice(dagbag, tf_env):
    settings = get_settings()
    dag = dagbag.dags["recommendation_training"]
    first = _run(dag, REC_CONF)
    shard, train, evaluation, register = (_xcom(first, t) for t in ("shard", "train", "evaluate", "register"))
    # The dataset version, its manifest and the run directory with a committed checkpoint.
    manifest = load_manifest(shard["manifest_uri"])
    assert shard["cache_hit"] is False and manifest.num_rows("eval") == 60
    run_dir = tf_env / "store" / "runs" / "recommendation_training" / first.run_id
    assert (run_dir / "result.json").exists() and (run_dir / "model" / "model.pt").exists()
    assert any((p / "_COMMITTED").exists() for p in (run_dir / "checkpoints").iterdir())
    assert train["world_size"] == 2 and train["parallelism"] == "ddp" and train["epochs"] == 2
    # MLflow: the run holds the metrics and plots of the evaluation.
    client = MlflowClient(settings.mlflow_tracking_uri)
    logged = client.get_run(train["mlflow_run_id"]).data.metrics
    assert logged["hr_at_10"] == pytest.approx(evaluation["metrics"]["hr_at_10"])
    assert "baseline_ndcg_at_10" in logged
    assert {a.path for a in client.list_artifacts(train["mlflow_run_id"], "plots")} >= {"plots/hr_at_k.png"}
    # Registry: version 1 with lineage; champion only if it beat ItemPop.
    name = "trainflow-recommendation"
    assert register["version"] == 1
    v1 = client.get_model_version(name, "1")
    assert v1.tags["trainflow.dataset_version"] == shard["version"]
    assert v1.tags["trainflow.run_id"] == first.run_id
    beat_baseline = evaluation["metrics"]["ndcg_at_10"] > evaluation["metrics"]["baseline_ndcg_at_10"]
    assert ("champion" in register["aliases"]) == beat_baseline
    assert v1.tags["trainflow.decision.outcome"] == ("promoted" if beat_baseline else "rejected")
    # No approval asked: the review tasks are skipped, the gate's decision stands.
    states = {t.task_id: t.state for t in first.get_task_instances()}
    assert states["approve"] == "skipped" and states["promote"] == "skipped"
    assert register["approval"]["required"] is False
    assert register["approval"]["timeout_hours"] == 72  # the run's own (what approve would wait)

    # A second run: the shard cache is hit, a new version goes through the gate.
    second = _run(dag, REC_CONF)
    shard2, register2 = _xcom(second, "shard"), _xcom(second, "register")
    assert shard2["cache_hit"] is True and shard2["version"] == shard["version"]
    assert register2["version"] == 2 and "challenger" in register2["aliases"]
    v2 = client.get_model_version(name, "2")
    expected_against = "champion v1" if beat_baseline else "baseline"
    assert v2.tags["trainflow.decision.compared_against"] == expected_against
    assert len(client.search_model_versions(f"name='{name}'")) == 2


def test_invalid_params_are_rejected_by_the_schema(dagbag, tf_env):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError, match="epochs"):
        dagbag.dags["recommendation_training"].test(run_conf={**REC_CONF, "epochs": -1})
    assert not (tf_env / "store").exists()


def test_cross_field_check_fails_the_first_task_naming_the_field(dagbag, tf_env, capfd):
    from airflow.utils.state import DagRunState

    run = dagbag.dags["recommendation_training"].test(run_conf={**REC_CONF, "nproc_per_node": 64})
    assert run.state == DagRunState.FAILED
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert states["shard"] == "failed" and states["train"] in ("upstream_failed", None)
    out, err = capfd.readouterr()
    assert "param 'nproc_per_node': 64 processes per node but this machine has" in out + err
    assert not (tf_env / "store").exists()


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"model_options": {"dropuot": 0.1}}, "param 'model_options': 'dropuot' is no setting of RecommendationConfig"),
        ({"batch_size": 127}, "param 'batch_size': 127 is not a multiple of the world size 2"),
    ],
)
def test_a_bad_run_config_fails_the_first_task_once_before_any_launch(dagbag, tf_env, capfd, conf, message):
    """What only torchrun found before (and Airflow and torchrun retried, up to 6 launches) fails
    the first task at once: one try, no retry, nothing launched, the field named."""
    from airflow.utils.state import DagRunState

    run = dagbag.dags["recommendation_training"].test(run_conf={**REC_CONF, **conf})
    assert run.state == DagRunState.FAILED
    tis = {t.task_id: t for t in run.get_task_instances()}
    assert tis["shard"].state == "failed" and tis["shard"].try_number == 1
    assert tis["train"].state in ("upstream_failed", None)
    out, err = capfd.readouterr()
    assert message in out + err
    assert not (tf_env / "store").exists()  # no run directory, no run_config.json: nothing launched


def test_driving_pipeline(dagbag, tf_env):
    settings = get_settings()
    conf = {"source_url": "synthetic://driving?num_sequences=150&seed=3", "epochs": 2, "model_size": 32, "batch_size": 64,
            "require_approval": "never"}
    run = _run(dagbag.dags["driving_training"], conf)
    shard, train, evaluation, register = (_xcom(run, t) for t in ("shard", "train", "evaluate", "register"))
    assert shard["splits"]["eval"] > 0 and train["world_size"] == 2
    metrics = evaluation["metrics"]
    assert {"ade", "fde", "miss_rate", "ade_1s", "fde_3s", "baseline_ade"} <= set(metrics)
    assert metrics["num_samples"] == shard["splits"]["eval"]
    client = MlflowClient(settings.mlflow_tracking_uri)
    assert {a.path for a in client.list_artifacts(train["mlflow_run_id"], "plots")} >= {
        "plots/error_vs_horizon.png",
        "plots/trajectories.png",
    }
    version = client.get_model_version("trainflow-driving", str(register["version"]))
    beat = metrics["ade"] < metrics["baseline_ade"]
    assert version.tags["trainflow.decision.outcome"] == ("promoted" if beat else "rejected")
    assert ("champion" in register["aliases"]) == beat
    report = json.loads((tf_env / "store" / "runs" / "driving_training" / run.run_id / "report.json").read_text())
    assert report["registry"]["version"] == register["version"]
