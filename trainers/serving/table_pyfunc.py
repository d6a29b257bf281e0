"""MLflow pyfunc model of a trainflow model over table rows (models-from-code: this file is
stored with the model and needs only torch, numpy, pandas and mlflow to load; no trainflow).

Input: a DataFrame with the feature columns the model was trained on (other columns are
ignored). Output: the model's outputs, one row per input row (a 1-D array for one output).
"""

from __future__ import annotations

import json

import mlflow
import numpy as np


class TableModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch

        self.program = torch.export.load(context.artifacts["program"]).module()
        with open(context.artifacts["columns"]) as handle:
            self.columns = json.load(handle)

    def predict(self, context, model_input, params=None):
        import torch

        missing = [c for c in self.columns if c not in model_input.columns]
        if missing:
            raise ValueError(f"missing input column(s) {missing}; the model takes {self.columns}")
        features = np.ascontiguousarray(model_input[self.columns].to_numpy(dtype=np.float32))
        with torch.no_grad():
            out = self.program(torch.from_numpy(features)).numpy()
        return out.reshape(len(features), -1).squeeze(-1) if out.ndim <= 2 and out.size == len(features) else out


mlflow.models.set_model(TableModel())
