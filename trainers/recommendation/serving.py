"""The served recommender: (user_id, item_id) → score, logged as ``pyfunc.py`` + a ``torch.export``
program, the id vocabularies and the items' training popularity (the cold-start fallback). With
``params={"top_k": K}`` and only ``user_id``, the K best items per user, ``cold_start`` flagging
users the model never saw (answered with the most popular items). See ``pyfunc.py``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from trainflow.trainers.serving import ServedModel

HERE = os.path.dirname(os.path.abspath(__file__))


class ServedRecommender(torch.nn.Module):
    """Scores of candidate items for users, for every recommendation model family.

    ``forward(users (B,), items (B, C)) -> (B, C)``: each user is encoded once (SASRec: one pass
    over the history) and all its ``C`` candidates are scored from that encoding; this is the
    exported form (``pyfunc.py`` groups a request's rows by user). ``items (B,)`` gives one
    score per ``(user, item)`` pair, ``(B,)``, the form exported before (kept for callers of
    the module).
    """

    def __init__(self, model: torch.nn.Module, sequential: bool) -> None:
        super().__init__()
        self.model = model
        self.sequential = sequential

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if items.dim() == 1:
            return self.forward(users, items.unsqueeze(1)).squeeze(1)
        if self.sequential:  # SASRec: item 0 is padding, histories are in the model
            return self.model(users=users, items=items + 1)
        return self.model(users, items)


def build_recommender(config: dict[str, Any]) -> torch.nn.Module:
    """The recommendation model described by an exported ``config.json`` (the one builder:
    training and serving both call :func:`trainflow.trainers.recommendation.models.build_model`)."""
    from trainflow.trainers.recommendation.models import build_model

    fc, ec = config["family_config"], config["export_config"]
    return build_model(fc, int(ec["num_users"]), int(ec["num_items"]))


def _recommendation_example(manifest) -> tuple[tuple[torch.Tensor, ...], Any]:
    import pandas as pd

    eval_rows = manifest.read_table("eval").slice(0, 4)
    users = eval_rows.column("user_idx").to_numpy().astype(np.int64)
    items = np.asarray(eval_rows.column("neg_item_idx").to_pylist(), dtype=np.int64)[:, :3]
    user_ids = manifest.read_file_table("users").column("user_id").to_numpy()
    item_ids = manifest.read_file_table("items").column("item_id").to_numpy()
    # The program takes (users (B,), candidates (B, C)); the pyfunc's example is the same
    # request as (user_id, item_id) rows, user by user (its B * C scores reshape to (B, C)).
    frame = pd.DataFrame({"user_id": user_ids[np.repeat(users, items.shape[1])], "item_id": item_ids[items.reshape(-1)]})
    return (torch.from_numpy(users), torch.from_numpy(np.ascontiguousarray(items))), frame


def served_recommender(state: dict[str, torch.Tensor], config: dict[str, Any], manifest, tmp_dir: str) -> ServedModel:
    """The served model of an exported recommendation run (see :class:`trainflow.trainers.serving.ServedModel`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    model = build_recommender(config)
    model.load_state_dict(state)
    module = ServedRecommender(model, config["family_config"]["model"] == "sasrec").eval()
    inputs, example = _recommendation_example(manifest)
    artifacts = {}
    for name, table, column in (("user_ids", "users", "user_id"), ("item_ids", "items", "item_id"),
                                ("item_popularity", "items", "num_train_interactions")):
        path = os.path.join(tmp_dir, f"{name}.npy")
        np.save(path, manifest.read_file_table(table).column(column).to_numpy())
        artifacts[name] = path
    batch, candidates = torch.export.Dim("batch", min=1), torch.export.Dim("candidates", min=1)
    # item_id is optional: with params={"top_k": K} the model ranks every item per user.
    # Outputs: scoring returns the score column alone; ranking the whole frame, with
    # cold_start true where the user is unknown and the popularity fallback answered.
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "item_id", required=False)]),
        outputs=Schema([
            ColSpec("long", "user_id", required=False),
            ColSpec("long", "item_id", required=False),
            ColSpec("double", "score"),
            ColSpec("long", "rank", required=False),
            ColSpec("boolean", "cold_start", required=False),
        ]),
        params=ParamSchema([ParamSpec("top_k", "long", 0)]),
    )
    return ServedModel(
        module=module,
        inputs=inputs,
        dynamic_shapes=({0: batch}, {0: batch, 1: candidates}),
        example=example,
        code=os.path.join(HERE, "pyfunc.py"),
        artifacts=artifacts,
        signature=signature,
    )
