"""The driving evaluator: the served forecaster, given each scene, vs constant velocity.

The served model gets the scene (the focal vehicle's 2 s history and the other agents' first
20 frames, see :mod:`trainflow.trainers.driving.serving`) and is scored at K = 1 (ADE / FDE / miss rate of
its single forecast) and at K (minADE / minFDE / miss rate over its K forecasts, 6 by default),
each next to the constant-velocity baseline on the same scenarios (``baseline_*``), overall and
at 1, 2 and 3 s. A model registered before the scene contract (history in, one forecast out)
is scored at K = 1 on the histories alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainflow.tasks import metrics as M
from trainflow.tasks.evaluation import Predictor, bar_plot, figure, save_figure
from trainflow.tasks.manifest import Manifest

HISTORY_FRAMES, FUTURE_FRAMES = 20, 30
FRAME_RATE_HZ = 10
NUM_EXAMPLES = 6


def scenes(manifest: Manifest, split: str = "eval", *, limit: int | None = None) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Scenario ids, the focal agents' (n, 50, 2) tracks and, per scenario, the other agents'
    (m, 50, 2) tracks (NaN where not observed) of ``split``, in manifest order."""
    from trainflow.trainers.driving.argoverse import batch_tracks

    ids: list[str] = []
    focal, others = [], []
    for batch in manifest.iter_batches(split, columns=["seq_id", "num_tracks", "tracks_xy"]):
        ids.extend(batch.column("seq_id").to_pylist())
        for tracks in batch_tracks(batch):
            focal.append(tracks[0])
            others.append(np.asarray(tracks[1:], dtype=np.float32))
        if limit is not None and len(ids) >= limit:
            break
    if not focal:
        raise ValueError(f"{manifest.uri}: split {split!r} has no scenarios")
    if limit is not None:
        ids, focal, others = ids[:limit], focal[:limit], others[:limit]
    return ids, np.stack(focal).astype(np.float32), others


def focal_tracks(manifest: Manifest, split: str = "eval") -> tuple[list[str], np.ndarray]:
    """Scenario ids and the focal agents' (n, 50, 2) tracks of ``split``."""
    ids, focal, _ = scenes(manifest, split)
    return ids, focal


def multimodal_metrics(
    forecasts: np.ndarray, probabilities: np.ndarray, future: np.ndarray, baseline: np.ndarray | None = None
) -> dict[str, float]:
    """minADE / minFDE / miss rate over K forecasts (Argoverse's definition: the forecast with the
    smallest final error is the one scored), overall and at 1, 2, 3 s (the forecast with the
    smallest error at that horizon), and the ADE / FDE of the most probable forecast.

    Args:
        forecasts: (n, K, F, 2).
        probabilities: (n, K).
        future: (n, F, 2) true positions, same frame.
        baseline: (n, F, 2) the constant-velocity forecast: adds ``baseline_min_*_K`` (its
            single forecast's errors, what the K forecasts are compared with).

    Returns:
        ``min_ade_K``, ``min_fde_K``, ``miss_rate_K``, ``min_ade_K_{h}s``, ``min_fde_K_{h}s``,
        ``top_ade_K``, ``top_fde_K`` (the most probable of the K) and the baseline's keys.
    """
    forecasts = np.asarray(forecasts, dtype=np.float64)
    future = np.asarray(future, dtype=np.float64)
    if forecasts.ndim != 4 or forecasts.shape[0] != future.shape[0] or forecasts.shape[2:] != future.shape[1:]:
        raise ValueError(f"forecasts {forecasts.shape} must be (n, K, F, 2) for futures {future.shape}")
    k = forecasts.shape[1]
    error = np.linalg.norm(forecasts - future[:, None], axis=-1)  # (n, K, F)
    rows = np.arange(len(error))
    out: dict[str, float] = {}

    def scored(last: int, prefix: str) -> dict[str, float]:
        best = error[:, :, last - 1].argmin(axis=1)
        chosen = error[rows, best, :last]
        return {f"{prefix}ade": float(chosen.mean()), f"{prefix}fde": float(chosen[:, -1].mean()),
                f"{prefix}miss": float((chosen[:, -1] > M.MISS_THRESHOLD_M).mean())}

    overall = scored(error.shape[2], "")
    out[f"min_ade_{k}"], out[f"min_fde_{k}"], out[f"miss_rate_{k}"] = overall["ade"], overall["fde"], overall["miss"]
    for seconds in (1, 2, 3):
        last = seconds * FRAME_RATE_HZ
        if last <= error.shape[2]:
            at = scored(last, "")
            out[f"min_ade_{k}_{seconds}s"], out[f"min_fde_{k}_{seconds}s"] = at["ade"], at["fde"]
    top = np.asarray(probabilities).argmax(axis=1)
    out[f"top_ade_{k}"] = float(error[rows, top].mean())
    out[f"top_fde_{k}"] = float(error[rows, top, -1].mean())
    if baseline is not None:
        base = M.displacement_metrics(baseline, future, frame_rate_hz=FRAME_RATE_HZ)
        out[f"baseline_min_ade_{k}"], out[f"baseline_min_fde_{k}"] = base["ade"], base["fde"]
        out[f"baseline_miss_rate_{k}"] = base["miss_rate"]
        for seconds in (1, 2, 3):
            if f"ade_{seconds}s" in base:
                out[f"baseline_min_ade_{k}_{seconds}s"] = base[f"ade_{seconds}s"]
                out[f"baseline_min_fde_{k}_{seconds}s"] = base[f"fde_{seconds}s"]
    return out


def takes_scenes(predict: Predictor) -> bool:
    """Whether a served model takes scenes (its MLflow signature has the ``num_forecasts`` param);
    models registered before, and plain callables (a baseline), take histories only."""
    model = getattr(predict, "__self__", None)
    metadata = getattr(model, "metadata", None)
    signature = getattr(metadata, "signature", None)
    if signature is None:
        return False
    params = getattr(signature, "params", None)
    return params is not None and "num_forecasts" in [p.name for p in params.params]


def _call(predict: Predictor, data: np.ndarray, params: dict[str, Any]) -> Any:
    return predict(data, params=params)


def evaluate_driving(manifest: Manifest, predict: Predictor, *, split: str = "eval", num_forecasts: int = 6) -> dict[str, Any]:
    """The served model on the scenes of ``split``: K = 1 ADE, FDE, miss rate (overall and at
    1/2/3 s) and, for a scene model, minADE / minFDE / miss rate over ``num_forecasts``
    forecasts (capped at what the model has) and its history-only call's ADE / FDE
    (``history_only_*``), each with the constant-velocity baseline's (``baseline_*``) on the
    same scenarios."""
    from trainflow.trainers.driving.serving import scene_array

    ids, tracks, others = scenes(manifest, split)
    history, future = tracks[:, :HISTORY_FRAMES], tracks[:, HISTORY_FRAMES:]
    baseline = M.constant_velocity_forecast(history, FUTURE_FRAMES)
    scene_model = takes_scenes(predict)
    forecasts = probabilities = None
    if scene_model:
        scene = scene_array(history, [o[:, :HISTORY_FRAMES] for o in others])
        single = np.asarray(_call(predict, scene, {"num_forecasts": 1})["forecast"], dtype=np.float64)
        answer = predict(scene)  # every forecast the model has, most likely first
        forecasts = np.asarray(answer["forecasts"], dtype=np.float64)[:, :num_forecasts]
        probabilities = np.asarray(answer["probabilities"], dtype=np.float64)[:, :num_forecasts]
        probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
        if not np.allclose(np.asarray(answer["forecast"], np.float64), single, atol=1e-3):
            raise ValueError("the model's single forecast depends on num_forecasts")
    else:
        single = np.asarray(predict(history.astype(np.float32)), dtype=np.float64)
    if single.shape != future.shape:
        raise ValueError(f"model returned forecasts of shape {single.shape}, expected {future.shape}")
    metrics = {**M.displacement_metrics(single, future), **M.displacement_metrics(baseline, future, prefix="baseline_")}
    for key in ("ade", "fde"):
        metrics[f"{key}_vs_baseline"] = metrics[key] / metrics[f"baseline_{key}"] - 1.0
    if forecasts is not None and forecasts.shape[1] > 1:
        k = forecasts.shape[1]
        metrics.update(multimodal_metrics(forecasts, probabilities, future, baseline))
        metrics[f"min_fde_{k}_vs_baseline"] = metrics[f"min_fde_{k}"] / metrics["baseline_fde"] - 1.0
        metrics[f"min_ade_{k}_vs_baseline"] = metrics[f"min_ade_{k}"] / metrics["baseline_ade"] - 1.0
    if scene_model:
        alone = np.asarray(predict(history.astype(np.float32)), dtype=np.float64)
        old = M.displacement_metrics(alone, future)
        metrics.update({f"history_only_{key}": old[key] for key in ("ade", "fde", "miss_rate")})
    examples = _example_indices(future, baseline)
    curves = {
        "seconds": [(f + 1) / FRAME_RATE_HZ for f in range(FUTURE_FRAMES)],
        "error": M.error_by_frame(single, future).tolist(),
        "baseline_error": M.error_by_frame(baseline, future).tolist(),
    }
    if forecasts is not None and forecasts.shape[1] > 1:
        curves["min_error"] = np.linalg.norm(forecasts - future[:, None], axis=-1).min(axis=1).mean(axis=0).tolist()
    return {
        "metrics": metrics,
        "curves": curves,
        "examples": {
            "seq_id": [ids[i] for i in examples],
            "history": history[examples],
            "future": future[examples],
            "forecast": single[examples],
            "baseline": baseline[examples],
            "forecasts": None if forecasts is None else forecasts[examples],
            "probabilities": None if probabilities is None else probabilities[examples],
            "neighbours": [others[i] for i in examples],
        },
    }


def _example_indices(future: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Scenes for the plots: the first three, and three where constant velocity misses most
    (turns, stops), so the plots show where several forecasts matter."""
    final = np.linalg.norm(baseline[:, -1] - future[:, -1], axis=-1)
    hard = [int(i) for i in np.argsort(-final, kind="stable") if i >= 3][:3]
    return np.asarray(list(range(min(3, len(future)))) + hard, dtype=np.int64)[:NUM_EXAMPLES]


def plot_driving(report: dict[str, Any], out_dir: str) -> list[str]:
    """Error vs horizon, metric bars and example scenes (the K forecasts drawn over the
    neighbours' tracks) as PNG files in ``out_dir``."""
    plt = figure()
    curves, metrics, ex = report["curves"], report["metrics"], report["examples"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curves["seconds"], curves["error"], label="model, K = 1")
    if "min_error" in curves:
        ax.plot(curves["seconds"], curves["min_error"], label="model, best of K")
    ax.plot(curves["seconds"], curves["baseline_error"], label="constant velocity", linestyle="--")
    ax.set(xlabel="horizon (s)", ylabel="mean displacement error (m)", title="Error vs horizon")
    ax.legend()
    paths.append(save_figure(fig, out_dir, "error_vs_horizon.png"))
    keys = [k for k in ("ade", "fde", "ade_1s", "fde_1s", "ade_2s", "fde_2s") if k in metrics]
    keys += sorted(k for k in metrics if k.startswith(("min_ade_", "min_fde_")) and k.count("_") == 2)
    paths.append(bar_plot(plt, [metrics[k] for k in keys], [metrics[f"baseline_{k}"] for k in keys], keys,
                          "constant velocity", out_dir))
    n = len(ex["seq_id"])
    fig, axes = plt.subplots(2, 3, figsize=(14, 9))
    for i, ax in enumerate(axes.reshape(-1)):
        if i >= n:
            ax.axis("off")
            continue
        h, f, p, b = ex["history"][i], ex["future"][i], ex["forecast"][i], ex["baseline"][i]
        centre = h[-1]
        for j, track in enumerate(ex["neighbours"][i]):
            near = np.isfinite(track).all(-1) & (np.linalg.norm(track - centre, axis=-1) < 40)
            if near.any():
                ax.plot(track[near, 0], track[near, 1], "-", color="0.75", lw=1,
                        label="other agents (5 s)" if i == 0 and j == 0 else None)
        if ex.get("forecasts") is not None:
            for k, (mode, prob) in enumerate(zip(ex["forecasts"][i], ex["probabilities"][i], strict=True)):
                ax.plot(mode[:, 0], mode[:, 1], "-", color="tab:orange", alpha=0.3 + 0.7 * float(prob) / max(
                    float(ex["probabilities"][i].max()), 1e-9), lw=1.5, label="K forecasts" if i == 0 and k == 0 else None)
                ax.annotate(f"{prob:.2f}", mode[-1], fontsize=6, color="tab:orange")
        ax.plot(h[:, 0], h[:, 1], "k.-", label="history (2 s)")
        ax.plot(f[:, 0], f[:, 1], "g.-", label="truth (3 s)")
        ax.plot(p[:, 0], p[:, 1], "b.-", label="K = 1")
        ax.plot(b[:, 0], b[:, 1], "r--", label="constant velocity")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"scenario {ex['seq_id'][i]}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    paths.append(save_figure(fig, out_dir, "trajectories.png"))
    plt.close("all")
    return paths
