"""The producer side of data-triggered training: announce a new raw-data drop as an event of
the pipeline's raw-data Asset (``trainflow://raw/<pipeline>``), whose extra names the data
(``source_url``); the training DAG, scheduled on that Asset, shards exactly that URL.

Two producers ship with trainflow (``dags/announce_raw_data.py``, ``dags/watch_raw_data.py``);
any other system can post the same event through Airflow's REST API
(``POST /api/v2/assets/events``, see docs/pipelines.md).
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)

def pipelines() -> tuple[str, ...]:
    """The pipelines whose raw data the producer DAGs announce: every registered one
    (:func:`trainflow.tasks.pipelines.pipeline_names`), sorted."""
    from trainflow.tasks.pipelines import pipeline_names

    return tuple(pipeline_names())


def check_source(kind: str, source_url: str) -> str:
    """Resolve ``source_url`` as the ``kind`` pipeline would (it exists, it is readable, its
    format is known) so that a bad drop fails here, not in the training run it would trigger.

    Returns:
        The URL, stripped.

    Raises:
        ValueError and the sources module's errors: a missing or malformed source (bad input).
    """
    from trainflow.airflow.dag_support import settings_with_connections
    from trainflow.tasks.datasets.sources import resolve_source
    from trainflow.tasks.settings import redact_url

    url = (source_url or "").strip()
    if not url:
        raise ValueError("source_url must not be empty")
    source = resolve_source(url, kind, settings_with_connections())
    log.info("%s raw data at %s: reader %s, fingerprint %s", kind, redact_url(url), source.reader, source.fingerprint[:16])
    return url


def announce(context: dict[str, Any], kind: str, asset, source_url: str, dataset_name: str | None = None) -> dict[str, Any]:
    """Check ``source_url`` and set the extra of this task's ``asset`` event."""
    from trainflow.airflow.dag_support import fail_fast_on_bad_input

    with fail_fast_on_bad_input():
        url = check_source(kind, source_url)
    extra: dict[str, Any] = {"source_url": url}
    if dataset_name:
        extra["dataset_name"] = dataset_name
    context["outlet_events"][asset].extra = extra
    log.info("announcing new %s raw data: %s", kind, json.dumps({**extra, "source_url": _redacted(url)}))
    return extra


def _redacted(url: str) -> str:
    from trainflow.tasks.settings import redact_url

    return redact_url(url)


def watch_prefix(kind: str) -> str | None:
    """The object-store prefix the watcher polls for ``kind``: the Airflow Variable
    ``trainflow_<kind>_watch``, else the setting ``TRAINFLOW_<KIND>_WATCH``; ``None`` if neither."""
    from airflow.sdk import Variable

    from trainflow.tasks.settings import pipeline_setting

    value = Variable.get(f"trainflow_{kind}_watch", default=None)
    return (value or "").strip() or pipeline_setting(kind, "WATCH")


def load_announced(kind: str) -> list[str]:
    """The drops of ``kind`` the watcher has announced (names under its prefix)."""
    from trainflow.airflow.dag_support import settings_with_connections
    from trainflow.tasks.retraining import watch_state_path
    from trainflow.tasks.storage import Storage

    store = Storage.from_settings(settings_with_connections())
    path = watch_state_path(kind)
    if not store.exists(path):
        return []
    return list(json.loads(store.read_bytes(path)).get("announced", []))


def remember_announced(kind: str, drop_url: str) -> list[str]:
    """Record ``drop_url`` as announced (after its event was emitted: at least once)."""
    from trainflow.airflow.dag_support import settings_with_connections
    from trainflow.tasks.retraining import watch_state_path
    from trainflow.tasks.storage import Storage

    store = Storage.from_settings(settings_with_connections())
    announced = load_announced(kind)
    name = drop_url.rstrip("/").rsplit("/", 1)[-1]
    if name not in announced:
        announced.append(name)
    store.commit_bytes(watch_state_path(kind), json.dumps({"announced": announced}, indent=1).encode())
    return announced


def detect(context: dict[str, Any], kind: str, asset) -> dict[str, Any]:
    """Body of a watcher's ``detect_<kind>`` task: announce the newest complete drop under the
    watched prefix that was not announced yet; skipped (no event) when there is none."""
    from airflow.sdk.exceptions import AirflowSkipException

    from trainflow.airflow.dag_support import settings_with_connections
    from trainflow.tasks.retraining import find_new_drop
    from trainflow.tasks.settings import redact_url

    prefix = watch_prefix(kind)
    if not prefix:
        raise AirflowSkipException(
            f"no prefix to watch for {kind}: set the Airflow Variable 'trainflow_{kind}_watch' or TRAINFLOW_{kind.upper()}_WATCH"
        )
    drop = find_new_drop(prefix, load_announced(kind), settings_with_connections())
    if drop is None:
        raise AirflowSkipException(f"no new complete drop under {redact_url(prefix)}")
    return announce(context, kind, asset, drop)



def watch_schedule() -> str:
    """The watcher DAG's poll schedule: ``TRAINFLOW_WATCH_SCHEDULE`` (cron), default every 15 minutes."""
    from trainflow.tasks.settings import watch_schedule as configured

    return configured() or "*/15 * * * *"
