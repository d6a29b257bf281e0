"""Faults of the services trainflow depends on, with real server processes on 127.0.0.1:
the MLflow tracking server stopped during a registration, the S3 endpoint (moto's server)
frozen in the middle of sharding. Each test checks the clear error, that nothing partial is
visible, and that a retry after the service is back completes exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.registry import TAG, GateConfig, Lineage, RegistryUnavailableError, register_step
from tasks.settings import get_settings
from tests.conftest import free_port
from tests.integration.conftest import wait_http

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
    import tasks.registry as registry

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
    real_gate = registry._apply_gate

    def server_dies_first(*args, **kwargs):
        server.stop()
        return real_gate(*args, **kwargs)

    monkeypatch.setattr(registry, "_apply_gate", server_dies_first)
    with pytest.raises(RegistryUnavailableError, match=rf"MLflow at {server.uri} unreachable while registering {name}"):
        register(1)
    monkeypatch.setattr(registry, "_apply_gate", real_gate)
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
    from tasks.storage import Storage

    assert Storage.from_settings(settings).list("locks/registry") == []  # no lease left behind
