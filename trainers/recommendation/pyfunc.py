"""MLflow pyfunc model of a trainflow recommender (models-from-code: this file is stored
with the model and needs only torch, numpy, pandas and mlflow to load; no trainflow).

Input: a DataFrame with integer columns ``user_id`` and ``item_id`` (the source data's ids).
Rows are scored grouped by user: each user is encoded once per request (SASRec: one pass over
its history) and all its rows are scored from that encoding; the answer keeps the input order.

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
        out = np.full(len(users), LOWEST, dtype=np.float64)
        u_idx, u_known = self._index(self.user_ids, users)
        i_idx, i_known = self._index(self.item_ids, items)
        rows = np.flatnonzero(u_known & i_known)
        cold = np.flatnonzero(~u_known & i_known)  # an unknown user: the popularity fallback
        out[cold] = self.popularity[i_idx[cold]]
        if len(rows):
            out[rows] = self._score_grouped(u_idx[rows], i_idx[rows])
        return out

    def _score_grouped(self, u_idx: np.ndarray, i_idx: np.ndarray) -> np.ndarray:
        """Scores of known (user, item) index pairs. The program takes ``(users (B,),
        candidates (B, C))`` and encodes each user once (SASRec: one pass over its history),
        so the rows are grouped by user into chunks of ``width`` candidates (padding ignored)."""
        import torch

        order = np.argsort(u_idx, kind="stable")
        sorted_users = u_idx[order]
        starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
        counts = np.diff(np.r_[starts, len(order)])
        width = _chunk_width(counts)
        chunks_per_user = -(-counts // width)
        position = np.arange(len(order)) - np.repeat(starts, counts)  # the row's place in its user's run
        chunk = np.repeat(np.cumsum(chunks_per_user) - chunks_per_user, counts) + position // width
        column = position % width
        chunk_users = np.repeat(sorted_users[starts], chunks_per_user)
        grid = np.zeros((len(chunk_users), width), dtype=np.int64)
        grid[chunk, column] = i_idx[order]
        scores = np.empty(grid.shape, dtype=np.float32)
        step = max(1, self.batch // width)
        with torch.no_grad():
            for lo in range(0, len(grid), step):
                got = self.program(torch.from_numpy(chunk_users[lo : lo + step]), torch.from_numpy(grid[lo : lo + step]))
                scores[lo : lo + step] = got.float().numpy()
        out = np.empty(len(order), dtype=np.float64)
        out[order] = scores[chunk, column]
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


def _chunk_width(counts: np.ndarray, widest: int = 4096, encoding_cost: int = 32) -> int:
    """Candidates per program row for users with ``counts`` rows each: the width that minimises
    ``encoding_cost`` per user chunk (one encoding) plus one per scored cell (padding included),
    among the widest count (no padding when every user has as many rows, e.g. an evaluation's
    1 + 100 candidates) and the powers of two, at most ``widest``."""
    options = {int(min(counts.max(), widest))} | {1 << p for p in range(13) if 1 << p <= widest}
    def cost(width: int) -> int:
        chunks = int((-(-counts // width)).sum())
        return chunks * encoding_cost + chunks * width
    return min(sorted(options), key=cost)


mlflow.models.set_model(TrainflowRecommender())
