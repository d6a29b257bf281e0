"""The shard step through real Airflow (`dag.test()`): a new version, then a cache hit."""

from __future__ import annotations

import pytest

from trainflow.tasks.manifest import load_manifest

pytestmark = pytest.mark.e2e


def _run(dag, conf):
    from airflow.utils.state import DagRunState

    # Only the shard step runs here; the whole pipeline is tests/e2e/test_pipelines.py.
    run = dag.test(run_conf=conf, mark_success_pattern="^(train|evaluate|register|approve|promote)$")
    assert run.state == DagRunState.SUCCESS
    ti = next(t for t in run.get_task_instances() if t.task_id == "shard")
    return ti


@pytest.mark.parametrize(
    "dag_id,source",
    [
        ("recommendation_training", "synthetic://recommendation?num_interactions=3000&num_users=50&num_items=300"),
        ("driving_training", "synthetic://driving?num_sequences=40"),
    ],
)
def test_shard_task_commits_a_version_then_hits_the_cache(dagbag, tf_env, dag_id, source):
    dag = dagbag.dags[dag_id]
    _run(dag, {"source_url": source})
    store = tf_env / "store" / "datasets"
    manifests = list(store.glob("*/*/_manifest.json"))
    assert len(manifests) == 1
    manifest = load_manifest(manifests[0].as_uri())
    assert manifest.kind == dag_id.split("_")[0]
    before = manifests[0].stat().st_mtime_ns
    _run(dag, {"source_url": source})
    assert list(store.glob("*/*/_manifest.json")) == manifests
    assert manifests[0].stat().st_mtime_ns == before  # nothing rewritten


def test_bad_source_fails_the_shard_task_naming_it(dagbag, tf_env, capfd):
    from airflow.utils.state import DagRunState

    run = dagbag.dags["recommendation_training"].test(run_conf={"source_url": "/no/such/place"})
    assert run.state == DagRunState.FAILED
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert states["shard"] == "failed" and states["train"] != "success"
    out, err = capfd.readouterr()
    assert "source_url /no/such/place: nothing there" in out + err
    assert not (tf_env / "store" / "datasets").exists()


@pytest.mark.parametrize(
    "source,shown,secret",
    [
        ("s3://AKIDEXAMPLE:Se/cr+etKey@bucket/ml/u.data", "source_url s3://AKIDEXAMPLE:***@bucket/ml/u.data carries "
         "credentials: refused", "Se/cr+etKey"),
        ("https://files.example.org/ml/u.data", "the scheme https:// is not supported", None),
    ],
)
def test_credentials_in_the_source_url_or_an_unsupported_scheme_fail_the_shard_task_once(
        dagbag, tf_env, capfd, source, shown, secret):
    """The library's error (botocore: ``Invalid bucket name "KEY:SECRET@bucket"``) used to print
    the secret; an http source was "nothing there". Now: named clearly, bad input, no retry."""
    from airflow.utils.state import DagRunState

    run = dagbag.dags["recommendation_training"].test(run_conf={"source_url": source})
    assert run.state == DagRunState.FAILED
    shard = next(t for t in run.get_task_instances() if t.task_id == "shard")
    assert shard.state == "failed" and shard.try_number == 1  # failed at once, not up for retry
    out, err = capfd.readouterr()
    assert shown in out + err
    if secret:
        assert secret not in out + err
    assert not (tf_env / "store" / "datasets").exists()
