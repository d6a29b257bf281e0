"""The served forecaster, logged as ``pyfunc.py`` + a ``torch.export`` program.

Two calls (see ``pyfunc.py`` and docs/evaluation-and-registry.md), told apart by the input's
last axis:

* **a scene**, float32 ``(n, 20 × A, 3)``: per scene the focal vehicle's 20 rows
  ``[x, y, observed]`` then each other agent's 20 rows (``observed`` 0 where a position was not
  seen, or for padding when scenes have fewer agents) → ``forecast`` (n, 30, 2), the single
  forecast (K = 1), ``forecasts`` (n, K, 30, 2), most likely first, and ``probabilities``
  (n, K); K by ``params={"num_forecasts": K}`` (default: all the model has, 6 by default);
* **the history-only call** of the first contract, float32 ``(n, 20, 2)`` → ``(n, 30, 2)``, the
  single forecast without neighbours (what models registered before answer too).

The exported program takes re-centred histories and neighbours (NaN where absent) and returns,
per scene, 1 + K rows of 61 numbers: 30 × [x, y] and a probability (the single forecast first,
with probability 1, then the K forecasts by decreasing probability).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from trainflow.trainers.serving import ServedModel

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE_SCENES = 4
FRAMES = 20


class ServedForecaster(torch.nn.Module):
    """(n, 20, 2) focal histories and (n, M, 20, 2) neighbours' histories (NaN where not
    observed), re-centred on the focal's last position → (n, 1 + K, 61): the single forecast
    and the K forecasts (30 × [x, y] flattened) with their probability (1 for the single one)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        n = history.shape[0]
        if getattr(self.model, "num_modes", 0) > 0:
            single, modes, logits = self.model(history, neighbours, with_modes=True)
            probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=1, descending=True)
            modes = torch.gather(modes, 1, order[:, :, None, None].expand_as(modes))
            positions = torch.cat([single[:, None], modes], dim=1)
            probs = torch.cat([torch.ones_like(probs[:, :1]), probs], dim=1)
        else:
            positions = self.model(history, neighbours)[:, None]
            probs = history.new_ones(n, 1)
        return torch.cat([positions.reshape(n, positions.shape[1], -1), probs[..., None]], dim=-1)


def scene_array(history: np.ndarray, neighbours: list[np.ndarray]) -> np.ndarray:
    """A scene request: float32 (n, 20 × A, 3), A = 1 + the most neighbours of any scene.

    Args:
        history: (n, 20, 2) focal histories.
        neighbours: Per scene, (m_i, 20, 2) other agents' histories, NaN where not observed.

    Returns:
        Per scene the focal's 20 rows ``[x, y, 1]``, then each neighbour's 20 rows
        ``[x, y, observed]`` (unobserved and padding rows ``[0, 0, 0]``).
    """
    history = np.asarray(history, dtype=np.float64)
    most = max([len(o) for o in neighbours] + [0])
    scene = np.zeros((len(history), 1 + most, FRAMES, 3))
    scene[:, 0, :, :2] = history
    scene[:, 0, :, 2] = 1.0
    for i, others in enumerate(neighbours):
        others = np.asarray(others, dtype=np.float64).reshape(-1, FRAMES, 2)
        seen = np.isfinite(others).all(axis=-1)
        scene[i, 1 : 1 + len(others), :, :2] = np.where(seen[..., None], others, 0.0)
        scene[i, 1 : 1 + len(others), :, 2] = seen
    return scene.reshape(len(history), -1, 3).astype(np.float32)


def _driving_example(manifest, max_neighbours: int, neighbours_seen: str = "last"):
    """The example scenes (first ``eval`` scenarios), the program's inputs for them and the
    focal origins (what turns its outputs into what ``predict`` returns)."""
    from trainflow.trainers.driving.evaluation import scenes

    _, tracks, others = scenes(manifest, "eval", limit=EXAMPLE_SCENES)
    neighbours = [o[:, :FRAMES] for o in others]
    example = scene_array(tracks[:, :FRAMES], neighbours)
    # What the pyfunc feeds the program: float32 positions as sent, re-centred in float64.
    agents = example.astype(np.float64).reshape(len(example), -1, FRAMES, 3)
    history = agents[:, 0, :, :2]
    origin = history[:, -1:, :]
    local_neighbours = np.full((len(history), max(2, max_neighbours), FRAMES, 2), np.nan)
    for i in range(len(history)):
        seen = agents[i, 1:, :, 2] > 0.5
        chosen = _nearest(np.where(seen[..., None], agents[i, 1:, :, :2], np.nan), history[i, -1], max_neighbours,
                          neighbours_seen)
        local_neighbours[i, : len(chosen)] = chosen - origin[i]
    inputs = (
        torch.from_numpy((history - origin).astype(np.float32)),
        torch.from_numpy(local_neighbours.astype(np.float32)),
    )
    return inputs, example, origin


def _nearest(others: np.ndarray, last: np.ndarray, limit: int, neighbours_seen: str = "last") -> np.ndarray:
    """The ``limit`` tracks nearest to ``last`` among those seen at the last frame
    (``neighbours_seen="last"``) or at any frame (``"history"``, by their last position seen):
    the training rule (:func:`trainflow.trainers.driving.data.scenario_samples`)."""
    seen_at = np.isfinite(others).all(axis=-1)  # (m, 20)
    seen = seen_at[:, -1] if neighbours_seen == "last" else seen_at.any(axis=1)
    latest = others.shape[1] - 1 - np.argmax(seen_at[:, ::-1], axis=1)
    candidates, latest = others[seen], latest[seen]
    where = candidates[np.arange(len(candidates)), latest]
    order = np.argsort(np.linalg.norm(where - last, axis=-1), kind="stable")
    return candidates[order[:limit]]


def packed_prediction(prediction: Any) -> np.ndarray:
    """The pyfunc's scene answer packed as the program's output (n, 1 + K, 61)."""
    forecast = np.asarray(prediction["forecast"], dtype=np.float64)
    forecasts = np.asarray(prediction["forecasts"], dtype=np.float64)
    probs = np.asarray(prediction["probabilities"], dtype=np.float64)
    n = len(forecast)
    positions = np.concatenate([forecast[:, None], forecasts], axis=1).reshape(n, 1 + forecasts.shape[1], -1)
    probs = np.concatenate([np.ones((n, 1)), probs], axis=1)
    return np.concatenate([positions, probs[..., None]], axis=-1)


def scene_signature(num_modes: int):
    """The MLflow signature: one float32 tensor, a scene (n, 20 × A, 3) or histories (n, 20, 2);
    outputs of the scene call; the ``num_forecasts`` param (default: every forecast)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    k = max(1, num_modes)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, 30, 2), "forecast"),
            TensorSpec(np.dtype(np.float32), (-1, -1, 30, 2), "forecasts"),
            TensorSpec(np.dtype(np.float32), (-1, -1), "probabilities"),
        ]),
        params=ParamSchema([ParamSpec("num_forecasts", "long", k)]),
    )


def served_forecaster(state: dict[str, torch.Tensor], config: dict[str, Any], manifest, tmp_dir: str) -> ServedModel:
    """The served model of an exported driving run (see :class:`trainflow.trainers.serving.ServedModel`)."""
    from trainflow.trainers.driving.model import build_forecaster

    export = config["export_config"]
    model = build_forecaster(export)
    model.load_state_dict(state)
    num_modes = int(export["model"].get("num_modes", 0))
    max_neighbours = int(export.get("max_neighbours", config.get("family_config", {}).get("max_neighbours", 32)))
    neighbours_seen = str(export.get("neighbours_seen", "last"))
    inputs, example, origin = _driving_example(manifest, max_neighbours, neighbours_seen)
    settings = os.path.join(tmp_dir, "scene.json")
    with open(settings, "w") as handle:
        json.dump({"max_neighbours": max_neighbours, "neighbours_seen": neighbours_seen, "num_modes": num_modes,
                   "history_frames": 20, "future_frames": 30}, handle)
    slots = 1 + num_modes
    batch = torch.export.Dim("batch", min=1)
    offset = np.zeros((len(origin), slots, 61))
    offset[:, :, :60] = np.tile(origin[:, 0, :], 30)[:, None, :]
    return ServedModel(
        module=ServedForecaster(model).eval(),
        inputs=inputs,
        dynamic_shapes=({0: batch}, {0: batch, 1: torch.export.Dim("neighbours", min=1)}),
        example=example,
        code=os.path.join(HERE, "pyfunc.py"),
        artifacts={"scene": settings},
        signature=scene_signature(num_modes),
        output_offset=offset,
        output_to_array=packed_prediction,
    )
