"""Frames and the constant-velocity baseline for 2 s → 3 s motion forecasting at 10 Hz.

The model works in an *agent frame*: origin at the last observed position, x along the heading
estimated from the history, y to its left. Every function here is a pure tensor or array
function so that the exported model, the metrics and the tests share one definition.
"""

from __future__ import annotations

import torch

HISTORY_FRAMES = 20
FUTURE_FRAMES = 30
FRAME_RATE_HZ = 10
# Displacement (m) over the last 0.5 s above which that displacement gives the heading; below it
# the whole 2 s history is used, and below MIN_HEADING_DISPLACEMENT the vehicle counts as
# standing still (heading = the input frame's x axis).
RECENT_HEADING_FRAMES = 5
RECENT_HEADING_DISPLACEMENT = 1.0
MIN_HEADING_DISPLACEMENT = 0.2


def estimate_heading(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit heading vectors of histories, as (cos, sin).

    The direction of travel over the last 0.5 s when the vehicle moved at least 1 m in it
    (robust to turns), else over the whole history, else the x axis (a standing vehicle).

    Args:
        history: (n, T, 2) observed positions, T >= 6, all finite.

    Returns:
        Two (n,) tensors: cos and sin of the heading.
    """
    last = history[:, -1]
    recent = last - history[:, -1 - RECENT_HEADING_FRAMES]
    full = last - history[:, 0]
    recent_norm = recent.norm(dim=-1, keepdim=True)
    direction = torch.where(recent_norm > RECENT_HEADING_DISPLACEMENT, recent, full)
    norm = direction.norm(dim=-1, keepdim=True)
    moving = norm > MIN_HEADING_DISPLACEMENT
    unit_x = torch.zeros_like(direction)
    unit_x[:, 0] = 1.0
    direction = torch.where(moving, direction / norm.clamp_min(1e-6), unit_x)
    return direction[:, 0], direction[:, 1]


def agent_frame(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The agent frame of each history: (origin (n, 2), cos (n,), sin (n,))."""
    cos, sin = estimate_heading(history)
    return history[:, -1], cos, sin


def _expand(value: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    # (n,) or (n, 2) → broadcastable against points (n, ..., 2) minus the last axis.
    return value.reshape(value.shape[0], *([1] * (points.dim() - 2)))


def to_agent_frame(points: torch.Tensor, origin: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Positions (n, ..., 2) in the input frame → the agent frames given per row (NaN stays NaN)."""
    shape = (points.shape[0],) + (1,) * (points.dim() - 2) + (2,)
    d = points - origin.reshape(shape)
    c, s = _expand(cos, points), _expand(sin, points)
    x, y = d[..., 0], d[..., 1]
    return torch.stack([c * x + s * y, -s * x + c * y], dim=-1)


def from_agent_frame(points: torch.Tensor, origin: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_agent_frame`."""
    shape = (points.shape[0],) + (1,) * (points.dim() - 2) + (2,)
    c, s = _expand(cos, points), _expand(sin, points)
    x, y = points[..., 0], points[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1) + origin.reshape(shape)
