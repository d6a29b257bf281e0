"""Scaling: Trainer samples/s with 1 and 2 processes (torchrun, gloo, 1 thread each).

NeuMF over pre-built batches (``trainer_memory`` in ``benchmarks/_train_io.py``), the same
global batch (1024: 1 × 1024 or 2 × 512), DDP, one epoch; 1 and 2 processes interleaved,
medians compared. On the 2-core development machine two ranks share the cores with everything
else, so this measures the DDP overhead more than a speed-up.

    python -m benchmarks.scaling            # 300k interactions, 3 rounds
    python -m benchmarks.scaling --quick    # 20k interactions, 1 round
"""

from __future__ import annotations

import argparse
import sys

from benchmarks._recdata import manifest_uri
from benchmarks.common import child_env, emit, interleave, machine, median, run_json, spread


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    size = args.interactions or (20_000 if args.quick else 300_000)
    rounds = args.rounds or (1 if args.quick else 3)
    uri = manifest_uri(size)

    def launch(n: int) -> float:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "benchmarks._train_io", "trainer_memory", uri, "--batch", str(args.batch)]
        return run_json(cmd, env=child_env(OMP_NUM_THREADS="1"))["samples_per_s"]

    values = interleave({n: (lambda n=n: launch(n)) for n in args.procs}, rounds)
    med = {n: median(v) for n, v in values.items()}
    base = med[args.procs[0]]
    common = {"interactions": size, "model": "neumf", "global_batch": args.batch, "backend": "gloo",
              "threads_per_process": 1, "rounds": rounds, "machine": machine()}
    return [emit(f"scaling_trainer_{n}_procs", round(med[n]), "samples/s", round(base),
                 {**common, "processes": n, "baseline_is": f"{args.procs[0]} process(es)",
                  "runs": [round(x) for x in values[n]], "min_max": spread(values[n])}) for n in args.procs]


if __name__ == "__main__":
    main()
