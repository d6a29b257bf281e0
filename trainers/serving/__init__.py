"""Turn a finished training run into an MLflow pyfunc model a reviewer can load anywhere.

The pipeline's serving function (:attr:`trainflow.tasks.pipelines.PipelineSpec.serving`) rebuilds the
exported weights (``{run_dir}/model/``) into the served computation and says how it is
called (:class:`ServedModel`). This driver traces it with ``torch.export`` (architecture and
weights in one ``.pt2`` program, no Python class needed to load it) and logs it with the
pipeline's models-from-code pyfunc file, which needs only torch, numpy, pandas and mlflow.
Before returning, the logged model is loaded back and must reproduce the trained model's
outputs on the input example.

    python -m trainflow.trainers.serving --run-dir file:///.../runs/dag/run --mlflow-run-id ID
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from typing import Any

import numpy as np
import torch

from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServedModel:
    """What a pipeline's serving function returns.

    Attributes:
        module: The served computation, in eval mode (traced with ``torch.export``).
        inputs: Example tensors for ``module`` (as the pyfunc file feeds them).
        dynamic_shapes: ``torch.export`` dynamic shapes of ``inputs`` (the batch dimension).
        example: The pyfunc's input example (what a user passes to ``predict``).
        code: Path of the models-from-code pyfunc file; it loads ``artifacts["program"]``.
        artifacts: Further files the pyfunc needs, by artifact name.
        signature: The MLflow signature; ``None``: inferred from ``example`` and the outputs.
        output_offset: Added to ``module``'s outputs to get what ``predict`` returns (e.g.
            the re-centring origin of trajectories).
    """

    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[Any, ...]
    example: Any
    code: str
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)
    signature: Any = None
    output_offset: Any = 0.0


HERE = os.path.dirname(os.path.abspath(__file__))


def table_served_model(module: torch.nn.Module, manifest, feature_columns: list[str], tmp_dir: str) -> ServedModel:
    """The served model of a network over a table's feature columns (float32 ``(n, f)`` in):
    the generic pyfunc (``table_pyfunc.py``) takes a DataFrame with those columns.

    Args:
        module: The trained network, taking one ``(n, len(feature_columns))`` float32 tensor.
        manifest: The dataset version (the input example is the first rows of ``eval``).
        feature_columns: The columns, in the order the network takes them.
        tmp_dir: Where to write the artifacts.
    """
    table = manifest.read_table("eval", columns=list(feature_columns)).slice(0, 8)
    # float64 in the signature: MLflow casts float32 up safely, never float64 down (a user's
    # DataFrame of Python floats is float64); the pyfunc feeds the network float32.
    example = table.to_pandas().astype(np.float64)
    features = np.ascontiguousarray(example[list(feature_columns)].to_numpy(dtype=np.float32))
    columns = os.path.join(tmp_dir, "columns.json")
    with open(columns, "w") as handle:
        json.dump(list(feature_columns), handle)
    return ServedModel(
        module=module.eval(),
        inputs=(torch.from_numpy(features),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        example=example,
        code=os.path.join(HERE, "table_pyfunc.py"),
        artifacts={"columns": columns},
    )


def pipeline_of(config: dict[str, Any]):
    """The pipeline spec an exported ``config.json`` belongs to."""
    from trainflow.tasks.pipelines import get_pipeline

    return get_pipeline(config.get("pipeline") or config["family"])


def served_module(state: dict[str, torch.Tensor], config: dict[str, Any], manifest=None) -> tuple[torch.nn.Module, str]:
    """The served computation of an exported run, in eval mode, and its pipeline's name."""
    spec = pipeline_of(config)
    if manifest is None:
        manifest = load_manifest(config["train_config"]["manifest_uri"])
    with tempfile.TemporaryDirectory(prefix="trainflow-serving-") as tmp:
        served = spec.load_serving()(state, config, manifest, tmp)
    return served.module.eval(), spec.name


def log_serving_model(run_dir: str, mlflow_run_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Export ``run_dir``'s model and log it as a pyfunc model in MLflow run ``mlflow_run_id``.

    Returns:
        ``{"model_uri", "kind", "model_id"}``.

    Raises:
        RuntimeError: the logged model, loaded back, does not reproduce the trained outputs.
    """
    import mlflow
    from mlflow.models import infer_signature

    from trainflow.trainers.loop import load_exported_model

    settings = settings or get_settings()
    state, config = load_exported_model(run_dir, settings)
    spec = pipeline_of(config)
    manifest = load_manifest(config["train_config"]["manifest_uri"], settings)
    with tempfile.TemporaryDirectory(prefix="trainflow-serving-") as tmp:
        served = spec.load_serving()(state, config, manifest, tmp)
        module = served.module.eval()
        artifacts = {"program": os.path.join(tmp, "program.pt2"), **served.artifacts}
        with torch.no_grad():
            expected = (module(*served.inputs).double().numpy() + served.output_offset).astype(np.float32)
        program = torch.export.export(module, served.inputs, dynamic_shapes=served.dynamic_shapes)
        torch.export.save(program, artifacts["program"])
        signature = served.signature if served.signature is not None else infer_signature(served.example, expected)
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
                python_model=served.code,
                artifacts=artifacts,
                signature=signature,
                input_example=served.example,
                pip_requirements=requirements,
            )
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    got = np.asarray(loaded.predict(served.example), dtype=np.float32).reshape(expected.shape)
    if not np.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(
            f"the logged model does not reproduce the trained model: max difference {np.abs(got - expected).max():.3g}"
        )
    log.info("logged the %s model as %s (reproduces the trained outputs)", spec.name, info.model_uri)
    return {"model_uri": info.model_uri, "kind": spec.name, "model_id": getattr(info, "model_id", None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--mlflow-run-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    result = log_serving_model(args.run_dir, args.mlflow_run_id)
    print(json.dumps(result))
    return 0
