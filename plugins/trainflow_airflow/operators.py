"""``@trainflow_task``: TaskFlow tasks that carry the MLflow extra links."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk.bases.decorator import task_decorator_factory

from trainflow.airflow.links import MLflowModelVersionLink, MLflowRunLink


class TrainflowStepOperator(_PythonDecoratedOperator):
    """A TaskFlow Python task with links to its MLflow run and model version."""

    custom_operator_name = "@trainflow_task"
    operator_extra_links = (MLflowRunLink(), MLflowModelVersionLink())


MLflowRunLink.operators = [*getattr(MLflowRunLink, "operators", []), TrainflowStepOperator]
MLflowModelVersionLink.operators = [*getattr(MLflowModelVersionLink, "operators", []), TrainflowStepOperator]


def trainflow_task(python_callable: Callable | None = None, **kwargs: Any):
    """Like ``@task``, with the MLflow extra links on the task."""
    return task_decorator_factory(
        python_callable=python_callable, decorated_operator_class=TrainflowStepOperator, **kwargs
    )
