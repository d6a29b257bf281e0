from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def airflow_db():
    """The test AIRFLOW_HOME's SQLite metadata DB, migrated once per session."""
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pool = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "airflow"), "pools", "set", "training", "1", "trainflow training"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pool.returncode == 0, pool.stderr[-2000:]
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture
def dagbag(airflow_db):
    """A freshly parsed DagBag per test: ``dag.test(run_conf=...)`` applies the conf to the DAG
    object's params, so a shared DAG would carry one test's conf into the next."""
    from airflow.dag_processing.dagbag import DagBag

    from trainflow.tasks.settings import PROJECT_DIR

    bag = DagBag(dag_folder=str(PROJECT_DIR / "dags"))
    assert bag.import_errors == {}
    return bag
