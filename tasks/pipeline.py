"""The work of each pipeline step as a plain function: what the Airflow tasks call.

Each function takes the run's params (already validated by the schema) plus the settings,
returns small JSON (URIs, counts, metrics), and never imports Airflow, so a step can be run
and tested from a shell.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.params import validate_params
from tasks.settings import Settings, get_settings
from tasks.sharding import ShardingConfig, shard_dataset

log = logging.getLogger(__name__)


def shard_step(params: dict[str, Any], kind: str, settings: Settings | None = None) -> dict[str, Any]:
    """Validate the params, then shard the source into a dataset version (or find it).

    Returns:
        The sharding summary (``manifest_uri``, ``version``, ``cache_hit``, split sizes,
        stats) plus the validated ``params``.
    """
    settings = settings or get_settings()
    values = validate_params(params, kind)
    log.info("settings: %s", settings.describe())
    summary = shard_dataset(
        values["source_url"],
        kind,
        name=values["dataset_name"] or None,
        config=ShardingConfig(seed=0),
        settings=settings,
    )
    if summary["cache_hit"]:
        log.info("dataset %s version %s: cache hit, reusing the committed shards", summary["name"], summary["version"])
    else:
        log.info("dataset %s version %s: new version committed", summary["name"], summary["version"])
    log.info("splits: %s", summary["splits"])
    return {**summary, "params": values}
