"""Run under torchrun by tests/trainers/test_all_to_all.py: an AllToAllEmbedding against the
full nn.Embedding it came from, on every rank, with ids that differ per rank (and in number,
one rank with none), a padding row, a table with fewer rows than ranks; then 3 optimizer
steps of RowSparseAdamW on the shards against torch's SparseAdam (lazy Adam) on the full
table fed the mean over ranks of the gradients.

    torchrun --nproc-per-node N all_to_all_worker.py OUT_DIR

Writes ``OUT_DIR/rank-R.json`` with the largest differences seen.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from trainflow.trainers.parallel import (
    AllToAllEmbedding,
    RowSparseAdamW,
    clip_grad_norm,
    wrap_all_to_all_embeddings,
)


def _ids(rank: int, rows: int, step: int) -> torch.Tensor:
    if rank == 1 and step == 0:
        return torch.zeros((0, 3), dtype=torch.int64)  # a rank with nothing to look up
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, rows, (2 + rank, 3), generator=gen)


def _union_mean_grad(full: nn.Embedding, ids: torch.Tensor, world: int) -> torch.Tensor:
    """The sparse gradient lazy Adam gets: rows any rank looked up, the mean over ranks."""
    grad = full.weight.grad.clone() if full.weight.grad is not None else torch.zeros_like(full.weight)
    dist.all_reduce(grad)
    touched = torch.zeros(full.num_embeddings)
    touched[ids.reshape(-1)] = 1
    dist.all_reduce(touched)
    if full.padding_idx is not None:
        touched[full.padding_idx] = 0
    rows = touched.nonzero().flatten()
    return torch.sparse_coo_tensor(rows.unsqueeze(0), grad[rows] / world, full.weight.shape)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {"rank": rank, "world": world, "cases": []}
    for rows, dim, padding_idx in ((11, 4, None), (7, 3, 0), (world - 1 if world > 1 else 1, 2, None)):
        torch.manual_seed(0)
        full = nn.Embedding(rows, dim, padding_idx=padding_idx)
        holder = nn.Module()
        holder.table = nn.Embedding(rows, dim, padding_idx=padding_idx)
        holder.table.load_state_dict(full.state_dict())
        holder.head = nn.Linear(dim, 1)
        ddp = wrap_all_to_all_embeddings(holder, [holder.table], torch.device("cpu"))
        sharded = holder.table
        assert isinstance(sharded, AllToAllEmbedding)
        lo, hi = sharded.row_range
        reference = torch.optim.SparseAdam([full.weight], lr=0.05)
        opt = RowSparseAdamW([sharded.weight], lr=0.05)
        case = {"rows": rows, "row_range": [lo, hi], "local_rows": sharded.weight.to_local().shape[0],
                "forward_diff": 0.0, "grad_diff": 0.0, "padding_grad": None, "weight_diff": 0.0}
        for step in range(3):
            ids = _ids(rank, rows, step)
            gen = torch.Generator().manual_seed(7 + rank + step)
            weights = torch.randn(*ids.shape, dim, generator=gen)
            out = sharded(ids)
            (out * weights).sum().backward()
            expected = full(ids)
            (expected * weights).sum().backward()
            case["forward_diff"] = max(case["forward_diff"], float((out - expected).abs().max()) if out.numel() else 0.0)
            grad = _union_mean_grad(full, ids, world)
            dense = grad.to_dense()
            kept = sharded.coalesced_grad()
            local = torch.zeros(hi - lo, dim)
            if kept is not None:
                local[kept[0]] = kept[1]
                if padding_idx is not None and lo <= padding_idx < hi:
                    case["padding_grad"] = float(local[padding_idx - lo].abs().max())
            case["grad_diff"] = max(case["grad_diff"], float((local - dense[lo:hi]).abs().max()) if hi > lo else 0.0)
            full.weight.grad = grad
            reference.step()
            reference.zero_grad(set_to_none=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert sharded.pending == []
            diff = (sharded.weight.to_local() - full.weight.detach()[lo:hi]).abs()
            case["weight_diff"] = max(case["weight_diff"], float(diff.max()) if diff.numel() else 0.0)
        with torch.no_grad():
            case["no_grad_diff"] = float((sharded(torch.arange(rows)) - full.weight).abs().max())
        report["cases"].append(case)
        del ddp
    # clipping over the kept row gradients and a replicated tensor: the norm is the global one
    torch.manual_seed(0)
    holder = nn.Module()
    holder.table = nn.Embedding(10, 2)
    holder.dense = nn.Linear(2, 1)
    wrap_all_to_all_embeddings(holder, [holder.table], torch.device("cpu"))
    out = holder.dense(holder.table(torch.arange(10) if rank == 0 else torch.arange(3)))
    out.sum().backward()
    for p in holder.dense.parameters():  # DDP is bypassed here: average the replicated grads by hand
        dist.all_reduce(p.grad)
        p.grad /= world
    kept = holder.table.coalesced_grad()
    local = kept[1].pow(2).sum() if kept is not None else torch.zeros(())
    dist.all_reduce(local)
    full_sq = local + sum(p.grad.pow(2).sum() for p in holder.dense.parameters())
    norm = clip_grad_norm(list(holder.parameters()), 0.5)
    kept = holder.table.coalesced_grad()
    after = kept[1].pow(2).sum() if kept is not None else torch.zeros(())
    dist.all_reduce(after)
    after = after + sum(p.grad.pow(2).sum() for p in holder.dense.parameters())
    report["clip"] = {"norm": float(norm), "expected": float(full_sq.sqrt()), "after": float(after.sqrt())}
    with open(f"{out_dir}/rank-{rank}.json", "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
