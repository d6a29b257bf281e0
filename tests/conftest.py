"""Shared fixtures: an isolated trainflow environment and a real S3 endpoint (moto's server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from trainflow.tasks.settings import PROJECT_DIR


def pytest_configure(config):
    """Airflow for tests: a private AIRFLOW_HOME (SQLite), this project's DAGs, no examples."""
    import tempfile

    home = os.environ.get("TRAINFLOW_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="trainflow-airflow-")
    os.environ["AIRFLOW_HOME"] = home
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(PROJECT_DIR / "dags")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"

# Wall-clock bound (pytest-timeout) of the tests that start whole stacks, DAG runs, Docker builds or
# benchmarks; every other test has pyproject's `timeout` (900 s). Their own waits are shorter
# (e.g. the compose check's 50 min covers an image build from nothing).
LONG_TEST_DIRS = ("integration", "e2e", "benchmarks", "scripts")
LONG_TEST_TIMEOUT_S = 3300


def pytest_collection_modifyitems(config, items):
    tests_dir = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        try:
            top = item.path.relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        if top in LONG_TEST_DIRS:
            item.add_marker(pytest.mark.timeout(LONG_TEST_TIMEOUT_S))


SHARED_DATA = Path(os.environ.get("TRAINFLOW_SHARED_DATA") or PROJECT_DIR.parent / "shared" / "data")


def shared_dataset(name: str) -> Path:
    """Path of a real dataset under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {name!r} not found at {path} (set TRAINFLOW_SHARED_DATA to its folder)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tf_env(tmp_path, monkeypatch):
    """A private data dir and local storage root for one test; returns the data dir.

    The test runs in ``tmp_path``, so anything written relative to the working directory
    (MLflow's default ``mlruns``) stays out of the checkout.
    """
    data_dir = tmp_path / "tfdata"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINFLOW_DATA_DIR", str(data_dir))
    monkeypatch.delenv("TRAINFLOW_STORAGE_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # mlflow.set_experiment (called by in-process training runs) leaves the experiment id in
    # module state and in os.environ; a later test with a fresh store must not inherit it.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    import mlflow.tracking.fluent

    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    return data_dir


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 endpoint); yields its endpoint URL."""
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {log_path.read_text()[-2000:]}") from None
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start within 30 s")
    yield endpoint
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_env(s3_server, tf_env, monkeypatch):
    """Environment pointing trainflow's storage root at a fresh bucket on moto's server.

    Returns the bucket's root URL (``s3://bucket/trainflow``).
    """
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("TRAINFLOW_S3_MAX_ATTEMPTS", "2")
    bucket = f"tf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/trainflow"
    monkeypatch.setenv("TRAINFLOW_STORAGE_ROOT", root)
    return root


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tf_env):
    """The same test on a local folder and on S3 (moto): yields the storage root URL."""
    if request.param == "local":
        return (tf_env / "store").resolve().as_uri()
    return request.getfixturevalue("s3_env")
