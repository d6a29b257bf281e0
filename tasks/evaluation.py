"""Evaluation: score a logged model (any ``mlflow.pyfunc`` URI) on a dataset's eval split,
against the baseline, with the plots a reviewer needs.

The model is called through its served contract (see DESIGN.md), so the same code scores the
model just trained (``runs:/...``), any registered version (``models:/name/3``) or a baseline:

* recommendation: ``DataFrame(user_id, item_id)`` → one score per row (higher is better);
* driving: float32 ``(n, 20, 2)`` histories → ``(n, 30, 2)`` forecasts, same frame.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from tasks import metrics as M
from tasks.manifest import Manifest, load_manifest
from tasks.settings import Settings, get_settings
from tasks.tracking import require_tracking_server

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 20, 50)
HISTORY_FRAMES, FUTURE_FRAMES = 20, 30

Predictor = Callable[[Any], Any]


def load_predictor(model_uri: str, tracking_uri: str | None = None) -> Predictor:
    """``predict`` of the pyfunc model at ``model_uri``."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri).predict


# --- recommendation ----------------------------------------------------------------------
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


# --- driving -------------------------------------------------------------------------------
def focal_tracks(manifest: Manifest, split: str = "eval") -> tuple[list[str], np.ndarray]:
    """Scenario ids and the focal agents' (n, 50, 2) tracks of ``split``."""
    from tasks.datasets.argoverse import batch_tracks

    ids: list[str] = []
    tracks = []
    for batch in manifest.iter_batches(split, columns=["seq_id", "num_tracks", "tracks_xy"]):
        ids.extend(batch.column("seq_id").to_pylist())
        tracks.extend(t[0] for t in batch_tracks(batch))
    if not tracks:
        raise ValueError(f"{manifest.uri}: split {split!r} has no scenarios")
    return ids, np.stack(tracks).astype(np.float32)


def evaluate_driving(manifest: Manifest, predict: Predictor, *, split: str = "eval") -> dict[str, Any]:
    """ADE, FDE, miss rate (overall and at 1/2/3 s) of a forecaster on the focal agents of
    ``split``, and the constant-velocity baseline's (``baseline_*``) on the same scenarios."""
    ids, tracks = focal_tracks(manifest, split)
    history, future = tracks[:, :HISTORY_FRAMES], tracks[:, HISTORY_FRAMES:]
    forecast = np.asarray(predict(history.astype(np.float32)), dtype=np.float64)
    if forecast.shape != future.shape:
        raise ValueError(f"model returned forecasts of shape {forecast.shape}, expected {future.shape}")
    baseline = M.constant_velocity_forecast(history, FUTURE_FRAMES)
    metrics = {**M.displacement_metrics(forecast, future), **M.displacement_metrics(baseline, future, prefix="baseline_")}
    for key in ("ade", "fde"):
        metrics[f"{key}_vs_baseline"] = metrics[key] / metrics[f"baseline_{key}"] - 1.0
    return {
        "metrics": metrics,
        "curves": {
            "seconds": [(f + 1) / 10 for f in range(FUTURE_FRAMES)],
            "error": M.error_by_frame(forecast, future).tolist(),
            "baseline_error": M.error_by_frame(baseline, future).tolist(),
        },
        "examples": {"seq_id": ids[:6], "history": history[:6], "future": future[:6], "forecast": forecast[:6], "baseline": baseline[:6]},
    }


# --- plots ---------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recommendation(report: dict[str, Any], out_dir: str) -> list[str]:
    """HR@K vs K and metric-vs-baseline bars as PNG files in ``out_dir``."""
    plt = _figure()
    curves, metrics = report["curves"], report["metrics"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curves["k"], curves["hr"], label="model")
    ax.plot(curves["k"], curves["baseline_hr"], label="ItemPop", linestyle="--")
    ax.axvline(10, color="grey", linewidth=0.5)
    ax.set(xlabel="K", ylabel="HR@K", title=f"Hit ratio @K ({report['num_users']} users, 1 positive + negatives)")
    ax.legend()
    paths.append(_save(fig, out_dir, "hr_at_k.png"))
    keys = ["hr_at_10", "ndcg_at_10", "mrr", "coverage_at_10"]
    paths.append(_bars(plt, [metrics[k] for k in keys], [metrics[f"baseline_{k}"] for k in keys], keys, "ItemPop", out_dir))
    plt.close("all")
    return paths


def plot_driving(report: dict[str, Any], out_dir: str) -> list[str]:
    """Error vs horizon, metric bars and example trajectories as PNG files in ``out_dir``."""
    plt = _figure()
    curves, metrics, ex = report["curves"], report["metrics"], report["examples"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curves["seconds"], curves["error"], label="model")
    ax.plot(curves["seconds"], curves["baseline_error"], label="constant velocity", linestyle="--")
    ax.set(xlabel="horizon (s)", ylabel="mean displacement error (m)", title="Error vs horizon")
    ax.legend()
    paths.append(_save(fig, out_dir, "error_vs_horizon.png"))
    keys = ["ade", "fde", "ade_1s", "fde_1s", "ade_2s", "fde_2s"]
    paths.append(_bars(plt, [metrics[k] for k in keys], [metrics[f"baseline_{k}"] for k in keys], keys, "constant velocity", out_dir))
    n = len(ex["seq_id"])
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    for i, ax in enumerate(axes.reshape(-1)):
        if i >= n:
            ax.axis("off")
            continue
        h, f, p, b = ex["history"][i], ex["future"][i], ex["forecast"][i], ex["baseline"][i]
        ax.plot(h[:, 0], h[:, 1], "k.-", label="history (2 s)")
        ax.plot(f[:, 0], f[:, 1], "g.-", label="truth (3 s)")
        ax.plot(p[:, 0], p[:, 1], "b.-", label="model")
        ax.plot(b[:, 0], b[:, 1], "r--", label="constant velocity")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"scenario {ex['seq_id'][i]}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "trajectories.png"))
    plt.close("all")
    return paths


def plot_losses(histories: dict[str, list[tuple[int, float]]], out_dir: str) -> str | None:
    """Loss curves (metric key → [(step, value)]) as one PNG, or ``None`` without data."""
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in sorted(histories.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, label=key)
    ax.set(xlabel="step", ylabel="loss", title="Training and validation loss")
    ax.legend()
    path = _save(fig, out_dir, "loss_curves.png")
    plt.close("all")
    return path


def _bars(plt, model_values, base_values, labels, base_name, out_dir) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, model_values, 0.4, label="model")
    ax.bar(x + 0.2, base_values, 0.4, label=base_name)
    ax.set_xticks(x, labels, rotation=20)
    ax.set_title(f"Model vs {base_name} (same evaluation rows)")
    ax.legend()
    return _save(fig, out_dir, "metrics_vs_baseline.png")


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- the step ------------------------------------------------------------------------------
def evaluate_step(
    kind: str,
    model_uri: str,
    manifest_uri: str,
    *,
    mlflow_run_id: str | None = None,
    split: str = "eval",
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Score ``model_uri`` on ``split`` of ``manifest_uri``; log metrics and plots to the
    MLflow run ``mlflow_run_id`` when given.

    Returns:
        ``{"metrics": {...}, "plots": [artifact paths], "manifest_uri", "model_uri"}``.
    """
    settings = settings or get_settings()
    manifest = load_manifest(manifest_uri, settings)
    if manifest.kind != kind:
        raise ValueError(f"{manifest_uri} holds {manifest.kind} data, not {kind}")
    require_tracking_server(settings.mlflow_tracking_uri)  # refused: fail in seconds, not minutes
    predict = load_predictor(model_uri, settings.mlflow_tracking_uri)
    if kind == "recommendation":
        report = evaluate_recommendation(manifest, predict, split=split)
        plotter = plot_recommendation
    else:
        report = evaluate_driving(manifest, predict, split=split)
        plotter = plot_driving
    metrics = {k: float(v) for k, v in report["metrics"].items()}
    _log_summary(kind, metrics)
    artifacts: list[str] = []
    if mlflow_run_id:
        import time

        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(settings.mlflow_tracking_uri)
        now = int(time.time() * 1000)
        client.log_batch(mlflow_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if np.isfinite(v)])
        with tempfile.TemporaryDirectory() as out_dir:
            paths = plotter(report, out_dir)
            histories = {
                key: [(m.step, m.value) for m in client.get_metric_history(mlflow_run_id, key)]
                for key in client.get_run(mlflow_run_id).data.metrics
                if "loss" in key
            }
            loss_plot = plot_losses(histories, out_dir)
            if loss_plot:
                paths.append(loss_plot)
            for path in paths:
                client.log_artifact(mlflow_run_id, path, artifact_path="plots")
                artifacts.append(f"plots/{os.path.basename(path)}")
    return {"metrics": metrics, "plots": artifacts, "manifest_uri": manifest.uri, "model_uri": model_uri}


def _log_summary(kind: str, metrics: dict[str, float]) -> None:
    keys = ("hr_at_10", "ndcg_at_10", "mrr") if kind == "recommendation" else ("ade", "fde", "miss_rate")
    baseline = "ItemPop" if kind == "recommendation" else "constant velocity"
    for key in keys:
        log.info("%-11s model %.4f   %s %.4f", key, metrics[key], baseline, metrics[f"baseline_{key}"])
