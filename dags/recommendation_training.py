"""
### Recommendation training

Trains a recommender on MovieLens-style interactions, end to end:

1. **shard**: raw interactions → a versioned Parquet dataset (NCF protocol: each user's latest
   interaction held out with 99 sampled negatives) under `{root}/datasets/`. Same inputs →
   the committed version is reused (a cache hit the log says).
2. **train**: torchrun runs `nproc_per_node` processes (DDP or FSDP2) of the chosen model
   (NeuMF / GMF / MLP from the NCF paper, or the sequence-aware SASRec), with progress lines
   and checkpoints under `{root}/runs/<dag_id>/<run_id>/`; a retried task resumes from the last
   committed checkpoint. Uses the `training` pool.
3. **evaluate**: HR@K / NDCG@K on the held-out items vs ItemPop, coverage and popularity bias,
   plots in the MLflow run.
4. **register**: a version of `registered_model_name` with lineage tags and a model card; it
   becomes `champion` only if it beats the current champion by `promotion_margin`.

Trigger it with the form (every param is described there) or with a `conf`, e.g.
`{"source_url": "movielens-1m", "epochs": 10}`. Runs weekly on the production configuration
(Variable `trainflow_recommendation_production`; none set: the run fails at once, it never trains
on the form's demo defaults) and whenever new raw data is announced on the Asset
`trainflow://raw/recommendation` (the event's `source_url` is sharded). Without a reviewer a
version becomes champion only by beating the champion on the same dataset. Each run is idempotent.
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

KIND = "recommendation"
TRAINING_POOL = "training"
RAW_DATA = raw_data_asset(KIND)
DATASET = Asset(name="trainflow_recommendation_dataset", uri="trainflow://datasets/recommendation")
MODEL = Asset(name="trainflow_recommendation_model", uri="trainflow://models/recommendation")


@dag(
    schedule=training_schedule(KIND, "@weekly", RAW_DATA),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    params=build_params(KIND),
    default_args=default_args(),
    tags=["trainflow", KIND, "training"],
    doc_md=__doc__,
)
def recommendation_training():
    pipeline_tasks(KIND, DATASET, MODEL, TRAINING_POOL, raw_asset=RAW_DATA)


recommendation_training()
