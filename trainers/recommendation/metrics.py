"""Leave-one-out ranking metrics (NCF protocol: one held-out positive among sampled negatives)."""

from __future__ import annotations

import numpy as np


def rank_of_positive(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """0-based rank of each positive among its negatives, pessimistic on ties.

    A negative scoring the same as the positive counts as ranked above it, so a model that
    scores everything equal (or a collapsed one) gets the worst rank, never the best.

    Args:
        pos_scores: ``(n,)`` score of each held-out positive.
        neg_scores: ``(n, num_negatives)`` scores of its negatives.

    Returns:
        ``(n,)`` int64: number of negatives with score >= the positive's.
    """
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    if neg.ndim != 2 or pos.shape != (neg.shape[0],):
        raise ValueError(f"pos_scores must be (n,) and neg_scores (n, m); got {pos.shape} and {neg.shape}")
    # A NaN negative never outranks the positive; a NaN positive ranks below every negative.
    neg = np.where(np.isnan(neg), -np.inf, neg)
    ranks = (neg >= pos[:, None]).sum(axis=1).astype(np.int64)
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
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def ranking_metrics(ranks: np.ndarray, k: int) -> dict[str, float]:
    """``{hr_at_K, ndcg_at_K, mrr}`` of the given 0-based ranks."""
    ranks = np.asarray(ranks)
    return {
        f"hr_at_{k}": hit_ratio(ranks, k),
        f"ndcg_at_{k}": ndcg(ranks, k),
        "mrr": float((1.0 / (ranks + 1.0)).mean()) if ranks.size else float("nan"),
    }
