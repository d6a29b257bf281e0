"""Training-throughput children for benchmarks/training_overhead.py and benchmarks/scaling.py.

    python -m benchmarks._train_io VARIANT MANIFEST_URI --batch 1024 [--run-dir URL]
    torchrun --standalone --nproc-per-node 2 -m benchmarks._train_io trainer_memory MANIFEST_URI ...

VARIANT (NeuMF on a committed recommendation dataset, one epoch, 1 torch thread a process):

- ``hand_memory``: a minimal hand-written PyTorch loop (forward, BCE, backward, AdamW step)
  over pre-built batches in memory.
- ``trainer_memory``: :class:`trainflow.trainers.loop.Trainer` over the same pre-built batches (a family
  whose ``train_batches`` replays them): the loop's own overhead.
- ``trainer_family``: the Trainer with the family's real data path (``train_batches``: the
  train split streamed by ShardLoader, negatives sampled in its transform).
- ``hand_shardloader``: the hand-written loop fed by :class:`trainflow.trainers.loader.ShardLoader`
  (shards read and verified, negatives sampled in the loader's ``transform``), in process.
- ``hand_shardloader_nw1``: the same with one DataLoader worker process making the batches
  while the training process trains.

Prints ``{"samples_per_s", "samples", "seconds"}``: training time only (the Trainer's epoch
time, which leaves out the valid evaluation and the checkpoint after it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from trainflow.trainers.recommendation.config import RecommendationConfig
from trainflow.trainers.recommendation.family import RecommendationFamily

BATCHES: dict[int, list] = {}


class MemoryFamily(RecommendationFamily):
    """The recommendation family, replaying batches built before the clock starts."""

    micro_batch = 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prebuilt = list(super().train_batches(0, self.micro_batch))

    def train_batches(self, epoch, batch_size, skip_batches=0):
        assert batch_size == self.micro_batch, (batch_size, self.micro_batch)
        yield from self.prebuilt[skip_batches:]


def family_config(seed: int = 0) -> RecommendationConfig:
    return RecommendationConfig(model="neumf", num_negatives=4, seed=seed)


def hand_loop(model: torch.nn.Module, batches, lr: float, batch_size: int) -> tuple[int, float]:
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    samples = 0
    started = time.perf_counter()
    for batch in batches:
        logits = model(batch["users"], batch["items"])
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += batch_size  # counted as the Trainer counts: a full batch per step
    return samples, time.perf_counter() - started


def run(variant: str, manifest_uri: str, batch: int, run_dir: str | None) -> dict:
    from trainflow.tasks.manifest import load_manifest
    from trainflow.trainers.distributed import World, world_from_env

    manifest = load_manifest(manifest_uri)
    config = family_config()
    if variant in ("hand_memory", "hand_shardloader", "hand_shardloader_nw1"):
        world = World()
        family = RecommendationFamily(config, manifest, world)
        model = family.build_model()
        if variant == "hand_memory":
            batches = list(family.train_batches(0, batch))
        else:
            batches = shardloader_batches(family, manifest, batch, workers=1 if variant.endswith("_nw1") else 0)
        samples, seconds = hand_loop(model, batches, 1e-3, batch)
        return {"samples_per_s": samples / seconds, "samples": samples, "seconds": seconds}
    from trainflow.trainers.config import TrainConfig
    from trainflow.trainers.loop import run_training

    world = world_from_env("cpu")
    micro = batch // world.world_size
    MemoryFamily.micro_batch = micro
    cls = MemoryFamily if variant == "trainer_memory" else RecommendationFamily
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-run-") as tmp:
        train = TrainConfig(manifest_uri=manifest_uri, run_dir=run_dir or f"file://{tmp}/run", epochs=1, batch_size=batch,
                            learning_rate=1e-3, log_to_mlflow=False, system_metrics=False, log_every_steps=50,
                            keep_best=False, parallelism="ddp")
        result = run_training(cls, config, train)
    seconds = result["history"][0]["seconds"]
    return {"samples_per_s": result["samples"] / seconds, "samples": result["samples"], "seconds": seconds,
            "world_size": result["world_size"]}


def shardloader_batches(family: RecommendationFamily, manifest, batch: int, workers: int = 0):
    """The train split through ShardLoader, negatives sampled in the loader's transform."""
    from trainflow.trainers.loader import ShardLoader
    from trainflow.trainers.recommendation.data import sample_negatives

    positives, num_items, k = family.positives, family.num_items, family.config.num_negatives

    def transform(b, info):
        users = b["user_idx"].numpy().astype(np.int64)
        rng = np.random.default_rng(int(info.generator.initial_seed()))
        negatives = sample_negatives(rng, users, k, positives, num_items)
        items = np.concatenate([b["item_idx"].numpy().astype(np.int64)[:, None], negatives], axis=1)
        return {"users": torch.from_numpy(users), "items": torch.from_numpy(items)}

    return ShardLoader(manifest, "train", batch, columns=["user_idx", "item_idx"], transform=transform,
                       num_workers=workers)


def main() -> None:
    from benchmarks.common import pin_threads

    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=["hand_memory", "trainer_memory", "trainer_family", "hand_shardloader",
                                            "hand_shardloader_nw1"])
    parser.add_argument("manifest_uri")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    pin_threads()
    result = run(args.variant, args.manifest_uri, args.batch, args.run_dir)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
