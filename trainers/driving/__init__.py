"""Driving model family: focal-vehicle motion forecasting (Argoverse-style, 2 s → 3 s at 10 Hz)."""

from tasks.metrics import constant_velocity_forecast, displacement_metrics
from trainers.driving.config import DrivingConfig
from trainers.driving.family import DrivingFamily
from trainers.driving.model import ForecastModel, build_forecaster, forecast

__all__ = [
    "DrivingConfig",
    "DrivingFamily",
    "ForecastModel",
    "build_forecaster",
    "constant_velocity_forecast",
    "displacement_metrics",
    "forecast",
]
