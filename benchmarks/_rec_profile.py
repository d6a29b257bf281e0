"""Per-phase time of a recommendation training step, 1 or 2 ranks (torchrun, gloo, 1 thread):

    torchrun --standalone --nproc-per-node 2 -m benchmarks._rec_profile MANIFEST_URI --model neumf \\
        --batch 4096 --steps 40 [--row-sparse | --a2a]

The family's real batches (ShardLoader, negatives), the model under DDP as the loop wraps it
(the family's ``ddp_ignored`` names left out), AdamW or RowSparseAdamW. Per step: ``data``
(next batch), ``forward`` (+ loss), ``backward`` (DDP's all-reduce of the dense gradients
included), ``exchange`` (RowSparseAdamW's all-gather of the touched rows; with ``--a2a``, the
all-to-alls of :class:`~trainflow.trainers.parallel.AllToAllEmbedding`'s lookups in forward and
backward, taken out of those two columns) and ``update`` (the optimizer's arithmetic). With
``--a2a`` the tables are row-sharded as ``parallelism='sharded_embeddings_a2a'`` wraps them
(2+ ranks). Rank 0 prints the medians in ms (after 5 warm-up steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    from benchmarks.common import pin_threads

    parser = argparse.ArgumentParser()
    parser.add_argument("manifest_uri")
    parser.add_argument("--model", default="neumf", choices=["neumf", "sasrec"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--row-sparse", action="store_true")
    parser.add_argument("--a2a", action="store_true")
    args = parser.parse_args()
    pin_threads()
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks._recdata import benchmark_preset
    from trainflow.tasks.manifest import load_manifest
    from trainflow.trainers.distributed import World
    from trainflow.trainers.parallel import RowSparseAdamW, wrap_all_to_all_embeddings
    from trainflow.trainers.recommendation.config import RecommendationConfig
    from trainflow.trainers.recommendation.family import RecommendationFamily

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")
    config = RecommendationConfig(model=args.model, row_sparse_updates=args.row_sparse, **benchmark_preset(args.model))
    family = RecommendationFamily(config, load_manifest(args.manifest_uri), World(rank=rank, world_size=world_size))
    model = family.build_model()
    net = model
    a2a: list[float] = []
    if args.a2a and world_size > 1:
        net = wrap_all_to_all_embeddings(model, family.embedding_tables(model), torch.device("cpu"))
        inner_a2a = dist.all_to_all_single

        def timed_a2a(*a, **k):
            t = time.perf_counter()
            out = inner_a2a(*a, **k)
            a2a.append(time.perf_counter() - t)
            return out

        dist.all_to_all_single = timed_a2a
    elif world_size > 1:
        ignored = family.ddp_ignored(model)
        if ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        net = DistributedDataParallel(model)
    opt = RowSparseAdamW(model.parameters(), lr=1e-3) if (args.row_sparse or args.a2a) else torch.optim.AdamW(model.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {k: [] for k in ("data", "forward", "backward", "exchange", "update", "step")}
    if args.row_sparse:  # time the exchange apart from the arithmetic
        inner = opt._exchange

        def timed(rows, values):
            t = time.perf_counter()
            out = inner(rows, values)
            times["exchange"].append(time.perf_counter() - t)
            return out

        opt._exchange = timed
    batches = family.train_batches(0, args.batch // world_size)
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        a2a.clear()
        loss = family.loss(net, batch)
        t2 = time.perf_counter()
        a2a_forward = sum(a2a)
        loss.backward()
        t3 = time.perf_counter()
        a2a_backward = sum(a2a) - a2a_forward
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step >= 5:
            times["data"].append(t1 - t0)
            times["forward"].append(t2 - t1 - a2a_forward)
            times["backward"].append(t3 - t2 - a2a_backward)
            if args.a2a:
                times["exchange"].append(a2a_forward + a2a_backward)
            times["step"].append(t4 - t0)
            exchange = times["exchange"][-1] if args.row_sparse else 0.0
            times["update"].append(t4 - t3 - exchange)
    if args.row_sparse:
        times["exchange"] = times["exchange"][5:]
    out = {k: round(1000 * statistics.median(v), 2) for k, v in times.items() if v}
    out.update(world_size=world_size, per_rank_batch=args.batch // world_size, model=args.model,
               row_sparse=args.row_sparse, a2a=args.a2a, load_avg_1m=os.getloadavg()[0])
    if rank == 0:
        print(json.dumps(out), flush=True)
    if world_size > 1:
        del net  # a DDP freed after its process group can hang the rank at exit
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
