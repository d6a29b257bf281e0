"""The Airflow plugin: trainflow's extra links for the UI, and the API server's check that a
triggered run's ``conf`` names only params of the pipeline (400 otherwise)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from trainflow.airflow.conf_check import RejectUnknownConfKeys
from trainflow.airflow.links import MLflowModelVersionLink, MLflowRunLink


class TrainflowPlugin(AirflowPlugin):
    name = "trainflow"
    operator_extra_links = [MLflowRunLink(), MLflowModelVersionLink()]
    fastapi_root_middlewares = [
        {"middleware": RejectUnknownConfKeys, "args": [], "kwargs": {}, "name": "trainflow conf keys"},
    ]
