"""What the recommendation family keeps besides the streamed batches, in memory bounded by the
number of users (never by the number of interactions).

The train split is streamed by :class:`trainflow.trainers.loader.ShardLoader`; no rank ever holds it. Two
things the models need beyond a batch are built by one streaming pass over the split when the
family starts (:func:`scan_train`), each of a size that does not grow with the interactions:

* :class:`PositiveFilter`: a Bloom filter over the (user, item) training pairs, for drawing
  negatives among the items a user has no positive with. Fixed size (16 bits a pair, at most
  ``max_bytes``, 64 MiB by default: 0.5 % false positives up to 32M pairs); a false positive
  only means an item is not drawn as that user's negative, never that a positive is drawn.
* :class:`UserHistories`: each user's latest ``keep`` train items in time order (ties on the
  timestamp broken by the item id, the rule that picks the held-out interactions), with the
  ``is_valid`` flag: ``num_users x min(keep, longest history)`` int32, for SASRec's training windows, its valid/eval
  histories and the exported model's ``histories`` buffer.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainflow.tasks.manifest import Manifest

_HASH_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)


class PositiveFilter:
    """A Bloom filter over ``user * num_items + item`` keys (see the module docstring).

    Args:
        num_items: Rows of the item table (the key's radix).
        expected_keys: Pairs it will hold (sizes the bit array: 16 bits a pair, a power of two).
        max_bytes: Cap on the bit array.
    """

    def __init__(self, num_items: int, expected_keys: int, max_bytes: int = 64 << 20) -> None:
        bits = 1 << max(16, int(np.ceil(np.log2(max(1, expected_keys) * 16))))
        bits = min(bits, max(1 << 16, 1 << int(np.floor(np.log2(max_bytes * 8)))))
        self.num_items = int(num_items)
        self.shift = np.uint64(64 - int(np.log2(bits)))
        self.bits = np.zeros(bits // 8, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def _positions(self, users, items) -> list[np.ndarray]:
        keys = np.asarray(users, dtype=np.int64).astype(np.uint64) * np.uint64(self.num_items) + np.asarray(
            items, dtype=np.int64
        ).astype(np.uint64)
        keys = keys ^ (keys >> np.uint64(29))
        with np.errstate(over="ignore"):
            return [(keys * np.uint64(m)) >> self.shift for m in _HASH_MULTIPLIERS]

    def add(self, users, items) -> None:
        for pos in self._positions(users, items):
            np.bitwise_or.at(self.bits, (pos >> np.uint64(3)).astype(np.int64), (1 << (pos & np.uint64(7))).astype(np.uint8))

    def contains(self, users, items) -> np.ndarray:
        """Whether each (user, item) may be a positive (no false negatives)."""
        out = None
        for pos in self._positions(users, items):
            hit = (self.bits[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
            out = hit.astype(bool) if out is None else out & hit.astype(bool)
        return out


def sample_negatives(
    rng: np.random.Generator, users: np.ndarray, num: int, positives: PositiveFilter, num_items: int,
    max_rounds: int = 100,
) -> np.ndarray:
    """``(len(users), num)`` items drawn uniformly among those ``positives`` does not hold for
    each user.

    Rejection sampling: draws that hit a (possible) positive are redrawn (a user with positives
    on more than ~99 % of the items would need many rounds; after ``max_rounds`` it raises).

    Raises:
        RuntimeError: some draws still hit positives after ``max_rounds`` rounds.
    """
    users = np.asarray(users, dtype=np.int64)
    out = rng.integers(0, num_items, size=(len(users), num), dtype=np.int64)
    bad = positives.contains(np.repeat(users[:, None], num, axis=1), out)
    for _ in range(max_rounds):
        if not bad.any():
            return out
        rows, cols = np.nonzero(bad)
        out[rows, cols] = rng.integers(0, num_items, size=len(rows), dtype=np.int64)
        bad[rows, cols] = positives.contains(users[rows], out[rows, cols])
    if bad.any():
        raise RuntimeError(f"negative sampling: {int(bad.sum())} draws still hit positives after {max_rounds} rounds")
    return out


@dataclasses.dataclass
class UserHistories:
    """Each user's latest ``keep`` train items, right-aligned, ids + 1 (0 = none).

    Attributes:
        items: ``(num_users, keep)`` int32.
        is_valid: ``(num_users, keep)`` bool, the valid split's held-out interaction (each
            user's latest train item when the user has one).
    """

    items: np.ndarray
    is_valid: np.ndarray

    @property
    def keep(self) -> int:
        return self.items.shape[1]

    def sequences(self, include_valid: bool) -> np.ndarray:
        """``(num_users, keep)`` right-aligned train items, without the ``is_valid`` one unless
        ``include_valid`` (the rest shifted right to close the gap)."""
        if include_valid or not self.is_valid.any():
            return self.items
        mask = (self.items > 0) & ~self.is_valid
        order = np.argsort(mask, axis=1, kind="stable")  # dropped and empty slots first, order kept
        return np.where(np.take_along_axis(mask, order, 1), np.take_along_axis(self.items, order, 1), 0).astype(np.int32)

    def latest(self, max_len: int, include_valid: bool) -> np.ndarray:
        """``(num_users, max_len)`` int32 latest items of each user (SASRec's input)."""
        seq = self.sequences(include_valid)
        if max_len <= seq.shape[1]:
            return np.ascontiguousarray(seq[:, -max_len:])
        out = np.zeros((seq.shape[0], max_len), dtype=np.int32)
        out[:, -seq.shape[1] :] = seq
        return out


class _LatestPerUser:
    """Streaming top-``keep`` of (timestamp, item) per user: chunks are buffered and merged
    with what is kept when they reach the size of the kept part (amortised O(n log n) time,
    memory at most about twice ``num_users x keep`` entries plus one chunk)."""

    def __init__(self, num_users: int, keep: int) -> None:
        self.num_users = num_users
        self.keep = keep
        self.kept: tuple[np.ndarray, ...] = (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                                             np.zeros(0, bool))
        self.pending: list[tuple[np.ndarray, ...]] = []
        self.pending_rows = 0

    def add(self, users, stamps, items, valid) -> None:
        self.pending.append((users.astype(np.int32), stamps.astype(np.int64), items.astype(np.int32),
                             valid.astype(bool)))
        self.pending_rows += len(users)
        if self.pending_rows >= max(len(self.kept[0]), 1 << 20):
            self._compact()

    def _compact(self) -> None:
        if not self.pending:
            return
        parts = [self.kept, *self.pending]
        u, ts, it, va = (np.concatenate([p[c] for p in parts]) for c in range(4))
        self.pending, self.pending_rows = [], 0
        order = np.lexsort((it, ts, u))
        u, ts, it, va = u[order], ts[order], it[order], va[order]
        ends = np.searchsorted(u, u, side="right")  # end of each row's user group
        keep = (ends - np.arange(len(u))) <= self.keep
        self.kept = (u[keep], ts[keep], it[keep], va[keep])

    def finish(self) -> UserHistories:
        self._compact()
        u, _, it, va = self.kept
        ends = np.searchsorted(u, u, side="right")
        from_end = ends - np.arange(len(u))  # 1 for each user's latest item
        width = max(2, int(from_end.max()) if len(u) else 0)  # no wider than the longest kept history
        items = np.zeros((self.num_users, width), dtype=np.int32)
        valid = np.zeros((self.num_users, width), dtype=bool)
        if len(u):
            col = width - from_end
            items[u, col] = it + 1
            valid[u, col] = va
        return UserHistories(items, valid)


def table_sizes(manifest: Manifest) -> tuple[int, int]:
    stats = manifest.stats
    if "num_users" in stats and "num_items" in stats:
        return int(stats["num_users"]), int(stats["num_items"])
    return manifest.file("users").num_rows, manifest.file("items").num_rows


@dataclasses.dataclass
class TrainScan:
    """What :func:`scan_train` keeps: the positive filter, the histories (when asked) and the
    rows it read."""

    positives: PositiveFilter
    histories: UserHistories | None
    rows_read: int


def scan_train(
    manifest: Manifest, *, include_valid: bool, history_keep: int = 0, chunk_rows: int = 1 << 18,
    max_filter_bytes: int = 64 << 20,
) -> TrainScan:
    """One streaming pass over the train split (verified reads, ``chunk_rows`` at a time).

    Args:
        manifest: A committed recommendation dataset version.
        include_valid: Put the ``is_valid`` rows in the positive filter (``train_on_valid``).
        history_keep: Items kept per user in :class:`UserHistories` (0: no histories).
        chunk_rows: Rows decoded at a time.
        max_filter_bytes: Cap on the positive filter.
    """
    from trainflow.trainers.loader import ShardLoader

    num_users, num_items = table_sizes(manifest)
    columns = ["user_idx", "item_idx", "is_valid"] + (["timestamp"] if history_keep else [])
    loader = ShardLoader(manifest, "train", chunk_rows, columns=columns, shuffle=False, remainder="pad")
    positives = PositiveFilter(num_items, manifest.num_rows("train"), max_filter_bytes)
    latest = _LatestPerUser(num_users, history_keep) if history_keep else None
    rows = 0
    for batch in loader:
        real = batch["sample_mask"].numpy()
        users, items = batch["user_idx"].numpy()[real], batch["item_idx"].numpy()[real]
        valid = batch["is_valid"].numpy()[real]
        rows += len(users)
        pick = slice(None) if include_valid else ~valid
        positives.add(users[pick], items[pick])
        if latest is not None:
            latest.add(users, batch["timestamp"].numpy()[real], items, valid)
    return TrainScan(positives, latest.finish() if latest is not None else None, rows)


def history_windows(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """``(n, 3)`` int64 (user, start, end) SASRec windows: a user's targets ``[start, end)`` of
    its sequence of ``lengths[user]`` items, cut into windows of ``max_len`` from the end; the
    first item, which has no history, is never a target."""
    lengths = np.asarray(lengths, dtype=np.int64)
    per_user = np.maximum(0, -(-(lengths - 1) // max_len))
    users = np.repeat(np.arange(len(lengths)), per_user)
    first = np.concatenate([[0], np.cumsum(per_user)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    j = np.arange(len(users)) - np.repeat(first, per_user)  # window number from the end
    end = lengths[users] - j * max_len
    start = np.maximum(1, end - max_len)
    return np.stack([users, start, end], axis=1).astype(np.int64).reshape(-1, 3)
