"""Extra links: serialised with the DAG, built from what the task persisted, empty (never an
exception) when there is nothing."""

from __future__ import annotations

import datetime as dt

import pytest

from trainflow.airflow import links
from trainflow.airflow.links import MLflowModelVersionLink, MLflowRunLink, mlflow_ui_url, persist_mlflow_links
from trainflow.airflow.operators import TrainflowStepOperator, trainflow_task


def _dag():
    from airflow.sdk import DAG

    with DAG("links_dag", start_date=dt.datetime(2026, 1, 1), schedule=None) as dag:

        @trainflow_task
        def register():
            return 1

        register()
    return dag


def test_links_survive_dag_serialization():
    from airflow.serialization.serialized_objects import DagSerialization

    dag = _dag()
    task = dag.get_task("register")
    assert isinstance(task, TrainflowStepOperator)
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag)).get_task("register")
    assert set(restored.extra_links) == {"MLflow run", "MLflow model version"}


class _Key:
    dag_id, task_id, run_id, try_number, map_index = "d", "t", "r", 1, -1


@pytest.fixture
def xcom(monkeypatch):
    store: dict = {}

    def get_value(*, key, ti_key):
        return store.get(key)

    from airflow.sdk.execution_time import xcom as xcom_module

    monkeypatch.setattr(xcom_module.XCom, "get_value", staticmethod(get_value))
    return store


def test_links_from_persisted_values(xcom, monkeypatch):
    monkeypatch.setenv("TRAINFLOW_MLFLOW_UI_URL", "http://mlflow.example:5000/")

    class TI:
        def xcom_push(self, key, value):
            xcom[key] = value

    persist_mlflow_links({"ti": TI()}, experiment_id="3", run_id="abc", model_name="trainflow recs", model_version=7)
    assert MLflowRunLink().get_link(None, ti_key=_Key()) == "http://mlflow.example:5000/#/experiments/3/runs/abc"
    assert (
        MLflowModelVersionLink().get_link(None, ti_key=_Key())
        == "http://mlflow.example:5000/#/models/trainflow%20recs/versions/7"
    )


def test_links_are_empty_without_data_or_on_errors(xcom, monkeypatch):
    assert MLflowRunLink().get_link(None, ti_key=_Key()) == ""
    assert MLflowModelVersionLink().get_link(None, ti_key=_Key()) == ""
    xcom[links.XCOM_KEY] = {"run_id": "only-run"}  # incomplete
    assert MLflowRunLink().get_link(None, ti_key=_Key()) == ""

    def boom(**kwargs):
        raise RuntimeError("xcom backend down")

    from airflow.sdk.execution_time import xcom as xcom_module

    monkeypatch.setattr(xcom_module.XCom, "get_value", staticmethod(boom))
    assert MLflowRunLink().get_link(None, ti_key=_Key()) == ""


def test_persist_never_raises():
    persist_mlflow_links({}, run_id="x")  # no "ti" in the context: logged, not raised


def test_ui_url_from_tracking_uri(monkeypatch):
    monkeypatch.delenv("TRAINFLOW_MLFLOW_UI_URL", raising=False)
    assert mlflow_ui_url("http://user:pw@mlflow:5000/") == "http://mlflow:5000"
    assert mlflow_ui_url("sqlite:///x.db") == "http://127.0.0.1:5000"


def test_plugin_registers_the_links():
    from airflow.plugins_manager import get_operator_extra_links

    names = {type(link).__name__ for link in get_operator_extra_links()}
    assert {"MLflowRunLink", "MLflowModelVersionLink"} <= names
