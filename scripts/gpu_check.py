"""Python side of ``scripts/gpu-check.sh``: the loader-vs-memory step time, and the device probe.

    python scripts/gpu_check.py probe                      # JSON: torch, CUDA build, device count and names
    python scripts/gpu_check.py loader --device cuda --manifest-uri URI [--batch 4096] [--steps 200]

``loader`` trains NeuMF (the recommendation family, bf16 autocast on CUDA) for ``--steps``
optimizer steps twice, alternating blocks of ``--block`` steps so that both see the same
machine state:

- *memory*: synthetic batches of the same shapes made once, already on the device (no data
  path at all: the step time of the model alone);
- *loader*: the real data path, :class:`trainflow.trainers.loader.ShardLoader` streaming the train
  split's shards (checksums verified, negatives sampled in its ``transform``, one DataLoader
  worker), each batch copied to the device from pinned memory.

It prints one JSON object: samples/s of each, ``ratio`` = loader step time / memory step time
(the target is <= 1.05: the loader keeps the device fed) and ``ok``. ``--device cpu`` runs the
same code on the CPU (how the tests check it without a GPU; the ratio there says nothing about
a GPU). Exit status 0 when the measurement ran, whatever the ratio (the shell script judges).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RATIO = 1.05


def probe() -> dict:
    import torch

    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    return {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": available,
            "devices": count, "names": [torch.cuda.get_device_name(i) for i in range(count)],
            "bf16": bool(available and torch.cuda.is_bf16_supported())}


def _steps(model, optimizer, batches, device, autocast, sync) -> float:
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    for batch in batches:
        users = batch["users"].to(device, non_blocking=True)
        items = batch["items"].to(device, non_blocking=True)
        with autocast():
            logits = model(users, items)
            labels = torch.zeros_like(logits)
            labels[:, 0] = 1.0
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return time.perf_counter() - started


def loader_check(manifest_uri: str, device_name: str, batch: int, steps: int, block: int, workers: int) -> dict:
    import contextlib
    import itertools

    import torch

    from benchmarks._train_io import family_config, shardloader_batches
    from trainflow.tasks.manifest import load_manifest
    from trainflow.trainers.distributed import World
    from trainflow.trainers.recommendation.family import RecommendationFamily

    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check loader: --device cuda but torch sees no CUDA device")
    device = torch.device(device_name)
    manifest = load_manifest(manifest_uri)
    family = RecommendationFamily(family_config(), manifest, World())
    model = family.build_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    k = family.config.num_negatives
    gen = torch.Generator(device="cpu").manual_seed(0)
    memory = [{"users": torch.randint(0, family.num_users, (batch,), generator=gen).to(device),
               "items": torch.randint(0, family.num_items, (batch, k + 1), generator=gen).to(device)}
              for _ in range(min(block, 64))]
    loader = shardloader_batches(family, manifest, batch, workers=workers)

    def loader_stream():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for item in loader:
                yield {key: (value.pin_memory() if cuda else value) for key, value in item.items()}
            epoch += 1

    stream = loader_stream()
    # Warm-up (CUDA context, kernels, the loader's first window) off the clock.
    _steps(model, optimizer, itertools.islice(stream, 5), device, autocast, sync)
    _steps(model, optimizer, memory[:5], device, autocast, sync)
    seconds = {"memory": 0.0, "loader": 0.0}
    done = 0
    while done < steps:
        n = min(block, steps - done)
        seconds["memory"] += _steps(model, optimizer, (memory[i % len(memory)] for i in range(n)), device,
                                    autocast, sync)
        seconds["loader"] += _steps(model, optimizer, itertools.islice(stream, n), device, autocast, sync)
        done += n
    ratio = seconds["loader"] / seconds["memory"]
    return {"check": "loader_vs_memory", "device": device_name,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "model": "neumf", "precision": "bf16" if cuda else "fp32", "batch": batch, "steps": steps,
            "loader_workers": workers,
            "memory_samples_per_s": round(steps * batch / seconds["memory"], 1),
            "loader_samples_per_s": round(steps * batch / seconds["loader"], 1),
            "memory_step_ms": round(1000 * seconds["memory"] / steps, 3),
            "loader_step_ms": round(1000 * seconds["loader"] / steps, 3),
            "ratio": round(ratio, 4), "target": TARGET_RATIO, "ok": ratio <= TARGET_RATIO}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU check helpers (see scripts/gpu-check.sh)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe", help="print torch's view of the CUDA devices as JSON")
    loader = sub.add_parser("loader", help="real loader vs in-memory batches: samples/s and step-time ratio")
    loader.add_argument("--manifest-uri", required=True)
    loader.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    loader.add_argument("--batch", type=int, default=4096)
    loader.add_argument("--steps", type=int, default=200)
    loader.add_argument("--block", type=int, default=25, help="steps per alternation block")
    loader.add_argument("--workers", type=int, default=1, help="DataLoader workers of the real loader")
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe()))
        return 0
    for name in ("batch", "steps", "block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.workers < 0:
        parser.error("--workers must not be negative")
    print(json.dumps(loader_check(args.manifest_uri, args.device, args.batch, args.steps, args.block, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
