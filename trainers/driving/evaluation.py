"""The driving evaluator: ADE / FDE / miss rate of the served forecaster vs constant velocity.

Served contract: float32 ``(n, 20, 2)`` histories → ``(n, 30, 2)`` forecasts, same frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainflow.tasks import metrics as M
from trainflow.tasks.evaluation import Predictor, bar_plot, figure, save_figure
from trainflow.tasks.manifest import Manifest

HISTORY_FRAMES, FUTURE_FRAMES = 20, 30


def focal_tracks(manifest: Manifest, split: str = "eval") -> tuple[list[str], np.ndarray]:
    """Scenario ids and the focal agents' (n, 50, 2) tracks of ``split``."""
    from trainflow.trainers.driving.argoverse import batch_tracks

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



def plot_driving(report: dict[str, Any], out_dir: str) -> list[str]:
    """Error vs horizon, metric bars and example trajectories as PNG files in ``out_dir``."""
    plt = figure()
    curves, metrics, ex = report["curves"], report["metrics"], report["examples"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curves["seconds"], curves["error"], label="model")
    ax.plot(curves["seconds"], curves["baseline_error"], label="constant velocity", linestyle="--")
    ax.set(xlabel="horizon (s)", ylabel="mean displacement error (m)", title="Error vs horizon")
    ax.legend()
    paths.append(save_figure(fig, out_dir, "error_vs_horizon.png"))
    keys = ["ade", "fde", "ade_1s", "fde_1s", "ade_2s", "fde_2s"]
    paths.append(bar_plot(plt, [metrics[k] for k in keys], [metrics[f"baseline_{k}"] for k in keys], keys, "constant velocity", out_dir))
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
    paths.append(save_figure(fig, out_dir, "trajectories.png"))
    plt.close("all")
    return paths
