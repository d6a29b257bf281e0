"""Real services started by the fixtures: an ``mlflow server`` process on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s: {log_path.read_text()[-3000:]}")


@pytest.fixture
def mlflow_server(s3_env, tmp_path, monkeypatch):
    """``mlflow server`` with a SQLite backend store and artifacts proxied to S3 (moto's
    server); sets MLFLOW_TRACKING_URI for the test. Yields (tracking URI, artifact bucket)."""
    bucket = s3_env.split("/")[2]
    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL_S3"]}
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                mlflow_bin, "server",
                "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow-server.db'}",
                "--artifacts-destination", f"s3://{bucket}/mlflow-artifacts",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, log_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("TRAINFLOW_MLFLOW_ARTIFACT_ROOT", raising=False)
        yield uri, bucket
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
