"""Dataset names, DAG ids and run ids never escape ``{root}``: no ``..``, no absolute paths,
no separators, whether plain, URL-encoded or anything else (property-based)."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainflow.tasks.launch import run_dir_url
from trainflow.tasks.settings import get_settings
from trainflow.tasks.sharding import shard_dataset
from trainflow.tasks.storage import Storage, safe_name

ESCAPES = ["..", "../x", "a/../../b", "/etc", "/tmp/x", "a/b", "a\\b", "%2e%2e", "%2e%2e%2fetc", "..%2fetc",
           "%2Fetc", "x\x00y", "~root", ".", ".hidden", "", "s3://other/bucket", "file:///etc"]


@pytest.mark.parametrize("bad", [e for e in ESCAPES if e])  # empty: the name is derived from the source
def test_dataset_names_that_escape_are_rejected_before_any_write(tf_env, bad):
    with pytest.raises(ValueError, match="dataset name"):
        shard_dataset("synthetic://recommendation?num_interactions=3000&num_users=50&num_items=300", "recommendation",
                      name=bad)
    assert not (tf_env / "store").exists()


@pytest.mark.parametrize("bad", ESCAPES)
def test_run_ids_and_dag_ids_that_escape_are_rejected(tf_env, bad):
    with pytest.raises(ValueError, match="run_id"):
        run_dir_url("recommendation_training", bad)
    with pytest.raises(ValueError, match="dag_id"):
        run_dir_url(bad, "manual__1")


def test_dataset_name_param_pattern_rejects_escapes():
    from trainflow.tasks.params import ParamError, validate_params

    for bad in ESCAPES:
        if bad == "":
            continue
        with pytest.raises(ParamError, match="dataset_name"):
            validate_params({"dataset_name": bad}, "recommendation", cpu_count=2)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_any_name_is_rejected_or_stays_one_component_under_the_root(value):
    root = "file:///srv/store"
    try:
        safe_name(value)
    except ValueError:
        return
    url = Storage(root, get_settings()).url(f"runs/dag/{value}")
    path = url.removeprefix("file://")
    for candidate in (path, unquote(path), unquote(unquote(path))):
        normal = posixpath.normpath(candidate)
        assert normal.startswith("/srv/store/runs/dag/"), (value, normal)
        assert posixpath.dirname(normal) == "/srv/store/runs/dag"


def test_the_store_layout_is_the_one_stores_already_have():
    """trainflow.tasks.layout is the one place of the store's paths; they are the paths existing stores use."""
    from trainflow.tasks import layout

    assert layout.manifest_path("ncf-ml-100k", "48ae74924b31ed64") == "datasets/ncf-ml-100k/48ae74924b31ed64/_manifest.json"
    assert layout.run_dir("recommendation_training", "manual__1") == "runs/recommendation_training/manual__1"
    assert layout.checkpoint_dir(120) == "step-120" and layout.CHECKPOINTS_DIR == "checkpoints"
    assert (layout.MODEL_DIR, layout.MODEL_WEIGHTS_NAME, layout.MODEL_CONFIG_NAME) == ("model", "model.pt", "config.json")
    assert (layout.RESULT_NAME, layout.REPORT_NAME, layout.RUN_CONFIG_NAME) == ("result.json", "report.json", "run_config.json")
    with pytest.raises(ValueError):
        layout.run_dir("../etc", "x")
    with pytest.raises(ValueError):
        layout.dataset_dir("a/b", "v")
