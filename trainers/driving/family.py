"""The driving model family: focal-vehicle motion forecasting (2 s of history → 3 s).

Training samples are every track observed at all 50 frames of a training scenario (AGENT, AV,
OTHERS), the AGENT weighted up in the loss; each carries the first 20 frames of its nearest
surrounding tracks as context. Evaluation forecasts the AGENT of every scenario of a split and
reports ADE/FDE/miss rate next to the constant-velocity baseline's on the same sequences.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainflow.tasks.metrics import constant_velocity_forecast, displacement_metrics
from trainflow.trainers.driving.config import DrivingConfig
from trainflow.trainers.driving.data import ForecastSamples, load_samples
from trainflow.trainers.driving.geometry import FRAME_RATE_HZ, FUTURE_FRAMES, HISTORY_FRAMES
from trainflow.trainers.driving.model import build_forecaster
from trainflow.trainers.family import ModelFamily

if TYPE_CHECKING:
    from trainflow.tasks.manifest import Manifest
    from trainflow.trainers.distributed import World

log = logging.getLogger(__name__)


def epoch_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's sample indices for ``epoch``, batch by batch.

    One permutation by (seed, epoch) is dealt round-robin to the ranks, so an epoch covers every
    sample exactly once across ranks; each rank cuts its share into the same number of batches
    (at most ``batch_size`` samples, sizes differing by at most one), so collectives stay in step.

    Raises:
        ValueError: too few samples to give every rank a sample in each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    per_rank_max = math.ceil(num_samples / world_size)
    num_batches = math.ceil(per_rank_max / batch_size)
    if num_samples // world_size < num_batches or num_samples == 0:
        raise ValueError(f"{num_samples} training samples are too few for {world_size} ranks")
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return np.array_split(order[rank::world_size], num_batches)


class DrivingFamily(ModelFamily):
    """Motion forecasting of the focal vehicle; see the module doc.

    Args:
        config: A :class:`DrivingConfig`.
        manifest: A committed ``driving`` dataset version (splits train, valid, eval).
        world: This process's rank information.

    Raises:
        ValueError: the manifest is not a driving dataset.
    """

    name = "driving"

    def __init__(self, config: DrivingConfig, manifest: Manifest, world: World) -> None:
        if manifest.kind != "driving":
            raise ValueError(f"manifest {manifest.uri} holds a {manifest.kind!r} dataset, expected 'driving'")
        super().__init__(config, manifest, world)
        self._train: ForecastSamples | None = None
        self._focal: dict[str, ForecastSamples] = {}

    # data -------------------------------------------------------------------------------------
    @property
    def train_samples(self) -> ForecastSamples:
        """Every training sample (loaded once; every rank holds the index, takes its share)."""
        if self._train is None:
            samples = load_samples(
                self.manifest,
                "train",
                focal_only=not self.config.train_on_all_tracks,
                max_neighbours=self.config.max_neighbours,
            )
            if self.config.min_other_displacement > 0:
                # Parked cars teach little about forecasting the (moving) focal vehicles.
                travelled = np.linalg.norm(samples.future[:, -1] - samples.history[:, 0], axis=-1)
                keep = samples.is_agent | (travelled >= self.config.min_other_displacement)
                log.info("train: %d of %d other tracks moved at least %.1f m: kept", int((keep & ~samples.is_agent).sum()),
                         int((~samples.is_agent).sum()), self.config.min_other_displacement)
                samples = samples.subset(np.flatnonzero(keep))
            self._train = samples
        return self._train

    def focal_samples(self, split: str) -> ForecastSamples:
        """The AGENT sample of every scenario of ``split``."""
        if split not in self._focal:
            self._focal[split] = load_samples(
                self.manifest, split, focal_only=True, max_neighbours=self.config.max_neighbours
            )
        return self._focal[split]

    # ModelFamily ------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            # The one builder: serving rebuilds the model from the same export config.
            return build_forecaster(self.export_config())

    def num_train_samples(self, epoch: int) -> int:
        return len(self.train_samples)

    def num_train_batches(self, batch_size: int) -> int:
        """Batches per rank in every epoch."""
        return len(self._plan(0, batch_size))

    def _plan(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        return epoch_batches(
            len(self.train_samples),
            batch_size,
            seed=self.config.seed,
            epoch=epoch,
            rank=self.world.rank,
            world_size=self.world.world_size,
        )

    def train_batches(self, epoch: int, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        samples = self.train_samples
        c = self.config
        # Augmentations are drawn per sample by (seed, epoch), not per rank: the same epoch sees
        # the same samples whatever the world size.
        rng = np.random.default_rng([c.seed, epoch, 1])
        mirror = rng.random(len(samples)) < c.mirror_probability
        drop_context = rng.random(len(samples)) < c.context_dropout
        weight = np.where(samples.is_agent, c.focal_weight, 1.0).astype(np.float32)
        for index in self._plan(epoch, batch_size)[skip_batches:]:
            history = samples.history[index].copy()
            future = samples.future[index].copy()
            neighbours = samples.neighbours[index].copy()
            flip = mirror[index]
            history[flip, :, 1] *= -1
            future[flip, :, 1] *= -1
            neighbours[flip, ..., 1] *= -1
            neighbours[drop_context[index]] = np.nan
            yield {
                "history": torch.from_numpy(history),
                "future": torch.from_numpy(future),
                "neighbours": torch.from_numpy(neighbours),
                "weight": torch.from_numpy(weight[index]),
            }

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.world.device
        history = batch["history"].to(device)
        future = batch["future"].to(device)
        neighbours = batch["neighbours"].to(device) if self.config.context_dim > 0 else None
        weight = batch["weight"].to(device)
        # Each ensemble member learns from its own loss: (members, n, 30) errors.
        error = torch.linalg.vector_norm(model(history, neighbours, per_member=True) - future, dim=-1)
        per_sample = error.mean(dim=-1) + self.config.fde_weight * error[..., -1]
        return (per_sample * weight).sum(dim=-1).mean() / weight.sum()

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, samples: ForecastSamples, *, context: bool = True) -> np.ndarray:
        """Forecasts (n, 30, 2) of ``samples`` (in their own shifted frame)."""
        was_training = model.training
        model.eval()
        device = self.world.device
        outputs = []
        try:
            for start in range(0, len(samples), self.config.eval_batch_size):
                stop = start + self.config.eval_batch_size
                history = torch.from_numpy(samples.history[start:stop]).to(device)
                neighbours = None
                if context and self.config.context_dim > 0:
                    neighbours = torch.from_numpy(samples.neighbours[start:stop]).to(device)
                outputs.append(model(history, neighbours).float().cpu().numpy())
        finally:
            model.train(was_training)
        return np.concatenate(outputs)

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """ADE/FDE/miss rate (and at 1, 2, 3 s) of the AGENT forecasts of ``split``, with the
        constant-velocity baseline's as ``baseline_*``; a context model also reports its
        history-only forecasts (what the served model does) as ``history_only_*``.

        Every rank computes the whole split (it is small), so the values agree across ranks.
        """
        samples = self.focal_samples(split)
        metrics = displacement_metrics(self.predict(model, samples), samples.future, frame_rate_hz=FRAME_RATE_HZ)
        baseline = constant_velocity_forecast(samples.history, FUTURE_FRAMES)
        metrics.update(displacement_metrics(baseline, samples.future, frame_rate_hz=FRAME_RATE_HZ, prefix="baseline_"))
        if self.config.context_dim > 0:
            alone = displacement_metrics(
                self.predict(model, samples, context=False), samples.future, frame_rate_hz=FRAME_RATE_HZ
            )
            metrics.update({f"history_only_{k}": alone[k] for k in ("ade", "fde", "miss_rate")})
        metrics.pop("baseline_num_samples", None)
        return metrics

    def selection_metric(self) -> tuple[str, str]:
        return "ade", "min"

    def export_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "family": self.name,
            "model": {
                "history_frames": HISTORY_FRAMES,
                "future_frames": FUTURE_FRAMES,
                "hidden_dim": c.hidden_dim,
                "num_layers": c.num_layers,
                "context_dim": c.context_dim,
                "dropout": c.dropout,
                "num_members": c.num_members,
                "mirror_average": c.mirror_average,
            },
            "frame_rate_hz": FRAME_RATE_HZ,
            "input": {"name": "history", "dtype": "float32", "shape": [-1, HISTORY_FRAMES, 2]},
            "output": {"name": "forecast", "dtype": "float32", "shape": [-1, FUTURE_FRAMES, 2]},
            "predict": "trainflow.trainers.driving.model:forecast",
        }
