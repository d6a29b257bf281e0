"""Evaluation and registration against an ``mlflow server`` process whose artifacts live on S3
(moto's server), with the object store root on the same S3 endpoint."""

from __future__ import annotations

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from trainflow.tasks.evaluation import evaluate_step
from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.registry import GateConfig, Lineage, register_step
from trainflow.tasks.settings import get_settings
from trainflow.tasks.sharding import shard_dataset

pytestmark = pytest.mark.integration


class PopularityModel(mlflow.pyfunc.PythonModel):
    def __init__(self, popularity):
        self.popularity = popularity

    def predict(self, context, model_input, params=None):
        return np.array([self.popularity.get(int(i), 0.0) for i in model_input["item_id"]])


def test_evaluate_and_register_against_a_tracking_server_with_s3_artifacts(mlflow_server):
    uri, bucket = mlflow_server
    settings = get_settings()
    assert settings.mlflow_tracking_uri == uri and settings.storage_root.startswith("s3://")
    manifest = load_manifest(
        shard_dataset("synthetic://recommendation?num_interactions=3000&num_users=30&num_items=200", "recommendation")[
            "manifest_uri"
        ]
    )
    assert manifest.uri.startswith("s3://")
    items = manifest.read_file_table("items").to_pandas()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=PopularityModel(dict(zip(items.item_id, items.num_train_interactions.astype(float)))),
            input_example=pd.DataFrame({"user_id": [1], "item_id": [2]}),
            pip_requirements=["mlflow"],
        )
    result = evaluate_step("recommendation", info.model_uri, manifest.uri, mlflow_run_id=run.info.run_id)
    lineage = Lineage(
        dag_id="recommendation_training", run_id="server-run", try_number=1, manifest_uri=manifest.uri,
        dataset_version=manifest.version, dataset_name=manifest.name, mlflow_run_id=run.info.run_id,
        world_size=1, parallelism="none",
    )
    metrics = {**result["metrics"], "baseline_ndcg_at_10": result["metrics"]["baseline_ndcg_at_10"] - 0.01}
    out = register_step(
        model_uri=info.model_uri, registered_model_name="server-model", metrics=metrics, lineage=lineage,
        gate=GateConfig("ndcg_at_10"),
    )
    client = MlflowClient(uri)
    assert out["aliases"] == ["challenger", "champion"]
    version = client.get_model_version_by_alias("server-model", "champion")
    assert version.tags["trainflow.dataset_version"] == manifest.version
    # Plots and the model went through the server to S3.
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="mlflow-artifacts/")["Contents"]]
    assert any(k.endswith("plots/hr_at_k.png") for k in keys)
    assert any(k.endswith("MLmodel") for k in keys)
    # The registered version loads back through the server.
    loaded = mlflow.pyfunc.load_model("models:/server-model@champion")
    top = items.sort_values("num_train_interactions").item_id.iloc[-1]
    assert loaded.predict(pd.DataFrame({"user_id": [1], "item_id": [int(top)]}))[0] == items.num_train_interactions.max()
