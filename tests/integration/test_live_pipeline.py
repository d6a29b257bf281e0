"""``recommendation_training`` against real services (the ``live_stack`` fixture): triggered
through Airflow's REST API, run by a Celery worker, checked through MLflow's REST API and S3."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.integration.live_stack import FAST_RECOMMENDATION_CONF, AirflowAPIError

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

DAG_ID = "recommendation_training"


def test_the_run_carries_its_conf_and_every_task_succeeds(live_stack, recommendation_run):
    run = live_stack.api.dag_run(DAG_ID, recommendation_run["run_id"])
    assert run["state"] == "success"
    assert run["triggered_by"] == "rest_api" and run["triggering_user_name"] == live_stack.username
    assert run["conf"] == recommendation_run["conf"]
    instances = live_stack.api.task_instances(DAG_ID, recommendation_run["run_id"])
    # One node (train_node maps over nothing) and require_approval=never (approve/promote skipped).
    assert {ti["task_id"]: ti["state"] for ti in instances} == {
        **dict.fromkeys(("shard", "plan_nodes", "train", "evaluate", "register"), "success"),
        **dict.fromkeys(("train_node", "approve", "promote"), "skipped"),
    }
    # The tasks ran on the stack's Celery queue, training in the training pool.
    assert {ti["queue"] for ti in instances} == {live_stack.celery_queue}
    assert next(ti for ti in instances if ti["task_id"] == "train")["pool"] == "training"
    # The conf reached the trainer: 2 DDP ranks, the epochs asked for.
    train = live_stack.api.xcom(DAG_ID, recommendation_run["run_id"], "train")
    assert (train["world_size"], train["parallelism"], train["epochs"]) == (2, "ddp", FAST_RECOMMENDATION_CONF["epochs"])


def test_the_registered_model_through_mlflow_rest(live_stack, recommendation_run):
    run_id = recommendation_run["run_id"]
    name = recommendation_run["conf"]["registered_model_name"]
    model = live_stack.mlflow_get("registered-models/get", name=name)["registered_model"]
    versions = live_stack.mlflow_get("model-versions/search", filter=f"name='{name}'")["model_versions"]
    assert [v["version"] for v in versions] == ["1"]
    version = live_stack.mlflow_get("model-versions/get", name=name, version="1")["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}

    # Lineage: which DAG run, dataset and training produced it.
    shard = live_stack.api.xcom(DAG_ID, run_id, "shard")
    train = live_stack.api.xcom(DAG_ID, run_id, "train")
    assert tags["trainflow.dag_id"] == DAG_ID and tags["trainflow.run_id"] == run_id
    assert tags["trainflow.try_number"] == "1"
    assert tags["trainflow.manifest_uri"] == shard["manifest_uri"]
    assert tags["trainflow.manifest_uri"].startswith(live_stack.storage_root + "/datasets/")
    assert tags["trainflow.dataset_version"] == shard["version"]
    assert tags["trainflow.world_size"] == "2" and tags["trainflow.parallelism"] == "ddp"
    assert tags["trainflow.mlflow_run_id"] == train["mlflow_run_id"] == version["run_id"]
    assert tags["trainflow.airflow_run_url"].startswith(f"{live_stack.airflow_url}/dags/{DAG_ID}/runs/")

    # The gate, recomputed from the metrics MLflow holds for the training run: the first version
    # is compared with the baseline (ItemPop) on ndcg_at_10, margin 0.
    metrics = {m["key"]: m["value"] for m in live_stack.mlflow_get("runs/get", run_id=version["run_id"])["run"]["data"]["metrics"]}
    promoted = metrics["ndcg_at_10"] > metrics["baseline_ndcg_at_10"]
    assert tags["trainflow.decision.outcome"] == ("promoted" if promoted else "rejected")
    assert tags["trainflow.decision.compared_against"] == "baseline"
    assert float(tags["trainflow.metric.ndcg_at_10"]) == pytest.approx(metrics["ndcg_at_10"], rel=1e-5)
    expected_aliases = {"challenger", "champion"} if promoted else {"challenger"}
    assert set(version.get("aliases", [])) == expected_aliases
    assert {a["alias"]: a["version"] for a in model.get("aliases", [])} == dict.fromkeys(expected_aliases, "1")
    by_alias = live_stack.mlflow_get("registered-models/alias", name=name, alias="challenger")["model_version"]
    assert by_alias["version"] == "1"
    # Its artifacts went through the MLflow server to S3.
    assert version["source"].startswith("models:/") or version["source"].startswith("mlflow-artifacts:")
    keys = live_stack.s3_keys("mlflow-artifacts/")
    assert any(k.endswith("/MLmodel") for k in keys)
    assert any(k.endswith("plots/hr_at_k.png") for k in keys)


def test_the_dataset_manifest_and_checkpoints_are_on_s3(live_stack, recommendation_run):
    run_id = recommendation_run["run_id"]
    shard = live_stack.api.xcom(DAG_ID, run_id, "shard")
    bucket_prefix = f"s3://{live_stack.bucket}/"
    manifest_key = shard["manifest_uri"].removeprefix(bucket_prefix)
    version_dir = manifest_key.rsplit("/", 1)[0]
    s3 = live_stack.s3_client()
    manifest = json.loads(s3.get_object(Bucket=live_stack.bucket, Key=manifest_key)["Body"].read())
    keys = set(live_stack.s3_keys(version_dir + "/"))
    assert manifest["name"] == shard["name"] and manifest["version"] == shard["version"]
    assert set(manifest["splits"]) == {"train", "valid", "eval"}
    shards = [entry for split in manifest["splits"].values() for entry in split["shards"]]
    assert shards and sum(s["num_rows"] for s in manifest["splits"]["train"]["shards"]) == shard["splits"]["train"]
    for entry in shards:
        key = f"{version_dir}/{entry['path']}"
        assert key in keys, f"{key} listed in the manifest is missing on S3"
        body = s3.get_object(Bucket=live_stack.bucket, Key=key)["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["num_bytes"], entry["sha256"]), key

    train = live_stack.api.xcom(DAG_ID, run_id, "train")
    checkpoint_prefix = train["checkpoint_uri"].removeprefix(bucket_prefix)
    assert checkpoint_prefix.startswith(f"trainflow/runs/{DAG_ID}/")
    checkpoint_keys = live_stack.s3_keys(checkpoint_prefix + "/")
    assert f"{checkpoint_prefix}/_COMMITTED" in checkpoint_keys
    assert any(k.endswith(".distcp") for k in checkpoint_keys), checkpoint_keys
    marker = json.loads(s3.get_object(Bucket=live_stack.bucket, Key=f"{checkpoint_prefix}/_COMMITTED")["Body"].read())
    assert marker["step"] == train["steps"]


@pytest.mark.parametrize(
    ("conf", "field", "why"),
    [
        ({"epochs": 0}, "epochs", "less than the minimum of 1"),
        ({"model": "transformer-xl"}, "model", "is not one of"),
        ({"batch_size": "big"}, "batch_size", "is not of type 'integer'"),
        ({"source_url": ""}, "source_url", "non-empty"),
        # Not a param at all: refused by trainflow's plugin middleware on the API server.
        ({"epoch": 1}, "epoch", "unknown parameter (did you mean 'epochs'?"),
    ],
)
def test_an_invalid_conf_gets_400_naming_the_field(live_stack, conf, field, why):
    before = live_stack.api.json("GET", f"dags/{DAG_ID}/dagRuns")["total_entries"]
    with pytest.raises(AirflowAPIError) as error:
        live_stack.api.trigger(DAG_ID, {**FAST_RECOMMENDATION_CONF, **conf})
    assert error.value.status_code == 400
    detail = error.value.body["detail"]
    assert f"param {field}" in detail and why in detail, detail
    # Nothing was created.
    assert live_stack.api.json("GET", f"dags/{DAG_ID}/dagRuns")["total_entries"] == before
