"""Recommendation data parallelism on the DAG's trainer path: samples/s of 2 processes vs 1.

NeuMF and SASRec on a synthetic log (default 2M interactions), one epoch each through
``benchmarks/_rec_run.py`` (streamed train split, DDP, per-epoch valid evaluation split
across ranks, epoch-end checkpoint, final eval evaluation, export), for the variants:

- ``dense``: DDP all-reduces and AdamW updates the whole embedding tables every step (before);
- ``row_sparse``: ``row_sparse_updates=True``: only the rows a step touches are exchanged and
  updated (:class:`trainflow.trainers.parallel.RowSparseAdamW`), every replica updating the union;
- ``a2a``: ``parallelism="sharded_embeddings_a2a"``: the tables row-sharded, lookups and row
  gradients through all-to-alls, each rank updating only its own touched rows
  (:class:`trainflow.trainers.parallel.AllToAllEmbedding`; on 1 process the unsharded model
  with the same lazy Adam on the touched rows, as ``row_sparse``).

1 and 2 processes are interleaved round by round (the machine is shared: ratios within a
round are what compare); each line carries the 1-minute load average of its runs.

    python -m benchmarks.rec_scaling                  # 2M interactions, both models, every variant, 2 rounds
    python -m benchmarks.rec_scaling --quick          # 20k interactions, NeuMF a2a, 1 round
    python -m benchmarks.rec_scaling --models neumf --variants a2a --rounds 3
    python -m benchmarks.rec_scaling --ml25m --variants a2a --max-steps 300   # ML-25M size, bounded steps
"""

from __future__ import annotations

import argparse
import sys

from benchmarks._recdata import ML25M, manifest_uri
from benchmarks.common import child_env, emit, machine, median, run_json

BATCH = {"neumf": 4096, "sasrec": 256}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--variants", nargs="+")
    parser.add_argument("--ml25m", action="store_true", help="MovieLens 25M's sizes (25M interactions, 162k users, 59k items)")
    parser.add_argument("--max-steps", type=int, help="bounded runs: stop each after N steps")
    parser.add_argument("--batch", type=int, nargs=2, metavar=("NEUMF", "SASREC"), help="global batches")
    args = parser.parse_args(argv)
    size = ML25M[0] if args.ml25m else args.interactions or (20_000 if args.quick else 2_000_000)
    models = args.models or (["neumf"] if args.quick else ["neumf", "sasrec"])
    variants = args.variants or (["a2a"] if args.quick else ["a2a", "row_sparse", "dense"])
    rounds = args.rounds or (1 if args.quick else 2)
    uri = manifest_uri(*ML25M) if args.ml25m else manifest_uri(size)
    batch = dict(zip(("neumf", "sasrec"), args.batch, strict=True)) if args.batch else BATCH

    def launch(model: str, variant: str, n: int) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "benchmarks._rec_run", uri, "--model", model, "--batch", str(batch[model])]
        if variant == "row_sparse":
            cmd.append("--row-sparse")
        if variant == "a2a":
            cmd.append("--a2a")
        if args.max_steps:
            cmd += ["--max-steps", str(args.max_steps)]
        return run_json(cmd, env=child_env(OMP_NUM_THREADS="1"), timeout=3600)

    out = []
    for model in models:
        for variant in variants:
            runs: dict[int, list[dict]] = {1: [], 2: []}
            for _ in range(rounds):
                for n in (1, 2):
                    runs[n].append(launch(model, variant, n))
            ratios = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(runs[1], runs[2], strict=True)]
            med = {n: median([r["samples_per_s"] for r in runs[n]]) for n in runs}
            common = {"interactions": size, "model": model, "variant": variant, "global_batch": batch[model], "max_steps": args.max_steps,
                      "threads_per_process": 1, "rounds": rounds, "machine": machine(),
                      "ratio_2_over_1_per_round": [round(x, 3) for x in ratios]}
            for n in (1, 2):
                out.append(emit(f"rec_scaling_{model}_{variant}_{n}_procs", round(med[n]), "samples/s", round(med[1]),
                                {**common, "processes": n, "runs": runs[n]}))
    return out


if __name__ == "__main__":
    main()
