"""The forecasting network: history (+ optional surrounding tracks) → 3 s of future positions.

:class:`ForecastModel` takes positions in *any* fixed frame and returns forecasts in that
frame; the agent-frame transform (origin at the last observed position, x along the
estimated heading) happens inside, so the exported module alone serves
``(n, 20, 2) float32 → (n, 30, 2)`` without training code. The network predicts a
correction to the constant-velocity extrapolation in the agent frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from trainflow.trainers.driving.geometry import (
    FUTURE_FRAMES,
    HISTORY_FRAMES,
    agent_frame,
    from_agent_frame,
    to_agent_frame,
)

# Feature scales: metres, m/s, m/s² to roughly unit range.
_POSITION_SCALE = 10.0
_VELOCITY_SCALE = 10.0
_ACCELERATION_SCALE = 20.0
_CONTEXT_POSITION_SCALE = 20.0


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def history_features(local: torch.Tensor, frame_rate_hz: float = 10.0) -> torch.Tensor:
    """Positions, velocities and accelerations of agent-frame histories, flattened and scaled.

    Args:
        local: (n, T, 2) positions in the agent frame.

    Returns:
        (n, 2T + 2(T-1) + 2(T-2)) features.
    """
    velocity = torch.diff(local, dim=1) * frame_rate_hz
    acceleration = torch.diff(velocity, dim=1) * frame_rate_hz
    n = local.shape[0]
    return torch.cat(
        [
            (local / _POSITION_SCALE).reshape(n, -1),
            (velocity / _VELOCITY_SCALE).reshape(n, -1),
            (acceleration / _ACCELERATION_SCALE).reshape(n, -1),
        ],
        dim=1,
    )


class ContextEncoder(nn.Module):
    """Surrounding tracks' histories (agent frame) → one vector.

    Each track is encoded by a shared MLP; the encodings are pooled by an element-wise max
    (``pooling="max"``) or, with ``pooling="attention"``, by the max *and* a learned
    interaction: the focal agent's history features ask ``num_heads`` queries and each head
    takes the softmax-weighted sum of the neighbours' encodings (absent neighbours masked),
    so that which neighbour matters is learned from the focal's own motion.
    """

    def __init__(self, history_frames: int, context_dim: int, dropout: float, pooling: str = "max",
                 query_dim: int = 0, num_heads: int = 4) -> None:
        super().__init__()
        if pooling not in ("max", "attention"):
            raise ValueError(f"pooling must be 'max' or 'attention', got {pooling!r}")
        in_dim = history_frames * 2 + history_frames + (history_frames - 1) * 2
        self.mlp = _mlp([in_dim, context_dim, context_dim], dropout)
        self.context_dim = context_dim
        self.pooling = pooling
        self.out_dim = context_dim
        if pooling == "attention":
            if query_dim < 1 or context_dim % num_heads:
                raise ValueError(f"attention pooling needs query_dim >= 1 and context_dim divisible by {num_heads}")
            self.num_heads = num_heads
            self.query = nn.Linear(query_dim, context_dim)
            self.key = nn.Linear(context_dim, context_dim)
            self.value = nn.Linear(context_dim, context_dim)
            self.out_dim = 2 * context_dim

    def forward(self, local: torch.Tensor, query_features: torch.Tensor | None = None,
                frame_rate_hz: float = 10.0) -> torch.Tensor:
        # local: (n, K, T, 2) with NaN where unobserved.
        observed = torch.isfinite(local).all(dim=-1)  # (n, K, T)
        positions = torch.where(observed[..., None], local, torch.zeros_like(local))
        both = observed[..., 1:] & observed[..., :-1]
        velocity = torch.diff(positions, dim=2) * frame_rate_hz * both[..., None]
        n, k = local.shape[:2]
        features = torch.cat(
            [
                (positions / _CONTEXT_POSITION_SCALE).reshape(n, k, -1),
                observed.to(local.dtype),
                (velocity / _VELOCITY_SCALE).reshape(n, k, -1),
            ],
            dim=-1,
        )
        encoded = self.mlp(features)  # (n, K, D)
        present = observed.any(dim=-1)  # a neighbour is a track seen at some history frame
        masked = encoded.masked_fill(~present[..., None], float("-inf"))
        pooled = masked.max(dim=1).values
        pooled = torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))
        if self.pooling == "max":
            return pooled
        if query_features is None:
            raise ValueError("attention pooling needs the focal agent's features")
        h, d = self.num_heads, self.context_dim // self.num_heads
        query = self.query(query_features).reshape(n, 1, h, d)
        keys = self.key(encoded).reshape(n, k, h, d)
        values = self.value(encoded).reshape(n, k, h, d)
        scores = (query * keys).sum(dim=-1) / d**0.5  # (n, K, h)
        # A large negative rather than -inf: a scene without neighbours gives uniform weights
        # over zeros instead of NaN, and the result is zeroed below.
        scores = scores.masked_fill(~present[..., None], -1e9)
        weights = torch.softmax(scores, dim=1)
        attended = (weights[..., None] * values).sum(dim=1).reshape(n, self.context_dim)
        attended = attended * present.any(dim=1, keepdim=True).to(attended.dtype)
        return torch.cat([pooled, attended], dim=1)


def _context_encoder(history_frames: int, context_dim: int, dropout: float, pooling: str) -> ContextEncoder | None:
    feature_dim = history_frames * 2 + (history_frames - 1) * 2 + (history_frames - 2) * 2
    if context_dim <= 0:
        return None
    return ContextEncoder(history_frames, context_dim, dropout, pooling, query_dim=feature_dim)


class _Member(nn.Module):
    """One forecaster of the ensemble: optional context encoder + decoder MLP."""

    def __init__(self, history_frames: int, future_frames: int, hidden_dim: int, num_layers: int,
                 context_dim: int, dropout: float, context_pooling: str = "max") -> None:
        super().__init__()
        self.context = _context_encoder(history_frames, context_dim, dropout, context_pooling)
        context_out = self.context.out_dim if self.context is not None else 0
        in_dim = history_frames * 2 + (history_frames - 1) * 2 + (history_frames - 2) * 2 + context_out
        self.decoder = _mlp([in_dim] + [hidden_dim] * num_layers + [future_frames * 2], dropout)

    def forward(self, features: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        parts = [features]
        if self.context is not None:
            parts.append(self.context(context, features) if context is not None
                         else features.new_zeros(features.shape[0], self.context.out_dim))
        return self.decoder(torch.cat(parts, dim=1))


class _ModeHead(nn.Module):
    """The multimodal head: its own context encoder + an MLP giving ``num_modes`` corrections to
    the constant-velocity extrapolation and one logit per mode (trained winner-takes-all)."""

    def __init__(self, history_frames: int, future_frames: int, hidden_dim: int, num_layers: int,
                 context_dim: int, dropout: float, num_modes: int, context_pooling: str = "max") -> None:
        super().__init__()
        self.num_modes = num_modes
        self.future_frames = future_frames
        self.context = _context_encoder(history_frames, context_dim, dropout, context_pooling)
        context_out = self.context.out_dim if self.context is not None else 0
        in_dim = history_frames * 2 + (history_frames - 1) * 2 + (history_frames - 2) * 2 + context_out
        self.decoder = _mlp([in_dim] + [hidden_dim] * num_layers + [num_modes * (future_frames * 2 + 1)], dropout)

    def forward(self, features: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [features]
        if self.context is not None:
            parts.append(self.context(context, features) if context is not None
                         else features.new_zeros(features.shape[0], self.context.out_dim))
        out = self.decoder(torch.cat(parts, dim=1))
        k, f = self.num_modes, self.future_frames
        return out[:, : k * f * 2].reshape(-1, k, f, 2), out[:, k * f * 2 :]


class ForecastModel(nn.Module):
    """History (and optionally neighbours' histories) in any frame → future positions in that frame.

    Args:
        history_frames: Observed frames (20 at 10 Hz).
        future_frames: Forecast frames (30 at 10 Hz).
        hidden_dim: Width of the decoder MLP.
        num_layers: Hidden layers of the decoder MLP.
        context_dim: Width of the context encoder; 0 builds a history-only model.
        dropout: Dropout in the MLPs while training.
        num_members: Independently initialised forecasters whose forecasts are averaged (an
            ensemble trained in one pass, each member on its own loss).
        mirror_average: Outside training, also forecast the mirror image of the scene (y → -y
            in the agent frame) and average it, mirrored back, with the direct forecast
            (the model is trained on mirrored scenes, so both are forecasts of the same future).
        num_modes: Forecasts of the multimodal head (0: none); see :meth:`modes`.
        context_pooling: How the context encoder pools the surrounding tracks: ``"max"`` or
            ``"attention"`` (max + attention from the focal agent; see :class:`ContextEncoder`).
        mode_blend: Outside training, the single forecast is ``(1 - mode_blend)`` x the
            ensemble's + ``mode_blend`` x the probability-weighted mean of the multimodal head's
            K forecasts (two estimators of the same future, trained on different losses); 0
            (the ensemble alone) without a multimodal head.
    """

    def __init__(
        self,
        history_frames: int = HISTORY_FRAMES,
        future_frames: int = FUTURE_FRAMES,
        hidden_dim: int = 256,
        num_layers: int = 3,
        context_dim: int = 64,
        dropout: float = 0.0,
        num_members: int = 1,
        mirror_average: bool = False,
        num_modes: int = 0,
        context_pooling: str = "max",
        mode_blend: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= mode_blend <= 1.0:
            raise ValueError(f"mode_blend must be in [0, 1], got {mode_blend}")
        self.num_modes = num_modes
        self.mode_blend = float(mode_blend) if num_modes > 0 else 0.0
        self.mirror_average = mirror_average
        self.history_frames = history_frames
        self.future_frames = future_frames
        self.context_dim = context_dim
        self.members = nn.ModuleList(
            _Member(history_frames, future_frames, hidden_dim, num_layers, context_dim, dropout, context_pooling)
            for _ in range(num_members)
        )
        self.mode_head = (
            _ModeHead(history_frames, future_frames, hidden_dim, num_layers, context_dim, dropout, num_modes,
                      context_pooling)
            if num_modes > 0 else None
        )
        steps = torch.arange(1, future_frames + 1, dtype=torch.float32)
        self.register_buffer("steps", steps, persistent=False)

    def forward(
        self,
        history: torch.Tensor,
        neighbours: torch.Tensor | None = None,
        *,
        per_member: bool = False,
        with_modes: bool = False,
    ) -> Any:
        """Forecast.

        Args:
            history: (n, history_frames, 2) finite positions in any fixed frame.
            neighbours: Optional (n, K, history_frames, 2) positions of surrounding tracks in the
                same frame, NaN where unobserved; ``None`` (the served contract) means no context.
            per_member: Return every member's forecast, (num_members, n, future_frames, 2),
                instead of their mean (training).
            with_modes: Also return the multimodal head's forecasts (n, num_modes,
                future_frames, 2) in the input frame and their logits (n, num_modes), as a tuple
                ``(forecast, modes, logits)`` (one forward call, so DDP sees every parameter).

        Returns:
            (n, future_frames, 2) forecast positions in the input frame (the single forecast).
        """
        origin, cos, sin = agent_frame(history)
        local = to_agent_frame(history, origin, cos, sin)
        features = history_features(local)
        context = None
        if self.context_dim > 0 and neighbours is not None and neighbours.shape[1] > 0:
            context = to_agent_frame(neighbours, origin, cos, sin)
        velocity = (local[:, -1] - local[:, 0]) / (self.history_frames - 1)
        constant_velocity = self.steps[None, :, None] * velocity[:, None, :]
        corrections = torch.stack([member(features, context) for member in self.members])
        corrections = corrections.reshape(len(self.members), -1, self.future_frames, 2)
        if self.mirror_average and not self.training and not per_member:
            flip = local.new_tensor([1.0, -1.0])
            mirrored_context = context * flip if context is not None else None
            mirrored = torch.stack([member(history_features(local * flip), mirrored_context) for member in self.members])
            mirrored = mirrored.reshape(len(self.members), -1, self.future_frames, 2) * flip
            corrections = 0.5 * (corrections + mirrored)
        if per_member:
            n = history.shape[0]
            flat = (constant_velocity + corrections).reshape(-1, self.future_frames, 2)
            rep = lambda v: v.repeat(len(self.members), *([1] * (v.dim() - 1)))  # noqa: E731
            single = from_agent_frame(flat, rep(origin), rep(cos), rep(sin)).reshape(-1, n, self.future_frames, 2)
        else:
            single = from_agent_frame(constant_velocity + corrections.mean(dim=0), origin, cos, sin)
        blend = self.mode_blend if not self.training and not per_member else 0.0
        if not with_modes and not blend:
            return single
        if self.mode_head is None:
            raise ValueError("this model has no multimodal head (num_modes=0)")
        mode_corrections, logits = self.mode_head(features, context)
        local_modes = constant_velocity[:, None] + mode_corrections  # (n, K, F, 2)
        modes = from_agent_frame(local_modes, origin, cos, sin)
        if blend:
            expected = (logits.softmax(dim=-1)[:, :, None, None] * modes).sum(dim=1)
            single = (1.0 - blend) * single + blend * expected
        if not with_modes:
            return single
        return single, modes, logits


def build_forecaster(export_config: dict[str, Any]) -> ForecastModel:
    """An untrained :class:`ForecastModel` shaped as ``export_config["model"]`` says (load the state dict next)."""
    return ForecastModel(**export_config["model"])


@torch.no_grad()
def forecast(model: nn.Module, history: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """The served contract: float32 (n, 20, 2) histories in any fixed frame → (n, 30, 2) forecasts.

    Each history is shifted to its last position in float64 before the float32 model runs, so
    large city-frame coordinates keep centimetre precision.

    Raises:
        ValueError: wrong shape or non-finite positions.
    """
    history = np.asarray(history, dtype=np.float64)
    frames = getattr(model, "history_frames", HISTORY_FRAMES)
    if history.ndim != 3 or history.shape[1:] != (frames, 2):
        raise ValueError(f"history must have shape (n, {frames}, 2), got {history.shape}")
    if not np.isfinite(history).all():
        raise ValueError("history has NaN or infinite positions")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    try:
        for start in range(0, len(history), batch_size):
            chunk = history[start : start + batch_size]
            origin = chunk[:, -1:, :]
            local = torch.as_tensor((chunk - origin).astype(np.float32), device=device)
            outputs.append(model(local).double().cpu().numpy() + origin)
    finally:
        model.train(was_training)
    if not outputs:
        return np.zeros((0, getattr(model, "future_frames", 30), 2), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32)
