"""Real services started by the fixtures: an ``mlflow server`` process on 127.0.0.1, the whole
production shape (``live_stack``: Airflow + Celery + PostgreSQL + MLflow + S3) and a headless
Chromium (``browser``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration import browser as browser_helpers
from tests.integration.live_stack import LiveStack, services_unavailable


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


def _required(name: str) -> bool:
    """CI (``.ci/run`` sets these) fails instead of skipping when a service or tool is missing."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory):
    """The production shape, once per test session: Airflow api-server, scheduler, dag-processor,
    triggerer and a Celery worker (concurrency 2) on a private PostgreSQL database and the
    machine's Redis, an ``mlflow server`` (PostgreSQL backend, artifacts on S3), moto's S3 server
    holding ``TRAINFLOW_STORAGE_ROOT``. Yields a started :class:`LiveStack`; everything is killed
    and the databases dropped at the end of the session, also after a failure.

    ``TRAINFLOW_LIVE_STACK_EXECUTOR=LocalExecutor`` runs it without Celery. Skips when PostgreSQL
    or Redis is not reachable, unless ``TRAINFLOW_REQUIRE_LIVE_STACK=1`` (CI), which fails instead.
    """
    executor = os.environ.get("TRAINFLOW_LIVE_STACK_EXECUTOR", "CeleryExecutor")
    reason = services_unavailable(executor)
    if reason:
        if _required("TRAINFLOW_REQUIRE_LIVE_STACK"):
            pytest.fail(f"live stack: {reason}")
        pytest.skip(f"live stack: {reason}")
    stack = LiveStack(tmp_path_factory.mktemp("live-stack"), executor=executor)
    stack.start()
    print(f"\nlive stack up in {stack.startup_seconds:.0f} s: Airflow {stack.airflow_url}, MLflow {stack.mlflow_url}, "
          f"logs {stack.log_dir}")
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests save screenshots and other artifacts: ``TRAINFLOW_TEST_ARTIFACTS`` or the
    checkout's ``test-artifacts/`` (gitignored)."""
    return browser_helpers.artifacts_dir()


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, driven by Selenium through Debian's chromedriver (nothing is
    downloaded), window 1440x900. Skips when they are not installed, unless
    ``TRAINFLOW_REQUIRE_BROWSER=1`` (CI), which fails instead."""
    reason = browser_helpers.browser_unavailable()
    if reason:
        if _required("TRAINFLOW_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    driver = browser_helpers.start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def recommendation_run(live_stack):
    """One ``recommendation_training`` run triggered through the REST API with
    :data:`LIVE_RECOMMENDATION_CONF` and finished successfully; shared by the tests of a session
    (REST, S3 and UI checks of the same run). Returns ``{"run_id", "conf", "seconds"}``."""
    import time as _time

    from tests.integration.live_stack import LIVE_RECOMMENDATION_CONF

    started = _time.monotonic()
    run_id = live_stack.api.trigger("recommendation_training", LIVE_RECOMMENDATION_CONF)
    live_stack.api.wait_for_run("recommendation_training", run_id, timeout=1200)
    return {"run_id": run_id, "conf": dict(LIVE_RECOMMENDATION_CONF), "seconds": _time.monotonic() - started}
