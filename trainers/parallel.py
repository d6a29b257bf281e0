"""Model parallelism beyond DDP/FSDP: embedding tables sharded row-wise across ranks.

``parallelism="sharded_embeddings"`` replaces every embedding table a family names
(:meth:`trainflow.trainers.family.ModelFamily.embedding_tables`) with a :class:`RowShardedEmbedding`
and wraps the rest of the model in DDP (the tables are excluded from DDP's gradient sync):

* Rank ``r`` of ``W`` owns rows ``[r*c, min((r+1)*c, N))`` of an ``N``-row table, ``c =
  ceil(N / W)`` (``torch.chunk`` layout). The weight is a ``DTensor`` with ``Shard(0)`` on a
  1-D device mesh over all ranks, so its local tensor (and the optimizer's ``exp_avg`` /
  ``exp_avg_sq``, which follow the parameter) holds only those rows. The full table is never
  gathered while training: not for the forward, not for the backward, not for the step.
* A lookup is collective (every rank calls it with its own indices): the ranks all-gather
  their indices, each looks up the rows it owns (zeros for the others) and a reduce-scatter
  sums the partial results back to the rank that asked (gloo and nccl both have it). The backward all-gathers the output gradients and each rank adds them into its own
  rows, scaled by ``1 / W`` so that the update is the DDP update (DDP averages gradients).
* Checkpoints: ``torch.distributed.checkpoint`` saves and loads the ``DTensor`` shards (and
  re-shards on another number of ranks); a full state dict (the exported model) gathers them
  into ordinary tensors with the same keys as the unsharded model, so serving is unchanged.

On one rank there is nothing to shard: the loop trains the plain model (``parallelism`` is
reported as ``none``), like ``fsdp``.

``parallelism="sharded_embeddings_a2a"`` (:class:`AllToAllEmbedding`) keeps the same row split
and ``DTensor`` weights but looks rows up TorchRec-style: ids all-to-all to their owners, rows
back, row gradients all-to-all to the owners, which update only the rows a step touched
(:class:`RowSparseAdamW`): bytes and optimizer work follow the batch, not the table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

SHARDED_EMBEDDINGS = "sharded_embeddings"


def shard_rows(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)``: the rows of an ``num_rows``-row table that ``rank`` owns (``torch.chunk`` layout)."""
    chunk = -(-num_rows // world_size)
    lo = min(rank * chunk, num_rows)
    return lo, min(lo + chunk, num_rows)


class _RowShardedLookup(torch.autograd.Function):
    """All-gather indices, look up own rows, reduce-scatter; backward all-gathers the grads."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, indices: torch.Tensor, lo: int, padding_idx: int | None,
                group: Any) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        flat = indices.reshape(-1)
        counts = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
        all_counts = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=group)
        sizes = [int(c) for c in all_counts]
        longest = max(sizes)
        padded = torch.full((longest,), -1, dtype=torch.int64, device=flat.device)
        padded[: flat.numel()] = flat
        gathered = torch.empty(world * longest, dtype=torch.int64, device=flat.device)
        dist.all_gather_single(gathered, padded, group=group)
        local = gathered - lo
        owned = (local >= 0) & (local < weight.shape[0])
        rows = torch.where(owned, local, torch.zeros_like(local))
        if weight.shape[0]:
            partial = F.embedding(rows, weight) * owned.unsqueeze(-1).to(weight.dtype)
        else:  # more ranks than rows: this rank owns none
            partial = weight.new_zeros((rows.numel(), weight.shape[1]))
        out = _reduce_scatter(partial.contiguous(), world, rank, group)
        ctx.save_for_backward(rows, owned)
        ctx.meta = (world, rank, longest, flat.numel(), weight.shape, lo, padding_idx, group)
        return out[: flat.numel()].reshape(*indices.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, owned = ctx.saved_tensors
        world, rank, longest, count, shape, lo, padding_idx, group = ctx.meta
        grad = torch.zeros((longest, shape[1]), dtype=grad_out.dtype, device=grad_out.device)
        grad[:count] = grad_out.reshape(count, shape[1])
        gathered = torch.empty((world * longest, shape[1]), dtype=grad.dtype, device=grad.device)
        dist.all_gather_single(gathered, grad, group=group)
        keep = owned
        if padding_idx is not None and lo <= padding_idx < lo + shape[0]:
            keep = keep & (rows != padding_idx - lo)
        grad_weight = torch.zeros(shape, dtype=grad_out.dtype, device=grad_out.device)
        grad_weight.index_add_(0, rows[keep], gathered[keep])
        return grad_weight / world, None, None, None, None


def _reduce_scatter(partial: torch.Tensor, world: int, rank: int, group: Any) -> torch.Tensor:
    """Sum ``partial`` (``world`` equal blocks) over ranks and keep block ``rank``."""
    out = torch.empty((partial.shape[0] // world, *partial.shape[1:]), dtype=partial.dtype, device=partial.device)
    dist.reduce_scatter_single(out, partial, group=group)
    return out


class RowShardedEmbedding(nn.Module):
    """An ``nn.Embedding`` whose rows are split across the ranks (see the module docstring).

    Built from an existing table (same init on every rank, so the shards form the same table
    a replicated run starts from); ``weight`` keeps the name, so state-dict keys do not change.

    Args:
        table: The full table (read once, then dropped).
        mesh: 1-D device mesh over all ranks.
    """

    def __init__(self, table: nn.Embedding, mesh: Any) -> None:
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        if table.max_norm is not None or table.sparse:
            raise ValueError("sharded_embeddings supports plain tables only (no max_norm, no sparse gradients)")
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        self.padding_idx = table.padding_idx
        self.mesh = mesh
        self.group = mesh.get_group()
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.row_range = shard_rows(self.num_embeddings, world, rank)
        lo, hi = self.row_range
        local = table.weight.detach()[lo:hi].clone()
        weight = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                    shape=table.weight.shape, stride=table.weight.stride())
        self.weight = nn.Parameter(weight)

    @torch.compiler.disable  # collectives inside: runs eager under torch.compile (a graph break)
    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        local = self.weight.to_local()
        return _RowShardedLookup.apply(local, indices, self.row_range[0], self.padding_idx, self.group)

    def extra_repr(self) -> str:
        lo, hi = self.row_range
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{lo}, {hi}) on this rank"


def shard_embeddings(model: nn.Module, tables: list[nn.Module], device: torch.device, group: Any = None) -> list[str]:
    """Replace each of ``tables`` (``nn.Embedding`` sub-modules of ``model``) in place by a
    :class:`RowShardedEmbedding` split over ``group`` (default: all ranks); returns their
    parameter names (for DDP to ignore).

    Raises:
        ValueError: a table is not an ``nn.Embedding`` sub-module of ``model``.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if not tables:
        raise ValueError("parallelism='sharded_embeddings' needs a model family with embedding tables")
    if group is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    else:
        mesh = DeviceMesh.from_group(group, device.type)
    names = {id(m): name for name, m in model.named_modules()}
    ignored = []
    for table in tables:
        if not isinstance(table, nn.Embedding) or id(table) not in names:
            raise ValueError(f"sharded_embeddings: {type(table).__name__} is not an nn.Embedding of the model")
        name = names[id(table)]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, RowShardedEmbedding(table, mesh))
        ignored.append(f"{name}.weight")
    return ignored


def wrap_sharded_embeddings(model: nn.Module, tables: list[nn.Module], device: torch.device,
                            group: Any = None) -> nn.Module:
    """Shard ``tables`` row-wise over ``group`` (default: all ranks) and wrap the rest of
    ``model`` in DDP over the same ranks."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = shard_embeddings(model, tables, device, group)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, process_group=group)


# --- row-sharded tables with an all-to-all (TorchRec-style) ---------------------------------
SHARDED_EMBEDDINGS_A2A = "sharded_embeddings_a2a"
ROW_SHARDED_ATTR = "_trainflow_row_sharded"


class _AllToAllLookup(torch.autograd.Function):
    """Send the ids to their owners, get the rows back; backward sends the row gradients to
    the owners, which keep them for :class:`RowSparseAdamW` (the weight's ``.grad`` stays
    ``None``: only the rows a step touched ever travel or get updated)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, table: AllToAllEmbedding, indices: torch.Tensor) -> torch.Tensor:
        plan = table._plan(indices)
        unique, inverse, send, recv, local_ids = plan
        local = table.weight.to_local()
        rows = local.index_select(0, local_ids)
        back = rows.new_empty((len(unique), local.shape[1]))
        dist.all_to_all_single(back, rows, output_split_sizes=send, input_split_sizes=recv, group=table.group)
        ctx.table, ctx.plan = table, plan
        return back.index_select(0, inverse).reshape(*indices.shape, local.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table = ctx.table
        unique, inverse, send, recv, local_ids = ctx.plan
        dim = grad_out.shape[-1]
        grad = grad_out.new_zeros((len(unique), dim)).index_add_(0, inverse, grad_out.reshape(-1, dim))
        got = grad.new_empty((len(local_ids), dim))
        dist.all_to_all_single(got, grad, output_split_sizes=recv, input_split_sizes=send, group=table.group)
        table._keep_grad(local_ids, got)
        return None, None, None


class AllToAllEmbedding(nn.Module):
    """An ``nn.Embedding`` whose rows are split across the ranks, looked up with an all-to-all.

    Rank ``r`` owns rows ``[r*c, min((r+1)*c, N))`` (:func:`shard_rows`); ``weight`` is a
    ``DTensor`` with ``Shard(0)`` (checkpoints and the exported full model go through the same
    code as :class:`RowShardedEmbedding`). A lookup (collective: every rank calls it, possibly
    with no ids) de-duplicates this rank's ids, sends each owner the ids it owns
    (``all_to_all_single`` with splits; gloo and nccl), the owners send the rows back; the
    backward sends each de-duplicated row's gradient to its owner, which keeps (row, gradient
    / world) for the optimizer (:class:`RowSparseAdamW` updates only the owned rows a step
    touched: the optimizer work, the table and its moments split across the ranks; the bytes
    follow the batch, not the table). Gradients are scaled by ``1 / world``: the same mean
    over ranks DDP applies to the replicated parameters. The lookups run on their own process
    group, so they never interleave with DDP's asynchronous all-reduces.

    Args:
        table: The full table (read once, then dropped).
        mesh: 1-D device mesh over all ranks (for the ``DTensor``).
        group: Process group for the lookups' all-to-alls (same ranks as ``mesh``).
    """

    def __init__(self, table: nn.Embedding, mesh: Any, group: Any) -> None:
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        if table.max_norm is not None or table.sparse:
            raise ValueError(f"{SHARDED_EMBEDDINGS_A2A} supports plain tables only (no max_norm, no sparse gradients)")
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        self.padding_idx = table.padding_idx
        self.group = group
        self.world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.chunk = -(-self.num_embeddings // self.world)
        self.row_range = shard_rows(self.num_embeddings, self.world, rank)
        lo, hi = self.row_range
        local = table.weight.detach()[lo:hi].clone()
        weight = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                    shape=table.weight.shape, stride=table.weight.stride())
        self.weight = nn.Parameter(weight)
        setattr(self.weight, ROW_SHARDED_ATTR, self)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._coalesced = False
        # Shared by the tables of one wrap (wrap_all_to_all_embeddings): the last lookup's plan,
        # reused by the next table looked up with the same ids (e.g. two tables both indexed by
        # user id): its ids and split sizes need not travel again.
        self.plan_cache: dict[str, Any] = {}

    def _plan(self, indices: torch.Tensor):
        """De-duplicated ids (sorted, so grouped by owner), the map back, the split sizes
        and the local rows this rank is asked for.

        A table of the same size looked up with the very same ids tensor (same object, not
        modified in place since) as the previous lookup of its wrap reuses that plan: two of
        the four all-to-alls of the lookup are saved. Every rank runs the same model code, so
        every rank makes the same choice and the collectives stay matched.
        """
        cache = self.plan_cache
        key = (self.num_embeddings, self.world, self.row_range)
        version = None if indices.is_inference() else indices._version  # inference tensors have none
        if (version is not None and cache.get("indices") is indices and cache.get("version") == version
                and cache.get("key") == key):
            return cache["plan"]
        unique, inverse, counts = self._owners(indices)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send, recv = counts.tolist(), recv_counts.tolist()
        asked = unique.new_empty(sum(recv))
        dist.all_to_all_single(asked, unique, output_split_sizes=recv, input_split_sizes=send, group=self.group)
        plan = unique, inverse, send, recv, asked - self.row_range[0]
        if version is None:
            cache.clear()
        else:
            cache.update(indices=indices, version=version, key=key, plan=plan)
        return plan

    def _owners(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ids de-duplicated (sorted, so grouped by owner), the map back to the
        lookup's positions, and how many of them each rank owns."""
        flat = indices.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"embedding ids out of range [0, {self.num_embeddings})")
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        return unique, inverse, torch.bincount(unique // self.chunk, minlength=self.world)

    def _keep_grad(self, local_ids: torch.Tensor, grad: torch.Tensor) -> None:
        if self.padding_idx is not None and self.row_range[0] <= self.padding_idx < self.row_range[1]:
            keep = local_ids != self.padding_idx - self.row_range[0]
            local_ids, grad = local_ids[keep], grad[keep]
        self.pending.append((local_ids, grad / self.world))
        self._coalesced = False

    def coalesced_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gradient of this rank's rows kept since :meth:`clear_grad`: (unique local rows,
        their summed gradients), or ``None`` when no owned row was touched."""
        if not self.pending:
            return None
        if len(self.pending) > 1 or not getattr(self, "_coalesced", False):
            rows = torch.cat([r for r, _ in self.pending])
            values = torch.cat([v for _, v in self.pending])
            unique, inverse = torch.unique(rows, return_inverse=True)
            summed = values.new_zeros((len(unique), values.shape[1])).index_add_(0, inverse, values)
            self.pending, self._coalesced = [(unique, summed)], True
        rows, values = self.pending[0]
        return (rows, values) if rows.numel() else None

    def clear_grad(self) -> None:
        self.pending, self._coalesced = [], False

    @torch.compiler.disable  # collectives inside: runs eager under torch.compile (a graph break)
    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        # a leaf that requires grad, so the backward runs (the weight's grad is never formed)
        anchor = torch.empty(0, device=indices.device, requires_grad=torch.is_grad_enabled())
        return _AllToAllLookup.apply(anchor, self, indices)

    def extra_repr(self) -> str:
        lo, hi = self.row_range
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{lo}, {hi}) on this rank, all-to-all lookups"


class _GroupedPlan:
    """The exchange plan of several lookups at once (:func:`lookup_embeddings`): one key per
    distinct (ids tensor, table size), each with its de-duplicated ids, the map back, the rows
    sent to / asked by every rank, and the local rows this rank is asked for."""

    def __init__(self, lookups: list[tuple[AllToAllEmbedding, torch.Tensor]]) -> None:
        first = lookups[0][0]
        self.group, self.world = first.group, first.world
        keys: list[tuple[torch.Tensor, AllToAllEmbedding]] = []
        self.key_of: list[int] = []
        for table, ids in lookups:
            for k, (ids_k, table_k) in enumerate(keys):
                if ids_k is ids and table_k.num_embeddings == table.num_embeddings:
                    self.key_of.append(k)
                    break
            else:
                keys.append((ids, table))
                self.key_of.append(len(keys) - 1)
        self.uniques, self.inverses, counts = [], [], []
        for ids, table in keys:
            unique, inverse, owned = table._owners(ids)
            self.uniques.append(unique)
            self.inverses.append(inverse)
            counts.append(owned)
        world, nkeys = self.world, len(keys)
        send_counts = torch.stack(counts, dim=1)  # (world, keys): row r goes to rank r
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # row s: what rank s asks
        self.send, self.recv = send_counts.tolist(), recv_counts.tolist()
        parts = [u.split(send_counts[:, k].tolist()) for k, u in enumerate(self.uniques)]
        ids_out = torch.cat([parts[k][r] for r in range(world) for k in range(nkeys)])
        asked = ids_out.new_empty(int(recv_counts.sum()))
        dist.all_to_all_single(asked, ids_out, output_split_sizes=[sum(row) for row in self.recv],
                               input_split_sizes=[sum(row) for row in self.send], group=self.group)
        asked_parts = asked.split([self.recv[s][k] for s in range(world) for k in range(nkeys)])
        self.local_ids = [torch.cat([asked_parts[s * nkeys + k] for s in range(world)]) - keys[k][1].row_range[0]
                          for k in range(nkeys)]
        self.shapes = [ids.shape for ids, _ in keys]


class _GroupedAllToAllLookup(torch.autograd.Function):
    """Rows of several row-sharded tables in one all-to-all, their gradients in one (see
    :func:`lookup_embeddings`); mixed widths travel as one flat buffer."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, tables: tuple[AllToAllEmbedding, ...], plan: _GroupedPlan):
        world, key_of = plan.world, plan.key_of
        dims = [t.embedding_dim for t in tables]
        rows = [t.weight.to_local().index_select(0, plan.local_ids[key_of[i]]) for i, t in enumerate(tables)]
        parts = [r.split([plan.recv[s][key_of[i]] for s in range(world)]) for i, r in enumerate(rows)]
        out = torch.cat([parts[i][s].reshape(-1) for s in range(world) for i in range(len(tables))])
        send_sizes = [sum(plan.recv[s][key_of[i]] * dims[i] for i in range(len(tables))) for s in range(world)]
        back_sizes = [sum(plan.send[r][key_of[i]] * dims[i] for i in range(len(tables))) for r in range(world)]
        back = out.new_empty(sum(back_sizes))
        dist.all_to_all_single(back, out, output_split_sizes=back_sizes, input_split_sizes=send_sizes,
                               group=plan.group)
        pieces = back.split([plan.send[r][key_of[i]] * dims[i] for r in range(world) for i in range(len(tables))])
        results = []
        for i, dim in enumerate(dims):
            k = key_of[i]
            unique_rows = torch.cat([pieces[r * len(tables) + i].view(-1, dim) for r in range(world)])
            results.append(unique_rows.index_select(0, plan.inverses[k]).reshape(*plan.shapes[k], dim))
        ctx.tables, ctx.plan, ctx.sizes = tables, plan, (send_sizes, back_sizes)
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads_out: torch.Tensor):
        tables, plan = ctx.tables, ctx.plan
        send_sizes, back_sizes = ctx.sizes
        world, key_of, n = plan.world, plan.key_of, len(tables)
        parts = []
        for i, (table, grad_out) in enumerate(zip(tables, grads_out, strict=True)):
            k, dim = key_of[i], table.embedding_dim
            grad = torch.zeros((len(plan.uniques[k]), dim), dtype=table.weight.dtype, device=plan.uniques[k].device)
            if grad_out is not None:
                grad.index_add_(0, plan.inverses[k], grad_out.reshape(-1, dim).to(grad.dtype))
            parts.append(grad.split([plan.send[r][k] for r in range(world)]))
        out = torch.cat([parts[i][r].reshape(-1) for r in range(world) for i in range(n)])
        got = out.new_empty(sum(send_sizes))
        dist.all_to_all_single(got, out, output_split_sizes=send_sizes, input_split_sizes=back_sizes,
                               group=plan.group)
        pieces = got.split([plan.recv[s][key_of[i]] * tables[i].embedding_dim for s in range(world) for i in range(n)])
        for i, table in enumerate(tables):
            dim = table.embedding_dim
            rows = torch.cat([pieces[s * n + i].view(-1, dim) for s in range(world)])
            table._keep_grad(plan.local_ids[key_of[i]], rows)
        return None, None, None


def lookup_embeddings(lookups: list[tuple[nn.Module, torch.Tensor]]) -> list[torch.Tensor]:
    """``[table(ids) for table, ids in lookups]``, with the row-sharded tables of one wrap
    (:class:`AllToAllEmbedding`, ``parallelism='sharded_embeddings_a2a'``) looked up in one
    exchange, as TorchRec sends all features of a batch in one all-to-all: the row counts of
    every table in one all-to-all, their ids in one, their rows in one, and in the backward
    their row gradients in one: 4 collectives a step whatever the number of tables, instead
    of 4 (3 with a shared plan) for each. A model with several tables calls this in its
    forward; with plain tables (any other parallelism, the exported model) it is the loop.

    Collective like every lookup of a row-sharded table: every rank calls it with the same
    tables in the same order (ids may differ, and be empty)."""
    grouped = [table for table, _ in lookups if isinstance(table, AllToAllEmbedding)]
    if (len(grouped) < 2 or len(grouped) != len(lookups) or len({id(t.group) for t in grouped}) > 1
            or len({t.weight.dtype for t in grouped}) > 1):
        return [table(ids) for table, ids in lookups]
    return list(_grouped_lookup(lookups))


@torch.compiler.disable  # collectives inside: runs eager under torch.compile (a graph break)
def _grouped_lookup(lookups: list[tuple[nn.Module, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    plan = _GroupedPlan(lookups)
    tables = tuple(table for table, _ in lookups)
    device = lookups[0][1].device
    anchor = torch.empty(0, device=device, requires_grad=torch.is_grad_enabled())
    return _GroupedAllToAllLookup.apply(anchor, tables, plan)


def row_sharded_table(param: torch.Tensor) -> AllToAllEmbedding | None:
    """The :class:`AllToAllEmbedding` ``param`` is the weight of, else ``None``."""
    return getattr(param, ROW_SHARDED_ATTR, None)


def wrap_all_to_all_embeddings(model: nn.Module, tables: list[nn.Module], device: torch.device) -> nn.Module:
    """Replace each of ``tables`` in place by an :class:`AllToAllEmbedding` over all ranks and
    wrap the rest of ``model`` in DDP (the tables left out of its all-reduce).

    Raises:
        ValueError: no tables, or a table is not an ``nn.Embedding`` sub-module of ``model``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    if not tables:
        raise ValueError(f"parallelism='{SHARDED_EMBEDDINGS_A2A}' needs a model family with embedding tables")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    group = dist.new_group(list(range(dist.get_world_size())))
    names = {id(m): name for name, m in model.named_modules()}
    ignored = []
    plan_cache: dict[str, Any] = {}
    for table in tables:
        if not isinstance(table, nn.Embedding) or id(table) not in names:
            raise ValueError(f"{SHARDED_EMBEDDINGS_A2A}: {type(table).__name__} is not an nn.Embedding of the model")
        name = names[id(table)]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        sharded = AllToAllEmbedding(table, mesh, group)
        sharded.plan_cache = plan_cache
        setattr(parent, attr, sharded)
        ignored.append(f"{name}.weight")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """The part of ``value`` this rank stores (the local shard of a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 table_params: set[str] | None = None) -> dict[str, int]:
    """Bytes this rank stores for parameters and optimizer state, measured on the local
    tensors (the shard of a sharded parameter), in total and for ``table_params`` (parameter
    names of the embedding tables; default: every ``nn.Embedding``, :class:`RowShardedEmbedding` and
    :class:`AllToAllEmbedding`)."""
    if table_params is None:
        table_params = {f"{name}.{p}" for name, m in model.named_modules()
                        if isinstance(m, nn.Embedding | RowShardedEmbedding | AllToAllEmbedding)
                        for p, _ in m.named_parameters(recurse=False)}
    tables = {id(p) for name, p in model.named_parameters() if name in table_params}
    out = {"param_bytes": 0, "embedding_param_bytes": 0, "optimizer_bytes": 0, "embedding_optimizer_bytes": 0}
    for param in model.parameters():
        size = _nbytes(param)
        out["param_bytes"] += size
        if id(param) in tables:
            out["embedding_param_bytes"] += size
    if optimizer is not None:
        for param, state in optimizer.state.items():
            size = sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            out["optimizer_bytes"] += size
            if id(param) in tables:
                out["embedding_optimizer_bytes"] += size
    return out


def _nbytes(value: torch.Tensor) -> int:
    local = local_tensor(value)
    return local.numel() * local.element_size()


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float, group: Any = None) -> torch.Tensor:
    """Clip the global gradient norm over replicated and row-sharded parameters alike.

    ``torch.nn.utils.clip_grad_norm_`` cannot mix ``DTensor`` and plain gradients: the squared
    norms of the shards are summed over ranks, the replicated ones (identical after DDP) not.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    owned = [g for g in (t.coalesced_grad() for t in {id(t): t for t in map(row_sharded_table, parameters)
                                                       if t is not None}.values()) if g is not None]
    if not grads and not owned:
        return torch.zeros(())
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)] + [values for _, values in owned]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    device = sharded[0].device if sharded else grads[0].device
    shard_sq = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=device))
    if dist.is_initialized():
        dist.all_reduce(shard_sq, group=group)
    plain_sq = sum((g.float().pow(2).sum() for g in plain), torch.zeros((), device=device))
    total = (shard_sq + plain_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in sharded + plain:
        g.mul_(scale.to(g.dtype))
    return total


# --- row-sparse embedding updates -----------------------------------------------------------
ROW_SPARSE_ATTR = "_trainflow_row_sparse"


def mark_row_sparse(tables: list[nn.Module]) -> list[nn.Parameter]:
    """Switch ``nn.Embedding`` tables to sparse gradients and mark their weights for
    :class:`RowSparseAdamW` (and for DDP to leave alone: their rows are exchanged by the
    optimizer, see there). Returns the marked weights."""
    marked = []
    for table in tables:
        if not isinstance(table, nn.Embedding):
            raise TypeError(f"row-sparse updates need nn.Embedding tables, got {type(table).__name__}")
        table.sparse = True
        setattr(table.weight, ROW_SPARSE_ATTR, True)
        marked.append(table.weight)
    return marked


def is_row_sparse(param: torch.Tensor) -> bool:
    return bool(getattr(param, ROW_SPARSE_ATTR, False))


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW whose cost for embedding tables follows the rows a step touches, not the table.

    Dense parameters get the ordinary AdamW update (their gradients averaged across ranks by
    DDP). Parameters marked by :func:`mark_row_sparse` have sparse gradients (the rows the
    step looked up); at :meth:`step` the ranks all-gather those rows (one collective for the
    row counts, one for the row ids and one for the values of all tables together), sum the
    duplicates, divide by the world size (DDP's average) and update **only those rows**:
    their ``exp_avg`` / ``exp_avg_sq`` and weights ("lazy" Adam, as TensorFlow's LazyAdam or
    TorchRec's row-wise fused optimizers; the bias correction uses the global step). Rows a
    step does not touch keep their moments and weights, where dense AdamW would keep moving
    them with their decaying momentum. Bytes each rank sends per step: ``(rows touched) x
    (8 + 4 x dim)`` per table, independent of the table's size.

    Args:
        params: Parameters or groups, as for :class:`torch.optim.AdamW`.
        lr, betas, eps, weight_decay: As for AdamW.
        group: Process group of the data-parallel ranks (default: the world, when initialised).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, group: Any = None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.process_group = group

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (see the class docstring)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse: list[tuple[dict, torch.Tensor]] = []
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if is_row_sparse(p):
                    sparse.append((group, p))
                    continue
                table = row_sharded_table(p)
                if table is not None:
                    self._owned_rows_step(group, p, table)
                    continue
                if p.grad is None:
                    continue
                grad = p.grad
                state = self._state(p)
                state["step"] += 1
                t = float(state["step"])
                if wd:
                    p.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
        if sparse:
            self._sparse_step(sparse)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 (also drops kept row gradients)
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                table = row_sharded_table(p)
                if table is not None:
                    table.clear_grad()

    def _owned_rows_step(self, group: dict, p: torch.Tensor, table: AllToAllEmbedding) -> None:
        """Lazy Adam(W) on the rows of ``p`` this rank owns that the step touched (their
        gradients summed over the ranks by the all-to-all; see :class:`AllToAllEmbedding`)."""
        state = self._state(p)
        state["step"] += 1
        grad = table.coalesced_grad()
        table.clear_grad()
        if grad is None:
            return
        rows, values = grad
        self._update_rows(group, local_tensor(p), local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]),
                          float(state["step"]), rows, values)

    @staticmethod
    def _update_rows(group: dict, weight_all: torch.Tensor, avg_all: torch.Tensor, sq_all: torch.Tensor, t: float,
                     unique: torch.Tensor, grad: torch.Tensor) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        exp_avg = avg_all.index_select(0, unique).lerp_(grad, 1 - b1)
        exp_avg_sq = sq_all.index_select(0, unique).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        avg_all.index_copy_(0, unique, exp_avg)
        sq_all.index_copy_(0, unique, exp_avg_sq)
        weight = weight_all.index_select(0, unique)
        if wd:
            weight.mul_(1 - lr * wd)
        denom = (exp_avg_sq / (1 - b2**t)).sqrt_().add_(eps)
        weight.addcdiv_(exp_avg, denom, value=-lr / (1 - b1**t))
        weight_all.index_copy_(0, unique, weight)

    def _sparse_step(self, items: list[tuple[dict, torch.Tensor]]) -> None:
        rows, values = [], []
        for _, p in items:
            if p.grad is None:
                rows.append(torch.zeros(0, dtype=torch.int64, device=p.device))
                values.append(torch.zeros(0, p.shape[1], dtype=p.dtype, device=p.device))
                continue
            g = p.grad.coalesce() if p.grad.is_sparse else p.grad.to_sparse(1).coalesce()
            rows.append(g.indices()[0])
            values.append(g.values())
        rows, values = self._exchange(rows, values)
        for (group, p), r, v in zip(items, rows, values, strict=True):
            state = self._state(p)
            state["step"] += 1
            if r.numel() == 0:
                continue
            unique, inverse = torch.unique(r, return_inverse=True)
            grad = torch.zeros(len(unique), v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, inverse, v)
            self._update_rows(group, p, state["exp_avg"], state["exp_avg_sq"], float(state["step"]), unique, grad)

    def _exchange(self, rows: list[torch.Tensor], values: list[torch.Tensor]):
        """Every rank's touched rows of every table, gradients averaged over the ranks."""
        if not (dist.is_available() and dist.is_initialized()):
            return rows, values
        group = self.process_group
        world = dist.get_world_size(group)
        if world == 1:
            return rows, values
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        all_counts = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=group)
        dims = [v.shape[1] for v in values]
        totals = [int(c.sum()) for c in all_counts]
        sizes = [int((c * torch.tensor(dims)).sum()) for c in all_counts]
        flat_rows = torch.zeros(max(totals), dtype=torch.int64)
        flat_rows[: totals[dist.get_rank(group)]] = torch.cat(rows) if rows else flat_rows[:0]
        flat_values = torch.zeros(max(sizes), dtype=values[0].dtype)
        mine = torch.cat([v.reshape(-1) for v in values])
        flat_values[: len(mine)] = mine
        got_rows = [torch.empty_like(flat_rows) for _ in range(world)]
        got_values = [torch.empty_like(flat_values) for _ in range(world)]
        dist.all_gather(got_rows, flat_rows, group=group)
        dist.all_gather(got_values, flat_values, group=group)
        out_rows: list[list[torch.Tensor]] = [[] for _ in rows]
        out_values: list[list[torch.Tensor]] = [[] for _ in rows]
        for rank in range(world):
            r_pos = v_pos = 0
            for k, n in enumerate(all_counts[rank].tolist()):
                out_rows[k].append(got_rows[rank][r_pos : r_pos + n])
                out_values[k].append(got_values[rank][v_pos : v_pos + n * dims[k]].view(n, dims[k]))
                r_pos += n
                v_pos += n * dims[k]
        return ([torch.cat(r) for r in out_rows],
                [torch.cat(v) / world for v in out_values])
