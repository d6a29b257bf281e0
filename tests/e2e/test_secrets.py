"""A whole pipeline run with known fake secrets: they must appear nowhere a user or an
operator can read: task output (the task logs), the Airflow log folder, MLflow params, tags,
descriptions and artifacts, or any object in the store (manifest, checkpoints, result.json,
report.json, the exported model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from trainflow.tasks.settings import get_settings

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

ENV_KEY_ID, ENV_SECRET = "AKIAENVFAKEKEY7Q2W", "env-secret-V8xq2LmZ0pTr"
CONN_KEY_ID, CONN_SECRET = "AKIACONNFAKEKEY3K9J", "conn-secret-Hh4nB7sQwE1y"
MLFLOW_USER, MLFLOW_PASSWORD = "mlflow-user-fake", "mlflow-pass-R5tY8uIo2"
SECRETS = [ENV_SECRET, CONN_KEY_ID, CONN_SECRET, MLFLOW_PASSWORD]

CONF = {
    "require_approval": "never",  # a manual run would wait for a reviewer
    "source_url": "synthetic://recommendation?num_interactions=3000&num_users=40&num_items=300&seed=2",
    "model": "gmf",
    "model_size": 8,
    "epochs": 1,
    "batch_size": 128,
}


def _leaks(data: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in data]


def test_pipeline_run_leaks_no_secret(dagbag, s3_env, capfd, monkeypatch):
    from airflow.utils.state import DagRunState

    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    bucket = s3_env.split("/")[2]
    # The environment holds one pair of keys, the Airflow connection (which wins) another;
    # moto accepts any keys, so the run really authenticates with the connection's.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("TRAINFLOW_AWS_CONN_ID", "trainflow_test_s3")
    monkeypatch.setenv("AIRFLOW_CONN_TRAINFLOW_TEST_S3", json.dumps({
        "conn_type": "aws", "login": CONN_KEY_ID, "password": CONN_SECRET,
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    monkeypatch.setenv("TRAINFLOW_S3_MAX_ATTEMPTS", "3")

    run = dagbag.dags["recommendation_training"].test(run_conf=CONF)
    out, err = capfd.readouterr()
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert run.state == DagRunState.SUCCESS, (states, (out + err)[-3000:])
    # The tasks resolve S3 credentials with this function: here it picks the connection's keys.
    from trainflow.airflow.dag_support import settings_with_connections

    assert settings_with_connections().s3.access_key_id == CONN_KEY_ID

    assert set(_leaks(json.dumps(dict(os.environ)).encode())) == set(SECRETS)  # the scan can see them

    # 1. Everything the tasks printed (their logs), and the Airflow log folder.
    assert _leaks((out + err).encode()) == []
    for path in Path(os.environ["AIRFLOW_HOME"]).rglob("*.log"):
        assert _leaks(path.read_bytes()) == [], path
    # 2. Every object in the store: manifest, shards, checkpoints, result.json, report.json, model.
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.endswith("_manifest.json") for k in keys) and any(k.endswith("report.json") for k in keys)
    assert any(k.endswith("result.json") for k in keys) and any("/checkpoints/" in k for k in keys)
    for key in keys:
        assert _leaks(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) == [], key
    # 3. MLflow: params, tags and metrics of the training run; versions' tags and model cards.
    settings = get_settings()
    client = MlflowClient(settings.mlflow_tracking_uri)
    for experiment in client.search_experiments():
        for mlflow_run in client.search_runs([experiment.experiment_id]):
            text = json.dumps([mlflow_run.data.params, mlflow_run.data.tags, mlflow_run.info.artifact_uri])
            assert _leaks(text.encode()) == [], mlflow_run.info.run_id
            assert mlflow_run.data.params, "the training run logged its params"
    versions = client.search_model_versions("name='trainflow-recommendation'")
    assert versions
    for version in versions:
        assert _leaks(json.dumps([version.tags, version.description, version.source]).encode()) == []
    # MLflow's local artifacts (the logged model, plots) and its database file.
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            assert _leaks(path.read_bytes()) == [], path
