"""Score a finished driving run the way the DAG does: log its served model (the pyfunc) to
MLflow, load it back and evaluate it with the scene on ``valid`` and/or ``eval``::

    python -m trainflow.trainers.driving.served_eval --run-dir file:///.../runs/driving_training/RUN --split valid --split eval

The MLflow store is ``TRAINFLOW_DATA_DIR``'s (or ``MLFLOW_TRACKING_URI``). Prints one JSON object:
per split, the metrics and each metric's relative change against constant velocity; the plots
of the last split are logged to the MLflow run (and copied to ``--plots-dir`` when given).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

SUMMARY = ("ade", "fde", "miss_rate", "ade_1s", "fde_1s", "ade_2s", "fde_2s", "ade_3s", "fde_3s",
           "min_ade_6", "min_fde_6", "miss_rate_6", "min_ade_6_1s", "min_fde_6_1s", "min_ade_6_2s",
           "min_fde_6_2s", "top_ade_6", "top_fde_6", "history_only_ade", "history_only_fde")


def _baseline_key(key: str) -> str:
    """The constant-velocity metric ``key`` is compared with (the same horizon)."""
    if key.startswith("top_"):
        return "baseline_" + key.removeprefix("top_").removesuffix("_6")
    return "baseline_" + key.removeprefix("history_only_")


def served_metrics(run_dir: str, splits: list[str], plots_dir: str | None = None) -> dict[str, Any]:
    import mlflow

    from trainflow.tasks.evaluation import evaluate_step
    from trainflow.tasks.settings import get_settings
    from trainflow.trainers.loop import load_exported_model
    from trainflow.trainers.serving import log_serving_model

    settings = get_settings()
    _, config = load_exported_model(run_dir, settings)
    manifest_uri = config["train_config"]["manifest_uri"]
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("trainflow-driving-served-eval")
    with mlflow.start_run(run_name=os.path.basename(run_dir.rstrip("/"))) as run:
        pass
    logged = log_serving_model(run_dir, run.info.run_id, settings)
    out: dict[str, Any] = {"model_uri": logged["model_uri"], "mlflow_run_id": run.info.run_id, "splits": {}}
    for i, split in enumerate(splits):
        last = i == len(splits) - 1
        result = evaluate_step("driving", logged["model_uri"], manifest_uri, split=split, settings=settings,
                               mlflow_run_id=run.info.run_id if last else None)
        metrics = result["metrics"]
        summary = {}
        for key in SUMMARY:
            if key not in metrics:
                continue
            base = metrics.get(_baseline_key(key))
            summary[key] = {"model": round(metrics[key], 4), "constant_velocity": None if base is None else round(base, 4),
                            "below_cv": None if not base else round(1 - metrics[key] / base, 4)}
        out["splits"][split] = {"num_samples": metrics.get("num_samples"), "summary": summary, "metrics": metrics}
        if last and plots_dir:
            from mlflow import MlflowClient

            os.makedirs(plots_dir, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                local = MlflowClient(settings.mlflow_tracking_uri).download_artifacts(run.info.run_id, "plots", tmp)
                for name in os.listdir(local):
                    shutil.copy(os.path.join(local, name), os.path.join(plots_dir, name))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--split", action="append", choices=("valid", "eval"), required=True)
    parser.add_argument("--plots-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    print(json.dumps(served_metrics(args.run_dir, args.split, args.plots_dir), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
