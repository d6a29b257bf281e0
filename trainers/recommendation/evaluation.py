"""The recommendation evaluator: HR@K / NDCG@K / MRR / coverage of the served model vs ItemPop.

Served contract: ``DataFrame(user_id, item_id)`` → one score per row (higher is better).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainflow.tasks import metrics as M
from trainflow.tasks.evaluation import Predictor, bar_plot, figure, save_figure
from trainflow.tasks.manifest import Manifest

DEFAULT_KS = (1, 5, 10, 20, 50)


def _score_candidates(predict: Predictor, users: np.ndarray, candidates: np.ndarray, batch_rows: int = 200_000) -> np.ndarray:
    import pandas as pd

    n, m = candidates.shape
    user_col = np.repeat(users, m)
    item_col = candidates.reshape(-1)
    scores = np.empty(n * m, dtype=np.float64)
    for start in range(0, n * m, batch_rows):
        frame = pd.DataFrame({"user_id": user_col[start : start + batch_rows], "item_id": item_col[start : start + batch_rows]})
        out = np.asarray(predict(frame), dtype=np.float64).reshape(-1)
        if out.size != len(frame):
            raise ValueError(f"model returned {out.size} scores for {len(frame)} (user_id, item_id) rows")
        scores[start : start + len(frame)] = out
    return scores.reshape(n, m)


def _rank_report(scores: np.ndarray, candidates_idx: np.ndarray, valid: np.ndarray, ks, popularity, num_items, prefix=""):
    ranks = M.rank_of_positive(scores[:, 0], scores[:, 1:], valid)
    out: dict[str, float] = {}
    for k in ks:
        for key, value in M.ranking_metrics(ranks, k).items():
            out[prefix + key] = value
    masked = np.where(np.c_[np.ones(len(valid), bool), valid], scores, -np.inf)
    top10 = M.top_k_lists(candidates_idx, masked, 10)
    for key, value in M.list_diversity(top10, popularity, num_items).items():
        out[f"{prefix}{key}_at_10"] = value
    return out, ranks


def evaluate_recommendation(
    manifest: Manifest, predict: Predictor, *, split: str = "eval", ks=DEFAULT_KS
) -> dict[str, Any]:
    """HR@K, NDCG@K (K in ``ks``), MRR, coverage and popularity bias of a model on ``split``,
    and the same for ItemPop (``baseline_*``) on the same rows.

    Returns:
        ``{"metrics": {...}, "curves": {"k": [...], "hr": [...], "baseline_hr": [...], ...},
        "num_users": n}``
    """
    table = manifest.read_table(split)
    items = manifest.read_file_table("items")
    popularity = items.column("num_train_interactions").to_numpy().astype(np.float64)
    item_ids = items.column("item_id").to_numpy()
    users = table.column("user_id").to_numpy()
    pos_idx = table.column("item_idx").to_numpy().astype(np.int64)
    neg_idx = np.asarray(table.column("neg_item_idx").to_pylist(), dtype=np.int64)
    candidates_idx = np.c_[pos_idx, neg_idx]
    valid = neg_idx != pos_idx[:, None]  # a positive listed among its own negatives counts once
    scores = _score_candidates(predict, users, item_ids[candidates_idx])
    model_metrics, ranks = _rank_report(scores, candidates_idx, valid, ks, popularity, len(item_ids))
    base_scores = popularity[candidates_idx]
    base_metrics, base_ranks = _rank_report(base_scores, candidates_idx, valid, ks, popularity, len(item_ids), "baseline_")
    metrics = {**model_metrics, **base_metrics, "num_users": float(len(users))}
    curve_k = list(range(1, neg_idx.shape[1] + 2))
    curves = {
        "k": curve_k,
        "hr": [M.hit_ratio(ranks, k) for k in curve_k],
        "baseline_hr": [M.hit_ratio(base_ranks, k) for k in curve_k],
        "ndcg": [M.ndcg(ranks, k) for k in curve_k],
        "baseline_ndcg": [M.ndcg(base_ranks, k) for k in curve_k],
    }
    return {"metrics": metrics, "curves": curves, "num_users": int(len(users))}



def plot_recommendation(report: dict[str, Any], out_dir: str) -> list[str]:
    """HR@K vs K and metric-vs-baseline bars as PNG files in ``out_dir``."""
    plt = figure()
    curves, metrics = report["curves"], report["metrics"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curves["k"], curves["hr"], label="model")
    ax.plot(curves["k"], curves["baseline_hr"], label="ItemPop", linestyle="--")
    ax.axvline(10, color="grey", linewidth=0.5)
    ax.set(xlabel="K", ylabel="HR@K", title=f"Hit ratio @K ({report['num_users']} users, 1 positive + negatives)")
    ax.legend()
    paths.append(save_figure(fig, out_dir, "hr_at_k.png"))
    keys = ["hr_at_10", "ndcg_at_10", "mrr", "coverage_at_10"]
    paths.append(bar_plot(plt, [metrics[k] for k in keys], [metrics[f"baseline_{k}"] for k in keys], keys, "ItemPop", out_dir))
    plt.close("all")
    return paths
