"""An MLflow that refuses connections is declared unreachable in seconds; a timeout is left to MLflow."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.conftest import free_port
from trainflow.tasks.settings import Settings
from trainflow.tasks.tracking import TrackingServerUnreachableError, require_tracking_server


@pytest.fixture
def default_mlflow_retries(monkeypatch):
    """MLflow's own retry policy as shipped (7 retries, backoff factor 2: minutes when refused)."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


def test_refused_connection_fails_the_train_and_register_steps_in_seconds(tf_env, default_mlflow_retries):
    from trainflow.tasks.pipeline import ensure_mlflow_run
    from trainflow.tasks.registry import RegistryUnavailableError, _client

    port = free_port()  # nothing listens there
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(tf_env), "MLFLOW_TRACKING_URI": f"http://ops:pw-123@127.0.0.1:{port}"})
    started = time.monotonic()
    with pytest.raises(TrackingServerUnreachableError) as caught:
        ensure_mlflow_run(settings, "trainflow-x", "dag/run", "run", {})
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert f"MLflow at http://ops:***@127.0.0.1:{port} is unreachable: it refuses connections" in message
    assert "pw-123" not in message
    assert "MLFLOW_TRACKING_URI" in message
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="is unreachable: it refuses connections"):
        _client(settings)
    assert time.monotonic() - started < 10


def test_a_listening_server_passes_and_one_restarting_gets_a_moment(tf_env):
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_late():
        time.sleep(0.5)
        server.bind(("127.0.0.1", port))
        server.listen(4)

    thread = threading.Thread(target=listen_late)
    thread.start()
    try:
        require_tracking_server(f"http://127.0.0.1:{port}", attempts=3, delay_s=0.5)  # refused, then listening
        require_tracking_server(f"http://127.0.0.1:{port}")
    finally:
        thread.join()
        server.close()
    for uri in ("sqlite:////tmp/x.db", "file:///tmp/mlruns", "databricks"):
        require_tracking_server(uri)  # not servers: nothing to probe


def test_a_timeout_is_left_to_mlflows_retries(monkeypatch):
    calls = []

    def times_out(address, timeout):
        calls.append(address)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", times_out)
    require_tracking_server("http://10.1.2.3:5000")  # no error: MLflow's retries decide
    assert calls == [("10.1.2.3", 5000)]
