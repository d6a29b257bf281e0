"""The recommendation pipeline: NCF (GMF, MLP, NeuMF) and SASRec on MovieLens-style interactions.

Its spec is :data:`trainflow.trainers.recommendation.pipeline.PIPELINE`. The family classes are imported
lazily (they import torch), so reading the spec stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RecommendationConfig": "trainflow.trainers.recommendation.config",
    "RecommendationFamily": "trainflow.trainers.recommendation.family",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
