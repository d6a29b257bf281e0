"""Turn a finished training run into an MLflow pyfunc model a reviewer can load anywhere.

The exported weights (``{run_dir}/model/``) are rebuilt into the served computation, traced
with ``torch.export`` (architecture and weights in one ``.pt2`` program, no Python class
needed to load it) and logged with a models-from-code pyfunc file
(``recommendation_pyfunc.py`` / ``driving_pyfunc.py``) that needs only torch, numpy, pandas
and mlflow. Before returning, the logged model is loaded back and must reproduce the trained
model's outputs on the input example.

    python -m trainers.serving --run-dir file:///.../runs/dag/run --mlflow-run-id ID
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Any

import numpy as np
import torch

from tasks.manifest import load_manifest
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))


class ServedRecommender(torch.nn.Module):
    """(user_idx, item_idx) → score, for every recommendation model family."""

    def __init__(self, model: torch.nn.Module, sequential: bool) -> None:
        super().__init__()
        self.model = model
        self.sequential = sequential

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if self.sequential:  # SASRec: item 0 is padding, histories are in the model
            return self.model(users=users, items=(items + 1).unsqueeze(1)).squeeze(1)
        return self.model(users, items.unsqueeze(1)).squeeze(1)


class ServedForecaster(torch.nn.Module):
    """(n, 20, 2) histories, re-centred on their last position → (n, 30, 2) forecasts in the same
    frame; the served contract has no surrounding vehicles (the model's history-only path)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.model(history)


def build_recommender(config: dict[str, Any]) -> torch.nn.Module:
    """The recommendation model described by an exported ``config.json``."""
    from trainers.recommendation import models

    fc, ec = config["family_config"], config["export_config"]
    users, items = int(ec["num_users"]), int(ec["num_items"])
    name = fc["model"]
    if name == "gmf":
        return models.GMF(users, items, fc["gmf_factors"])
    if name == "mlp":
        return models.MLP(users, items, tuple(fc["mlp_layers"]), fc["dropout"])
    if name == "neumf":
        return models.NeuMF(users, items, fc["gmf_factors"], tuple(fc["mlp_layers"]), fc["dropout"])
    if name == "sasrec":
        return models.SASRec(users, items, fc["max_seq_len"], fc["hidden_size"], fc["num_blocks"], fc["num_heads"], fc["dropout"])
    raise ValueError(f"unknown recommendation model {name!r}")


def served_module(state: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """The served computation of an exported run, in eval mode, and its kind."""
    family = config["family"]
    if family == "recommendation":
        model = build_recommender(config)
        model.load_state_dict(state)
        module: torch.nn.Module = ServedRecommender(model, config["family_config"]["model"] == "sasrec")
    elif family == "driving":
        from trainers.driving.model import build_forecaster

        model = build_forecaster(config["export_config"])
        model.load_state_dict(state)
        module = ServedForecaster(model)
    else:
        raise ValueError(f"unknown model family {family!r}")
    return module.eval(), family


def _recommendation_example(manifest) -> tuple[tuple[torch.Tensor, ...], Any]:
    import pandas as pd

    eval_rows = manifest.read_table("eval").slice(0, 4)
    users = np.repeat(eval_rows.column("user_idx").to_numpy().astype(np.int64), 3)
    items = np.asarray(eval_rows.column("neg_item_idx").to_pylist(), dtype=np.int64)[:, :3].reshape(-1)
    user_ids = manifest.read_file_table("users").column("user_id").to_numpy()
    item_ids = manifest.read_file_table("items").column("item_id").to_numpy()
    frame = pd.DataFrame({"user_id": user_ids[users], "item_id": item_ids[items]})
    return (torch.from_numpy(users), torch.from_numpy(items)), frame


def _driving_example(manifest) -> tuple[tuple[torch.Tensor, ...], Any, np.ndarray]:
    """Model inputs (re-centred, as the pyfunc feeds them), the raw example, the origins."""
    from tasks.evaluation import focal_tracks

    _, tracks = focal_tracks(manifest, "eval")
    history = np.ascontiguousarray(tracks[:8, :20]).astype(np.float32)
    origin = history[:, -1:, :].astype(np.float64)
    local = (history.astype(np.float64) - origin).astype(np.float32)
    return (torch.from_numpy(local),), history, origin


def log_serving_model(run_dir: str, mlflow_run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Export ``run_dir``'s model and log it as a pyfunc model in MLflow run ``mlflow_run_id``.

    Returns:
        ``{"model_uri", "kind", "signature"}``.

    Raises:
        RuntimeError: the logged model, loaded back, does not reproduce the trained outputs.
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from trainers.loop import load_exported_model

    settings = settings or get_settings()
    state, config = load_exported_model(run_dir, settings)
    module, kind = served_module(state, config)
    manifest = load_manifest(config["train_config"]["manifest_uri"], settings)
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory(prefix="trainflow-serving-") as tmp:
        artifacts = {"program": os.path.join(tmp, "program.pt2")}
        origin = 0.0
        if kind == "recommendation":
            inputs, example = _recommendation_example(manifest)
            dynamic = ({0: batch}, {0: batch})
            np.save(os.path.join(tmp, "user_ids.npy"), manifest.read_file_table("users").column("user_id").to_numpy())
            np.save(os.path.join(tmp, "item_ids.npy"), manifest.read_file_table("items").column("item_id").to_numpy())
            artifacts["user_ids"] = os.path.join(tmp, "user_ids.npy")
            artifacts["item_ids"] = os.path.join(tmp, "item_ids.npy")
            code = os.path.join(HERE, "recommendation_pyfunc.py")
        else:
            inputs, example, origin = _driving_example(manifest)
            dynamic = ({0: batch},)
            code = os.path.join(HERE, "driving_pyfunc.py")
        with torch.no_grad():
            expected = (module(*inputs).double().numpy() + origin).astype(np.float32)
        program = torch.export.export(module, inputs, dynamic_shapes=dynamic)
        torch.export.save(program, artifacts["program"])
        if kind == "recommendation":
            # item_id is optional: with params={"top_k": K} the model ranks every item per user.
            signature = ModelSignature(
                inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "item_id", required=False)]),
                params=ParamSchema([ParamSpec("top_k", "long", 0)]),
            )
        else:
            signature = infer_signature(example, expected)
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        requirements = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}",
            "pandas",
        ]
        with mlflow.start_run(run_id=mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=code,
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
            )
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    got = np.asarray(loaded.predict(example), dtype=np.float32).reshape(expected.shape)
    if not np.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(
            f"the logged model does not reproduce the trained model: max difference {np.abs(got - expected).max():.3g}"
        )
    log.info("logged the %s model as %s (reproduces the trained outputs)", kind, info.model_uri)
    return {"model_uri": info.model_uri, "kind": kind, "model_id": getattr(info, "model_id", None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--mlflow-run-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    result = log_serving_model(args.run_dir, args.mlflow_run_id)
    print(json.dumps(result))
    return 0
