"""
### Watch object storage for new raw data

Polls, for each pipeline, the prefix named by the Airflow Variable `trainflow_<pipeline>_watch`
(or the setting `TRAINFLOW_<PIPELINE>_WATCH`), e.g. `s3://bucket/raw/ratings/`. A *drop* is
one file or one folder directly under it; a folder counts once it holds a `_SUCCESS` marker.
The newest drop not announced yet becomes an event of the pipeline's raw-data Asset
(`trainflow://raw/<pipeline>`, extra `{"source_url": ...}`), which triggers its training DAG;
`remember_<pipeline>` then records it under `{root}/watch/<pipeline>/announced.json` (after the
event: a drop is announced at least once). Nothing new (or no prefix configured): the task is
skipped and no event is emitted. The poll interval is `TRAINFLOW_WATCH_SCHEDULE` (default every
15 minutes).
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from trainflow.airflow.dag_support import default_args, raw_data_asset
from trainflow.airflow.raw_data import pipelines, watch_schedule

PIPELINES = pipelines()


@dag(
    schedule=watch_schedule(),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args={**default_args(), "retries": 2},
    tags=["trainflow", "raw-data"],
    doc_md=__doc__,
)
def watch_raw_data():
    for kind in PIPELINES:
        asset = raw_data_asset(kind)

        @task(task_id=f"detect_{kind}", outlets=[asset])
        def detect(kind=kind, asset=asset, **context):
            """Announce the newest complete drop not announced yet (skipped when there is none)."""
            from trainflow.airflow.raw_data import detect as detect_drop

            return detect_drop(context, kind, asset)

        @task(task_id=f"remember_{kind}")
        def remember(announced, kind=kind):
            """Record the announced drop so that the next poll does not announce it again."""
            from trainflow.airflow.raw_data import remember_announced

            return remember_announced(kind, announced["source_url"])

        remember(detect())


watch_raw_data()
