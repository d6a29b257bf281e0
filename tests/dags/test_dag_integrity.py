"""DAG integrity: the DagBag loads, each DAG carries what operators and users rely on, and
parsing stays cheap and side-effect free."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from trainflow.tasks.settings import PROJECT_DIR

DAGS = {
    "recommendation_training": {"shard", "train", "plan_nodes", "train_node", "evaluate", "register", "approve", "promote"},
    "driving_training": {"shard", "train", "plan_nodes", "train_node", "evaluate", "register", "approve", "promote"},
}
PRODUCER_DAGS = {
    "announce_raw_data": {"is_recommendation", "announce_recommendation", "is_driving", "announce_driving"},
    "watch_raw_data": {"detect_recommendation", "remember_recommendation", "detect_driving", "remember_driving"},
}
DAG_FILES = sorted((PROJECT_DIR / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT_DIR / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_dag_ids_and_tasks(dagbag):
    assert set(dagbag.dags) == set(DAGS) | set(PRODUCER_DAGS)
    for dag_id, task_ids in {**DAGS, **PRODUCER_DAGS}.items():
        dag = dagbag.dags[dag_id]
        assert {t.task_id for t in dag.tasks} >= task_ids
        assert dag.fileloc.endswith(f"{dag_id}.py")  # dag_id equals the file stem


@pytest.mark.parametrize("dag_id", sorted(DAGS))
def test_dag_metadata(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.owner == "trainflow"
    assert {"trainflow", "training"} <= set(dag.tags)
    assert dag.doc_md and len(dag.doc_md.strip()) > 100
    assert dag.catchup is False
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
        assert task.owner == "trainflow"


@pytest.mark.parametrize("dag_id", sorted(DAGS))
def test_every_param_is_typed_and_described(dagbag, dag_id):
    params = dagbag.dags[dag_id].params
    required = {
        "source_url", "epochs", "batch_size", "learning_rate", "nnodes", "nproc_per_node", "parallelism",
        "device", "registered_model_name", "promotion_metric", "promotion_margin",
    }
    assert required <= set(params.keys())
    for key in params.keys():
        param = params.get_param(key)
        assert param.description, f"{key} has no description"
        assert "type" in param.schema, f"{key} has no type"
    expected = ["ddp", "fsdp", "sharded_embeddings", "sharded_embeddings_a2a", "none"] if dag_id.startswith("recommendation") else [
        "ddp", "fsdp", "none"]
    assert params.get_param("parallelism").schema["enum"] == expected
    assert params.get_param("precision").schema["enum"] == ["auto", "fp32", "bf16"]
    assert params.get_param("compile").schema["type"] == "boolean"
    assert params.get_param("device").schema["enum"] == ["cpu", "cuda"]


@pytest.mark.parametrize("dag_id", sorted(DAGS))
def test_review_tasks_follow_register(dagbag, dag_id):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    dag = dagbag.dags[dag_id]
    approve, promote = dag.get_task("approve"), dag.get_task("promote")
    assert isinstance(approve, ApprovalOperator)
    assert approve.options == ["Approve", "Reject"] and approve.defaults == ["Reject"]  # safe timeout default
    assert "comment" in approve.params
    assert approve.upstream_task_ids == {"register"}
    assert promote.upstream_task_ids == {"register", "approve"}
    assert {link.name for link in approve.operator_extra_links} == {"MLflow run", "MLflow model version"}
    params = dag.params
    assert params["require_approval"] == "auto"
    assert params.get_param("require_approval").schema["enum"] == ["auto", "always", "never"]
    assert params["allow_gate_override"] is False and params["approval_timeout_hours"] == 72


@pytest.mark.parametrize(
    "conf,field",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": "ten"}, "epochs"),
        ({"parallelism": "zero3"}, "parallelism"),
        ({"device": "tpu"}, "device"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"dataset_name": "../escape"}, "dataset_name"),
        ({"require_approval": "sometimes"}, "require_approval"),
        ({"approval_timeout_hours": 0}, "approval_timeout_hours"),
    ],
)
def test_schema_rejects_bad_conf_naming_the_field(dagbag, conf, field):
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dagbag.dags["recommendation_training"].params)
    params.validate()  # the defaults are valid
    with pytest.raises(ParamValidationError, match=f"param {field}"):
        for key, value in conf.items():
            params[key] = value  # validated on assignment, as for a triggered run's conf
        params.validate()


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_parsing_imports_nothing_heavy_and_opens_no_connection(path):
    code = textwrap.dedent(
        f"""
        import socket, sys
        attempts = []
        real_connect = socket.socket.connect
        def connect(self, address):
            attempts.append(address)
            raise OSError("no connections at parse time")
        socket.socket.connect = connect
        import runpy
        runpy.run_path({str(path)!r})
        heavy = [m for m in ("torch", "mlflow", "pyarrow", "pandas", "numpy", "s3fs") if m in sys.modules]
        print("HEAVY", heavy)
        print("CONNECT", attempts)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout
    assert "CONNECT []" in out.stdout, out.stdout


@pytest.mark.parametrize("dag_id", sorted(PRODUCER_DAGS))
def test_producer_dag_metadata(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.owner == "trainflow" and {"trainflow", "raw-data"} <= set(dag.tags)
    assert dag.doc_md and "source_url" in dag.doc_md
    assert dag.catchup is False
    assert all(task.retries >= 1 for task in dag.tasks)


def _asset_uris(condition) -> set[str]:
    objects = getattr(condition, "objects", None)
    if objects is None:
        return {condition.uri}
    return set().union(*(_asset_uris(o) for o in objects))


def test_training_schedules_fire_on_time_and_on_new_raw_data(dagbag):
    """recommendation: weekly or when its raw data Asset gets an event; driving: on the event."""
    from airflow.sdk import AssetOrTimeSchedule

    rec = dagbag.dags["recommendation_training"]
    assert isinstance(rec.timetable, AssetOrTimeSchedule)
    assert rec.timetable.timetable.expression == "0 0 * * 0"  # @weekly
    assert _asset_uris(rec.timetable.asset_condition) == {"trainflow://raw/recommendation"}
    drv = dagbag.dags["driving_training"]
    assert _asset_uris(drv.timetable.asset_condition) == {"trainflow://raw/driving"}
    assert not isinstance(drv.timetable, AssetOrTimeSchedule)  # data-triggered only by default


def test_producers_emit_the_training_dags_raw_data_assets(dagbag):
    for kind in ("recommendation", "driving"):
        uri = f"trainflow://raw/{kind}"
        announce = dagbag.dags["announce_raw_data"].get_task(f"announce_{kind}")
        detect = dagbag.dags["watch_raw_data"].get_task(f"detect_{kind}")
        assert [a.uri for a in announce.outlets] == [uri] and [a.uri for a in detect.outlets] == [uri]
        assert announce.upstream_task_ids == {f"is_{kind}"}
        assert dagbag.dags["watch_raw_data"].get_task(f"remember_{kind}").upstream_task_ids == {f"detect_{kind}"}
    params = dagbag.dags["announce_raw_data"].params
    assert params.get_param("pipeline").schema["enum"] == ["driving", "recommendation"]  # the registered ones
    assert params.get_param("pipeline").value == "recommendation"


def test_schedule_settings_change_the_parsed_schedule():
    """TRAINFLOW_<PIPELINE>_SCHEDULE sets the time schedule (``none`` leaves the Asset alone)."""
    code = textwrap.dedent(
        f"""
        import runpy
        ns = runpy.run_path({str(PROJECT_DIR / "dags" / "recommendation_training.py")!r})
        print("TT", type(ns["recommendation_training"]().timetable).__name__)
        """
    )
    import os

    def parsed(value):
        env = {**os.environ, "TRAINFLOW_RECOMMENDATION_SCHEDULE": value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split("TT ", 1)[1].strip()

    assert parsed("*/5 * * * *") == "AssetOrTimeSchedule"
    assert parsed("none") == "AssetTriggeredTimetable"


@pytest.mark.parametrize("dag_id", sorted(DAGS))
def test_multi_node_wiring(dagbag, dag_id):
    """Node 0 is `train` (its result feeds evaluate); nodes 1..n-1 are the mapped `train_node`,
    in the same pool, started with it (both only wait for shard), and evaluate waits for all of
    them (none_failed: with one node train_node is skipped, being mapped over an empty list)."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    dag = dagbag.dags[dag_id]
    train, node, evaluate = dag.get_task("train"), dag.get_task("train_node"), dag.get_task("evaluate")
    assert isinstance(node, MappedOperator)
    assert node.pool == train.pool == "training"
    assert node.upstream_task_ids == {"shard", "plan_nodes"} and train.upstream_task_ids == {"shard"}
    assert dag.get_task("plan_nodes").upstream_task_ids == {"shard"}  # the run's params, as shard settled them
    assert evaluate.upstream_task_ids == {"train", "train_node"}
    assert evaluate.trigger_rule == "none_failed"
    assert dag.get_task("register").trigger_rule == "all_success"


def test_peer_node_ranks():
    from trainflow.airflow.dag_support import peer_node_ranks

    assert peer_node_ranks({}) == [] and peer_node_ranks({"nnodes": 1}) == []
    assert peer_node_ranks({"nnodes": 3}) == [1, 2]
    assert peer_node_ranks({"nnodes": 3, "launcher": "kubernetes"}) == []  # pods, not tasks
