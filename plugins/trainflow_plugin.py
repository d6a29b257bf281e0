"""Entry for Airflow's plugins folder (the installed package also registers it by entry point)."""

from trainflow.airflow.plugin import TrainflowPlugin

__all__ = ["TrainflowPlugin"]
