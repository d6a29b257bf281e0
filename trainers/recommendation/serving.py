"""The served recommender: (user_id, item_id) → score, logged as ``pyfunc.py`` + a ``torch.export``
program and the id vocabularies. With ``params={"top_k": K}`` and only ``user_id``, the K best
items per user.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from trainflow.trainers.serving import ServedModel

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


def build_recommender(config: dict[str, Any]) -> torch.nn.Module:
    """The recommendation model described by an exported ``config.json`` (the one builder:
    training and serving both call :func:`trainflow.trainers.recommendation.models.build_model`)."""
    from trainflow.trainers.recommendation.models import build_model

    fc, ec = config["family_config"], config["export_config"]
    return build_model(fc, int(ec["num_users"]), int(ec["num_items"]))


def _recommendation_example(manifest) -> tuple[tuple[torch.Tensor, ...], Any]:
    import pandas as pd

    eval_rows = manifest.read_table("eval").slice(0, 4)
    users = np.repeat(eval_rows.column("user_idx").to_numpy().astype(np.int64), 3)
    items = np.asarray(eval_rows.column("neg_item_idx").to_pylist(), dtype=np.int64)[:, :3].reshape(-1)
    user_ids = manifest.read_file_table("users").column("user_id").to_numpy()
    item_ids = manifest.read_file_table("items").column("item_id").to_numpy()
    frame = pd.DataFrame({"user_id": user_ids[users], "item_id": item_ids[items]})
    return (torch.from_numpy(users), torch.from_numpy(items)), frame


def served_recommender(state: dict[str, torch.Tensor], config: dict[str, Any], manifest, tmp_dir: str) -> ServedModel:
    """The served model of an exported recommendation run (see :class:`trainflow.trainers.serving.ServedModel`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    model = build_recommender(config)
    model.load_state_dict(state)
    module = ServedRecommender(model, config["family_config"]["model"] == "sasrec").eval()
    inputs, example = _recommendation_example(manifest)
    artifacts = {}
    for name, table in (("user_ids", "users"), ("item_ids", "items")):
        path = os.path.join(tmp_dir, f"{name}.npy")
        np.save(path, manifest.read_file_table(table).column(table[:-1] + "_id").to_numpy())
        artifacts[name] = path
    batch = torch.export.Dim("batch", min=1)
    # item_id is optional: with params={"top_k": K} the model ranks every item per user.
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "item_id", required=False)]),
        params=ParamSchema([ParamSpec("top_k", "long", 0)]),
    )
    return ServedModel(
        module=module,
        inputs=inputs,
        dynamic_shapes=({0: batch}, {0: batch}),
        example=example,
        code=os.path.join(HERE, "pyfunc.py"),
        artifacts=artifacts,
        signature=signature,
    )
