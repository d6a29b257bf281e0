"""The driving pipeline: focal-vehicle motion forecasting (Argoverse-style, 2 s → 3 s at 10 Hz).

Its spec is :data:`trainflow.trainers.driving.pipeline.PIPELINE`. The family classes are imported lazily
(they import torch), so reading the spec stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DrivingConfig": "trainflow.trainers.driving.config",
    "DrivingFamily": "trainflow.trainers.driving.family",
    "ForecastModel": "trainflow.trainers.driving.model",
    "build_forecaster": "trainflow.trainers.driving.model",
    "forecast": "trainflow.trainers.driving.model",
    "constant_velocity_forecast": "trainflow.tasks.metrics",
    "displacement_metrics": "trainflow.tasks.metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
