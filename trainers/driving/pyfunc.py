"""MLflow pyfunc model of a trainflow motion forecaster (models-from-code: this file is
stored with the model and needs only torch, numpy and mlflow to load; no trainflow).

Input: float32 array (n, 20, 2): the last 2 s of a vehicle's positions (m) at 10 Hz in any
fixed frame. Output: float32 array (n, 30, 2): the next 3 s in the same frame.
"""

from __future__ import annotations

import mlflow
import numpy as np


class TrainflowForecaster(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch

        self.program = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        import torch

        history = np.asarray(model_input, dtype=np.float64)
        if history.ndim != 3 or history.shape[1:] != (20, 2):
            raise ValueError(f"input must have shape (n, 20, 2), got {history.shape}")
        if not np.isfinite(history).all():
            raise ValueError("input histories contain NaN or infinite positions")
        # Re-centre on the last position in float64 so city-frame coordinates keep their precision.
        origin = history[:, -1:, :]
        local = (history - origin).astype(np.float32)
        out = []
        with torch.no_grad():
            for lo in range(0, len(local), 8192):
                forecast = self.program(torch.from_numpy(local[lo : lo + 8192])).double().numpy()
                out.append(forecast + origin[lo : lo + 8192])
        return (np.concatenate(out) if out else np.zeros((0, 30, 2))).astype(np.float32)


mlflow.models.set_model(TrainflowForecaster())
