"""Faults of the services trainflow depends on, with real server processes on 127.0.0.1:
the MLflow tracking server stopped during a registration, the S3 endpoint (moto's server)
frozen in the middle of sharding. Each test checks the clear error, that nothing partial is
visible, and that a retry after the service is back completes exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import free_port
from tests.integration.conftest import wait_http
from trainflow.tasks.registry import TAG, GateConfig, Lineage, RegistryUnavailableError, register_step
from trainflow.tasks.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class ConstantModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return np.zeros(len(model_input))


class MlflowServer:
    """``mlflow server`` (SQLite backend, local artifacts) that a test can stop and restart on
    the same port; its state survives a restart, as a real server's database does."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log_path = self.folder / "mlflow-server.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
                 "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                 "--artifacts-destination", (self.folder / "artifacts").as_uri(),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_http(f"{self.uri}/health", self.proc, log_path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def restartable_mlflow(tf_env, tmp_path, monkeypatch):
    server = MlflowServer(tmp_path)
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("TRAINFLOW_MLFLOW_ARTIFACT_ROOT", raising=False)
    # Fail within seconds when the server is gone (MLflow's default retries take minutes).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        yield server
    finally:
        server.stop()


def test_mlflow_stopped_during_registration_then_the_retry_registers_once(restartable_mlflow, monkeypatch):
    import trainflow.tasks.registry as registry

    server = restartable_mlflow
    settings = get_settings()
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_experiment("faults")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=ConstantModel(), pip_requirements=["mlflow"],
                                       input_example=pd.DataFrame({"user_id": [1], "item_id": [2]}))
    lineage = Lineage(dag_id="recommendation_training", run_id="manual__faults", try_number=1,
                      manifest_uri="file:///m/_manifest.json", dataset_version="d1", dataset_name="x",
                      mlflow_run_id=run.info.run_id, world_size=1, parallelism="none")
    name = "trainflow-faults"

    def register(try_number):
        return register_step(
            model_uri=info.model_uri, registered_model_name=name,
            metrics={"ndcg_at_10": 0.3, "baseline_ndcg_at_10": 0.1}, lineage=lineage,
            gate=GateConfig("ndcg_at_10"), settings=settings,
        )

    # Try 1: the server goes away after the version was created, before the gate decided.
    real_gate = registry._gate_verdict

    def server_dies_first(*args, **kwargs):
        server.stop()
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(registry, "_gate_verdict", server_dies_first)
    with pytest.raises(RegistryUnavailableError, match=rf"MLflow at {server.uri} unreachable while registering {name}"):
        register(1)
    monkeypatch.setattr(registry, "_gate_verdict", real_gate)
    # Still down: the retry fails the same clear way (and does not mistake it for "no version yet").
    with pytest.raises(RegistryUnavailableError, match="unreachable"):
        register(2)

    # The server is back (same port, same database): the retry finishes the registration once.
    server.start()
    done = register(3)
    assert done["version"] == 1 and done["created"] is False  # found by its training key
    assert done["decision"]["outcome"] == "promoted" and "champion" in done["aliases"]
    again = register(4)
    assert again["version"] == 1 and again["decision"] == done["decision"]
    client = MlflowClient(server.uri)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    assert versions[0].tags[TAG + "training_key"] == "recommendation_training/manual__faults"
    assert versions[0].tags[TAG + "decision.outcome"] == "promoted"
    from trainflow.tasks.storage import Storage

    assert Storage.from_settings(settings).list("locks/registry") == []  # no lease left behind


@pytest.fixture
def own_s3(tf_env, monkeypatch):
    """A moto S3 server of this test alone (it gets frozen), a bucket, trainflow pointed at it."""
    import time

    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                             aws_access_key_id="k", aws_secret_access_key="s").create_bucket(Bucket="faults")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL_S3": endpoint, "TRAINFLOW_S3_MAX_ATTEMPTS": "2",
                           "TRAINFLOW_S3_CONNECT_TIMEOUT": "1", "TRAINFLOW_S3_READ_TIMEOUT": "2",
                           "TRAINFLOW_S3_OPERATION_TIMEOUT": "15",
                           "TRAINFLOW_STORAGE_ROOT": "s3://faults/root"}.items():
            monkeypatch.setenv(key, value)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_s3_endpoint_stopped_mid_sharding_fails_clearly_then_the_retry_completes(own_s3, tmp_path, monkeypatch):
    import dataclasses

    from trainflow.tasks.manifest import MANIFEST_NAME, load_manifest
    from trainflow.tasks.sharding import ShardingConfig, ShardWriter, shard_dataset
    from trainflow.tasks.storage import Storage, StorageUnavailableError

    source = "synthetic://recommendation?num_interactions=6000&num_users=60&num_items=400&seed=3"
    config = ShardingConfig(target_shard_bytes=20_000, row_group_rows=500)
    local = dataclasses.replace(get_settings(), storage_root=(tmp_path / "reference").as_uri())
    reference = load_manifest(shard_dataset(source, "recommendation", config=config, settings=local)["manifest_uri"], local)

    real_close = ShardWriter._close_shard
    closes = {"n": 0}
    root = Storage.from_settings(get_settings())
    version_dir = f"datasets/{reference.name}/{reference.version}"

    def endpoint_stops_at_the_third_shard(self):
        if self._writer is not None:
            closes["n"] += 1
            if closes["n"] == 3:
                # Shards are published on a background thread: let the first one land (on a
                # loaded machine it may still be in flight), so that the retry meets leftovers.
                deadline = time.monotonic() + 60
                while not root.list(version_dir, recursive=True) and time.monotonic() < deadline:
                    time.sleep(0.1)
                os.killpg(own_s3.pid, signal.SIGSTOP)  # the endpoint hangs: connections time out
        return real_close(self)

    monkeypatch.setattr(ShardWriter, "_close_shard", endpoint_stops_at_the_third_shard)
    with pytest.raises(StorageUnavailableError,
                       match=r"object store unreachable: upload s3://faults/root/datasets/.*part-0000\d\.parquet.*2 attempts"):
        shard_dataset(source, "recommendation", config=config)
    monkeypatch.setattr(ShardWriter, "_close_shard", real_close)
    os.killpg(own_s3.pid, signal.SIGCONT)  # the endpoint is back, with what it had stored

    assert root.list(version_dir, recursive=True), "the shards written before the stop are there"
    assert not root.exists(f"{version_dir}/{MANIFEST_NAME}")  # no reader sees the partial version
    retried = shard_dataset(source, "recommendation", config=config)
    assert retried["cache_hit"] is False and retried["version"] == reference.version
    manifest = load_manifest(retried["manifest_uri"])
    for split in reference.splits:
        assert [s.sha256 for s in manifest.shards(split)] == [s.sha256 for s in reference.shards(split)]
    assert manifest.read_table("train").num_rows == reference.num_rows("train")
