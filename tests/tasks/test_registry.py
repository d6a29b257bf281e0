"""Registry state after first / better / worse / retried registrations (real MLflow, SQLite)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from trainflow.tasks.pipelines import get_pipeline
from trainflow.tasks.registry import TAG, GateConfig, Lineage, register_step
from trainflow.tasks.settings import get_settings

NAME = "trainflow-test-model"


class ConstantModel(mlflow.pyfunc.PythonModel):
    def __init__(self, value: float):
        self.value = value

    def predict(self, context, model_input, params=None):
        return np.full(len(model_input), self.value)


@pytest.fixture
def mlflow_env(tf_env):
    settings = get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return settings


def _train(run_id: str, value: float, dataset_version: str = "d1", dataset_name: str = "x",
           split_protocol: str = "leave-latest-out (NCF)", source_origin: str = "form"):
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ConstantModel(value),
            input_example=pd.DataFrame({"user_id": [1], "item_id": [2]}),
            pip_requirements=["mlflow"],  # skip requirement inference: slow, and not under test here
        )
    lineage = Lineage(
        dag_id="recommendation_training",
        run_id=run_id,
        try_number=1,
        manifest_uri=f"file:///store/datasets/x/{dataset_version}/_manifest.json",
        dataset_version=dataset_version,
        dataset_name=dataset_name,
        mlflow_run_id=run.info.run_id,
        world_size=2,
        parallelism="ddp",
        torch_version="2.13.0",
        code_version="abc123",
        split_protocol=split_protocol,
        source_origin=source_origin,
    )
    return info.model_uri, lineage


def _register(model_uri, lineage, ndcg, baseline=0.2, margin=0.01, **kwargs):
    return register_step(
        model_uri=model_uri,
        registered_model_name=NAME,
        metrics={"ndcg_at_10": ndcg, "baseline_ndcg_at_10": baseline, "hr_at_10": ndcg * 2, "baseline_hr_at_10": 0.4},
        lineage=lineage,
        gate=GateConfig("ndcg_at_10", margin),
        **kwargs,
    )


def test_first_better_worse_and_retried_registrations(mlflow_env):
    client = MlflowClient()
    # 1. The first version beats the baseline: champion (and the latest challenger).
    uri1, lin1 = _train("run-1", 0.3)
    first = _register(uri1, lin1, 0.30)
    assert first["version"] == 1 and first["created"]
    assert first["aliases"] == ["challenger", "champion"]
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags[TAG + "dataset_version"] == "d1"
    assert v1.tags[TAG + "run_id"] == "run-1" and v1.tags[TAG + "world_size"] == "2"
    assert v1.tags[TAG + "torch_version"] == "2.13.0" and v1.tags[TAG + "code_version"] == "abc123"
    assert v1.tags[TAG + "decision.outcome"] == "promoted"
    assert v1.tags[TAG + "decision.compared_against"] == "baseline"
    assert "model card" in v1.description and "ndcg_at_10" in v1.description

    # 2. A better run (by more than the margin): new champion, old version kept and tagged.
    uri2, lin2 = _train("run-2", 0.4)
    second = _register(uri2, lin2, 0.35)
    assert second["version"] == 2 and second["aliases"] == ["challenger", "champion"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags[TAG + "superseded_by"] == "2" and v1.aliases == []
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags[TAG + "decision.previous_champion"] == "1"
    assert float(v2.tags[TAG + "decision.reference_value"]) == pytest.approx(0.30)

    # 3. A worse run: stays challenger, champion unchanged, the decision recorded.
    uri3, lin3 = _train("run-3", 0.1)
    third = _register(uri3, lin3, 0.355)  # better, but not by the 0.01 margin
    assert third["aliases"] == ["challenger"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags[TAG + "decision.outcome"] == "rejected"
    assert v3.tags[TAG + "decision.compared_against"] == "champion v2"
    assert "stays challenger" in v3.tags[TAG + "decision.reason"]

    # 4. A retried register for run-3: no new version, the same decision, nothing moves.
    retry = _register(uri3, lin3, 0.355)
    assert retry["version"] == 3 and not retry["created"]
    assert retry["decision"]["outcome"] == "rejected"
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"


def test_first_version_that_does_not_beat_the_baseline_is_not_champion(mlflow_env):
    uri, lin = _train("run-a", 0.1)
    out = _register(uri, lin, 0.15, baseline=0.2)
    assert out["aliases"] == ["challenger"]
    assert out["decision"]["outcome"] == "rejected"


def test_champion_from_another_dataset_version_is_rescored(mlflow_env):
    uri1, lin1 = _train("run-x", 0.3, dataset_version="old")
    _register(uri1, lin1, 0.30)
    uri2, lin2 = _train("run-y", 0.3, dataset_version="new")
    calls = []

    def rescore(model_uri):
        calls.append(model_uri)
        return {"ndcg_at_10": 0.5}

    out = _register(uri2, lin2, 0.4, rescore=rescore)
    assert calls == [f"models:/{NAME}/1"]
    assert out["decision"]["outcome"] == "rejected"
    assert "re-scored" in out["decision"]["compared_against"]
    uri3, lin3 = _train("run-z", 0.3, dataset_version="newer")
    with pytest.raises(ValueError, match="no rescore"):
        _register(uri3, lin3, 0.4)


def test_a_run_without_reviewer_never_replaces_a_champion_trained_on_another_dataset(mlflow_env):
    """The scheduled-retraining scenario: a champion trained on real data; an unattended run on
    another dataset (here: another name; below: another split protocol) scores far higher on its
    own eval split. champion does not move; the version records why; nothing is re-scored."""
    client = MlflowClient()
    uri1, lin1 = _train("run-1", 0.3, dataset_name="ncf-ml-100k")
    assert _register(uri1, lin1, 0.30)["aliases"] == ["challenger", "champion"]

    def rescore(model_uri):
        raise AssertionError("a champion from another dataset must not be re-scored on the candidate's data")

    uri2, lin2 = _train("scheduled__2026-12-01", 0.9, dataset_version="d9", dataset_name="synthetic-recommendation",
                        source_origin="production")
    out = _register(uri2, lin2, 0.90, rescore=rescore)
    assert out["aliases"] == ["challenger"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    tags = client.get_model_version(NAME, "2").tags
    assert tags[TAG + "decision.outcome"] == "rejected"
    assert tags[TAG + "decision.same_dataset"] == "false"
    assert tags[TAG + "decision.compared_against"] == "baseline"
    assert "synthetic-recommendation (leave-latest-out (NCF))" in tags[TAG + "decision.dataset_mismatch"]
    assert "champion v1 on ncf-ml-100k" in tags[TAG + "decision.dataset_mismatch"]
    assert "never replaces a champion trained on another dataset" in tags[TAG + "decision.reason"]
    assert tags[TAG + "split_protocol"] == "leave-latest-out (NCF)" and tags[TAG + "source_origin"] == "production"
    assert "not comparable" in client.get_model_version(NAME, "2").description  # the model card says why

    # Same name, another split protocol: not the same dataset either.
    uri3, lin3 = _train("run-3", 0.9, dataset_version="d1", dataset_name="ncf-ml-100k", split_protocol="given NCF split")
    assert _register(uri3, lin3, 0.90, rescore=rescore)["aliases"] == ["challenger"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    # A newer version of the champion's dataset: re-scored and compared like for like.
    uri4, lin4 = _train("run-4", 0.5, dataset_version="d2", dataset_name="ncf-ml-100k")
    out = _register(uri4, lin4, 0.50, rescore=lambda uri: {"ndcg_at_10": 0.31, "hr_at_10": 0.6})
    assert out["decision"]["compared_against"] == "champion v1 (re-scored on this eval set)"
    assert out["aliases"] == ["challenger", "champion"]


def test_with_a_reviewer_a_different_dataset_waits_and_the_request_says_the_datasets_differ(mlflow_env):
    from trainflow.tasks.registry import approval_request

    uri1, lin1 = _train("run-1", 0.3, dataset_name="a")
    _register(uri1, lin1, 0.30)
    uri2, lin2 = _train("run-2", 0.5, dataset_name="b")
    out = _register(uri2, lin2, 0.50, approval=True, allow_override=False)
    assert out["decision"]["outcome"] == "pending_approval" and out["aliases"] == ["challenger"]
    assert "the datasets differ" in out["approval"]["reason"]
    _, body = approval_request(out)
    assert "The datasets differ" in body and "champion v1 on a (" in body
    # ... and one that does not even beat its baseline is rejected without asking anyone.
    uri3, lin3 = _train("run-3", 0.1, dataset_name="c")
    assert _register(uri3, lin3, 0.10, approval=True, allow_override=False)["decision"]["outcome"] == "rejected"


def test_lower_is_better_metrics():
    rec, drv = get_pipeline("recommendation"), get_pipeline("driving")
    assert rec.higher_is_better("ndcg_at_10") and rec.higher_is_better("hr_at_10")
    assert not drv.higher_is_better("ade") and not drv.higher_is_better("fde_3s") and not drv.higher_is_better("miss_rate")


def test_unknown_promotion_metric_is_rejected(mlflow_env):
    uri, lin = _train("run-q", 0.3)
    with pytest.raises(ValueError, match="promotion_metric 'ade'"):
        register_step(
            model_uri=uri, registered_model_name=NAME, metrics={"ndcg_at_10": 0.3}, lineage=lin, gate=GateConfig("ade")
        )


def test_racing_registrations_leave_one_consistent_champion(mlflow_env, monkeypatch):
    """Two DAG runs register at once: without the registry lease both compare against "no
    champion" and the slower one (here the worse model) overwrites the alias last."""
    import threading
    import time

    import trainflow.tasks.registry as registry

    (uri_a, lin_a), (uri_b, lin_b) = _train("run-fast-better", 0.5), _train("run-slow-worse", 0.4)
    real_decide = registry.decide

    def slow_for_the_worse(candidate, reference, metric, margin):
        if candidate == pytest.approx(0.40):
            time.sleep(2.0)  # B read the champion, then decides slowly: A's promotion lands meanwhile
        return real_decide(candidate, reference, metric, margin)

    monkeypatch.setattr(registry, "decide", slow_for_the_worse)
    results, errors = {}, []

    def register(key, uri, lin, value, delay):
        try:
            time.sleep(delay)
            results[key] = _register(uri, lin, value)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=register, args=("b", uri_b, lin_b, 0.40, 0.0)),
        threading.Thread(target=register, args=("a", uri_a, lin_a, 0.50, 0.3)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    client = MlflowClient()
    versions = {v.tags[TAG + "run_id"]: v for v in client.search_model_versions(f"name='{NAME}'")}
    assert len(versions) == 2
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.tags[TAG + "run_id"] == "run-fast-better"  # the better model, whoever came last
    # Both decisions are recorded and form one chain: B was decided first (it started first and
    # held the lease), then A was compared against B, not against the baseline.
    b, a = versions["run-slow-worse"], versions["run-fast-better"]
    assert b.tags[TAG + "decision.outcome"] == "promoted"
    assert b.tags[TAG + "decision.compared_against"] == "baseline"
    assert a.tags[TAG + "decision.outcome"] == "promoted"
    assert a.tags[TAG + "decision.compared_against"] == f"champion v{b.version}"
    assert b.tags[TAG + "superseded_by"] == str(a.version)
    assert results["a"]["aliases"] == ["challenger", "champion"] and b.aliases == []
    # The lease is released.
    from trainflow.tasks.storage import Storage

    assert Storage.from_settings(mlflow_env).list("locks/registry") == []
