"""The live stack's own promises: a failed start says why (with the log tail) and leaves nothing
behind (processes, databases)."""

from __future__ import annotations

import psutil
import pytest

from tests.integration.live_stack import LiveStack, StackError, services_unavailable

pytestmark = [pytest.mark.integration]


def _databases() -> set[str]:
    import psycopg2

    from tests.integration.live_stack import POSTGRES_DSN

    with psycopg2.connect(f"{POSTGRES_DSN}/postgres", connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        return {row[0] for row in cur.fetchall()}


def test_a_failed_start_reports_the_log_and_cleans_up(tmp_path):
    reason = services_unavailable("LocalExecutor")
    if reason:
        pytest.skip(reason)
    # The metadata DB points at a database that does not exist: `airflow db migrate` fails after
    # moto and the MLflow server were started and both databases created.
    stack = LiveStack(tmp_path, executor="LocalExecutor", extra_env={
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://postgres@127.0.0.1:5432/tf_no_such_database",
    })
    with pytest.raises(StackError, match="db-migrate failed") as error:
        stack.start(timeout=300)
    assert 'database "tf_no_such_database" does not exist' in str(error.value)
    assert (tmp_path / "logs" / "db-migrate.log").exists() and (tmp_path / "logs" / "mlflow.log").exists()
    # Nothing left: the databases are dropped, every process it started is gone.
    assert not {stack.airflow_db, stack.mlflow_db} & _databases()
    assert stack.services == {}
    mine = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
            or f"--port {stack.mlflow_port}" in " ".join(p.info["cmdline"] or [])
            or f"-p {stack.s3_port}" in " ".join(p.info["cmdline"] or [])]
    assert mine == [], [p.info["cmdline"] for p in mine]
    stack.stop()  # a second stop is harmless
