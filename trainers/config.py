"""The generic train loop's configuration (one dataclass, validated on construction)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from trainflow.tasks.storage import safe_name

PARALLELISMS = ("none", "ddp", "fsdp", "sharded_embeddings", "sharded_embeddings_a2a")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("cpu", "cuda")
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass
class TrainConfig:
    """How to train: data, run directory, optimisation, distribution, logging.

    Every field is logged to MLflow as a parameter; an invalid value raises ``ValueError``
    naming the field.
    """

    manifest_uri: str
    """URL of the dataset version's ``_manifest.json`` (or its folder)."""

    run_dir: str | None = None
    """URL of the run directory; default ``{root}/runs/{dag_id}/{run_id}``."""

    dag_id: str = "manual"
    """DAG id keying the run directory (a safe path component)."""

    run_id: str = "local"
    """DAG run id keying the run directory: retries and restarts of one run resume there."""

    epochs: int = 1
    """Passes over the train split."""

    batch_size: int = 1024
    """Global batch: samples per optimizer step across all ranks and accumulation steps."""

    learning_rate: float = 1e-3
    """Peak learning rate."""

    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (Adam)."""

    optimizer: str = "adamw"
    """``adamw`` or ``adam``."""

    adam_beta1: float = 0.9
    """Adam(W)'s decay of the gradient's running mean."""

    adam_beta2: float = 0.999
    """Adam(W)'s decay of the squared gradient's running mean (Transformers often use 0.98: the
    step size follows a change of gradient scale sooner)."""

    lr_schedule: str = "constant"
    """``constant``, ``cosine`` (to 10 % of the peak) or ``linear`` (to 0), after warmup."""

    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""

    grad_accum_steps: int = 1
    """Micro batches per optimizer step on each rank."""

    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value; ``None`` disables clipping."""

    parallelism: str = "ddp"
    """``ddp`` (replicated), ``fsdp`` (FSDP2 ``fully_shard``: every parameter sharded, each
    embedding table on its own), ``sharded_embeddings`` (the family's embedding tables split
    row-wise across ranks, never gathered; an all-gather and a reduce-scatter per lookup, dense
    AdamW on each rank's rows; the rest replicated with DDP), ``sharded_embeddings_a2a`` (the
    same split, TorchRec-style: a lookup sends the ids to the rows' owners and gets the rows
    back with an all-to-all, the backward sends the row gradients to the owners, which update
    only the owned rows a step touched with lazy Adam(W); bytes and optimizer work follow the
    batch, not the table) or ``none`` (one process only)."""

    device: str = "cpu"
    """``cpu`` (gloo) or ``cuda`` (nccl; each rank takes ``cuda:LOCAL_RANK``)."""

    precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` (bf16 autocast on either) or
    ``fp32`` (no autocast). Weights and optimizer state stay fp32 in every case."""

    pin_memory: bool = False
    """Copy batches into pinned (page-locked) host memory on a background thread and move them
    to the GPU asynchronously; needs ``device='cuda'``."""

    seed: int = 0
    """Seed of model init, data order and per-batch randomness."""

    checkpoint_every_steps: int = 0
    """Checkpoint every N optimizer steps (0: only at the end of each epoch)."""

    checkpoint_every_minutes: float = 10.0
    """Also checkpoint mid-epoch once this many minutes have passed since the last checkpoint
    (or the start of the run), so that a failure loses at most about that much training; 0:
    no time-based checkpoints. On several ranks the clocks are compared every
    ``CLOCK_CHECK_STEPS`` (10) optimizer steps (one all-reduce of a flag), alone every step."""

    keep_checkpoints: int = 2
    """Committed checkpoints kept in the run directory."""

    log_every_steps: int = 50
    """Progress line and MLflow step metrics every N optimizer steps."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` or the local SQLite store."""

    mlflow_experiment: str = "trainflow"
    """MLflow experiment of a new run."""

    mlflow_run_id: str | None = None
    """Attach to this existing MLflow run instead of starting one."""

    log_to_mlflow: bool = True
    """Log params, metrics and system metrics to MLflow (rank 0 only)."""

    system_metrics: bool = True
    """Let MLflow sample CPU/memory/GPU while training."""

    compile: bool = False
    """Wrap the model in ``torch.compile`` (the default inductor backend; the first steps
    compile, so it pays off on long runs)."""

    keep_best: bool = True
    """Export the weights of the best ``valid`` epoch (``False``: the last epoch's)."""

    max_steps: int | None = None
    """Stop after this many optimizer steps in total (smoke tests); ``None``: all epochs."""

    def __post_init__(self) -> None:
        if not self.manifest_uri:
            raise ValueError("manifest_uri is required")
        safe_name(self.dag_id, "dag_id")
        safe_name(self.run_id, "run_id")
        _positive(self, "epochs", "batch_size", "grad_accum_steps", "keep_checkpoints", "log_every_steps")
        if isinstance(self.checkpoint_every_minutes, bool) or not isinstance(self.checkpoint_every_minutes, int | float) \
                or not math.isfinite(self.checkpoint_every_minutes):
            raise ValueError(f"checkpoint_every_minutes must be a finite number, got {self.checkpoint_every_minutes!r}")
        _non_negative(self, "checkpoint_every_steps", "checkpoint_every_minutes", "warmup_steps", "weight_decay")
        for name in ("adam_beta1", "adam_beta2"):
            beta = getattr(self, name)
            if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {beta!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 or None, got {self.max_steps}")
        for name, allowed in (
            ("parallelism", PARALLELISMS),
            ("device", DEVICES),
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", SCHEDULES),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

        for name in ("pin_memory", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.pin_memory and self.device != "cuda":
            raise ValueError(f"pin_memory=True needs device='cuda' (pinned memory only speeds up copies to a GPU), "
                             f"got device={self.device!r}")

    @property
    def autocast_dtype(self):
        """The autocast dtype (``torch.bfloat16``) or ``None`` for fp32."""
        import torch

        if self.precision == "bf16" or (self.precision == "auto" and self.device == "cuda"):
            return torch.bfloat16
        return None

    def micro_batch_size(self, world_size: int) -> int:
        """Samples per micro batch on each rank.

        Raises:
            ValueError: ``batch_size`` is not a multiple of ``world_size * grad_accum_steps``.
        """
        parts = world_size * self.grad_accum_steps
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of world_size ({world_size}) x "
                f"grad_accum_steps ({self.grad_accum_steps})"
            )
        return self.batch_size // parts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**data)


def _positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


def _non_negative(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value!r}")
