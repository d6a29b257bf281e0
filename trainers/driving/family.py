"""The driving model family: focal-vehicle motion forecasting (2 s of history → 3 s).

Training samples are every track of a training scenario (AGENT, AV, OTHERS) observed at all 20
history frames and at least ``min_future_frames`` of the 30 future ones (the loss masked to the
observed frames), the AGENT weighted up in the loss; each carries the first 20 frames of its nearest
surrounding tracks as context. The train split is streamed: :class:`trainflow.trainers.loader.ShardLoader`
deals the scenario rows to the ranks (each scenario once per epoch across the world, the
padded tail flagged by ``sample_mask``) and each batch of scenarios is cut into its samples
where it is made, so no rank holds more than the loader's windows of the split.

The model gives a single forecast (an ensemble trained on ADE + FDE) and K forecasts with
probabilities (a head trained winner-takes-all). Evaluation forecasts the AGENT of every
scenario of a split and reports ADE/FDE/miss rate of the single forecast (K = 1) and minADE /
minFDE / miss rate over the K forecasts, next to the constant-velocity baseline's on the same
sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainflow.tasks.metrics import constant_velocity_forecast, displacement_metrics
from trainflow.trainers.driving.config import DrivingConfig
from trainflow.trainers.driving.data import TRAIN_COLUMNS, ForecastSamples, load_samples, loader_batch_samples
from trainflow.trainers.driving.geometry import FRAME_RATE_HZ, FUTURE_FRAMES, HISTORY_FRAMES
from trainflow.trainers.driving.model import build_forecaster
from trainflow.trainers.family import ModelFamily

if TYPE_CHECKING:
    from trainflow.tasks.manifest import Manifest
    from trainflow.trainers.distributed import World

log = logging.getLogger(__name__)


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
        self._focal: dict[str, ForecastSamples] = {}
        if config.train_on_valid:
            log.warning("train_on_valid=True: the valid scenarios are trained on, so 'valid' metrics leak")

    # data -------------------------------------------------------------------------------------
    def focal_samples(self, split: str) -> ForecastSamples:
        """The AGENT sample of every scenario of ``split``."""
        if split not in self._focal:
            self._focal[split] = load_samples(
                self.manifest, split, focal_only=True, max_neighbours=self.config.max_neighbours,
                neighbours_seen=self.config.neighbours_seen,
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
        """An estimate (``samples_per_scenario`` × training scenarios): the exact count is known
        only once the scenarios are read, and they are streamed."""
        scenarios = sum(self.manifest.num_rows(split) for split in self.train_splits)
        return max(1, round(scenarios * self.config.samples_per_scenario))

    @property
    def train_splits(self) -> tuple[str, ...]:
        """The splits trained on: ``train``, and ``valid`` too for a refit (``train_on_valid``)."""
        return ("train", "valid") if self.config.train_on_valid else ("train",)

    def scenarios_per_batch(self, batch_size: int) -> int:
        """Scenarios in a batch of about ``batch_size`` training samples (at least 1)."""
        return max(1, round(batch_size / self.config.samples_per_scenario))

    def train_loader(self, batch_size: int):
        """This rank's :class:`~trainflow.trainers.loader.ShardLoader` over the train split's scenarios
        (with ``train_on_valid``, the valid split's too; shuffled by ``seed``; the padded tail of an
        epoch carries ``sample_mask`` False)."""
        from trainflow.trainers.loader import ShardLoader

        return ShardLoader(
            self.manifest, self.train_splits, self.scenarios_per_batch(batch_size), world=self.world,
            columns=TRAIN_COLUMNS,
            seed=self.config.seed, remainder="pad", with_row_index=True,
        )

    def num_train_batches(self, batch_size: int) -> int:
        """Batches per rank in every epoch."""
        return self.train_loader(batch_size).num_batches()

    def train_batches(self, epoch: int, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        loader = self.train_loader(batch_size)
        loader.load_state_dict({"epoch": epoch, "position": skip_batches})
        for batch in loader:
            yield self.training_batch(batch, epoch)

    def training_batch(self, batch: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        """A loader batch of scenarios → the tensors the loss takes (samples, augmented).

        Augmentations are drawn per scenario by (seed, epoch, scenario row), not per rank: the
        same epoch sees the same samples whatever the world size. Samples of padding rows get
        weight 0, so each scenario counts once per epoch.
        """
        c = self.config
        shifts = None
        if c.max_time_shift > 0:
            shifts = np.array([
                np.random.default_rng([c.seed, epoch, 2, int(row)]).integers(0, c.max_time_shift + 1)
                for row in np.asarray(batch["row_index"])
            ])
        reversed_ = None
        if c.time_reverse_probability > 0:
            reversed_ = np.array([
                np.random.default_rng([c.seed, epoch, 3, int(row)]).random() < c.time_reverse_probability
                for row in np.asarray(batch["row_index"])
            ])
        samples, valid = loader_batch_samples(
            batch,
            focal_only=not c.train_on_all_tracks,
            max_neighbours=c.max_neighbours,
            min_other_displacement=c.min_other_displacement,
            min_future_frames=c.min_future_frames,
            time_shifts=shifts,
            time_reversed=reversed_,
            neighbours_seen=c.neighbours_seen,
        )
        mirror = np.zeros(len(samples), dtype=bool)
        drop_context = np.zeros(len(samples), dtype=bool)
        scale = np.ones(len(samples), dtype=np.float32)
        for row in np.unique(samples.scenario):
            at = np.flatnonzero(samples.scenario == row)
            rng = np.random.default_rng([c.seed, epoch, 1, int(row)])
            mirror[at] = rng.random(len(at)) < c.mirror_probability
            drop_context[at] = rng.random(len(at)) < c.context_dropout
            if c.scale_augmentation > 0:
                scale_rng = np.random.default_rng([c.seed, epoch, 4, int(row)])
                scale[at] = 1.0 + scale_rng.uniform(-c.scale_augmentation, c.scale_augmentation)
        history, future, neighbours = samples.history, samples.future, samples.neighbours
        history[mirror, :, 1] *= -1
        future[mirror, :, 1] *= -1
        neighbours[mirror, ..., 1] *= -1
        neighbours[drop_context] = np.nan
        if c.scale_augmentation > 0:
            # Samples are centred on their last observed position, so this scales about it.
            history *= scale[:, None, None]
            future *= scale[:, None, None]
            neighbours *= scale[:, None, None, None]
        weight = np.where(samples.is_agent, c.focal_weight, 1.0).astype(np.float32) * valid
        return {
            "history": torch.from_numpy(history),
            "future": torch.from_numpy(future),
            "neighbours": torch.from_numpy(neighbours),
            "weight": torch.from_numpy(weight.astype(np.float32)),
            "scenario": torch.from_numpy(samples.scenario),
        }

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        device = self.world.device
        history = batch["history"].to(device)
        future = batch["future"].to(device)
        neighbours = batch["neighbours"].to(device) if c.context_dim > 0 else None
        weight = batch["weight"].to(device)
        total = weight.sum().clamp_min(1e-6)  # a batch of padding rows only: loss 0
        if c.num_modes > 0:
            single, modes, logits = model(history, neighbours, per_member=True, with_modes=True)
        else:
            single, modes, logits = model(history, neighbours, per_member=True), None, None
        # Tracks with a partial future learn from their observed frames only; the final term
        # counts where the 3 s position is observed.
        seen = torch.isfinite(future).all(dim=-1)  # (n, 30)
        seen_f = seen.to(future.dtype)
        future = torch.where(seen[..., None], future, torch.zeros_like(future))
        num_seen = seen_f.sum(dim=-1).clamp_min(1.0)

        def displacement(error: torch.Tensor, fde_weight: float) -> torch.Tensor:
            return (error * seen_f).sum(dim=-1) / num_seen + fde_weight * error[..., -1] * seen_f[:, -1]

        # Each ensemble member learns from its own loss: (members, n, 30) errors.
        error = torch.linalg.vector_norm(single - future, dim=-1)
        per_sample = displacement(error, c.fde_weight)
        loss = (per_sample * weight).sum(dim=-1).mean() / total
        if modes is not None:
            # Winner-takes-all: only the forecast closest to the truth (ADE + FDE) learns to be
            # closer; the probabilities learn which one that is (cross-entropy).
            mode_error = torch.linalg.vector_norm(modes - future[:, None], dim=-1)  # (n, K, 30)
            per_mode = (mode_error * seen_f[:, None]).sum(dim=-1) / num_seen[:, None] + mode_error[..., -1] * seen_f[:, -1:]
            best = per_mode.detach().argmin(dim=1)
            wta = per_mode.gather(1, best[:, None]).squeeze(1)
            nll = torch.nn.functional.cross_entropy(logits.float(), best, reduction="none")
            loss = loss + c.mode_weight * ((wta + nll) * weight).sum() / total
        return loss

    @torch.no_grad()
    def predict(
        self, model: torch.nn.Module, samples: ForecastSamples, *, context: bool = True, modes: bool = False
    ) -> Any:
        """Forecasts (n, 30, 2) of ``samples`` (in their own shifted frame); with ``modes``,
        also the K forecasts (n, K, 30, 2) and their probabilities (n, K)."""
        was_training = model.training
        model.eval()
        device = self.world.device
        singles, all_modes, all_probs = [], [], []
        try:
            for start in range(0, len(samples), self.config.eval_batch_size):
                stop = start + self.config.eval_batch_size
                history = torch.from_numpy(samples.history[start:stop]).to(device)
                neighbours = None
                if context and self.config.context_dim > 0:
                    neighbours = torch.from_numpy(samples.neighbours[start:stop]).to(device)
                if modes:
                    single, forecasts, logits = model(history, neighbours, with_modes=True)
                    all_modes.append(forecasts.float().cpu().numpy())
                    all_probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
                else:
                    single = model(history, neighbours)
                singles.append(single.float().cpu().numpy())
        finally:
            model.train(was_training)
        if modes:
            return np.concatenate(singles), np.concatenate(all_modes), np.concatenate(all_probs)
        return np.concatenate(singles)

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """ADE/FDE/miss rate (and at 1, 2, 3 s) of the AGENT forecasts of ``split`` (K = 1),
        minADE/minFDE/miss rate over the K forecasts (``min_ade_K``...), with the
        constant-velocity baseline's as ``baseline_*``; a context model also reports its
        history-only forecasts (the old served call) as ``history_only_*``.

        Every rank computes the whole split (it is small), so the values agree across ranks.
        """
        from trainflow.trainers.driving.evaluation import multimodal_metrics

        samples = self.focal_samples(split)
        k = self.config.num_modes
        if k > 0:
            single, forecasts, probs = self.predict(model, samples, modes=True)
        else:
            single = self.predict(model, samples)
        metrics = displacement_metrics(single, samples.future, frame_rate_hz=FRAME_RATE_HZ)
        baseline = constant_velocity_forecast(samples.history, FUTURE_FRAMES)
        metrics.update(displacement_metrics(baseline, samples.future, frame_rate_hz=FRAME_RATE_HZ, prefix="baseline_"))
        if k > 0:
            metrics.update(multimodal_metrics(forecasts, probs, samples.future, baseline))
        if self.config.context_dim > 0:
            alone = displacement_metrics(
                self.predict(model, samples, context=False), samples.future, frame_rate_hz=FRAME_RATE_HZ
            )
            metrics.update({f"history_only_{key}": alone[key] for key in ("ade", "fde", "miss_rate")})
        metrics.pop("baseline_num_samples", None)
        return metrics

    @property
    def trains_on_valid(self) -> bool:
        return self.config.train_on_valid

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
                "num_modes": c.num_modes,
                "context_pooling": c.context_pooling,
                "mode_blend": c.mode_blend,
            },
            "max_neighbours": c.max_neighbours,
            "neighbours_seen": c.neighbours_seen,
            "frame_rate_hz": FRAME_RATE_HZ,
            "input": {"name": "history", "dtype": "float32", "shape": [-1, HISTORY_FRAMES, 2]},
            "output": {"name": "forecast", "dtype": "float32", "shape": [-1, FUTURE_FRAMES, 2]},
            "scene_input": {"history": [HISTORY_FRAMES, 2], "neighbours": [-1, HISTORY_FRAMES, 2],
                            "neighbours_mask": [-1, HISTORY_FRAMES]},
            "scene_output": {"forecasts": [c.num_modes, FUTURE_FRAMES, 2], "probabilities": [c.num_modes]},
            "predict": "trainflow.trainers.driving.model:forecast",
        }
