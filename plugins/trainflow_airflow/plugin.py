"""The Airflow plugin: registers trainflow's extra links so the UI can show them."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from trainflow_airflow.links import MLflowModelVersionLink, MLflowRunLink


class TrainflowPlugin(AirflowPlugin):
    name = "trainflow"
    operator_extra_links = [MLflowRunLink(), MLflowModelVersionLink()]
