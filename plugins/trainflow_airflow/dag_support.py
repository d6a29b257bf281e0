"""What both pipeline DAGs share: params, default args, Airflow-side connections.

Imports nothing heavy at module level: the DAG
files import it at parse time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from typing import Any

from airflow.sdk import Param

from tasks.params import param_specs

log = logging.getLogger(__name__)

OWNER = "trainflow"


def build_params(kind: str) -> dict[str, Param]:
    """Typed trigger-form params (JSON schema) for the ``kind`` pipeline."""
    params = {}
    for key, spec in param_specs(kind).items():
        schema = dict(spec["schema"])
        params[key] = Param(spec["default"], description=spec["description"], title=spec["title"], **schema)
    return params


def default_args() -> dict[str, Any]:
    return {
        "owner": OWNER,
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=10),
    }


def settings_with_connections():
    """trainflow settings, with S3 credentials from the Airflow connection when it exists.

    The connection id is ``TRAINFLOW_AWS_CONN_ID`` (default ``aws_default``): login = access
    key id, password = secret key, extra ``endpoint_url`` / ``region_name``. Without the
    connection the standard AWS variables (or botocore's chain) apply. Values are passed on
    as plain settings; nothing is logged but whether a connection was used.
    """
    from tasks.settings import get_settings

    settings = get_settings()
    conn_id = os.environ.get("TRAINFLOW_AWS_CONN_ID", "aws_default")
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # not defined: fall back to the environment
        return settings
    extra = conn.extra_dejson or {}
    log.info("S3 credentials from Airflow connection %r", conn_id)
    return settings.with_s3_credentials(
        access_key_id=conn.login or None,
        secret_access_key=conn.password or None,
        endpoint_url=extra.get("endpoint_url") or None,
        region=extra.get("region_name") or None,
    )


@contextlib.contextmanager
def fail_fast_on_bad_input():
    """Bad input (params, a missing or malformed source) fails the task at once: a retry
    cannot fix it. Infrastructure errors (an unreachable store) still go through retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.datasets.sources import SourceNotFoundError
    from tasks.datasets.textio import SourceFormatError
    from tasks.manifest import ManifestError, ShardVerificationError

    try:
        yield
    except (ValueError, SourceNotFoundError, SourceFormatError, ManifestError, ShardVerificationError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def run_shard(context: dict[str, Any], kind: str, asset) -> dict[str, Any]:
    """Body of the ``shard`` task: shard (or reuse) the dataset and annotate the Asset event."""
    from tasks.pipeline import shard_step

    with fail_fast_on_bad_input():
        result = shard_step(dict(context["params"]), kind, settings_with_connections())
    outlet_events = context.get("outlet_events")
    if outlet_events is not None:
        outlet_events[asset].extra = {
            "manifest_uri": result["manifest_uri"],
            "version": result["version"],
            "cache_hit": result["cache_hit"],
        }
    return result
