"""
### Driving (motion forecasting) training

Trains a forecaster of the focal vehicle's next 3 s from 2 s of history on Argoverse-style
scenarios, end to end:

1. **shard**: a folder of scenario CSVs → a versioned Parquet dataset, split by scenario
   (the eval scenarios are never trained on). Same inputs → the committed version is reused.
2. **train**: torchrun runs `nproc_per_node` processes (DDP or FSDP2) of the forecaster (the
   focal vehicle's history in its own heading-aligned frame, plus surrounding vehicles with
   `model=context`); checkpoints under `{root}/runs/<dag_id>/<run_id>/`; a retried task resumes.
3. **evaluate**: ADE / FDE / miss rate, overall and at 1, 2, 3 s, vs constant velocity;
   error-vs-horizon and trajectory plots in the MLflow run.
4. **register**: a version of `registered_model_name` with lineage tags; `champion` only if it
   beats the current champion by `promotion_margin` (lower ADE/FDE is better).

Runs when new raw data is announced on the Asset `trainflow://raw/driving` (the event's extra
`source_url` is what it shards; dags/announce_raw_data.py, dags/watch_raw_data.py or
`POST /api/v2/assets/events`), and on manual trigger with the form or a `conf`, e.g.
`{"source_url": "s3://bucket/argoverse/train"}`. Without a reviewer a version becomes champion
only by beating the champion on the same dataset.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, dag

from trainflow.airflow.dag_support import (
    build_params,
    default_args,
    pipeline_tasks,
    raw_data_asset,
    training_schedule,
)

KIND = "driving"
TRAINING_POOL = "training"
RAW_DATA = raw_data_asset(KIND)
DATASET = Asset(name="trainflow_driving_dataset", uri="trainflow://datasets/driving")
MODEL = Asset(name="trainflow_driving_model", uri="trainflow://models/driving")


@dag(
    schedule=training_schedule(KIND, None, RAW_DATA),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    params=build_params(KIND),
    default_args=default_args(),
    tags=["trainflow", KIND, "training"],
    doc_md=__doc__,
)
def driving_training():
    pipeline_tasks(KIND, DATASET, MODEL, TRAINING_POOL, raw_asset=RAW_DATA)


driving_training()
