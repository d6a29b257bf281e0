"""MLflow pyfunc model of a trainflow motion forecaster (models-from-code: this file is
stored with the model and needs only torch, numpy and mlflow to load; no trainflow).

Two calls, told apart by the last axis of the float32 input array:

* **A scene**, ``(n, 20 × A, 3)``: for each of the n scenes, A agents one after the other, each
  20 rows ``[x, y, observed]`` (the last 2 s at 10 Hz, metres, any fixed frame; ``observed`` 1
  where the position was seen, 0 where not, e.g. padding when scenes have fewer agents). The
  first agent is the focal vehicle (all 20 positions observed); the others are its neighbours
  (the ``max_neighbours`` nearest seen at the last frame are used, or, for a model trained
  with ``neighbours_seen="history"``, the nearest seen at any of the 20 frames, by their
  last position seen). Returns a dict:
  ``forecast`` (n, 30, 2), the single forecast (K = 1); ``forecasts`` (n, K, 30, 2), most likely
  first, and ``probabilities`` (n, K) (summing to 1), with K = ``params["num_forecasts"]``
  (default: every forecast the model has; 1 gives the single forecast with probability 1).
* **The history-only call** of the first contract, ``(n, 20, 2)``: the focal histories alone →
  float32 ``(n, 30, 2)``, the single forecast without neighbours.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np

FRAMES, FUTURE = 20, 30
CHUNK = 4096


class TrainflowForecaster(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch

        self.program = torch.export.load(context.artifacts["program"]).module()
        with open(context.artifacts["scene"]) as handle:
            scene = json.load(handle)
        self.max_neighbours = int(scene["max_neighbours"])
        # Models logged before the option existed chose among the tracks seen at the last frame.
        self.neighbours_seen = scene.get("neighbours_seen", "last")
        self.num_modes = int(scene["num_modes"])

    def predict(self, context, model_input, params=None):
        data = np.asarray(model_input, dtype=np.float64)
        if data.ndim != 3 or data.shape[2] not in (2, 3):
            raise ValueError(
                f"input must be a scene (n, 20 x agents, 3) of [x, y, observed] or histories (n, 20, 2), got {data.shape}"
            )
        if data.shape[2] == 2:
            if data.shape[1] != FRAMES:
                raise ValueError(f"histories must have shape (n, {FRAMES}, 2), got {data.shape}")
            if not np.isfinite(data).all():
                raise ValueError("input histories contain NaN or infinite positions")
            empty = np.full((len(data), 2, FRAMES, 2), np.nan)
            return self._run(data, empty)[:, 0, : FUTURE * 2].reshape(-1, FUTURE, 2).astype(np.float32)
        if data.shape[1] < FRAMES or data.shape[1] % FRAMES:
            raise ValueError(f"a scene has 20 rows per agent (the focal first): got {data.shape[1]} rows")
        k = int((params or {}).get("num_forecasts") or max(1, self.num_modes))
        if not 1 <= k <= max(1, self.num_modes):
            raise ValueError(f"num_forecasts must be between 1 and {max(1, self.num_modes)}, got {k}")
        agents = data.reshape(len(data), -1, FRAMES, 3)
        observed = agents[..., 2] > 0.5
        history = agents[:, 0, :, :2]
        if not observed[:, 0].all() or not np.isfinite(history).all():
            raise ValueError("the focal agent (the first 20 rows of a scene) must be observed, finite, at all 20 frames")
        others = np.where((observed[:, 1:] & np.isfinite(agents[:, 1:, :, :2]).all(-1))[..., None],
                          agents[:, 1:, :, :2], np.nan)
        out = self._run(history, self._nearest(history, others))
        n = len(data)
        forecast = out[:, 0, : FUTURE * 2].reshape(n, FUTURE, 2)
        if k == 1:
            return {
                "forecast": forecast.astype(np.float32),
                "forecasts": forecast[:, None].astype(np.float32),
                "probabilities": np.ones((n, 1), dtype=np.float32),
            }
        probabilities = out[:, 1 : 1 + k, -1]
        return {
            "forecast": forecast.astype(np.float32),
            "forecasts": out[:, 1 : 1 + k, : FUTURE * 2].reshape(n, k, FUTURE, 2).astype(np.float32),
            "probabilities": (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32),
        }

    def _nearest(self, history, others):
        """Per scene, the neighbours seen at the last frame (or at any frame, by their last
        position seen: ``neighbours_seen="history"``), nearest first, at most max_neighbours."""
        n = len(history)
        seen_at = np.isfinite(others).all(axis=-1)  # (n, m, 20)
        if self.neighbours_seen == "last":
            seen = seen_at[:, :, -1]
            where = others[:, :, -1]
        else:
            seen = seen_at.any(axis=-1)
            latest = FRAMES - 1 - np.argmax(seen_at[:, :, ::-1], axis=-1)
            where = np.take_along_axis(others, latest[:, :, None, None], axis=2)[:, :, 0]
        distance = np.linalg.norm(where - history[:, None, -1], axis=-1)
        distance = np.where(seen, distance, np.inf)
        order = np.argsort(distance, axis=1, kind="stable")[:, : self.max_neighbours]
        count = max(2, order.shape[1])  # the program takes at least 2 neighbour rows (NaN: absent)
        chosen = np.full((n, count, FRAMES, 2), np.nan)
        if order.shape[1]:
            picked = np.take_along_axis(others, order[:, :, None, None], axis=1)
            valid = np.isfinite(np.take_along_axis(distance, order, axis=1))
            picked[~valid] = np.nan
            chosen[:, : order.shape[1]] = picked
        return chosen

    def _run(self, history, neighbours):
        """The program's (n, 1 + K, 61) output, positions moved back to the input frame."""
        import torch

        # Re-centre on the last position in float64 so city-frame coordinates keep their precision.
        origin = history[:, -1:, :]
        local = (history - origin).astype(np.float32)
        local_neighbours = (neighbours - origin[:, None]).astype(np.float32)
        out = []
        with torch.no_grad():
            for lo in range(0, len(local), CHUNK):
                chunk = self.program(torch.from_numpy(local[lo : lo + CHUNK]),
                                     torch.from_numpy(local_neighbours[lo : lo + CHUNK])).double().numpy()
                chunk[..., :-1] += np.tile(origin[lo : lo + CHUNK, 0], FUTURE)[:, None, :]
                out.append(chunk)
        if not out:
            return np.zeros((0, 1 + self.num_modes, FUTURE * 2 + 1))
        return np.concatenate(out)


mlflow.models.set_model(TrainflowForecaster())
