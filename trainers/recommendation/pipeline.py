"""The recommendation pipeline's spec: MovieLens-style interactions, the NCF protocol, HR@10 /
NDCG@10 vs ItemPop. Registered through the ``trainflow.pipelines`` entry point (pyproject.toml).

Imports nothing heavy: the DAG file builds its params from this spec at parse time.
"""

from __future__ import annotations

from typing import Any

from trainflow.tasks.pipelines import Metric, PipelineSpec

MODELS = ("neumf", "gmf", "mlp", "sasrec")
# Row-sharded embedding tables: the recommendation models have tables to shard.
PARALLELISM = ("ddp", "fsdp", "sharded_embeddings", "sharded_embeddings_a2a", "none")

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Tuned on the valid split of ML-100K (docs/quality.md); model_options override them. SASRec:
    # the sampled softmax over 256 negatives a window (valid NDCG@10 0.514 against 0.481 with BCE
    # and 1 negative a position).
    "sasrec": {"max_seq_len": 50, "dropout": 0.2, "num_negatives": 256, "loss": "softmax"},
    "neumf": {"num_negatives": 4},
    "gmf": {"num_negatives": 4},
    "mlp": {"num_negatives": 4},
}

MODEL_SIZE_HELP = (
    "Embedding / hidden size of the model (NCF: GMF factors, MLP tower 2×size...; SASRec: hidden size; "
    "driving: decoder width)."
)
MODEL_OPTIONS_HELP = (
    "Further settings of the model family as JSON, e.g. {\"dropout\": 0.1, \"max_seq_len\": 100} "
    "(fields of RecommendationConfig / DrivingConfig; see docs/trainer.md)."
)


def family_settings(values: dict[str, Any]) -> dict[str, Any]:
    """``RecommendationConfig`` fields from the params ``model``, ``model_size``, ``model_options``
    (which win) and ``seed``."""
    size = int(values["model_size"])
    model = values["model"]
    settings: dict[str, Any] = {"seed": values["seed"], "model": model, **MODEL_PRESETS.get(model, {})}
    if model == "sasrec":
        settings["hidden_size"] = size
    else:
        settings["gmf_factors"] = size
        settings["mlp_layers"] = [max(2 * size, 8), max(size, 4), max(size // 2, 2), max(size // 4, 1)]
    settings.update(values.get("model_options") or {})
    return settings


def _resolve(url: str, settings) -> Any:
    from trainflow.trainers.recommendation.sources import resolve_recommendation_source

    return resolve_recommendation_source(url, settings)


def _split(source, store, config, tmp_dir) -> dict[str, Any]:
    from trainflow.trainers.recommendation.split import shard_recommendation

    return shard_recommendation(source, store, config, tmp_dir)


def _evaluate(manifest, predict, split: str = "eval") -> dict[str, Any]:
    from trainflow.trainers.recommendation.evaluation import evaluate_recommendation

    return evaluate_recommendation(manifest, predict, split=split)


def _plot(report, out_dir: str) -> list[str]:
    from trainflow.trainers.recommendation.evaluation import plot_recommendation

    return plot_recommendation(report, out_dir)


PIPELINE = PipelineSpec(
    name="recommendation",
    description="Recommenders (NCF family, SASRec) on MovieLens-style interactions, NCF protocol.",
    resolve_source=_resolve,
    split=_split,
    # 2: negatives sampled exactly per block of 8,192 users (bounded memory), not from per-user
    # candidate lists thinned while the log streamed: other negatives for the same seed.
    split_version="2",
    family="trainflow.trainers.recommendation.family:RecommendationFamily",
    family_config="trainflow.trainers.recommendation.config:RecommendationConfig",
    family_settings=family_settings,
    serving="trainflow.trainers.recommendation.serving:served_recommender",
    evaluate=_evaluate,
    plot=_plot,
    baseline_name="ItemPop",
    registered_model_name="trainflow-recommendation",
    dag_id="recommendation_training",
    metrics=(
        Metric("hr_at_10", True, headline=True, report=True, gate=True, description="hit ratio @10 of the held-out item"),
        Metric("ndcg_at_10", True, headline=True, report=True, gate=True, description="NDCG@10 of the held-out item"),
        Metric("mrr", True, headline=True, report=True, description="mean reciprocal rank"),
        Metric("coverage_at_10", True, report=True, description="share of the items in some top-10 list"),
    ),
    promotion_metric="ndcg_at_10",
    params={
        "source_url": {
            "default": "synthetic://recommendation?num_interactions=100000",
            "description": (
                "Raw interactions: a MovieLens release name (movielens-100k, movielens-1m, movielens-20m, "
                "movielens-25m, movielens-32m), an fsspec URL of a ratings file / folder / NCF split "
                "(file://, s3://), or synthetic://recommendation?num_interactions=N."
            ),
        },
        "model": {
            "default": "sasrec",
            "schema": {"type": "string", "enum": list(MODELS)},
            "description": (
                "sasrec: self-attention over each user's history in time order (the best here); "
                "neumf, gmf, mlp: the NCF family of He et al. 2017 (tuned with batch_size 512, learning_rate 0.001)."
            ),
        },
        "model_size": {"default": 64, "description": MODEL_SIZE_HELP},
        "model_options": {"description": MODEL_OPTIONS_HELP},
        "epochs": {"default": 100},
        "batch_size": {"default": 256},
        "learning_rate": {"default": 0.002},
        "parallelism": {
            "schema": {"enum": list(PARALLELISM)},
            "description": (
                "ddp: the model replicated on every rank; fsdp: every parameter sharded (FSDP2), each table "
                "gathered for its forward; sharded_embeddings: the user/item embedding tables split row-wise "
                "across ranks and never gathered (each rank holds 1/world of their rows and optimizer state; "
                "for tables too large for one rank), the rest replicated with DDP; sharded_embeddings_a2a: the same "
                "split with all-to-all lookups (only the ids and rows a step needs travel, each rank updates only "
                "its own touched rows: what makes 2 ranks pay off for NeuMF); none: a single process."
            ),
        },
    },
)
