"""The contract between the generic train loop and a model family (one per pipeline, see
:attr:`trainflow.tasks.pipelines.PipelineSpec.family`).

The loop (``trainflow.trainers.loop``) owns distribution (DDP/FSDP wrapping), the optimizer, gradient
accumulation, mixed precision, checkpoints, progress lines and MLflow logging. A family owns
what is specific to its data and model: how to build the model, how this rank's training
batches are made from the dataset manifest, the loss, evaluation and the exported model.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from trainflow.tasks.manifest import Manifest
    from trainflow.trainers.distributed import World


class ModelFamily(abc.ABC):
    """One model family; the loop calls these in order: build_model, then per epoch
    train_batches / loss, then evaluate, then export.

    Args:
        config: The family's config dataclass (validated in its ``__post_init__``).
        manifest: The committed dataset version to train on.
        world: This process's rank information.
    """

    name: str = "family"

    def __init__(self, config: Any, manifest: Manifest, world: World) -> None:
        self.config = config
        self.manifest = manifest
        self.world = world

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A fresh, deterministically initialised model (same on every rank)."""

    def fsdp_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Sub-modules to shard separately under FSDP (e.g. embedding tables); default none."""
        return []

    def embedding_tables(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The ``nn.Embedding`` tables that ``parallelism='sharded_embeddings'`` splits row-wise
        across ranks (the rest is replicated); default none (that parallelism is then refused).
        A model with several tables looks them up with
        :func:`trainflow.trainers.parallel.lookup_embeddings`: under ``sharded_embeddings_a2a``
        all of them then travel in one exchange (4 collectives a step, not 4 a table)."""
        return []

    def ddp_ignored(self, model: torch.nn.Module) -> list[str]:
        """Names of parameters and buffers DDP must not synchronise (e.g. tables whose rows an
        optimizer exchanges itself, constant buffers identical on every rank); default none."""
        return []

    @abc.abstractmethod
    def num_train_samples(self, epoch: int) -> int:
        """Training samples in ``epoch`` across the whole world (for progress and ETA)."""

    @abc.abstractmethod
    def train_batches(self, epoch: int, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches for ``epoch``, deterministic in (seed, epoch, rank).

        Every rank must yield the same number of batches (collectives stay in step); the
        samples of an epoch are covered once across ranks. ``skip_batches`` resumes mid-epoch.
        """

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of ``batch`` (a scalar tensor)."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """Metrics on ``split`` (``valid`` or ``eval``), the same on every rank."""

    def selection_metric(self) -> tuple[str, str]:
        """(metric key, ``max``/``min``) used to pick the best epoch on ``valid``."""
        return "loss", "min"

    @property
    def trains_on_valid(self) -> bool:
        """Whether this run trains on the ``valid`` split too (a refit with settings chosen
        before). The loop then keeps the last epoch whatever ``keep_best`` says: an epoch chosen
        on data the model was trained on is a leaked choice."""
        return False

    def export_config(self) -> dict[str, Any]:
        """What, besides the state dict, rebuilds the model without training code."""
        return {}


class ShardLoaderFamily(ModelFamily):
    """A family whose training batches are rows of the ``train`` split as tensors, streamed by
    :class:`trainflow.trainers.loader.ShardLoader`: the default batch path (each rank reads its own share
    of the shards, every row once per epoch, resumable mid-epoch).

    A subclass sets :attr:`columns` (``None``: every column) and writes ``build_model``,
    ``loss`` and ``evaluate``; it may override :meth:`to_batch` to shape the tensors.
    """

    columns: list[str] | None = None
    shuffle_seed_offset: int = 0

    def num_train_samples(self, epoch: int) -> int:
        return self.manifest.num_rows("train")

    def train_batches(self, epoch: int, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        from trainflow.trainers.loader import ShardLoader

        seed = int(getattr(self.config, "seed", 0)) + self.shuffle_seed_offset
        loader = ShardLoader(self.manifest, "train", batch_size, world=self.world, columns=self.columns, seed=seed)
        loader.load_state_dict({"epoch": epoch, "position": skip_batches})
        for batch in loader:
            yield self.to_batch(batch)

    def to_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loader's batch (column → tensor) as the loss takes it; default unchanged."""
        return batch
