"""Refuse a DAG run ``conf`` with a key that is no param of the pipeline, at trigger time.

Airflow validates the values of the declared params (type, range, enum) when a run is created and
answers 400 naming the param, but it accepts keys no param declares: a typo such as ``epoch`` would
create a run that trains with the default ``epochs`` (or, with trainflow, fails at its first task).
This ASGI middleware, registered by the plugin on the API server, answers those triggers of
trainflow's DAGs with the same 400 shape: ``{"detail": "Invalid input for param epoch: unknown
parameter (did you mean 'epochs'? known: ...)"}``. Everything else passes through untouched.
"""

from __future__ import annotations

import json
import re
from typing import Any

TRIGGER_PATH = re.compile(r"/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")


class RejectUnknownConfKeys:
    """ASGI middleware: 400 for ``POST /api/v2/dags/{trainflow dag}/dagRuns`` with an unknown conf key."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        match = TRIGGER_PATH.search(scope.get("path", "")) if scope["type"] == "http" else None
        kind = _pipeline_of(match["dag_id"]) if match and scope.get("method") == "POST" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        messages = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        detail = _unknown_key_detail(body, kind)
        if detail is not None:
            payload = json.dumps({"detail": detail}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _pipeline_of(dag_id: str) -> str | None:
    """The registered pipeline whose DAG is ``dag_id`` (``None``: not a trainflow pipeline's DAG,
    which this middleware leaves to Airflow)."""
    from trainflow.tasks.pipelines import pipeline_for_dag

    spec = pipeline_for_dag(dag_id)
    return spec.name if spec is not None else None


def _unknown_key_detail(body: bytes, kind: str) -> str | None:
    """The 400 detail for the first unknown conf key or invalid value, or ``None`` (also for a
    body Airflow itself should judge: not JSON, no ``conf`` object).

    The values are checked as the first task checks them (:func:`trainflow.tasks.params.validate_params`:
    combinations, the family's ``model_options``, ``batch_size`` vs the world size), except what
    depends on the worker's machine (CPU and GPU counts), which the first task still checks.
    """
    from trainflow.tasks.params import (
        ParamError,
        check_schema,
        param_specs,
        unknown_param_message,
        unknown_params,
        validate_params,
    )

    try:
        conf = json.loads(body or b"{}").get("conf")
    except (ValueError, AttributeError):
        return None
    if not isinstance(conf, dict):
        return None
    unknown = unknown_params(conf, kind)
    if unknown:
        return f"Invalid input for param {unknown[0]}: {unknown_param_message(unknown[0], kind)}"
    specs = param_specs(kind)
    try:
        for key, value in conf.items():
            check_schema(key, value, specs[key]["schema"])
    except ParamError:
        return None  # a value the declared schema refuses: Airflow's own 400 says so
    try:
        validate_params(conf, kind, check_machine=False)
    except ParamError as exc:
        return f"Invalid input for param {exc.field}: {exc.reason}"
    return None
