"""Scheduled and data-triggered retraining on the live stack, with the job scheduler on.

A stack of its own (LocalExecutor, ``use_job_schedule`` on, ``recommendation_training``
scheduled every minute through ``TRAINFLOW_RECOMMENDATION_SCHEDULE``) shows, through the real
scheduler and the REST API:

1. a scheduled run with no production source configured fails at once (``shard``, try 1, the
   message says how to configure one) and trains nothing;
2. a champion trained on real-format data (a manual run approved by a reviewer);
3. with the production configuration set (an Airflow Variable), the next scheduled run shards
   exactly that source (the manifest's source URL and fingerprint) and is compared with the
   champion on the same dataset;
4. an Asset event posted through ``POST /api/v2/assets/events`` with another dataset's
   ``source_url`` triggers a run that shards exactly that URL; trained on another dataset, its
   version stays ``challenger`` with ``require_approval=auto`` and no reviewer, and records why.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.integration.conftest import _required
from tests.integration.live_stack import LiveStack, StackError, services_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG = "recommendation_training"
MODEL = "live-retraining"
FAST = {"model": "neumf", "model_size": 8, "epochs": 1, "batch_size": 256, "nproc_per_node": 2,
        "registered_model_name": MODEL}


def _ratings(seed: int, num_users: int = 60, per_user: int = 40, num_items: int = 240) -> bytes:
    """MovieLens ``u.data`` lines (user, item, rating, timestamp) with clustered tastes."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, num_users + 1):
        cluster = user % 6
        items = rng.choice(np.arange(cluster * 40 + 1, cluster * 40 + 41), size=per_user - 5, replace=False)
        items = np.concatenate([items, rng.integers(1, num_items + 1, size=5)])
        for step, item in enumerate(items):
            lines.append(f"{user}\t{int(item)}\t{int(rng.integers(1, 6))}\t{880000000 + user * 1000 + step}")
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = services_unavailable("LocalExecutor")
    if reason:
        if _required("TRAINFLOW_REQUIRE_LIVE_STACK"):
            pytest.fail(f"live stack: {reason}")
        pytest.skip(f"live stack: {reason}")
    live = LiveStack(
        tmp_path_factory.mktemp("live-retraining"),
        executor="LocalExecutor",
        extra_env={
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",
            "TRAINFLOW_RECOMMENDATION_SCHEDULE": "* * * * *",
            "TRAINFLOW_DRIVING_SCHEDULE": "none",
        },
    )
    live.start()
    try:
        for name, seed in (("drop-a", 1), ("drop-b", 2)):
            live.s3_client().put_object(Bucket=live.bucket, Key=f"raw/{name}/u.data", Body=_ratings(seed))
        yield live
    finally:
        live.stop()


def _url(stack, name: str) -> str:
    return f"s3://{stack.bucket}/raw/{name}/u.data"


def _runs(stack, run_type: str) -> list[dict]:
    body = stack.api.json("GET", f"dags/{DAG}/dagRuns", params={"limit": 100, "order_by": "run_after"})
    return [r for r in body["dag_runs"] if r["run_type"] == run_type]


def _next_run(stack, run_type: str, after: set[str], timeout: float = 240.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r["dag_run_id"] for r in _runs(stack, run_type) if r["dag_run_id"] not in after]
        if new:
            return new[0]
        time.sleep(3)
    raise StackError(f"no new {run_type} run of {DAG} within {timeout:.0f} s\n{stack.log_tails(['scheduler'])}")


def _shard_log(stack, run_id: str) -> str:
    """The log of the ``shard`` try that ran the task's code, checking that the bad input was not
    retried: it is the last try, and no earlier try got as far (on a loaded machine a try can
    die before the task starts, an infrastructure fault that Airflow rightly retries)."""
    marker = "has no production data to train on"
    ti = next(t for t in stack.api.task_instances(DAG, run_id) if t["task_id"] == "shard")
    last = int(ti["try_number"])
    earlier = [stack.api.task_log(DAG, run_id, "shard", n) for n in range(1, last)]
    assert not any(marker in text for text in earlier), f"shard of {run_id} was retried after the bad input"
    return stack.api.task_log(DAG, run_id, "shard", last)


def _next_production_run(stack, seen: set[str], timeout: float = 600.0) -> str:
    """The first new scheduled run that trained on the production configuration (a run the
    scheduler created just before the Variable was set fails fast and is passed over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run_id = _next_run(stack, "scheduled", seen, timeout=max(1.0, deadline - time.monotonic()))
        seen.add(run_id)
        if stack.api.wait_for_run(DAG, run_id, timeout=900, raise_on_failure=False) == "success":
            return run_id
        log = _shard_log(stack, run_id)
        if "has no production data to train on" not in log:
            raise StackError(f"scheduled run {run_id} failed\n{stack.api.describe_run(DAG, run_id)}")
    raise StackError(f"no scheduled run trained on the production configuration within {timeout:.0f} s")


def _fingerprint(stack, url: str) -> str:
    from trainflow.tasks.datasets.sources import resolve_source
    from trainflow.tasks.settings import Settings

    creds = stack.s3_credentials
    settings = Settings.from_env({
        "AWS_ACCESS_KEY_ID": creds["access_key_id"], "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
        "AWS_ENDPOINT_URL": stack.s3_endpoint, "AWS_DEFAULT_REGION": creds["region"],
        "TRAINFLOW_DATA_DIR": str(stack.data_dir),
    })
    return resolve_source(url, "recommendation", settings).fingerprint


def _check_sharded(stack, run_id: str, *, origin: str, name: str, drop: str) -> None:
    """The run's shard task took its data from ``origin`` and sharded exactly ``drop``: the
    committed manifest's source URL and fingerprint are that file's."""
    shard = stack.api.xcom(DAG, run_id, "shard")
    assert shard["source_origin"] == origin and shard["name"] == name
    key = shard["manifest_uri"].removeprefix(f"s3://{stack.bucket}/")
    manifest = json.loads(stack.s3_client().get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    assert manifest["source"]["url"] == _url(stack, drop)
    assert manifest["source"]["fingerprint"] == _fingerprint(stack, _url(stack, drop))


def _mlflow(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


def _set_variable(stack, key: str, value: dict) -> None:
    stack.api.json("POST", "variables", json={"key": key, "value": json.dumps(value)})


def test_scheduled_and_asset_triggered_retraining(stack):
    api = stack.api
    # 1. No production source: the scheduled run fails at once, naming how to configure one.
    first = _next_run(stack, "scheduled", set())
    assert api.wait_for_run(DAG, first, timeout=300, raise_on_failure=False) == "failed"
    states = {ti["task_id"]: ti for ti in api.task_instances(DAG, first)}
    assert states["shard"]["state"] == "failed" and states["train"]["state"] in ("upstream_failed", None)
    log = _shard_log(stack, first)
    assert "has no production data to train on" in log and "trainflow_recommendation_production" in log
    assert "TRAINFLOW_RECOMMENDATION_PRODUCTION" in log

    # 2. A champion trained on real-format data: a manual run, approved by a reviewer.
    manual = api.trigger(DAG, {**FAST, "source_url": _url(stack, "drop-a"), "dataset_name": "ratings",
                               "require_approval": "always", "allow_gate_override": True})
    from tests.integration.test_model_review import _hitl_path, _wait_for_approval_request

    _wait_for_approval_request(stack, manual)
    api.json("PATCH", _hitl_path(manual), json={"chosen_options": ["Approve"], "params_input": {"comment": "baseline model"}})
    # An infrastructure retry of `approve` (a try that died before it ran) asks again: answer the
    # request that is open until the run ends.
    from tests.integration.live_stack import StackError

    deadline = time.monotonic() + 600
    while True:
        try:
            api.wait_for_run(DAG, manual, timeout=60)
            break
        except StackError:
            if time.monotonic() > deadline or api.dag_run(DAG, manual)["state"] != "running":
                raise
            states = {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG, manual)}
            if states.get("approve") == "awaiting_input":
                api.json("PATCH", _hitl_path(manual),
                         json={"chosen_options": ["Approve"], "params_input": {"comment": "baseline model"}})
    client = _mlflow(stack)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    # 3. The production configuration (an Airflow Variable): the next scheduled run shards it.
    seen = {r["dag_run_id"] for r in _runs(stack, "scheduled")}
    _set_variable(stack, "trainflow_recommendation_production",
                  {**FAST, "source_url": _url(stack, "drop-a"), "dataset_name": "ratings"})
    scheduled = _next_production_run(stack, seen)
    _check_sharded(stack, scheduled, origin="production", name="ratings", drop="drop-a")
    register = api.xcom(DAG, scheduled, "register")
    v2 = client.get_model_version(MODEL, str(register["version"])).tags
    assert v2["trainflow.source_origin"] == "production"
    assert v2["trainflow.decision.same_dataset"] == "true"
    assert v2["trainflow.decision.compared_against"].startswith("champion v1")
    assert v2["trainflow.decision.approval_required"] == "false"  # scheduled + auto: no reviewer
    assert ("champion" in register["aliases"]) == (v2["trainflow.decision.outcome"] == "promoted")

    # 4. New data announced through the REST API: the event's source_url is what the run shards.
    assets = api.json("GET", "assets", params={"uri_pattern": "trainflow://raw/recommendation"})["assets"]
    asset_id = next(a["id"] for a in assets if a["uri"] == "trainflow://raw/recommendation")
    seen = {r["dag_run_id"] for r in _runs(stack, "asset_triggered")}
    # The production configuration stays set: the event's run takes its other params (FAST).
    # Scheduled runs go on training on drop-a meanwhile; runs are serialised (max_active_runs=1).
    api.json("POST", "assets/events", json={
        "asset_id": asset_id, "extra": {"source_url": _url(stack, "drop-b"), "dataset_name": "clicks"}})
    triggered = _next_run(stack, "asset_triggered", seen, timeout=180)
    api.wait_for_run(DAG, triggered, timeout=900)
    _check_sharded(stack, triggered, origin="asset_event", name="clicks", drop="drop-b")
    # Trained on another dataset, no reviewer (auto + asset-triggered): champion does not move to
    # it (it stays with a model trained on "ratings", whichever scheduled run trained it).
    register = api.xcom(DAG, triggered, "register")
    assert "champion" not in register["aliases"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) != str(register["version"]) and champion.tags["trainflow.dataset_name"] == "ratings"
    tags = client.get_model_version(MODEL, str(register["version"])).tags
    assert tags["trainflow.source_origin"] == "asset_event"
    assert tags["trainflow.decision.outcome"] == "rejected" and tags["trainflow.decision.same_dataset"] == "false"
    assert "never replaces a champion trained on another dataset" in tags["trainflow.decision.reason"]
    assert "clicks (leave-latest-out (NCF))" in tags["trainflow.decision.dataset_mismatch"]
