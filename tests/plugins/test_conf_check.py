"""The API server middleware that refuses unknown conf keys of trainflow's DAGs (400 naming the key)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from trainflow.airflow.conf_check import RejectUnknownConfKeys
from trainflow.airflow.plugin import TrainflowPlugin


@pytest.fixture
def client():
    app = FastAPI()

    @app.post("/api/v2/dags/{dag_id}/dagRuns")
    async def trigger(dag_id: str, request: Request):
        return {"dag_id": dag_id, "received": await request.json()}

    @app.get("/api/v2/dags/{dag_id}/dagRuns")
    async def runs(dag_id: str):
        return {"dag_runs": []}

    app.add_middleware(RejectUnknownConfKeys)
    return TestClient(app)


def test_an_unknown_key_gets_400_naming_it_with_the_closest_param(client):
    response = client.post("/api/v2/dags/recommendation_training/dagRuns", json={"conf": {"epoch": 3, "model": "gmf"}})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("Invalid input for param epoch: unknown parameter (did you mean 'epochs'?")
    assert "known: source_url," in detail


def test_driving_params_are_checked_against_the_driving_pipeline(client):
    response = client.post("/api/v2/dags/driving_training/dagRuns", json={"conf": {"promotion_metric": "ade", "bogus": 1}})
    assert response.status_code == 400
    assert "param bogus" in response.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v2/dags/recommendation_training/dagRuns", {"logical_date": None, "conf": {"epochs": 3, "require_approval": True}}),
        ("/api/v2/dags/recommendation_training/dagRuns", {"logical_date": None}),
        ("/api/v2/dags/some_other_dag/dagRuns", {"conf": {"anything": 1}}),
    ],
)
def test_everything_else_passes_through_with_its_body(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 200
    assert response.json()["received"] == body


def test_a_body_airflow_must_judge_passes_through(client):
    response = client.post("/api/v2/dags/recommendation_training/dagRuns", json={"conf": "not an object"})
    assert response.status_code == 200 and response.json()["received"] == {"conf": "not an object"}
    assert client.get("/api/v2/dags/recommendation_training/dagRuns").status_code == 200


def test_the_plugin_registers_it():
    assert [m["middleware"] for m in TrainflowPlugin.fastapi_root_middlewares] == [RejectUnknownConfKeys]


@pytest.mark.parametrize(
    ("conf", "field", "match"),
    [
        ({"model_options": {"dropuot": 0.1}}, "model_options", "'dropuot' is no setting of RecommendationConfig"),
        ({"batch_size": 255, "nproc_per_node": 2}, "batch_size", "not a multiple of the world size 2"),
    ],
)
def test_a_bad_run_config_gets_400_naming_the_field(client, conf, field, match):
    """The trigger is refused before a run exists: nothing is launched, nothing retried."""
    response = client.post("/api/v2/dags/recommendation_training/dagRuns", json={"conf": conf})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith(f"Invalid input for param {field}: ") and match in detail
