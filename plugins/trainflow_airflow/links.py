"""Extra links from trainflow's tasks to MLflow: the run and the registered model version.

The task persists what a link needs to XCom while it runs (:func:`persist_mlflow_links`);
``get_link`` reads it back and returns an empty string when there is nothing (a task that
failed early, a run without MLflow) or anything goes wrong: a link never breaks a task.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any, ClassVar

from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)

XCOM_KEY = "trainflow_mlflow"


def mlflow_ui_url(tracking_uri: str | None = None) -> str:
    """Base URL of the MLflow UI: ``TRAINFLOW_MLFLOW_UI_URL``, else an http(s) tracking URI,
    else the local ``mlflow ui`` default."""
    from trainflow.tasks.settings import get_settings

    settings = get_settings()
    if settings.mlflow_ui_url:
        return settings.mlflow_ui_url
    tracking_uri = tracking_uri or settings.mlflow_tracking_uri
    if tracking_uri.startswith(("http://", "https://")):
        parsed = urllib.parse.urlsplit(tracking_uri)
        return f"{parsed.scheme}://{parsed.hostname}{':' + str(parsed.port) if parsed.port else ''}{parsed.path}".rstrip("/")
    return "http://127.0.0.1:5000"


def persist_mlflow_links(context: dict[str, Any], **fields: Any) -> None:
    """Store ``experiment_id``, ``run_id``, ``model_name``, ``model_version`` (any subset) in
    XCom for the links, merged with what the task stored before. Never raises."""
    try:
        ti = context["ti"]
        fields = {k: str(v) for k, v in fields.items() if v not in (None, "")}
        fields.setdefault("ui_url", mlflow_ui_url())
        ti.xcom_push(key=XCOM_KEY, value=fields)
    except Exception:  # a link must never fail the task
        log.warning("could not persist MLflow link data", exc_info=True)


def _read(ti_key) -> dict[str, str]:
    from airflow.sdk.execution_time.xcom import XCom

    value = XCom.get_value(key=XCOM_KEY, ti_key=ti_key)
    return value if isinstance(value, dict) else {}


class MLflowRunLink(BaseOperatorLink):
    """The MLflow run holding the step's params, metrics and plots."""

    name: ClassVar[str] = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        try:
            data = _read(ti_key)
            if data.get("experiment_id") and data.get("run_id"):
                return f"{data['ui_url']}/#/experiments/{data['experiment_id']}/runs/{data['run_id']}"
        except Exception:
            log.debug("MLflow run link unavailable", exc_info=True)
        return ""


class MLflowModelVersionLink(BaseOperatorLink):
    """The registered model version (with its aliases, tags and model card)."""

    name: ClassVar[str] = "MLflow model version"

    def get_link(self, operator, *, ti_key) -> str:
        try:
            data = _read(ti_key)
            if data.get("model_name") and data.get("model_version"):
                name = urllib.parse.quote(data["model_name"], safe="")
                return f"{data['ui_url']}/#/models/{name}/versions/{data['model_version']}"
        except Exception:
            log.debug("MLflow model version link unavailable", exc_info=True)
        return ""
