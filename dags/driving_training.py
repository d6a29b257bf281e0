"""
### Driving (motion forecasting) training

Trains a forecaster of the focal vehicle's next 3 s from 2 s of history on Argoverse-style
scenarios, end to end:

1. **shard**: a folder of scenario CSVs → a versioned Parquet dataset, split by scenario
   (the eval scenarios are never trained on). Same inputs → the committed version is reused.

Runs when the raw driving data Asset is updated, and on manual trigger with the form or a
`conf`, e.g. `{"source_url": "s3://bucket/argoverse/train"}`.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, dag, task
from trainflow_airflow.dag_support import build_params, default_args, run_shard

KIND = "driving"
RAW_DATA = Asset(name="trainflow_driving_raw", uri="trainflow://raw/driving")
DATASET = Asset(name="trainflow_driving_dataset", uri="trainflow://datasets/driving")


@dag(
    schedule=[RAW_DATA],
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=build_params(KIND),
    default_args=default_args(),
    tags=["trainflow", KIND, "training"],
    doc_md=__doc__,
)
def driving_training():
    @task(outlets=[DATASET])
    def shard(**context):
        """Shard the raw scenarios (or reuse the committed version)."""
        return run_shard(context, KIND, DATASET)

    shard()


driving_training()
