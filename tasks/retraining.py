"""Which data an unattended (scheduled or data-triggered) training run uses, and when it may
promote without a reviewer.

A manually triggered run takes its params from the trigger form or its ``conf``. A run that
nobody triggered by hand has no conf, so the form's defaults (the demo's synthetic data) must
never stand in for production data:

* a **scheduled** run (``scheduled``, ``backfill``) trains on the pipeline's *production
  configuration*: the deployment names it once, as the Airflow Variable
  ``trainflow_<pipeline>_production`` or the setting ``TRAINFLOW_<PIPELINE>_PRODUCTION``
  (the Variable wins), either a source URL or a JSON object with ``source_url`` and any other
  params for unattended runs (``{"source_url": "s3://bucket/ratings/", "dataset_name":
  "ratings", "epochs": 20}``). With none configured the run fails at once, saying how to
  configure one;
* an **Asset-triggered** run shards exactly the data its triggering event names: the event's
  extra carries ``source_url`` (and optionally ``dataset_name``); the production
  configuration's other params apply. An event without ``source_url`` is refused.

This module is the engine's half (plain values in, plain values out, no Airflow); the Airflow
glue reads the Variable and the triggering events and calls :func:`resolve_run_params`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

MANUAL = "manual"
ASSET_TRIGGERED = "asset_triggered"
SCHEDULED_RUN_TYPES = ("scheduled", "backfill")
UNATTENDED_RUN_TYPES = (*SCHEDULED_RUN_TYPES, ASSET_TRIGGERED)

ORIGIN_FORM = "form"
"""The source came from the trigger form or the run's conf (a person chose it)."""
ORIGIN_PRODUCTION = "production"
"""The source came from the deployment's production configuration (a scheduled run)."""
ORIGIN_ASSET_EVENT = "asset_event"
"""The source came from the Asset event that triggered the run (new production data)."""
PRODUCTION_ORIGINS = (ORIGIN_PRODUCTION, ORIGIN_ASSET_EVENT)

EVENT_KEYS = ("source_url", "dataset_name")
"""What an Asset event's extra may set for the run it triggers."""


class RunSourceError(ValueError):
    """An unattended run has no production data to train on (or its event names none).

    A configuration problem, not an infrastructure fault: retrying cannot fix it.
    """


def production_variable(pipeline: str) -> str:
    """The Airflow Variable that holds ``pipeline``'s production configuration."""
    return f"trainflow_{pipeline}_production"


def production_setting(pipeline: str) -> str:
    """The environment setting that holds ``pipeline``'s production configuration."""
    return f"TRAINFLOW_{pipeline.upper()}_PRODUCTION"


def how_to_configure(pipeline: str) -> str:
    """One sentence telling an operator how to name ``pipeline``'s production source."""
    return (
        f"set the Airflow Variable {production_variable(pipeline)!r} (or the setting "
        f"{production_setting(pipeline)}) to the production source URL, or to a JSON object "
        '{"source_url": "...", "dataset_name": "...", ...} with any other params for unattended runs '
        "(docs/pipelines.md, 'Retraining in production')"
    )


def parse_production_config(raw: str | Mapping[str, Any] | None, pipeline: str) -> dict[str, Any] | None:
    """The production configuration as params, or ``None`` when none is configured.

    Args:
        raw: The Variable's or setting's value: a source URL, a JSON object (a string or an
            already decoded mapping), or empty.
        pipeline: The pipeline's name, for the messages.

    Returns:
        ``{"source_url": ..., **other params}``, or ``None`` for an empty value.

    Raises:
        RunSourceError: a JSON object without a non-empty ``source_url``, or JSON that is not
            an object.
    """
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        config = dict(raw)
    else:
        text = str(raw).strip()
        if not text:
            return None
        if not text.startswith(("{", "[", '"')):
            return {"source_url": text}
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunSourceError(f"the production configuration of {pipeline!r} is not valid JSON ({exc}); {how_to_configure(pipeline)}") from exc
        if isinstance(config, str):
            return parse_production_config(config, pipeline)
        if not isinstance(config, dict):
            raise RunSourceError(
                f"the production configuration of {pipeline!r} must be a URL or a JSON object, got {type(config).__name__}"
            )
    source = config.get("source_url")
    if not isinstance(source, str) or not source.strip():
        raise RunSourceError(f"the production configuration of {pipeline!r} has no 'source_url'; {how_to_configure(pipeline)}")
    return {**config, "source_url": source.strip()}


def event_source(events: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What the most recent triggering Asset event says about the data (``source_url``...).

    Args:
        events: The triggering events' ``extra`` dicts in the order they happened (oldest
            first). Events that carry no ``source_url`` (e.g. announced by hand without one)
            are ignored when a later one carries it.

    Returns:
        ``{"source_url": ..., "dataset_name": ...}`` (the keys present) of the newest event
        that names a source, or ``None`` when no event does.
    """
    chosen = None
    for extra in events:
        url = (extra or {}).get("source_url")
        if isinstance(url, str) and url.strip():
            chosen = {k: extra[k] for k in EVENT_KEYS if extra.get(k) not in (None, "")}
            chosen["source_url"] = url.strip()
    return chosen


def resolve_run_params(
    params: Mapping[str, Any],
    run_type: str,
    pipeline: str,
    *,
    production: Mapping[str, Any] | None,
    events: Iterable[Mapping[str, Any]] = (),
) -> tuple[dict[str, Any], str]:
    """The params a run trains with, and where its data came from.

    Args:
        params: The run's params as Airflow resolved them (form defaults + conf).
        run_type: The DAG run's type (``manual``, ``scheduled``, ``backfill``, ``asset_triggered``).
        pipeline: The pipeline's name (for messages).
        production: The parsed production configuration (:func:`parse_production_config`).
        events: The triggering Asset events' extras, oldest first.

    Returns:
        ``(params, origin)``: for a manual run the params unchanged and ``form``; for a
        scheduled run the params with the production configuration applied and
        ``production``; for an Asset-triggered run the production configuration (if any)
        with the event's ``source_url`` (and ``dataset_name``) on top, and ``asset_event``.

    Raises:
        RunSourceError: a scheduled run with no production configuration; an Asset-triggered
            run whose events name no ``source_url``.
    """
    run_type = str(getattr(run_type, "value", run_type) or MANUAL)
    values = dict(params)
    if run_type not in UNATTENDED_RUN_TYPES:
        return values, ORIGIN_FORM
    if run_type == ASSET_TRIGGERED:
        event = event_source(list(events))
        if event is None:
            raise RunSourceError(
                f"this {pipeline} run was triggered by an Asset event that names no data: the event's extra "
                "must carry 'source_url' (the new raw data's URL), e.g. POST /api/v2/assets/events with "
                '{"asset_id": ..., "extra": {"source_url": "s3://bucket/raw/drop-2026-12-01/"}}; '
                "the run never falls back to the form's defaults"
            )
        return {**values, **(production or {}), **event}, ORIGIN_ASSET_EVENT
    if production is None:
        raise RunSourceError(
            f"this {run_type} {pipeline} run has no production data to train on: {how_to_configure(pipeline)}. "
            "A run nobody triggered never falls back to the form's default (demo) source."
        )
    return {**values, **production}, ORIGIN_PRODUCTION


# --- the raw-data watcher --------------------------------------------------------------------
READY_MARKER = "_SUCCESS"
"""A folder drop is complete once this file is in it (the Spark / Hadoop convention); a file
drop is complete when it appears (an S3 PUT is atomic; local writers rename into place)."""


def watch_state_path(pipeline: str) -> str:
    """Where, under the storage root, the watcher records the drops it has announced."""
    return f"watch/{pipeline}/announced.json"


def find_new_drop(prefix_url: str, announced: Iterable[str], settings=None, marker: str = READY_MARKER) -> str | None:
    """The newest complete drop directly under ``prefix_url`` that was not announced yet.

    Args:
        prefix_url: The object-store prefix raw data lands in (``s3://bucket/raw/ratings/``);
            each drop is one file or one folder directly under it, named so that newer drops
            sort later (dates, counters).
        announced: Names of the drops already announced.
        settings: Credentials (default: from the environment).
        marker: The file that marks a folder drop complete.

    Returns:
        The new drop's URL (the newest by name when several arrived), or ``None``.
    """
    from trainflow.tasks.storage import Storage

    storage = Storage(prefix_url.rstrip("/"), settings)
    seen = set(announced)
    ready = []
    for name in storage.list():
        base = name.rsplit("/", 1)[-1]
        if base in seen or base.startswith((".", "_")):
            continue
        if storage.is_dir(name) and not storage.exists(f"{name}/{marker}"):
            continue
        ready.append(base)
    if not ready:
        return None
    return storage.url(sorted(ready)[-1])
