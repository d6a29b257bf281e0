"""Evaluation: score a logged model (any ``mlflow.pyfunc`` URI) on a dataset's eval split,
against the pipeline's baseline, with the plots a reviewer needs.

The model is called through its served contract (see DESIGN.md), so the same code scores the
model just trained (``runs:/...``), any registered version (``models:/name/3``) or a baseline.
What is scored and how is the pipeline's evaluator
(:attr:`trainflow.tasks.pipelines.PipelineSpec.evaluate`); this module is the driver: it loads the
model, calls the evaluator, logs metrics and plots to the MLflow run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import Settings, get_settings
from trainflow.tasks.tracking import require_tracking_server

log = logging.getLogger(__name__)

Predictor = Callable[[Any], Any]


def load_predictor(model_uri: str, tracking_uri: str | None = None) -> Predictor:
    """``predict`` of the pyfunc model at ``model_uri``."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri).predict


# --- plots ---------------------------------------------------------------------------------
def figure():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(histories: dict[str, list[tuple[int, float]]], out_dir: str) -> str | None:
    """Loss curves (metric key → [(step, value)]) as one PNG, or ``None`` without data."""
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    plt = figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in sorted(histories.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, label=key)
    ax.set(xlabel="step", ylabel="loss", title="Training and validation loss")
    ax.legend()
    path = save_figure(fig, out_dir, "loss_curves.png")
    plt.close("all")
    return path


def bar_plot(plt, model_values, base_values, labels, base_name, out_dir) -> str:
    """Model vs baseline bars per metric as ``metrics_vs_baseline.png``; returns the path."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, model_values, 0.4, label="model")
    ax.bar(x + 0.2, base_values, 0.4, label=base_name)
    ax.set_xticks(x, labels, rotation=20)
    ax.set_title(f"Model vs {base_name} (same evaluation rows)")
    ax.legend()
    return save_figure(fig, out_dir, "metrics_vs_baseline.png")


def save_figure(fig, out_dir: str, name: str) -> str:
    """Save ``fig`` as ``out_dir/name`` (PNG); returns the path."""
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- the step ------------------------------------------------------------------------------
def evaluate_step(
    pipeline: Any,
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

    Raises:
        trainflow.tasks.pipelines.UnknownPipelineError: no such pipeline.
        ValueError: the dataset is of another pipeline.
    """
    from trainflow.tasks.pipelines import get_pipeline

    spec = get_pipeline(pipeline)
    settings = settings or get_settings()
    manifest = load_manifest(manifest_uri, settings)
    if manifest.kind != spec.name:
        raise ValueError(f"{manifest_uri} holds {manifest.kind} data, not {spec.name}")
    require_tracking_server(settings.mlflow_tracking_uri)  # refused: fail in seconds, not minutes
    predict = load_predictor(model_uri, settings.mlflow_tracking_uri)
    report = spec.evaluate(manifest, predict, split=split)
    metrics = {k: float(v) for k, v in report["metrics"].items()}
    _log_summary(spec, metrics)
    artifacts: list[str] = []
    if mlflow_run_id:
        import time

        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(settings.mlflow_tracking_uri)
        now = int(time.time() * 1000)
        client.log_batch(mlflow_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if np.isfinite(v)])
        with tempfile.TemporaryDirectory() as out_dir:
            paths = list(spec.plot(report, out_dir)) if spec.plot else []
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


def _log_summary(spec, metrics: dict[str, float]) -> None:
    for key in spec.headline_metrics:
        if key in metrics:
            base = metrics.get(f"baseline_{key}")
            log.info("%-11s model %.4f   %s %s", key, metrics[key], spec.baseline_name, "-" if base is None else f"{base:.4f}")
