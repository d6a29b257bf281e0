"""Displacement metrics of single-forecast motion prediction (Argoverse, K = 1)."""

from __future__ import annotations

import numpy as np

MISS_THRESHOLD_M = 2.0
HORIZONS_S = (1, 2, 3)


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
        ``ade`` (mean error over all frames), ``fde`` (mean final error), ``miss_rate``
        (share of FDE > threshold), ``ade_{h}s`` / ``fde_{h}s`` for the horizons within F,
        and ``num_samples``, each key with ``prefix``.

    Raises:
        ValueError: shapes differ, are not (n, F, 2), or n is zero.
    """
    forecast = np.asarray(forecast, dtype=np.float64)
    future = np.asarray(future, dtype=np.float64)
    if forecast.shape != future.shape or forecast.ndim != 3 or forecast.shape[2] != 2:
        raise ValueError(f"forecast {forecast.shape} and future {future.shape} must both be (n, F, 2)")
    if forecast.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    error = np.linalg.norm(forecast - future, axis=-1)  # (n, F)
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
