"""Training overhead: the Trainer on NeuMF vs a minimal hand-written PyTorch loop.

Same model (NeuMF, 4 negatives a positive), batch (1024), optimizer (AdamW, lr 1e-3) and
data, one epoch, 1 torch thread, a fresh process per run; the variants run interleaved and
the medians are compared (``benchmarks/_train_io.py`` has the variants):

- ``trainer_memory`` vs ``hand_memory`` (pre-built batches in memory): the loop's overhead
  (target ≥ 0.95).
- ``trainer_family`` vs ``trainer_memory``: the recommendation family's real data path
  (negatives sampled per batch) vs pre-built batches.
- ``hand_shardloader`` vs ``hand_memory``: batches streamed by ShardLoader from the shards
  (verified, negatives sampled in its transform) vs pre-built: is the loader the bottleneck?
  ``hand_shardloader_nw1``: the same with one DataLoader worker making the batches alongside.

    python -m benchmarks.training_overhead          # 300k interactions, 5 rounds
    python -m benchmarks.training_overhead --quick  # 20k interactions, 1 round
"""

from __future__ import annotations

import argparse
import sys

from benchmarks._recdata import manifest_uri
from benchmarks.common import emit, interleave, machine, median, run_json, spread

VARIANTS = ["hand_memory", "trainer_memory", "trainer_family", "hand_shardloader", "hand_shardloader_nw1"]
PAIRS = [  # (name, measured, baseline)
    ("training_trainer_vs_hand_loop", "trainer_memory", "hand_memory"),
    ("training_trainer_real_data_vs_memory", "trainer_family", "trainer_memory"),
    ("training_shardloader_vs_memory", "hand_shardloader", "hand_memory"),
    ("training_shardloader_nw1_vs_memory", "hand_shardloader_nw1", "hand_memory"),
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args(argv)
    size = args.interactions or (20_000 if args.quick else 300_000)
    rounds = args.rounds or (1 if args.quick else 5)
    uri = manifest_uri(size)
    variants = {v: (lambda v=v: run_json([sys.executable, "-m", "benchmarks._train_io", v, uri,
                                          "--batch", str(args.batch)])["samples_per_s"]) for v in VARIANTS}
    values = interleave(variants, rounds)
    med = {k: median(v) for k, v in values.items()}
    common = {"interactions": size, "model": "neumf", "batch": args.batch, "num_negatives": 4, "rounds": rounds,
              "machine": machine()}
    lines = []
    for name, a, b in PAIRS:
        lines.append(emit(name, round(med[a]), "samples/s", round(med[b]),
                          {**common, "measured": a, "baseline_is": b, "runs": {a: [round(x) for x in values[a]],
                                                                               b: [round(x) for x in values[b]]},
                           "min_max": {a: spread(values[a]), b: spread(values[b])}}))
    return lines


if __name__ == "__main__":
    main()
