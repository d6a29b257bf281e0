"""Run under torchrun by tests/trainers/test_parallel.py: a RowShardedEmbedding against the
full nn.Embedding it came from, on every rank, with indices that differ per rank (and in
number), a padding row, and tables with fewer rows than ranks.

    torchrun --nproc-per-node N parallel_worker.py OUT_DIR

Writes ``OUT_DIR/rank-R.json`` with the largest differences seen.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from trainflow.trainers.parallel import RowShardedEmbedding, clip_grad_norm, shard_embeddings


def main(out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {"rank": rank, "world": world, "cases": []}
    for rows, dim, padding_idx in ((11, 4, None), (7, 3, 0), (world - 1 if world > 1 else 1, 2, None)):
        torch.manual_seed(0)
        full = nn.Embedding(rows, dim, padding_idx=padding_idx)
        holder = nn.Module()
        holder.table = nn.Embedding(rows, dim, padding_idx=padding_idx)
        holder.table.load_state_dict(full.state_dict())
        shard_embeddings(holder, [holder.table], torch.device("cpu"))
        sharded = holder.table
        assert isinstance(sharded, RowShardedEmbedding)
        gen = torch.Generator().manual_seed(100 + rank)
        # a different number of lookups on every rank, repeated rows included
        indices = torch.randint(0, rows, (2 + rank, 3), generator=gen)
        weights = torch.randn(2 + rank, 3, dim, generator=gen)
        out = sharded(indices)
        (out * weights).sum().backward()
        expected = full(indices)
        (expected * weights).sum().backward()
        # the DDP-equivalent gradient of the full table: the mean over ranks
        grad = full.weight.grad.clone()
        dist.all_reduce(grad)
        grad /= world
        lo, hi = sharded.row_range
        local_grad = sharded.weight.grad.to_local()
        with torch.no_grad():
            ones = sharded(torch.arange(rows))  # an eval-style lookup under no_grad
        report["cases"].append({
            "rows": rows,
            "row_range": [lo, hi],
            "local_rows": sharded.weight.to_local().shape[0],
            "forward_diff": float((out - expected).abs().max()),
            "grad_diff": float((local_grad - grad[lo:hi]).abs().max()) if hi > lo else 0.0,
            "padding_grad": float(local_grad[padding_idx - lo].abs().max()) if padding_idx is not None and lo <= padding_idx < hi else None,
            "no_grad_diff": float((ones - full.weight).abs().max()),
        })
    # clipping over a DTensor shard and a replicated tensor: the norm is the global one
    torch.manual_seed(0)
    holder = nn.Module()
    holder.table = nn.Embedding(10, 2)
    holder.dense = nn.Linear(2, 1)
    shard_embeddings(holder, [holder.table], torch.device("cpu"))
    out = holder.dense(holder.table(torch.arange(10)))
    out.sum().backward()
    local = holder.table.weight.grad.to_local().pow(2).sum()
    dist.all_reduce(local)
    full_sq = local + sum(p.grad.pow(2).sum() for p in holder.dense.parameters())
    norm = clip_grad_norm(list(holder.parameters()), 0.5)
    after = holder.table.weight.grad.to_local().pow(2).sum()
    dist.all_reduce(after)
    after = after + sum(p.grad.pow(2).sum() for p in holder.dense.parameters())
    report["clip"] = {"norm": float(norm), "expected": float(full_sq.sqrt()), "after": float(after.sqrt())}
    with open(f"{out_dir}/rank-{rank}.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    from worker_group import run_in_group  # a sibling file: these workers run as scripts

    run_in_group(main, sys.argv[1])
