"""Metric functions in numpy that pipelines' evaluators and families share: one implementation
for the trainers (model selection on ``valid``) and for the evaluation step (the numbers a
reviewer sees).

Ranking (one held-out positive ranked among sampled negatives): HR@K, NDCG@K, MRR. Ties are
pessimistic: a negative that scores the same as the positive ranks above it, as in the
reference evaluation of He et al. 2017 (``heapq.nlargest`` over the negatives followed by the
positive keeps equal-scored negatives first). If the positive also appears among its own
negatives (as in 156 rows of that paper's ``ml-1m.test.negative``), that copy is ignored: the
reference code scores items through a dict keyed by item, so the duplicate collapses into the
positive.

Trajectories (K = 1): ADE (mean error over the forecast frames), FDE (final error), miss rate
(FDE > 2 m), and ADE/FDE at 1, 2 and 3 s; the constant-velocity baseline.
"""

from __future__ import annotations

import numpy as np

MISS_THRESHOLD_M = 2.0
HORIZONS_S = (1, 2, 3)


# --- ranking ------------------------------------------------------------------------
def rank_of_positive(pos_scores: np.ndarray, neg_scores: np.ndarray, neg_valid: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each positive among its negatives, pessimistic on ties.

    Args:
        pos_scores: ``(n,)`` score of each held-out positive.
        neg_scores: ``(n, m)`` scores of its negatives.
        neg_valid: Optional ``(n, m)`` mask; ``False`` entries (e.g. a negative that is the
            positive itself) are ignored.

    Returns:
        ``(n,)`` int64: the number of (valid) negatives scoring >= the positive. A NaN
        negative never outranks the positive; a NaN positive ranks below every negative.
    """
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    if neg.ndim != 2 or pos.shape != (neg.shape[0],):
        raise ValueError(f"pos_scores must be (n,) and neg_scores (n, m); got {pos.shape} and {neg.shape}")
    neg = np.where(np.isnan(neg), -np.inf, neg)
    above = neg >= pos[:, None]
    if neg_valid is not None:
        above &= np.asarray(neg_valid, dtype=bool)
    ranks = above.sum(axis=1).astype(np.int64)
    return np.where(np.isnan(pos), neg.shape[1], ranks)


def hit_ratio(ranks: np.ndarray, k: int) -> float:
    """HR@K: share of positives ranked in the top ``k`` (rank < k)."""
    ranks = np.asarray(ranks)
    return float((ranks < k).mean()) if ranks.size else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@K with one relevant item: mean of ``1 / log2(rank + 2)`` over ranks < k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return float("nan")
    return float(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0).mean())


def ranking_metrics(ranks: np.ndarray, k: int) -> dict[str, float]:
    """``{hr_at_K, ndcg_at_K, mrr}`` of the given 0-based ranks."""
    ranks = np.asarray(ranks)
    return {
        f"hr_at_{k}": hit_ratio(ranks, k),
        f"ndcg_at_{k}": ndcg(ranks, k),
        "mrr": float((1.0 / (ranks + 1.0)).mean()) if ranks.size else float("nan"),
    }


def top_k_lists(candidates: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ``k`` best candidates by score (``(n, k)`` item indices, best first)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(np.asarray(candidates), order, axis=1)


def list_diversity(top_k: np.ndarray, item_popularity: np.ndarray, num_items: int) -> dict[str, float]:
    """Coverage and popularity bias of recommended lists.

    Args:
        top_k: ``(n, k)`` recommended item indices.
        item_popularity: ``(num_items,)`` training interactions per item.
        num_items: Size of the catalogue.

    Returns:
        ``coverage``: share of the catalogue recommended to anyone; ``avg_popularity``: mean
        popularity percentile (0 = least, 1 = most popular) of recommended items;
        ``gini``: Gini index of how often items are recommended (0 = even, 1 = one item).
    """
    flat = np.asarray(top_k).reshape(-1)
    popularity = np.asarray(item_popularity, dtype=np.float64)
    percentile = np.argsort(np.argsort(popularity, kind="stable"), kind="stable") / max(len(popularity) - 1, 1)
    counts = np.sort(np.bincount(flat, minlength=num_items).astype(np.float64))
    n = counts.size
    gini = float((2 * np.arange(1, n + 1) - n - 1).dot(counts) / (n * counts.sum())) if counts.sum() else 0.0
    return {
        "coverage": float(np.unique(flat).size / num_items),
        "avg_popularity": float(percentile[flat].mean()) if flat.size else float("nan"),
        "gini": gini,
    }


# --- trajectories -------------------------------------------------------------------------------
def displacement_metrics(
    forecast: np.ndarray,
    future: np.ndarray,
    *,
    frame_rate_hz: int = 10,
    miss_threshold: float = MISS_THRESHOLD_M,
    prefix: str = "",
) -> dict[str, float]:
    """ADE, FDE, miss rate and per-horizon ADE/FDE of forecasts against the true futures.

    Args:
        forecast: (n, F, 2) predicted positions.
        future: (n, F, 2) true positions, same frame.
        frame_rate_hz: Frames per second (horizon h s ends at frame h × rate).
        miss_threshold: A forecast misses when its final error exceeds this (m).
        prefix: Prepended to every key (``baseline_`` for the baseline's).

    Returns:
        ``ade``, ``fde``, ``miss_rate``, ``ade_{h}s`` / ``fde_{h}s`` for the horizons within
        F, and ``num_samples``, each key with ``prefix``.

    Raises:
        ValueError: shapes differ, are not (n, F, 2), or n is zero.
    """
    forecast = np.asarray(forecast, dtype=np.float64)
    future = np.asarray(future, dtype=np.float64)
    if forecast.shape != future.shape or forecast.ndim != 3 or forecast.shape[2] != 2:
        raise ValueError(f"forecast {forecast.shape} and future {future.shape} must both be (n, F, 2)")
    if forecast.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    error = np.linalg.norm(forecast - future, axis=-1)
    metrics = {
        "ade": float(error.mean()),
        "fde": float(error[:, -1].mean()),
        "miss_rate": float((error[:, -1] > miss_threshold).mean()),
    }
    for horizon in HORIZONS_S:
        frames = horizon * frame_rate_hz
        if frames <= error.shape[1]:
            metrics[f"ade_{horizon}s"] = float(error[:, :frames].mean())
            metrics[f"fde_{horizon}s"] = float(error[:, frames - 1].mean())
    metrics["num_samples"] = float(error.shape[0])
    return {prefix + key: value for key, value in metrics.items()}


def error_by_frame(forecast: np.ndarray, future: np.ndarray) -> np.ndarray:
    """Mean displacement error at each forecast frame, ``(F,)``."""
    return np.linalg.norm(np.asarray(forecast, np.float64) - np.asarray(future, np.float64), axis=-1).mean(axis=0)


def constant_velocity_forecast(history: np.ndarray, num_future: int = 30) -> np.ndarray:
    """The constant-velocity baseline (the motion-forecasting benchmarks' reference): mean velocity over the history.

    Args:
        history: (n, T, 2) observed positions (T >= 2), any fixed frame.
        num_future: Frames to forecast.

    Returns:
        (n, num_future, 2) positions: last position + k × mean per-frame displacement.
    """
    history = np.asarray(history, dtype=np.float64)
    if history.ndim != 3 or history.shape[1] < 2 or history.shape[2] != 2:
        raise ValueError(f"history must have shape (n, T>=2, 2), got {history.shape}")
    velocity = (history[:, -1] - history[:, 0]) / (history.shape[1] - 1)
    steps = np.arange(1, num_future + 1, dtype=np.float64)[None, :, None]
    return history[:, -1:, :] + steps * velocity[:, None, :]
