"""MLflow pyfunc model of a trainflow recommender (models-from-code: this file is stored
with the model and needs only torch, numpy, pandas and mlflow to load; no trainflow).

Input: a DataFrame with integer columns ``user_id`` and ``item_id`` (the source data's ids).

* Scoring (``user_id`` and ``item_id``): one float score per row, higher is better. A user the
  model never saw (cold start) is scored by the fallback below (the item's share of the
  training interactions); an item the model never saw ranks last (the lowest float32 score:
  it cannot be recommended).
* Ranking (param ``top_k`` > 0, only ``user_id``): the ``top_k`` best items per user, a
  DataFrame ``(user_id, item_id, score, rank, cold_start)``. For a user the model never saw,
  ``cold_start`` is true and the items are the ``top_k`` most popular in training (score =
  the item's share of the training interactions); for a known user it is false and the
  scores are the model's.

Both answers are declared in the model's signature (``top_k`` in its params schema, the
columns in its output schema), so ``mlflow models serve`` validates the request.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

LOWEST = float(np.finfo(np.float32).min)


class TrainflowRecommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch

        self.program = torch.export.load(context.artifacts["program"]).module()
        self.user_ids = np.load(context.artifacts["user_ids"])
        self.item_ids = np.load(context.artifacts["item_ids"])
        counts = np.load(context.artifacts["item_popularity"]).astype(np.float64)
        self.popularity = counts / max(counts.sum(), 1.0)  # the cold-start fallback's scores
        self.batch = 65536

    def _index(self, vocab: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.clip(np.searchsorted(vocab, ids), 0, len(vocab) - 1)
        known = vocab[pos] == ids
        return pos.astype(np.int64), known

    def _score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        import torch

        out = np.full(len(users), LOWEST, dtype=np.float64)
        u_idx, u_known = self._index(self.user_ids, users)
        i_idx, i_known = self._index(self.item_ids, items)
        rows = np.flatnonzero(u_known & i_known)
        cold = np.flatnonzero(~u_known & i_known)  # an unknown user: the popularity fallback
        out[cold] = self.popularity[i_idx[cold]]
        with torch.no_grad():
            for lo in range(0, len(rows), self.batch):
                sel = rows[lo : lo + self.batch]
                scores = self.program(torch.from_numpy(u_idx[sel]), torch.from_numpy(i_idx[sel]))
                out[sel] = scores.float().numpy()
        return out

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        top_k = int((params or {}).get("top_k", 0) or 0)
        users = frame["user_id"].to_numpy(dtype=np.int64)
        if top_k <= 0:
            if "item_id" not in frame:
                raise ValueError("input needs columns user_id and item_id (or pass params={'top_k': K})")
            return self._score(users, frame["item_id"].to_numpy(dtype=np.int64))
        rows = []
        for user in np.unique(users):
            _, known = self._index(self.user_ids, np.asarray([user]))
            scores = self._score(np.full(len(self.item_ids), user), self.item_ids)
            best = np.argsort(-scores, kind="stable")[:top_k]
            rows.append(
                pd.DataFrame(
                    {"user_id": user, "item_id": self.item_ids[best], "score": scores[best],
                     "rank": np.arange(1, len(best) + 1), "cold_start": not bool(known[0])}
                )
            )
        return pd.concat(rows, ignore_index=True)


mlflow.models.set_model(TrainflowRecommender())
