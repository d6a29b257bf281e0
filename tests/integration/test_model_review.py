"""Model review against the real services (``live_stack``: api-server, scheduler, dag-processor,
triggerer, workers on PostgreSQL; MLflow server; S3): a run that requires approval waits in
``approve`` with the summary in its request; answering through Airflow's HITL REST endpoints
(Approve / Reject) or letting the timeout pass decides what happens to ``champion`` in MLflow, and
every decision is on the model version. The browser test answers in the Airflow UI itself."""

from __future__ import annotations

import re
import time
import urllib.parse
import uuid

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

DAG = "recommendation_training"
APPROVE_TASK = "approve"


def _conf(model_name: str, **extra):
    """A fast conf with ``require_approval=auto``: a run triggered through the API is manual, so it
    waits for a reviewer."""
    from tests.integration.live_stack import FAST_RECOMMENDATION_CONF

    # allow_gate_override: a 1-epoch model may or may not beat ItemPop; with the override the
    # reviewer is asked either way, and the gate's verdict decides what is recorded.
    return {
        **FAST_RECOMMENDATION_CONF,
        "registered_model_name": model_name,
        "allow_gate_override": True,
        "require_approval": "auto",
        **extra,
    }


def _states(stack, run_id):
    return {ti["task_id"]: ti["state"] for ti in stack.api.task_instances(DAG, run_id)}


def _wait_for_approval_request(stack, run_id, timeout=900.0):
    """Wait until ``approve`` waits for a human; returns its HITL detail (REST)."""
    from tests.integration.live_stack import StackError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _states(stack, run_id)
        if states.get(APPROVE_TASK) in ("awaiting_input", "deferred"):
            return stack.api.json("GET", _hitl_path(run_id))
        if stack.api.dag_run(DAG, run_id)["state"] in ("success", "failed") or states.get(APPROVE_TASK) in (
            "skipped", "failed", "upstream_failed",
        ):
            break
        time.sleep(3)
    raise StackError(f"{APPROVE_TASK} of {run_id} never waited for input: {_states(stack, run_id)}\n"
                     f"{stack.api.describe_run(DAG, run_id)}")


def _hitl_path(run_id):
    return f"dags/{DAG}/dagRuns/{run_id}/taskInstances/{APPROVE_TASK}/-1/hitlDetails"


def _mlflow(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


def _champion(client, name):
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def _check_request(detail, register, stack):
    """The request a reviewer sees: the options, the safe default, the comment field and a body
    with the comparison, the verdict, the dataset version and the MLflow links."""
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert "comment" in detail["params"]
    assert detail["subject"] == (
        f"Promote {register['name']} v{register['version']} to champion? (gate {register['decision']['gate_verdict']})"
    )
    body = detail["body"]
    against = register["decision"]["compared_against"]
    assert f"| metric (eval split) | candidate v{register['version']} |" in body and "ItemPop |" in body
    if against.startswith("champion"):
        assert f"{against} |" in body
    assert f"Automated gate: {register['decision']['gate_verdict'].upper()}" in body
    ndcg = next(row for row in register["comparison"] if row["metric"] == "ndcg_at_10")
    header_end = "---:|---:|\n" if not against.startswith("champion") else "---:|---:|---:|\n"
    assert f"{header_end}| **ndcg_at_10** | {ndcg['candidate']:.4f} |" in body  # the gate's metric first
    assert re.search(r"\(train [\d,]+, valid [\d,]+, eval [\d,]+\)", body)  # splits in their natural order
    assert "**Training**: world size 2, parallelism ddp, epochs 1," in body  # in the order written
    assert f"version `{register['review']['dataset']['version']}`" in body
    run_id = register["review"]["mlflow_run_id"]
    assert f"{stack.mlflow_url}/#/experiments/" in body and f"/runs/{run_id})" in body
    assert f"{stack.mlflow_url}/#/models/{register['name']}/versions/{register['version']})" in body
    assert "/artifactPath/plots/hr_at_k.png)" in body
    return body


@pytest.fixture
def model_name():
    return f"review-{uuid.uuid4().hex[:8]}"


def test_approve_through_the_rest_api_moves_champion(live_stack, model_name):
    stack = live_stack
    client = _mlflow(stack)
    run_id = stack.api.trigger(DAG, _conf(model_name))
    detail = _wait_for_approval_request(stack, run_id)
    register = stack.api.xcom(DAG, run_id, "register")
    version = str(register["version"])
    _check_request(detail, register, stack)
    # Waiting: the version is challenger, champion has not moved, promote has not run.
    assert register["decision"]["outcome"] == "pending_approval"
    assert client.get_model_version(model_name, version).aliases == ["challenger"]
    assert _champion(client, model_name) is None
    assert _states(stack, run_id)["promote"] in (None, "none", "scheduled", "queued")

    answer = stack.api.json(
        "PATCH", _hitl_path(run_id), json={"chosen_options": ["Approve"], "params_input": {"comment": "good enough"}}
    )
    assert answer["chosen_options"] == ["Approve"] and answer["responded_by"]["name"] == stack.username
    assert stack.api.wait_for_run(DAG, run_id, timeout=600) == "success"
    assert _states(stack, run_id)["promote"] == "success"
    assert _champion(client, model_name) == version
    tags = client.get_model_version(model_name, version).tags
    failed_gate = register["decision"]["gate_verdict"] == "failed"
    assert tags["trainflow.decision.outcome"] == "promoted"
    assert tags["trainflow.decision.approval"] == "Approve"
    assert tags["trainflow.decision.decided_by"] == stack.username
    assert tags["trainflow.decision.comment"] == "good enough"
    assert tags["trainflow.decision.override"] == ("true" if failed_gate else "false")
    assert tags["trainflow.decision.decided_at"].startswith(answer["responded_at"][:16])
    assert "trainflow.decision.reference.ndcg_at_10" in tags and "trainflow.metric.ndcg_at_10" in tags
    card = client.get_model_version(model_name, version).description
    assert f"**Decision**: promoted - approved by {stack.username}" in card
    assert f"/dags/{DAG}/runs/{urllib.parse.quote(run_id, safe=':')})" in card  # the link back to the DAG run


def test_reject_through_the_rest_api_keeps_challenger(live_stack, model_name):
    stack = live_stack
    client = _mlflow(stack)
    run_id = stack.api.trigger(DAG, _conf(model_name))
    _wait_for_approval_request(stack, run_id)
    register = stack.api.xcom(DAG, run_id, "register")
    version = str(register["version"])
    stack.api.json(
        "PATCH", _hitl_path(run_id), json={"chosen_options": ["Reject"], "params_input": {"comment": "not convinced"}}
    )
    assert stack.api.wait_for_run(DAG, run_id, timeout=600) == "success"
    assert _champion(client, model_name) is None
    assert client.get_model_version(model_name, version).aliases == ["challenger"]
    tags = client.get_model_version(model_name, version).tags
    assert tags["trainflow.decision.outcome"] == "rejected"
    assert tags["trainflow.decision.approval"] == "Reject"
    assert tags["trainflow.decision.decided_by"] == stack.username
    assert tags["trainflow.decision.comment"] == "not convinced"


def test_no_answer_within_the_timeout_rejects_recorded_as_timeout(live_stack, model_name):
    stack = live_stack
    client = _mlflow(stack)
    run_id = stack.api.trigger(DAG, _conf(model_name, approval_timeout_hours=0.005))  # 18 s
    detail = _wait_for_approval_request(stack, run_id)
    assert detail["response_received"] is False
    # Nobody answers: the scheduler applies the default (Reject) once the timeout has passed.
    assert stack.api.wait_for_run(DAG, run_id, timeout=600) == "success"
    register = stack.api.xcom(DAG, run_id, "register")
    version = str(register["version"])
    answer = stack.api.xcom(DAG, run_id, APPROVE_TASK)
    assert answer["chosen_options"] == ["Reject"] and answer["timed_out"] is True
    assert _champion(client, model_name) is None
    tags = client.get_model_version(model_name, version).tags
    assert tags["trainflow.decision.outcome"] == "timed_out"
    assert tags["trainflow.decision.approval"] == "timeout"
    assert tags["trainflow.decision.decided_by"] == "timeout"


def test_approval_form_in_the_airflow_ui_shows_the_summary_and_approving_there_works(
    live_stack, browser, artifacts_dir, model_name
):
    from selenium.webdriver.common.by import By

    from tests.integration import browser as ui

    stack = live_stack
    client = _mlflow(stack)
    run_id = stack.api.trigger(DAG, _conf(model_name))
    detail = _wait_for_approval_request(stack, run_id)
    register = stack.api.xcom(DAG, run_id, "register")
    version = str(register["version"])
    _check_request(detail, register, stack)

    ui.login_airflow(browser, stack, f"/dags/{DAG}/runs/{run_id}/tasks/{APPROVE_TASK}/required_actions")
    ui.wait_text(browser, detail["subject"])
    ui.wait_text(browser, f"Automated gate: {register['decision']['gate_verdict'].upper()}")
    ui.wait_text(browser, "ndcg_at_10")
    # The body is rendered markdown: the metrics table and working links to MLflow.
    hrefs = {a.get_attribute("href") for a in browser.find_elements(By.TAG_NAME, "a")}
    assert f"{stack.mlflow_url}/#/models/{model_name}/versions/{version}" in hrefs
    assert any(h and h.startswith(f"{stack.mlflow_url}/#/experiments/") and "/artifactPath/plots/" in h for h in hrefs)
    assert browser.find_elements(By.CSS_SELECTOR, "table")
    comment = ui.wait_visible(browser, By.CSS_SELECTOR, "input[name='element_comment']")  # the form's param
    comment.send_keys("approved in the browser")
    ui.save_screenshot(browser, "approval-form", artifacts_dir)
    button = ui.wait_visible(browser, By.XPATH, "//button[normalize-space()='Approve']")
    button.click()

    assert stack.api.wait_for_run(DAG, run_id, timeout=600) == "success"
    assert _champion(client, model_name) == version
    tags = client.get_model_version(model_name, version).tags
    assert tags["trainflow.decision.outcome"] == "promoted"
    assert tags["trainflow.decision.decided_by"] == stack.username
    assert tags["trainflow.decision.comment"] == "approved in the browser"
