"""A tiny ModelFamily for the trainer tests: rating regression with two embedding tables.

Runnable as a script under torchrun (``python -m torch.distributed.run ... toy_family.py
--config cfg.json``), like a real family's ``python -m trainflow.trainers.<family>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Iterator

import torch

from trainflow.trainers.family import ModelFamily
from trainflow.trainers.loader import ShardLoader
from trainflow.trainers.loop import main

COLUMNS = ["user_idx", "item_idx", "rating"]


@dataclasses.dataclass
class ToyConfig:
    """Toy family settings.

    Attributes:
        embedding_dim: Width of the user and item tables.
        num_workers: DataLoader workers of the train loader.
        eval_rows: Train rows used as the 'valid' (first half) and 'eval' (second half) sets.
        die_at_batch: Test hook: rank ``die_rank`` SIGKILLs itself at this batch of epoch 0,
            once (a marker file in ``die_marker_dir`` says it already happened).
        die_rank: The rank that dies.
        die_marker_dir: Folder of the "already died" marker.
        selection_mode: ``min`` picks the lowest valid MSE; ``max`` (a test hook) the highest.
        record_dir: Test hook: when set, each rank appends every train batch it hands out
            (restart count, epoch, position, row indices) to ``rank<N>.jsonl`` there.
        declare_trains_on_valid: Test hook: the family says it trains on ``valid`` (a refit).
        raise_at_batch: Test hook: every rank raises a RuntimeError at this batch of epoch 0.
    """

    embedding_dim: int = 4
    num_workers: int = 0
    eval_rows: int = 400
    die_at_batch: int = -1
    die_rank: int = 1
    die_marker_dir: str = ""
    selection_mode: str = "min"
    record_dir: str = ""
    declare_trains_on_valid: bool = False
    raise_at_batch: int = -1


class ToyModel(torch.nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int) -> None:
        super().__init__()
        self.user = torch.nn.Embedding(num_users, dim)
        self.item = torch.nn.Embedding(num_items, dim)
        self.head = torch.nn.Linear(2 * dim, 1)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.user(user_idx.long()), self.item(item_idx.long())], dim=-1)
        return self.head(x).squeeze(-1) + 3.0


class ToyFamily(ModelFamily):
    name = "toy"

    def build_model(self) -> torch.nn.Module:
        stats = self.manifest.stats
        return ToyModel(int(stats["num_users"]), int(stats["num_items"]), self.config.embedding_dim)

    def fsdp_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [model.user, model.item]

    def num_train_samples(self, epoch: int) -> int:
        return self.manifest.num_rows("train")

    def train_batches(self, epoch: int, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        record = self.config.record_dir
        loader = ShardLoader(self.manifest, "train", batch_size, world=self.world, columns=COLUMNS,
                             seed=7, num_workers=self.config.num_workers, window_row_groups=2,
                             with_row_index=bool(record))
        loader.load_state_dict({"epoch": epoch, "position": skip_batches})
        for batch in loader:
            self._maybe_die(epoch, loader.position - 1)
            self._maybe_raise(epoch, loader.position - 1)
            if record:
                entry = {"restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "epoch": epoch,
                         "position": loader.position - 1, "rows": batch.pop("row_index").tolist()}
                with open(os.path.join(record, f"rank{self.world.rank}.jsonl"), "a") as handle:
                    handle.write(json.dumps(entry) + "\n")
            yield batch

    def _maybe_die(self, epoch: int, batch_index: int) -> None:
        cfg = self.config
        if epoch != 0 or batch_index != cfg.die_at_batch or self.world.rank != cfg.die_rank:
            return
        marker = os.path.join(cfg.die_marker_dir, "died")
        if os.path.exists(marker):
            return
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

    def _maybe_raise(self, epoch: int, batch_index: int) -> None:
        if epoch == 0 and batch_index == self.config.raise_at_batch:
            raise RuntimeError(f"toy failure at batch {batch_index} on rank {self.world.rank}")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = model(batch["user_idx"], batch["item_idx"])
        return torch.nn.functional.mse_loss(pred, batch["rating"])

    def _rows(self, split: str) -> dict[str, torch.Tensor]:
        table = self.manifest.read_table("train", columns=COLUMNS)
        half = self.config.eval_rows // 2
        table = table.slice(0, half) if split == "valid" else table.slice(half, half)
        return {c: torch.from_numpy(table.column(c).to_numpy().copy()) for c in COLUMNS}

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        rows = self._rows(split)
        pred = model(rows["user_idx"], rows["item_idx"])
        return {"mse": float(torch.nn.functional.mse_loss(pred, rows["rating"]))}

    def selection_metric(self) -> tuple[str, str]:
        return "mse", self.config.selection_mode

    @property
    def trains_on_valid(self) -> bool:
        return self.config.declare_trains_on_valid

    def export_config(self) -> dict:
        return {"num_users": int(self.manifest.stats["num_users"]), "num_items": int(self.manifest.stats["num_items"]),
                "embedding_dim": self.config.embedding_dim}


def _report_models_alive_at_destroy(folder: str) -> None:
    """Test hook: when the rank leaves its process group, write how many DDP models are still
    alive (a DDP freed after that can hang the rank at exit) to ``rank<N>-destroy.json``."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    destroy = dist.destroy_process_group

    def recording_destroy(*args, **kwargs):
        alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
        with open(os.path.join(folder, f"rank{dist.get_rank()}-destroy.json"), "w") as handle:
            json.dump({"ddp_alive": alive}, handle)
        return destroy(*args, **kwargs)

    dist.destroy_process_group = recording_destroy


if __name__ == "__main__":
    torch.set_num_threads(1)
    if os.environ.get("TOY_DESTROY_REPORT_DIR"):
        _report_models_alive_at_destroy(os.environ["TOY_DESTROY_REPORT_DIR"])
    main(ToyFamily, ToyConfig)
