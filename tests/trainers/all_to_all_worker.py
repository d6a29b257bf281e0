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
    lookup_embeddings,
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
    report["shared_plan"] = _shared_plan(rank)
    report["grouped"] = _grouped(rank, world)
    with open(f"{out_dir}/rank-{rank}.json", "w") as handle:
        json.dump(report, handle)


def _shared_plan(rank: int) -> dict:
    """Two tables of one wrap looked up with the same ids tensor (NeuMF's user tables): the
    second reuses the first's plan, so 6 all-to-alls instead of 8 for both lookups and their
    backward, with the same rows and gradients as the full tables; an ids tensor modified in
    place, or an equal but other tensor, is planned again."""
    torch.manual_seed(1)
    fulls = [nn.Embedding(9, 3), nn.Embedding(9, 3)]
    holder = nn.Module()
    holder.a, holder.b = nn.Embedding(9, 3), nn.Embedding(9, 3)
    holder.a.load_state_dict(fulls[0].state_dict())
    holder.b.load_state_dict(fulls[1].state_dict())
    holder.head = nn.Linear(3, 1)  # DDP needs a replicated parameter
    wrap_all_to_all_embeddings(holder, [holder.a, holder.b], torch.device("cpu"))
    calls = []
    original = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_to_all_single = counting
    try:
        ids = torch.tensor([[rank, 8 - rank, 4]])
        out = holder.a(ids) * 2 + holder.b(ids)
        out.sum().backward()
        both = len(calls)
        expected = fulls[0](ids) * 2 + fulls[1](ids)
        expected.sum().backward()
        forward_diff = float((out - expected).abs().max())
        calls.clear()
        ids.add_(0)  # an in-place change: the ids may differ now, plan again (3 all-to-alls a lookup)
        holder.a(ids)
        ids.add_(0)
        holder.b(ids)
        after_inplace = len(calls)
        calls.clear()
        holder.a(ids.clone())
        holder.b(ids.clone())
        other_tensor = len(calls)
    finally:
        dist.all_to_all_single = original
    grads = {}
    for name, table, full in (("a", holder.a, fulls[0]), ("b", holder.b, fulls[1])):
        lo, hi = table.row_range
        kept = table.coalesced_grad()
        local = torch.zeros(hi - lo, 3)
        if kept is not None:
            local[kept[0]] = kept[1]
        # one rank's own gradient, before the mean over ranks: compare the sum over ranks
        dist.all_reduce(full.weight.grad)
        grads[name] = float((local - full.weight.grad[lo:hi] / dist.get_world_size()).abs().max())
    return {"calls_both": both, "forward_diff": forward_diff, "grad_diff": max(grads.values()),
            "calls_after_inplace": after_inplace, "calls_other_tensor": other_tensor}


def _grouped(rank: int, world: int) -> dict:
    """Four tables (two sizes, three widths, a padding row) looked up together, two by one ids
    tensor and two by another (NeuMF's user and item tables), one rank with no item ids: one
    exchange (2 all-to-alls for the plan, 1 for the rows, 1 for the gradients), the same rows
    and row gradients as the full tables; without grad, 3 all-to-alls and the same rows."""
    torch.manual_seed(2)
    specs = {"a": (9, 3, None), "b": (9, 2, None), "c": (5, 4, 0), "d": (5, 3, None)}
    fulls = {name: nn.Embedding(rows, dim, padding_idx=pad) for name, (rows, dim, pad) in specs.items()}
    holder = nn.Module()
    for name, (rows, dim, pad) in specs.items():
        setattr(holder, name, nn.Embedding(rows, dim, padding_idx=pad))
        getattr(holder, name).load_state_dict(fulls[name].state_dict())
    holder.head = nn.Linear(3, 1)
    wrap_all_to_all_embeddings(holder, [holder.a, holder.b, holder.c, holder.d], torch.device("cpu"))
    users = torch.tensor([rank, 8 - rank, 4, rank])
    items = torch.zeros((0, 2), dtype=torch.int64) if rank == world - 1 else torch.tensor([[0, 4], [rank % 5, 3]])
    lookups = [(holder.a, users), (holder.c, items), (holder.b, users), (holder.d, items)]
    calls = []
    original = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    gen = torch.Generator().manual_seed(11 + rank)
    weights = {name: torch.randn(*ids.shape, specs[name][1], generator=gen)
               for name, ids in (("a", users), ("c", items), ("b", users), ("d", items))}
    dist.all_to_all_single = counting
    try:
        outs = lookup_embeddings(lookups)
        sum((out * weights[name]).sum() for name, out in zip("acbd", outs, strict=True)).backward()
        with_grad = len(calls)
        calls.clear()
        with torch.no_grad():
            again = lookup_embeddings(lookups)
        no_grad = len(calls)
    finally:
        dist.all_to_all_single = original
    expected = [fulls[name](ids) for name, ids in (("a", users), ("c", items), ("b", users), ("d", items))]
    sum((out * weights[name]).sum() for name, out in zip("acbd", expected, strict=True)).backward()
    forward_diff = max(float((o - e).abs().max()) if o.numel() else 0.0 for o, e in zip(outs, expected, strict=True))
    no_grad_diff = max(float((o - e).abs().max()) if o.numel() else 0.0 for o, e in zip(again, expected, strict=True))
    shapes_ok = all(o.shape == e.shape for o, e in zip(outs, expected, strict=True))
    grad_diff, padding_grad = 0.0, None
    for name in "abcd":
        table, full = getattr(holder, name), fulls[name]
        lo, hi = table.row_range
        kept = table.coalesced_grad()
        local = torch.zeros(hi - lo, specs[name][1])
        if kept is not None:
            local[kept[0]] = kept[1]
        dist.all_reduce(full.weight.grad)
        grad_diff = max(grad_diff, float((local - full.weight.grad[lo:hi] / world).abs().max()) if hi > lo else 0.0)
        if name == "c" and lo <= 0 < hi:
            padding_grad = float(local[0].abs().max())
    return {"calls": with_grad, "calls_no_grad": no_grad, "forward_diff": forward_diff, "no_grad_diff": no_grad_diff,
            "grad_diff": grad_diff, "padding_grad": padding_grad, "shapes_ok": shapes_ok}


if __name__ == "__main__":
    from worker_group import run_in_group  # a sibling file: these workers run as scripts

    run_in_group(main, sys.argv[1])
