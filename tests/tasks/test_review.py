"""Human review of a promotion: the decision logic (approve / reject / timeout / override), what is
recorded on the model version, the model card and the approval request (real MLflow, SQLite)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from tests.tasks.test_registry import NAME, _register, _train
from trainflow.tasks.params import ParamError, approval_required
from trainflow.tasks.registry import (
    PENDING,
    TAG,
    ReviewResponse,
    approval_request,
    record_review,
    review_outcome,
)
from trainflow.tasks.settings import get_settings

WHEN = "2026-12-01T14:00:00+00:00"


@pytest.fixture
def mlflow_env(tf_env):
    settings = get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return settings


def _approve(by="alice", comment="ok"):
    return ReviewResponse("Approve", WHEN, responded_by=by, responded_by_id="7", comment=comment)


def _reject(by="bob", comment="worse on cold users"):
    return ReviewResponse("Reject", WHEN, responded_by=by, responded_by_id="8", comment=comment)


TIMEOUT = ReviewResponse("Reject", WHEN, timed_out=True)


@pytest.mark.parametrize(
    "mode,run_type,expected",
    [
        ("auto", "manual", True),
        ("auto", "scheduled", False),
        ("auto", "asset_triggered", False),
        ("auto", "backfill", False),
        ("always", "scheduled", True),
        ("never", "manual", False),
    ],
)
def test_approval_required_by_mode_and_run_type(mode, run_type, expected):
    assert approval_required(mode, run_type) is expected


def test_unknown_approval_mode_names_the_param():
    with pytest.raises(ParamError, match="require_approval"):
        approval_required("sometimes", "manual")


@pytest.mark.parametrize(
    "response,gate_passed,override,outcome,promote,overridden",
    [
        (_approve(), True, False, "promoted", True, False),
        (_approve(), False, False, "rejected", False, False),  # an approval alone cannot beat the gate
        (_approve(), False, True, "promoted", True, True),  # ... unless the override is on, recorded
        (_reject(), True, False, "rejected", False, False),
        (_reject(), False, True, "rejected", False, False),
        (TIMEOUT, True, False, "timed_out", False, False),  # the safe default
        (TIMEOUT, False, True, "timed_out", False, False),
    ],
)
def test_review_outcome(response, gate_passed, override, outcome, promote, overridden):
    result = review_outcome(response, gate_passed, override)
    assert (result.outcome, result.promote, result.override) == (outcome, promote, overridden)
    if response.responded_by:
        assert response.responded_by in result.reason


def test_bad_choice_is_refused():
    with pytest.raises(ValueError, match="Approve"):
        ReviewResponse("Maybe", WHEN)


def _tags(client, version):
    return client.get_model_version(NAME, str(version)).tags


def _champion(client):
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_approve_promotes_and_records_who_when_comment_and_both_sides(mlflow_env):
    client = MlflowClient()
    uri1, lin1 = _train("run-1", 0.3)
    _register(uri1, lin1, 0.30)  # no approval: the gate makes v1 champion
    uri2, lin2 = _train("run-2", 0.4)
    pending = _register(uri2, lin2, 0.35, approval=True)
    # The gate passed but champion did not move: the version waits for a reviewer.
    assert pending["decision"]["outcome"] == PENDING and pending["approval"]["required"] is True
    assert pending["aliases"] == ["challenger"] and _champion(client) == "1"
    tags = _tags(client, 2)
    assert tags[TAG + "decision.gate_verdict"] == "passed"
    assert tags[TAG + "decision.compared_against"] == "champion v1"
    assert float(tags[TAG + "decision.reference.ndcg_at_10"]) == pytest.approx(0.30)  # the champion's side
    assert float(tags[TAG + "metric.ndcg_at_10"]) == pytest.approx(0.35)  # the candidate's side
    # The comparison shown to the reviewer: candidate, champion and baseline per metric.
    rows = {row["metric"]: row for row in pending["comparison"]}
    assert rows["ndcg_at_10"] == {"metric": "ndcg_at_10", "candidate": 0.35, "reference": 0.30, "baseline": 0.2}
    assert rows["hr_at_10"]["reference"] == pytest.approx(0.60)

    # A retried register does not decide again or move anything.
    retry = _register(uri2, lin2, 0.35, approval=True)
    assert retry["version"] == 2 and not retry["created"] and retry["approval"]["required"] is True

    result = record_review(NAME, 2, _approve(comment="better NDCG, same data"))
    assert result["aliases"] == ["challenger", "champion"] and _champion(client) == "2"
    tags = _tags(client, 2)
    assert tags[TAG + "decision.outcome"] == "promoted"
    assert tags[TAG + "decision.decided_by"] == "alice" and tags[TAG + "decision.decided_by_id"] == "7"
    assert tags[TAG + "decision.decided_at"] == WHEN
    assert tags[TAG + "decision.approval"] == "Approve"
    assert tags[TAG + "decision.comment"] == "better NDCG, same data"
    assert tags[TAG + "decision.override"] == "false"
    assert tags[TAG + "decision.gate_verdict"] == "passed"  # the gate's verdict stays next to it
    assert _tags(client, 1)[TAG + "superseded_by"] == "2"
    card = client.get_model_version(NAME, "2").description
    assert "**Decision**: promoted - approved by alice" in card and "better NDCG, same data" in card
    assert "champion v1" in card  # the champion column of the metrics table

    # A retried promote finds the decision made and changes nothing.
    again = record_review(NAME, 2, _reject())
    assert again["decision"]["outcome"] == "promoted" and _champion(client) == "2"
    assert _tags(client, 2)[TAG + "decision.decided_by"] == "alice"


def test_reject_and_timeout_keep_challenger_and_are_recorded(mlflow_env):
    client = MlflowClient()
    uri1, lin1 = _train("run-1", 0.3)
    _register(uri1, lin1, 0.30, approval=True)
    record_review(NAME, 1, _reject())
    tags = _tags(client, 1)
    assert tags[TAG + "decision.outcome"] == "rejected" and tags[TAG + "decision.approval"] == "Reject"
    assert tags[TAG + "decision.decided_by"] == "bob" and tags[TAG + "decision.comment"] == "worse on cold users"
    assert client.get_model_version(NAME, "1").aliases == ["challenger"]
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found"):
        client.get_model_version_by_alias(NAME, "champion")

    uri2, lin2 = _train("run-2", 0.3)
    _register(uri2, lin2, 0.31, approval=True)
    out = record_review(NAME, 2, TIMEOUT)
    assert out["aliases"] == ["challenger"]
    tags = _tags(client, 2)
    assert tags[TAG + "decision.outcome"] == "timed_out"
    assert tags[TAG + "decision.approval"] == "timeout" and tags[TAG + "decision.decided_by"] == "timeout"
    assert "approval timeout" in tags[TAG + "decision.reason"]


def test_failed_gate_is_final_without_override_and_recorded_as_override_with_it(mlflow_env):
    client = MlflowClient()
    uri1, lin1 = _train("run-1", 0.3)
    _register(uri1, lin1, 0.30)
    # Worse than the champion, no override: rejected by the gate, no reviewer asked.
    uri2, lin2 = _train("run-2", 0.1)
    worse = _register(uri2, lin2, 0.25, approval=True)
    assert worse["decision"]["outcome"] == "rejected" and worse["approval"]["required"] is False
    assert "allow_gate_override is off" in worse["approval"]["reason"]
    with pytest.raises(ValueError, match="not waiting for approval"):
        record_review(NAME, 2, _approve())
    assert _champion(client) == "1"

    # Worse, override allowed: the reviewer is asked; approving promotes, recorded as an override.
    uri3, lin3 = _train("run-3", 0.1)
    forced = _register(uri3, lin3, 0.26, approval=True, allow_override=True)
    assert forced["decision"]["outcome"] == PENDING and forced["decision"]["gate_verdict"] == "failed"
    assert forced["approval"] == {"required": True, "allow_override": True, "reason": forced["approval"]["reason"]}
    record_review(NAME, 3, _approve(comment="known issue in eval set"))
    tags = _tags(client, 3)
    assert tags[TAG + "decision.outcome"] == "promoted" and tags[TAG + "decision.override"] == "true"
    assert tags[TAG + "decision.gate_verdict"] == "failed"
    assert "overriding the failed gate" in tags[TAG + "decision.reason"]
    assert _champion(client) == "3"


def test_champion_moved_while_waiting_makes_the_approval_stale(mlflow_env):
    client = MlflowClient()
    uri1, lin1 = _train("run-1", 0.3)
    _register(uri1, lin1, 0.30)
    uri2, lin2 = _train("run-2", 0.3)
    _register(uri2, lin2, 0.35, approval=True)  # waits, compared with v1
    uri3, lin3 = _train("run-3", 0.3)
    _register(uri3, lin3, 0.40)  # meanwhile v3 becomes champion through the gate
    out = record_review(NAME, 2, _approve())
    assert out["decision"]["outcome"] == "rejected" and "champion changed from v1 to v3" in out["decision"]["reason"]
    assert _champion(client) == "3"


def test_approval_request_shows_the_comparison_verdict_dataset_and_links(mlflow_env):
    uri1, lin1 = _train("run-1", 0.3)
    _register(uri1, lin1, 0.30)
    uri2, lin2 = _train("run-2", 0.3)
    pending = _register(uri2, lin2, 0.35, approval=True)
    links = {
        "mlflow_run": "http://mlflow/#/experiments/1/runs/abc",
        "model_version": "http://mlflow/#/models/m/versions/2",
        "airflow_run": "http://airflow/dags/d/runs/r",
        "plots": {"hr_at_k.png": "http://mlflow/#/experiments/1/runs/abc/artifactPath/plots/hr_at_k.png"},
    }
    subject, body = approval_request(
        pending,
        dataset={"name": "x", "version": "d1", "splits": {"eval": 60, "train": 1000}},  # any key order
        training=[["world size", 2], ["parallelism", "ddp"], ["epochs", 3]],
        links=links,
        timeout_hours=72,
        baseline_name="ItemPop",
    )
    assert subject == f"Promote {NAME} v2 to champion? (gate passed)"
    assert "| metric (eval split) | candidate v2 | champion v1 | ItemPop |" in body
    assert "| ItemPop |\n|---|---:|---:|---:|\n| **ndcg_at_10** | 0.3500 | 0.3000 | 0.2000 |" in body  # gate metric first
    assert "Automated gate: PASSED" in body and "improvement +0.0500" in body and "margin > 0.01" in body
    assert "`x` version `d1` (train 1,000, eval 60)" in body
    assert "**Training**: world size 2, parallelism ddp, epochs 3." in body
    for url in (links["mlflow_run"], links["model_version"], links["airflow_run"], links["plots"]["hr_at_k.png"]):
        assert f"({url})" in body
    assert "72 h rejects it" in body
