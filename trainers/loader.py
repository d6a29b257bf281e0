"""The shard loader: a split of a dataset manifest as batches of column tensors.

How an epoch is laid out (deterministic in ``(seed, epoch)``, independent of the world size):

1. *Order.* Shards are shuffled, then the row groups inside each shard, giving a sequence of
   row groups. Consecutive row groups form *windows* of ``window_row_groups``, cut short where
   the next row group would take a window past ``window_bytes`` (a window always holds at
   least one row group); the rows of a window are shuffled together. Reading the rows in this
   order gives the epoch's *sequence* of ``N`` rows (``shuffle=False`` keeps the manifest's
   order).
2. *Global batches.* The sequence is cut into global batches of ``world_size * batch_size``
   rows; global batch ``b`` gives rank ``r`` the rows ``[b*G + r*B, b*G + (r+1)*B)``. Every
   sample is therefore seen exactly once per epoch across the world, every rank yields the
   same number of batches, and the union of the ranks' ``b``-th batches does not depend on
   the number of ranks (1 process with batch 64 sees what 2 processes with batch 32 see).
3. *Remainder.* ``remainder="drop"`` (default) yields ``N // G`` batches per rank: the last
   ``N % G`` rows of the sequence are left out of this epoch (a different set every epoch).
   ``remainder="pad"`` yields ``ceil(N / G)`` batches; the missing rows are repeated from
   the start of the sequence and flagged ``False`` in a ``sample_mask`` column, so a loss
   that weights by the mask still counts each sample exactly once.
4. *Workers.* With ``num_workers`` DataLoader workers, the rank's batch ``b`` is made by
   worker ``(b - start) % num_workers``, which is the order in which ``DataLoader`` takes
   batches from its workers; resuming at batch ``start`` keeps that mapping.

Each worker reads through fsspec (:meth:`trainflow.tasks.manifest.Manifest.open_shard`, which verifies
size and checksum before anything is decoded; a local shard is memory-mapped, a remote one
fetched whole) with a background thread decoding the next windows ahead
(``prefetch_windows``) while batches are being consumed. A window's row groups stay as they
were decoded; each batch gathers its rows from them straight into the batch's tensors (one
copy of each row, not a shuffled copy of the window first).

A batch is a dict of tensors, one per column: numbers and booleans as 1-D tensors, lists of
one length and fixed-size binaries (images) as 2-D tensors (``uint8`` for binaries), lists of
varying length as a flat ``name`` tensor plus
``name_offsets`` (int64, ``len+1``), strings as a Python list of ``str``. ``with_row_index``
adds ``row_index`` (int64, the row's position in the split in manifest order; over several
splits, its position in their concatenation, in the order given).

A family hook ``transform(batch, info)`` runs where the batch is made (inside the worker) and
gets a :class:`BatchInfo` with a ``torch.Generator`` seeded by (seed, epoch, rank, batch), so
per-batch randomness (negative sampling) is reproducible across resumes and worker counts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainflow.tasks.manifest import CHECKSUMS

if TYPE_CHECKING:
    import pyarrow as pa

    from trainflow.tasks.manifest import Manifest
    from trainflow.trainers.distributed import World

log = logging.getLogger(__name__)

_REMAINDERS = ("drop", "pad")
STATE_FORMAT = "trainflow.loader/1"


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """Where a batch sits, handed to ``transform``.

    Attributes:
        epoch: The epoch.
        batch_index: Index of the batch among this rank's batches of the epoch.
        rank: Global rank.
        world_size: Ranks in the job.
        generator: A CPU generator seeded by (seed, epoch, rank, batch_index).
    """

    epoch: int
    batch_index: int
    rank: int
    world_size: int
    generator: torch.Generator


Transform = Callable[[dict[str, Any], BatchInfo], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class _Unit:
    shard: int
    row_group: int
    num_rows: int
    first_row: int  # index of the unit's first row in the split, manifest order
    num_bytes: int = 0  # estimated from the shard's bytes per row


def rank_rows(batch_index: int, batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """The dealing rule (module docstring, step 2): rank ``rank``'s rows ``[lo, hi)`` of global
    batch ``batch_index`` in the epoch's sequence. The one rule every batch path uses (the
    loader and families that deal in-memory samples, e.g. a sequence model's history windows)."""
    lo = batch_index * batch_size * world_size + rank * batch_size
    return lo, lo + batch_size


def batches_per_rank(num_rows: int, batch_size: int, world_size: int, remainder: str = "drop") -> int:
    """Batches each rank yields for ``num_rows`` rows (module docstring, step 3)."""
    if remainder not in _REMAINDERS:
        raise ValueError(f"remainder must be one of {_REMAINDERS}, got {remainder!r}")
    g = batch_size * world_size
    if remainder == "drop":
        return num_rows // g
    return -(-num_rows // g) if num_rows else 0


class ShardLoader(IterableDataset):
    """Batches of ``split`` for one rank; see the module docstring for the layout.

    Iterating the loader directly (in the training process) yields this rank's batches of
    the current epoch, running ``num_workers`` DataLoader workers itself when asked, and
    counts what it handed out so :meth:`state_dict` can resume mid-epoch. It is also a plain
    ``IterableDataset``: ``DataLoader(loader, batch_size=None, num_workers=loader.num_workers)``
    works, but then pass the number of consumed batches to :meth:`state_dict`.

    Args:
        manifest: The committed dataset version.
        split: ``train``, ``valid`` or ``eval``, or several of them read as one (e.g.
            ``("train", "valid")`` to refit on both once the epochs are chosen on ``valid``).
        batch_size: Rows per batch on this rank (the per-rank micro batch).
        world: Rank and world size (default: a world of one).
        columns: Columns to read (default: all).
        seed: Shuffle seed.
        shuffle: Shuffle row groups and rows within windows.
        window_row_groups: Row groups whose rows are shuffled together.
        window_bytes: Cap on a window's size, estimated from the shard's bytes per row (whole
            rows, whatever ``columns`` selects), so wide rows (images) do not hold
            ``prefetch_windows + 2`` windows of hundreds of MB in memory. ``None``: no cap.
        num_workers: DataLoader worker processes (0: make batches in this process).
        prefetch_windows: Windows decoded ahead by the background thread.
        remainder: ``drop`` or ``pad`` (see the module docstring).
        transform: Optional ``transform(batch, info) -> batch``, run where batches are made.
        with_row_index: Add the ``row_index`` column.
        checksum: How each shard is verified before any of it is used (see
            :meth:`trainflow.tasks.manifest.Manifest.read_shard_buffer`): ``auto`` (xxh3-128 where the
            manifest records it, else sha256), ``xxh3_128`` or ``sha256``.

    Raises:
        ValueError: a bad argument (named in the message).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str | tuple[str, ...] | list[str],
        batch_size: int,
        *,
        world: World | None = None,
        columns: list[str] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        window_row_groups: int = 4,
        window_bytes: int | None = 64 << 20,
        num_workers: int = 0,
        prefetch_windows: int = 2,
        remainder: str = "drop",
        transform: Transform | None = None,
        with_row_index: bool = False,
        checksum: str = "auto",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if window_row_groups < 1:
            raise ValueError(f"window_row_groups must be at least 1, got {window_row_groups}")
        if window_bytes is not None and window_bytes < 1:
            raise ValueError(f"window_bytes must be at least 1 (or None), got {window_bytes}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        if prefetch_windows < 1:
            raise ValueError(f"prefetch_windows must be at least 1, got {prefetch_windows}")
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {CHECKSUMS}, got {checksum!r}")
        if remainder not in _REMAINDERS:
            raise ValueError(f"remainder must be one of {_REMAINDERS}, got {remainder!r}")
        self.manifest = manifest
        self.split = split
        self.batch_size = batch_size
        self.rank = world.rank if world is not None else 0
        self.world_size = world.world_size if world is not None else 1
        self.columns = list(columns) if columns is not None else None
        self.seed = seed
        self.shuffle = shuffle
        self.window_row_groups = window_row_groups
        self.window_bytes = window_bytes
        self.num_workers = num_workers
        self.prefetch_windows = prefetch_windows
        self.remainder = remainder
        self.transform = transform
        self.with_row_index = with_row_index
        self.checksum = checksum
        self.splits = (split,) if isinstance(split, str) else tuple(split)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"split must name one split or several distinct ones, got {split!r}")
        self._shards = [shard for name in self.splits for shard in manifest.shards(name)]
        units = []
        first = 0
        for s, shard in enumerate(self._shards):
            row_bytes = shard.num_bytes / max(1, shard.num_rows)
            for g, rows in enumerate(shard.row_groups):
                if rows:
                    units.append(_Unit(s, g, rows, first, int(rows * row_bytes)))
                first += rows
        self._units = units
        self.num_rows = first
        if self.columns is not None:
            for name in self.splits:
                known = {f["name"] for f in manifest.schema(name)}
                unknown = [c for c in self.columns if c not in known]
                if unknown:
                    raise ValueError(f"columns {unknown} are not in split {name!r} (have: {sorted(known)})")
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out

    # sizes --------------------------------------------------------------------------------
    @property
    def global_batch_rows(self) -> int:
        return self.batch_size * self.world_size

    def num_batches(self) -> int:
        """Batches each rank yields per epoch."""
        return batches_per_rank(self.num_rows, self.batch_size, self.world_size, self.remainder)

    def __len__(self) -> int:
        return self.num_batches()

    # state --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (from its start, unless it is the epoch being resumed)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self, num_consumed: int | None = None) -> dict[str, Any]:
        """Where to resume: the epoch and the batches of it already consumed.

        Args:
            num_consumed: Batches consumed in this epoch when the caller iterated through its
                own DataLoader; default: what this loader handed out.
        """
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "position": self.position if num_consumed is None else int(num_consumed),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_rows": self.num_rows,
            "window_row_groups": self.window_row_groups,
            "window_bytes": self.window_bytes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output.

        Raises:
            ValueError: the state was made with another seed, global batch or dataset size,
                which would break the exactly-once guarantee.
        """
        mine_all = (
            ("seed", self.seed),
            ("num_rows", self.num_rows),
            ("window_row_groups", self.window_row_groups),  # the windows decide the epoch's order
            ("window_bytes", self.window_bytes),
        )
        for key, mine in mine_all:
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {mine}")
        theirs = int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", self.world_size))
        if theirs != self.global_batch_rows:
            raise ValueError(
                f"loader state has a global batch of {theirs} rows, this loader {self.global_batch_rows}"
            )
        position = int(state["position"])
        if not 0 <= position <= self.num_batches():
            raise ValueError(f"loader state position {position} is outside [0, {self.num_batches()}]")
        self.epoch = int(state["epoch"])
        self.position = position

    # iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:  # inside a DataLoader worker: make this worker's batches
            yield from self._produce(self.position, info.id, info.num_workers)
            return
        start = self.position
        if self.num_workers == 0:
            source: Iterator[dict[str, Any]] = self._produce(start, 0, 1)
        else:
            source = iter(
                DataLoader(
                    self,
                    batch_size=None,
                    num_workers=min(self.num_workers, max(1, self.num_batches() - start)),
                    prefetch_factor=2,
                    persistent_workers=False,
                )
            )
        for batch in source:
            self.position += 1
            yield batch
        if self.position >= self.num_batches():
            self.epoch += 1
            self.position = 0

    def _produce(self, start: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Batches ``start + worker``, ``+ num_workers``, ... of the current epoch."""
        epoch = self.epoch
        indices = range(start + worker, self.num_batches(), num_workers)
        if not indices:
            return
        units = self._epoch_units(epoch)
        windows = self._windows(units)
        window_starts = np.cumsum([0] + [sum(u.num_rows for u in w) for w in windows])
        # Each batch is one or more (window, lo, hi, valid) pieces of the epoch's sequence.
        plans = []
        for b in indices:
            lo, hi = rank_rows(b, self.batch_size, self.world_size, self.rank)
            plans.append((b, self._pieces(lo, hi, window_starts)))
        needed: list[int] = []  # windows in the order they are used (a padded tail wraps to 0)
        for _, pieces in plans:
            for w, _, _, _ in pieces:
                if not needed or needed[-1] != w:
                    needed.append(w)
        reader = _WindowReader(self, epoch, windows, needed)
        try:
            for b, pieces in plans:
                parts = []
                valid = []
                for w, lo, hi, ok in pieces:
                    window = reader.get(w)
                    parts.append((window, lo, hi))
                    valid.append(np.full(hi - lo, ok))
                yield self._to_batch(parts, valid, epoch, b)
        finally:
            reader.close()

    def _windows(self, units: list[_Unit]) -> list[list[_Unit]]:
        """Consecutive units, ``window_row_groups`` at most and ``window_bytes`` at most."""
        windows: list[list[_Unit]] = []
        size = 0
        for u in units:
            full = windows and (
                len(windows[-1]) >= self.window_row_groups
                or (self.window_bytes is not None and size + u.num_bytes > self.window_bytes)
            )
            if not windows or full:
                windows.append([])
                size = 0
            windows[-1].append(u)
            size += u.num_bytes
        return windows

    def _pieces(self, lo: int, hi: int, window_starts: np.ndarray) -> list[tuple[int, int, int, bool]]:
        n = self.num_rows
        pieces = []
        pos = lo
        while pos < hi:
            valid = pos < n
            p = pos % n
            w = int(np.searchsorted(window_starts, p, side="right") - 1)
            w_end = int(window_starts[w + 1])
            take = min(hi - pos, w_end - p)
            pieces.append((w, p - int(window_starts[w]), p - int(window_starts[w]) + take, valid))
            pos += take
        return pieces

    def _epoch_units(self, epoch: int) -> list[_Unit]:
        if not self.shuffle:
            return list(self._units)
        rng = np.random.default_rng([self.seed, epoch, 0])
        by_shard: dict[int, list[_Unit]] = collections.defaultdict(list)
        for u in self._units:
            by_shard[u.shard].append(u)
        order = []
        for s in rng.permutation(sorted(by_shard)):
            group = by_shard[int(s)]
            order.extend(group[i] for i in rng.permutation(len(group)))
        return order

    def _window_permutation(self, epoch: int, window: int, num_rows: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, epoch, 1, window]).permutation(num_rows)

    def _to_batch(
        self, parts: list[tuple[_Window, int, int]], valid: list[np.ndarray], epoch: int, b: int
    ) -> dict[str, Any]:
        batch = {name: _gather(parts, name) for name in parts[0][0].column_names}
        for name in [k for k in batch if isinstance(batch[k], tuple)]:
            values, offsets = batch.pop(name)
            batch[name] = values
            batch[f"{name}_offsets"] = offsets
        if self.remainder == "pad":
            batch["sample_mask"] = torch.from_numpy(np.concatenate(valid))
        if self.transform is not None:
            gen = torch.Generator()
            gen.manual_seed(int(np.random.SeedSequence([self.seed, epoch, self.rank, b]).generate_state(1)[0]))
            batch = self.transform(batch, BatchInfo(epoch, b, self.rank, self.world_size, gen))
        return batch

    # reading ------------------------------------------------------------------------------
    def _read_window(self, epoch: int, w: int, units: list[_Unit], files: _ShardCache) -> _Window:

        tables = []
        for u in units:
            table = files.get(u.shard).read_row_group(u.row_group, columns=self.columns)
            if self.with_row_index:
                table = table.append_column("row_index", _int64_array(np.arange(u.first_row, u.first_row + u.num_rows)))
            tables.append(table.combine_chunks())
        window = _Window(tables)
        perm = self._window_permutation(epoch, w, window.num_rows)
        window.order = perm if perm is not None else np.arange(window.num_rows)
        return window


class _Window:
    """The decoded row groups of a window, kept as they came from the shards, and the order
    of their rows in the epoch (``order``: window-relative row numbers).

    Batches are gathered straight from these tables (one copy of each row, into the batch),
    never from a shuffled copy of the whole window.
    """

    def __init__(self, tables: list[pa.Table]) -> None:
        self.tables = tables
        self.column_names = tables[0].column_names
        self.starts = np.cumsum([0] + [t.num_rows for t in tables])
        self.num_rows = int(self.starts[-1])
        self.order = np.arange(self.num_rows)
        self._views: dict[str, list[np.ndarray] | None] = {}
        self._permuted: dict[str, np.ndarray] = {}

    def views(self, name: str) -> list[np.ndarray] | None:
        """NumPy views of column ``name``, one per row group, when it is plain fixed-width data
        (zero-copy for numbers without nulls and fixed-size binaries as ``(rows, width)``
        uint8; booleans without nulls unpacked once); ``None`` for anything else (lists,
        strings, nulls...)."""
        if name not in self._views:
            views = []
            for table in self.tables:
                view = _fixed_width_view(table.column(name))
                if view is None:
                    views = None
                    break
                views.append(view)
            self._views[name] = views
        return self._views[name]

    def locate(self, rows: np.ndarray) -> np.ndarray:
        """The row group of each window-relative row."""
        return np.searchsorted(self.starts, rows, side="right") - 1

    def permuted(self, name: str) -> np.ndarray:
        """A narrow fixed-width column of the whole window in epoch order (made once, on first
        use: one vectorised gather per window instead of one per batch)."""
        if name not in self._permuted:
            chunks = self.views(name)
            whole = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
            self._permuted[name] = np.take(whole, self.order, axis=0)
        return self._permuted[name]


_POOL_CHOSEN = False
_WIDE_ROW = 1024  # bytes: rows at least this wide are gathered one by one, straight into the batch


def use_retaining_arrow_pool() -> None:
    """Make jemalloc pyarrow's default memory pool in this process, unless the user chose one.

    The loader decodes hundreds of MB a second into new Arrow buffers and frees them a window
    later. pyarrow's default pool (mimalloc) hands freed pages back to the OS within
    milliseconds, so every window pays the page faults of fresh memory again; jemalloc keeps
    freed pages for reuse (10 s decay). Decoding the 20k-image benchmark set took 0.36-1.3 s
    with mimalloc and 0.12-0.24 s with jemalloc on the 2-core development machine
    (docs/benchmarks.md). Buffers already allocated keep their own pool; setting
    ``ARROW_DEFAULT_MEMORY_POOL`` (e.g. ``mimalloc``) leaves pyarrow's choice alone.
    """
    global _POOL_CHOSEN
    if _POOL_CHOSEN:
        return
    _POOL_CHOSEN = True
    import os

    import pyarrow as pa

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL") or "jemalloc" not in pa.supported_memory_backends():
        return
    pa.set_memory_pool(pa.jemalloc_memory_pool())


def _fixed_width_view(column) -> np.ndarray | None:
    import pyarrow as pa

    arr = column.chunk(0) if column.num_chunks == 1 else None
    if arr is None or arr.null_count:
        return None
    typ = arr.type
    if pa.types.is_boolean(typ):  # bit-packed: unpacked once per window (Arrow's take path cost
        # ~130 ms per 4096-row batch from 131k-row windows; this, well under 1 ms)
        bits = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[arr.offset : arr.offset + len(arr)].view(np.bool_)
    if pa.types.is_fixed_size_binary(typ):
        width = typ.byte_width
        data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
        return data.reshape(len(arr), width)
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        # straight from the values buffer: Array.to_numpy imports pandas on first use, which
        # cost each DataLoader worker about a second before its first batch
        kind = "f" if pa.types.is_floating(typ) else ("i" if pa.types.is_signed_integer(typ) else "u")
        dtype = np.dtype(f"{kind}{typ.bit_width // 8}")
        return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
    return None


def _int64_array(values: np.ndarray):
    """An Arrow int64 array over ``values`` (``pa.array`` on NumPy input imports pandas)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _gather(parts: list[tuple[_Window, int, int]], name: str) -> Any:
    """Column ``name`` of a batch: the rows ``[lo, hi)`` of each window's epoch order in turn,
    as a tensor (or what :func:`_column_to_tensor` makes of the column's type)."""
    views = [window.views(name) for window, _, _ in parts]
    if all(v is not None for v in views):
        first = views[0][0]
        if first[0].nbytes < _WIDE_ROW:  # numbers: slices of the window's permuted column
            pieces = [window.permuted(name)[lo:hi] for window, lo, hi in parts]
            return torch.from_numpy(pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces))
        if len(parts) == 1 and len(views[0]) == 1:  # one row group: one fancy-index copy
            window, lo, hi = parts[0]
            return torch.from_numpy(views[0][0][window.order[lo:hi]])
        total = sum(hi - lo for _, lo, hi in parts)
        out = np.empty((total, *first.shape[1:]), dtype=first.dtype)
        pos = 0
        for (window, lo, hi), chunks in zip(parts, views, strict=True):  # images: one copy a row
            rows = window.order[lo:hi]
            if len(chunks) == 1:  # (not np.take(..., out=...): ~20x slower for wide rows here)
                out[pos : pos + len(rows)] = chunks[0][rows]
            else:
                where = window.locate(rows)
                local = rows - window.starts[where]
                for i, (c, r) in enumerate(zip(where.tolist(), local.tolist(), strict=True)):
                    out[pos + i] = chunks[c][r]
            pos += len(rows)
        return torch.from_numpy(out)
    import pyarrow as pa

    pieces = []
    for window, lo, hi in parts:
        # the chunks of each table's column (a ChunkedArray given as a value would be converted
        # element by element through Python: seconds per batch for long lists)
        column = pa.chunked_array([c for t in window.tables for c in t.column(name).chunks], type=window.tables[0].schema.field(name).type)
        pieces.extend(column.take(_int64_array(window.order[lo:hi])).chunks)
    return _column_to_tensor(pa.chunked_array(pieces, type=parts[0][0].tables[0].schema.field(name).type))


class _ShardCache:
    """The last few verified shards of one reader (the epoch order is shard by shard).

    From a remote store (S3) the next shard of the epoch is fetched and verified on a
    background thread while the current one is decoded, so the network and the decoding
    overlap; a local shard is memory-mapped, which costs nothing to open.
    """

    def __init__(self, loader: ShardLoader, order: list[int] | None = None, capacity: int = 2) -> None:
        self.loader = loader
        self.capacity = capacity
        self.files: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.order = order or []
        self._fetching: dict[int, concurrent.futures.Future] = {}
        self._pool = None
        if self.order and loader.manifest.storage.protocol != "file":
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-fetch")

    def _open(self, shard: int):
        future = self._fetching.pop(shard, None)
        if future is None:
            return self.loader.manifest.open_shard(self.loader._shards[shard], self.loader.checksum)
        data = future.result()  # raises the fetch's ShardVerificationError / StorageError
        return self.loader.manifest.parquet_file(self.loader._shards[shard], data)

    def get(self, shard: int):
        if shard in self.files:
            self.files.move_to_end(shard)
            return self.files[shard]
        pf = self._open(shard)
        self.files[shard] = pf
        while len(self.files) > self.capacity:
            self.files.popitem(last=False)
        if self._pool is not None:  # fetch the next shard of the epoch while this one is decoded
            later = self.order[self.order.index(shard) + 1 :] if shard in self.order else []
            nxt = next((s for s in later if s not in self.files), None)
            if nxt is not None and nxt not in self._fetching:
                info = self.loader._shards[nxt]
                self._fetching[nxt] = self._pool.submit(self.loader.manifest.read_shard_buffer, info, self.loader.checksum)
        return pf

    def close(self) -> None:
        if self._pool is not None:
            for future in self._fetching.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._fetching.clear()


class _WindowReader:
    """Decodes the needed windows in order on a background thread, ``prefetch`` ahead."""

    _DONE = object()

    def __init__(self, loader: ShardLoader, epoch: int, windows: list[list[_Unit]], needed: list[int]) -> None:
        use_retaining_arrow_pool()
        self.loader = loader
        self.windows = windows
        self.queue: queue.Queue = queue.Queue(maxsize=loader.prefetch_windows)
        self.stop = threading.Event()
        self.current: tuple[int, Any] | None = None
        self.thread = threading.Thread(target=self._run, args=(epoch, needed), name="shard-prefetch", daemon=True)
        self.thread.start()

    def _run(self, epoch: int, needed: list[int]) -> None:
        order: list[int] = []  # the shards in the order the windows use them
        for w in needed:
            for u in self.windows[w]:
                if not order or order[-1] != u.shard:
                    order.append(u.shard)
        files = _ShardCache(self.loader, order)
        try:
            for w in needed:
                if self.stop.is_set():
                    return
                item = (w, self.loader._read_window(epoch, w, self.windows[w], files))
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, which raises it
            self.queue.put((-1, exc))
        finally:
            files.close()

    def get(self, w: int):
        if self.current is None or self.current[0] != w:
            got = self.queue.get()
            if got[0] == -1:
                raise got[1]
            if got[0] != w:  # the plan and the prefetch order are the same list
                raise RuntimeError(f"prefetcher out of step: wanted window {w}, got {got[0]}")
            self.current = got
        return self.current[1]

    def close(self) -> None:
        """Stop and join the thread. Joined, not left behind: a daemon thread still decoding
        in pyarrow when the interpreter exits aborts the process ("terminate called without
        an active exception"), which a torchrun worker would report as a failed rank."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break


def _column_to_tensor(column) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    typ = arr.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        values = _numbers(arr.flatten())
        if len(lengths) and (lengths == lengths[0]).all():
            return values.reshape(len(lengths), int(lengths[0]))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return values, torch.from_numpy(offsets)
    if pa.types.is_fixed_size_binary(typ):  # e.g. images: (rows, width) uint8, one copy
        width = typ.byte_width
        data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
        return torch.from_numpy(data.reshape(len(arr), width).copy())
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ):
        return arr.to_pylist()
    return _numbers(arr)


def _numbers(arr) -> torch.Tensor:
    return torch.from_numpy(arr.to_numpy(zero_copy_only=False, writable=True))
