"""
### Announce new raw data

Tells a pipeline that new raw data has landed: emits an event of the pipeline's raw-data Asset
(`trainflow://raw/<pipeline>`) whose extra is `{"source_url": ...}` (and `dataset_name` when
given). The pipeline's training DAG, scheduled on that Asset, then shards exactly that URL.
The URL is checked first (it exists, its format is known), so a bad drop fails here.

Trigger it from the form, or do the same from any system with Airflow's REST API:
`POST /api/v2/assets/events` with `{"asset_id": <id of trainflow://raw/<pipeline>>, "extra": {"source_url": "s3://..."}}`.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag, task

from trainflow.airflow.dag_support import default_args, raw_data_asset
from trainflow.airflow.raw_data import pipelines

PIPELINES = pipelines()
# The form preselects the first example pipeline when it is installed.
DEFAULT = "recommendation" if "recommendation" in PIPELINES else PIPELINES[0]


@dag(
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    params={
        "pipeline": Param(DEFAULT, type="string", enum=list(PIPELINES), title="Pipeline",
                          description="Whose raw data landed."),
        "source_url": Param("", type="string", minLength=1, title="Source URL",
                            description="Where the new data is (file://, s3://...), in the pipeline's source format."),
        "dataset_name": Param(None, type=["null", "string"], pattern=r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]*$",
                              title="Dataset name",
                              description="The dataset this drop is a new version of; empty: the production "
                              "configuration's, else derived from the URL."),
    },
    default_args={**default_args(), "retries": 1},
    tags=["trainflow", "raw-data"],
    doc_md=__doc__,
)
def announce_raw_data():
    for kind in PIPELINES:
        asset = raw_data_asset(kind)

        @task.short_circuit(task_id=f"is_{kind}", ignore_downstream_trigger_rules=False)
        def chosen(kind=kind, **context):
            """Whether this run announces this pipeline's data."""
            return context["params"]["pipeline"] == kind

        @task(task_id=f"announce_{kind}", outlets=[asset])
        def announce(kind=kind, asset=asset, **context):
            """Check the URL and emit the Asset event with it."""
            from trainflow.airflow.raw_data import announce as announce_drop

            params = context["params"]
            return announce_drop(context, kind, asset, params["source_url"], params.get("dataset_name"))

        chosen() >> announce()


announce_raw_data()
