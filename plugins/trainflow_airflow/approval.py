"""The human review of a promotion: an Airflow HITL approval task with the evidence in its body.

``register`` records the automated gate's verdict; when the run requires approval it leaves
``champion`` where it is and says so in its result. :class:`ModelApprovalOperator` (task
``approve``) then asks a reviewer in the Airflow UI (Required Actions, or the HITL REST
endpoints) with a markdown summary built from that result: the candidate's metrics next to the
champion's and the baseline's, the gate's verdict and margin, the dataset version, links to the
MLflow run, the model version page, the plots and the DAG run. It waits without holding a
worker slot (Airflow 3.3 parks it in ``awaiting_input``; the scheduler applies the timeout
default, ``Reject``). ``promote`` applies the answer with :func:`trainflow.tasks.registry.record_review`.
When no approval is needed the task is skipped, and so is ``promote``.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowSkipException

from trainflow.airflow.links import MLflowModelVersionLink, MLflowRunLink, mlflow_ui_url, persist_mlflow_links

DEFAULT_TIMEOUT_HOURS = 72.0


def review_links(result: dict[str, Any], ui_url: str | None = None) -> dict[str, Any]:
    """MLflow and Airflow URLs for the approval request, from ``register``'s result."""
    ui = (ui_url or mlflow_ui_url()).rstrip("/")
    review = result.get("review", {})
    links: dict[str, Any] = {}
    exp, run = review.get("mlflow_experiment_id"), review.get("mlflow_run_id")
    if exp and run:
        links["mlflow_run"] = f"{ui}/#/experiments/{exp}/runs/{run}"
        links["plots"] = {
            path.rsplit("/", 1)[-1]: f"{ui}/#/experiments/{exp}/runs/{run}/artifactPath/{urllib.parse.quote(path)}"
            for path in review.get("plots", [])
        }
    links["model_version"] = f"{ui}/#/models/{urllib.parse.quote(result['name'], safe='')}/versions/{result['version']}"
    if review.get("airflow_run_url"):
        links["airflow_run"] = review["airflow_run_url"]
    return links


class ModelApprovalOperator(ApprovalOperator):
    """Ask a reviewer to approve the promotion of the version ``register`` created.

    Args:
        register_task_id: The task whose result (see ``trainflow.tasks.registry.register_step``) says
            whether approval is required and holds the comparison.
        timeout_param: DAG param holding the response timeout in hours.

    Options are ``Approve`` / ``Reject``; the timeout default is ``Reject``. The reviewer can
    add a comment (form field ``comment``). Unlike ``ApprovalOperator``, a rejection does not
    skip ``promote``: the rejection has to be recorded on the model version too. The result
    (XCom) is ``{"chosen_options", "params_input", "responded_at", "responded_by_user",
    "timed_out"}``.
    """

    operator_extra_links = (MLflowRunLink(), MLflowModelVersionLink())
    ui_color = "#fdd9a5"

    def __init__(self, *, register_task_id: str = "register", timeout_param: str = "approval_timeout_hours", **kwargs: Any) -> None:
        kwargs.setdefault("subject", "Promote the new model version to champion?")
        kwargs.setdefault("defaults", ApprovalOperator.REJECT)
        # ``params`` arrives already merged with the DAG's (marked source="dag"); HITLOperator
        # keeps only the task's own, so the form field is added marked as the task's.
        params = kwargs.get("params")
        params = params if isinstance(params, ParamsDict) else ParamsDict(params or {})
        if "comment" not in params:
            params["comment"] = Param(
                None,
                type=["null", "string"],
                maxLength=5000,
                title="Comment",
                description="Why you approve or reject (optional); recorded on the MLflow model version.",
                source="task",
            )
        kwargs["params"] = params
        kwargs.setdefault("response_timeout", dt.timedelta(hours=DEFAULT_TIMEOUT_HOURS))
        super().__init__(**kwargs)
        self.register_task_id = register_task_id
        self.timeout_param = timeout_param

    def execute(self, context: Any) -> Any:
        from trainflow.tasks.registry import approval_request

        result = context["ti"].xcom_pull(task_ids=self.register_task_id)
        if not result:
            raise AirflowSkipException(f"no result from {self.register_task_id!r}: nothing to review")
        approval = result.get("approval") or {}
        if not approval.get("required"):
            raise AirflowSkipException(
                f"{result['name']} v{result['version']}: no approval needed "
                f"({approval.get('reason') or 'require_approval is off for this run'}); decision: "
                f"{result['decision'].get('outcome')}"
            )
        hours = float(approval.get("timeout_hours") or context["params"].get(self.timeout_param) or DEFAULT_TIMEOUT_HOURS)
        self.response_timeout = dt.timedelta(hours=hours)
        links = review_links(result)
        review = result.get("review", {})
        persist_mlflow_links(
            context,
            experiment_id=review.get("mlflow_experiment_id"),
            run_id=review.get("mlflow_run_id"),
            model_name=result["name"],
            model_version=result["version"],
        )
        self.subject, self.body = approval_request(
            result,
            dataset=review.get("dataset"),
            training=review.get("training"),
            links=links,
            timeout_hours=hours,
            baseline_name=review.get("baseline_name", "baseline"),
        )
        self.log.info("asking for approval: %s (timeout %g h, default Reject)", self.subject, hours)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        # HITLOperator's, not ApprovalOperator's: a Reject must reach ``promote`` to be recorded.
        ret = HITLOperator.execute_complete(self, context=context, event=event)
        responded_at = ret.get("responded_at")
        user = ret.get("responded_by_user") or {}
        return {
            "chosen_options": list(ret["chosen_options"]),
            "params_input": dict(ret.get("params_input") or {}),
            "responded_at": responded_at.isoformat() if hasattr(responded_at, "isoformat") else str(responded_at or ""),
            "responded_by_user": {"id": str(user.get("id", "")), "name": str(user.get("name", ""))} if user else None,
            "timed_out": bool(event.get("timedout")) or not user,
        }


MLflowRunLink.operators = [*getattr(MLflowRunLink, "operators", []), ModelApprovalOperator]
MLflowModelVersionLink.operators = [*getattr(MLflowModelVersionLink, "operators", []), ModelApprovalOperator]
