"""The driving pipeline: focal-vehicle motion forecasting (Argoverse-style, 2 s → 3 s at 10 Hz).

Its spec is :data:`trainers.driving.pipeline.PIPELINE`. The family classes are imported lazily
(they import torch), so reading the spec stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DrivingConfig": "trainers.driving.config",
    "DrivingFamily": "trainers.driving.family",
    "ForecastModel": "trainers.driving.model",
    "build_forecaster": "trainers.driving.model",
    "forecast": "trainers.driving.model",
    "constant_velocity_forecast": "tasks.metrics",
    "displacement_metrics": "tasks.metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
