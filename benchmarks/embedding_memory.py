"""Per-rank memory of a large embedding table: replicated (DDP) vs row-sharded
(``parallelism='sharded_embeddings'``) on 1, 2 and 4 ranks.

Each case is one ``torchrun`` launch (gloo, CPU) of this module in worker mode (``--quick``:
one 2-rank launch runs every case on sub-groups, peak RSS not reported): every rank
builds a GMF recommender whose item table is the large one, wraps it as the train loop does
(``DistributedDataParallel``, or :func:`trainflow.trainers.parallel.wrap_sharded_embeddings`), takes a
few AdamW steps on random batches and measures, on its own local tensors
(:func:`trainflow.trainers.parallel.memory_bytes`), the bytes of the parameters and of the optimizer
state, plus its peak resident set size. One JSON line per case and rank count: the largest
rank's parameter + optimizer bytes, with the replicated run of the same size as baseline.

    python -m benchmarks.embedding_memory              # 1M x 64 item table; 1, 2, 4 ranks
    python -m benchmarks.embedding_memory --quick      # 100k x 32; 1 and 2 ranks (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import emit, machine


def worker(args: argparse.Namespace) -> None:
    """The ranks of one launch (run under torchrun): every case of ``--cases`` in turn, each
    on the first ``n`` ranks (a sub-group), so that a quick run needs one launch."""
    import gc
    import resource

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    mine: dict[str, dict | None] = {}
    for case in args.cases.split(","):
        nproc, parallelism = case.split(":")
        group = dist.new_group(list(range(int(nproc)))) if int(nproc) > 1 else None  # collective on all ranks
        mine[case] = _measure(args, int(nproc), parallelism, group) if rank < int(nproc) else None
        gc.collect()
        if world > 1:
            dist.barrier()
    mine["rss_end_mb"] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
    if rank == 0:
        with open(args.out, "w") as handle:
            json.dump(ranks, handle)


def _measure(args: argparse.Namespace, nproc: int, parallelism: str, group) -> dict:
    """Build, wrap and train the model for a few steps; bytes of this rank's local tensors."""
    import resource

    import torch
    from torch.distributed.tensor import DTensor

    from trainflow.trainers.parallel import memory_bytes, wrap_sharded_embeddings
    from trainflow.trainers.recommendation.models import GMF

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = GMF(args.users, args.rows, args.dim)
    if nproc > 1 and parallelism == "sharded_embeddings":
        model = wrap_sharded_embeddings(model, model.embedding_modules(), torch.device("cpu"), group)
    elif nproc > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    params = list(model.parameters())
    groups = [g for g in ([p for p in params if not isinstance(p, DTensor)],
                          [p for p in params if isinstance(p, DTensor)]) if g]
    optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    started = time.monotonic()
    for _ in range(args.steps):
        users = torch.randint(0, args.users, (args.batch,), generator=gen)
        items = torch.randint(0, args.rows, (args.batch, 5), generator=gen)
        loss = model(users, items).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_seconds = (time.monotonic() - started) / args.steps
    inner = model.module if hasattr(model, "module") else model
    measured = memory_bytes(inner, optimizer, {"item_embedding.weight", "user_embedding.weight"})
    measured.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    rss_before_model_mb=rss_start, step_seconds=step_seconds)
    return measured


def run_launch(nproc: int, cases: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """One torchrun launch of ``nproc`` ranks running ``cases``; per case, every rank's numbers."""
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-") as tmp:
        out = os.path.join(tmp, "ranks.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "benchmarks.embedding_memory", "--worker", f"--cases={','.join(cases)}", f"--rows={args.rows}",
               f"--dim={args.dim}", f"--users={args.users}", f"--steps={args.steps}", f"--batch={args.batch}",
               f"--out={out}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cases} on {nproc} ranks failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        with open(out) as handle:
            ranks = json.load(handle)
    return {case: [r[case] for r in ranks if r[case] is not None] for case in cases}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=None, help="rows of the item table")
    parser.add_argument("--dim", type=int, default=None, help="embedding width")
    parser.add_argument("--users", type=int, default=None, help="rows of the user table")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=256, help="per-rank batch")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    args.rows = args.rows or (100_000 if args.quick else 1_000_000)
    args.dim = args.dim or (32 if args.quick else 64)
    args.users = args.users or args.rows // 10
    args.steps = args.steps or (2 if args.quick else 5)
    cases = ["1:ddp", "2:ddp", "2:sharded_embeddings"]
    if not args.quick:
        cases += ["4:ddp", "4:sharded_embeddings"]
    started = time.monotonic()
    if args.quick:
        # One launch of 2 ranks runs every case (sub-groups): bytes are exact, RSS is shared.
        results = run_launch(2, cases, args)
    else:
        # One launch per case: each rank's peak RSS belongs to that case alone.
        results = {}
        for case in cases:
            results.update(run_launch(int(case.split(":")[0]), [case], args))
    wall = round(time.monotonic() - started, 2)
    lines = []
    for case, per_rank in results.items():
        nproc, parallelism = int(case.split(":")[0]), case.split(":")[1]
        totals = [r["param_bytes"] + r["optimizer_bytes"] for r in per_rank]
        tables = [r["embedding_param_bytes"] + r["embedding_optimizer_bytes"] for r in per_rank]
        baseline = max(r["param_bytes"] + r["optimizer_bytes"] for r in results[f"{nproc}:ddp"])
        lines.append(emit(
            f"embedding_memory_{'replicated' if parallelism == 'ddp' else 'sharded'}_{nproc}_ranks",
            round(max(totals) / 2**20, 2),
            "MiB",
            round(baseline / 2**20, 2),
            {
                "parallelism": "none" if nproc == 1 else parallelism,
                "ranks": nproc,
                "item_rows": args.rows,
                "user_rows": args.users,
                "dim": args.dim,
                "table_mib_per_rank": [round(t / 2**20, 2) for t in tables],
                "param_plus_optimizer_mib_per_rank": [round(t / 2**20, 2) for t in totals],
                # RSS only means something with one process per case (not --quick)
                "peak_rss_mb_per_rank": None if args.quick else [round(r["peak_rss_mb"], 1) for r in per_rank],
                "rss_before_model_mb_rank0": None if args.quick else round(per_rank[0]["rss_before_model_mb"], 1),
                "step_seconds_rank0": round(per_rank[0]["step_seconds"], 4),
                "total_wall_seconds": wall,
                "machine": machine(),
            },
        ))
    return lines


if __name__ == "__main__":
    main()
