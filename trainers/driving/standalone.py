"""A small single-process trainer for the driving family (development, tuning, tests).

The generic loop (``trainers.loop``) is what the pipeline runs; this driver does the same
steps without distribution or checkpoints: AdamW with a linear warm-up and cosine decay,
evaluation on ``valid`` after each epoch, and the best epoch's weights kept.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Any

import torch

from trainers.family import ModelFamily

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StandaloneConfig:
    """Optimisation settings of :func:`train_standalone`.

    Attributes:
        epochs: Passes over the training samples.
        batch_size: Samples per step.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: Share of the steps with a linear warm-up.
        eval_split: Split evaluated after each epoch to keep the best weights (``valid``).
    """

    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    eval_split: str = "valid"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


def train_standalone(family: ModelFamily, config: StandaloneConfig) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train ``family``'s model in this process.

    Returns:
        The model with the best epoch's weights (by the family's selection metric on
        ``config.eval_split``) and one record per epoch (loss, metrics, seconds).
    """
    model = family.build_model().to(family.world.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = sum(1 for _ in family.train_batches(0, config.batch_size))
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(total * config.warmup_fraction))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    key, mode = family.selection_metric()
    best_value, best_state, history = None, None, []
    for epoch in range(config.epochs):
        started = time.monotonic()
        model.train()
        losses = []
        for batch in family.train_batches(epoch, config.batch_size):
            loss = family.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        metrics = family.evaluate(model, config.eval_split)
        record = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "seconds": time.monotonic() - started}
        record.update({f"{config.eval_split}_{k}": v for k, v in metrics.items()})
        history.append(record)
        value = metrics[key]
        if best_value is None or (value < best_value if mode == "min" else value > best_value):
            best_value, best_state = value, copy.deepcopy(model.state_dict())
        log.info(
            "epoch %d: loss %.4f, %s %s %.4f (baseline %.4f), %.1f s",
            epoch, record["train_loss"], config.eval_split, key, value, metrics.get(f"baseline_{key}", float("nan")),
            record["seconds"],
        )
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history
