"""
### Recommendation training

Trains a recommender on MovieLens-style interactions, end to end:

1. **shard**: raw interactions → a versioned Parquet dataset (NCF protocol: each user's latest
   interaction held out with 99 sampled negatives) under `{root}/datasets/`. Same inputs →
   the committed version is reused (a cache hit the log says).

Trigger it with the form (every param is described there) or with a `conf`, e.g.
`{"source_url": "movielens-1m", "epochs": 10}`. Runs weekly; each run is idempotent.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, dag, task
from trainflow_airflow.dag_support import build_params, default_args, run_shard

KIND = "recommendation"
DATASET = Asset(name="trainflow_recommendation_dataset", uri="trainflow://datasets/recommendation")


@dag(
    schedule="@weekly",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    params=build_params(KIND),
    default_args=default_args(),
    tags=["trainflow", KIND, "training"],
    doc_md=__doc__,
)
def recommendation_training():
    @task(outlets=[DATASET])
    def shard(**context):
        """Shard the raw interactions (or reuse the committed version)."""
        return run_shard(context, KIND, DATASET)

    shard()


recommendation_training()
