"""The served forecaster: (n, 20, 2) histories → (n, 30, 2) forecasts in the same frame, logged
as ``pyfunc.py`` + a ``torch.export`` program.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from trainflow.trainers.serving import ServedModel

HERE = os.path.dirname(os.path.abspath(__file__))


class ServedForecaster(torch.nn.Module):
    """(n, 20, 2) histories, re-centred on their last position → (n, 30, 2) forecasts in the same
    frame; the served contract has no surrounding vehicles (the model's history-only path)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.model(history)


def _driving_example(manifest) -> tuple[tuple[torch.Tensor, ...], Any, np.ndarray]:
    """Model inputs (re-centred, as the pyfunc feeds them), the raw example, the origins."""
    from trainflow.trainers.driving.evaluation import focal_tracks

    _, tracks = focal_tracks(manifest, "eval")
    history = np.ascontiguousarray(tracks[:8, :20]).astype(np.float32)
    origin = history[:, -1:, :].astype(np.float64)
    local = (history.astype(np.float64) - origin).astype(np.float32)
    return (torch.from_numpy(local),), history, origin


def served_forecaster(state: dict[str, torch.Tensor], config: dict[str, Any], manifest, tmp_dir: str) -> ServedModel:
    """The served model of an exported driving run (see :class:`trainflow.trainers.serving.ServedModel`)."""
    from trainflow.trainers.driving.model import build_forecaster

    model = build_forecaster(config["export_config"])
    model.load_state_dict(state)
    inputs, example, origin = _driving_example(manifest)
    return ServedModel(
        module=ServedForecaster(model).eval(),
        inputs=inputs,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        example=example,
        code=os.path.join(HERE, "pyfunc.py"),
        output_offset=origin,
    )
