"""Synthetic stand-in with the Argoverse schema, deterministic by seed, any size.

Scenarios of vehicles following a kinematic unicycle model with smooth speed and yaw-rate
changes (lane keeping, turns, braking), 10 Hz, 50 frames; track 0 is the focal AGENT, track 1
the AV, then OTHERS with partial tracks. Source URL: ``synthetic://driving?num_sequences=1000``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticDrivingConfig:
    """Size of a synthetic driving set.

    Attributes:
        num_sequences: Scenarios to generate.
        max_others: Most surrounding vehicles per scenario.
        seed: Seed of every random draw.
    """

    num_sequences: int = 1000
    max_others: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sequences < 1:
            raise ValueError(f"num_sequences must be at least 1, got {self.num_sequences}")
        if self.max_others < 0:
            raise ValueError(f"max_others must be >= 0, got {self.max_others}")


def _simulate_track(rng: np.random.Generator, x0: float, y0: float, heading: float, speed: float) -> np.ndarray:
    """50 frames of a unicycle with smooth acceleration and yaw-rate processes (10 Hz)."""
    dt = 0.1
    n = 50
    accel = np.cumsum(rng.normal(0, 0.35, n)) * 0.3 + rng.normal(0, 0.8)
    manoeuvre = rng.choice([0.0, 0.0, 0.0, 1.0, -1.0])  # mostly straight, some turns
    turn_start = rng.integers(0, 40)
    yaw = np.where(np.arange(n) >= turn_start, manoeuvre * rng.uniform(0.05, 0.35), 0.0)
    yaw = yaw + np.cumsum(rng.normal(0, 0.004, n))
    xy = np.empty((n, 2))
    for t in range(n):
        xy[t] = (x0, y0)
        speed = max(0.0, speed + accel[t] * dt)
        heading += yaw[t] * dt
        x0 += speed * np.cos(heading) * dt
        y0 += speed * np.sin(heading) * dt
    return xy + rng.normal(0, 0.05, xy.shape)


class SyntheticDriving:
    """Deterministic synthetic scenarios; iterate with :meth:`iter_records`."""

    def __init__(self, config: SyntheticDrivingConfig) -> None:
        self.config = config

    def record(self, index: int) -> dict[str, Any]:
        """Scenario ``index`` as a sequence record (see :mod:`trainflow.trainers.driving.argoverse`)."""
        c = self.config
        rng = np.random.default_rng([c.seed, 2, index])
        origin = rng.uniform(-2000, 2000, 2)
        heading = rng.uniform(-np.pi, np.pi)
        tracks = [_simulate_track(rng, origin[0], origin[1], heading, rng.uniform(0, 18))]
        types = [0]
        num_others = int(rng.integers(1, c.max_others + 2))
        for k in range(num_others):
            offset = rng.normal(0, 25, 2)
            lane_heading = heading + rng.choice([0.0, 0.0, np.pi, np.pi / 2])
            xy = _simulate_track(rng, origin[0] + offset[0], origin[1] + offset[1], lane_heading, rng.uniform(0, 15))
            if k > 0 and rng.random() < 0.5:  # partial track: appears late or leaves early
                cut = int(rng.integers(5, 45))
                if rng.random() < 0.5:
                    xy[:cut] = np.nan
                else:
                    xy[cut:] = np.nan
            tracks.append(xy)
            types.append(1 if k == 0 else 2)
        return {
            "seq_id": f"syn-{c.seed}-{index}",
            "city": "SYN",
            "timestamps": 315_967_376.0 + index * 10.0 + np.arange(50) * 0.1,
            "tracks_xy": np.stack(tracks).astype(np.float32),
            "track_types": np.asarray(types, dtype=np.int8),
        }

    def iter_records(self) -> Iterator[dict[str, Any]]:
        for index in range(self.config.num_sequences):
            yield self.record(index)
