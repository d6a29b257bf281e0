"""In-memory interaction data of the recommendation family: positives, histories, negatives.

The train split of a recommendation dataset is small next to its model (100 K rows for
ML-100K, 25 M for ML-25M: 16 bytes a row), and negative sampling needs each user's whole
positive set, so the family reads it once into NumPy arrays rather than streaming it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainflow.tasks.manifest import Manifest


@dataclasses.dataclass
class Interactions:
    """Train interactions sorted by (user, timestamp, item): each user's history in time order.

    Ties on the timestamp are broken by the item id (``item_idx`` is the rank of the id), the
    same rule that picks the held-out interactions, so the valid and eval items always come
    after every train item of their user.

    Attributes:
        num_users: Rows of the user table (``user_idx`` < num_users).
        num_items: Rows of the item table (``item_idx`` < num_items).
        users: ``(n,)`` int64 user_idx of each interaction.
        items: ``(n,)`` int64 item_idx.
        is_valid: ``(n,)`` bool, the valid split's held-out interaction of its user.
    """

    num_users: int
    num_items: int
    users: np.ndarray
    items: np.ndarray
    is_valid: np.ndarray

    @classmethod
    def from_arrays(
        cls, num_users: int, num_items: int, users, items, timestamps, is_valid=None
    ) -> Interactions:
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        timestamps = np.asarray(timestamps, dtype=np.int64)
        is_valid = np.zeros(len(users), dtype=bool) if is_valid is None else np.asarray(is_valid, dtype=bool)
        order = np.lexsort((items, timestamps, users))
        return cls(num_users, num_items, users[order], items[order], is_valid[order])

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Interactions:
        """The train split of ``manifest`` (verified reads)."""
        table = manifest.read_table("train", columns=["user_idx", "item_idx", "timestamp", "is_valid"])
        num_users, num_items = _table_sizes(manifest)
        return cls.from_arrays(
            num_users,
            num_items,
            table.column("user_idx").to_numpy(),
            table.column("item_idx").to_numpy(),
            table.column("timestamp").to_numpy(),
            table.column("is_valid").to_numpy(),
        )

    def select(self, include_valid: bool) -> Interactions:
        """These interactions without the ``is_valid`` rows unless ``include_valid``."""
        if include_valid:
            return self
        keep = ~self.is_valid
        return Interactions(self.num_users, self.num_items, self.users[keep], self.items[keep], self.is_valid[keep])

    @property
    def user_offsets(self) -> np.ndarray:
        """``(num_users + 1,)`` CSR offsets: user u's interactions are ``[off[u], off[u+1])``."""
        counts = np.bincount(self.users, minlength=self.num_users)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def positive_keys(self) -> np.ndarray:
        """Sorted ``user * num_items + item`` of every (user, item) pair, for membership tests."""
        return np.unique(self.users * self.num_items + self.items)

    def histories(self, max_len: int) -> np.ndarray:
        """``(num_users, max_len)`` int32 latest items of each user, left-padded, ids + 1 (0 = pad)."""
        out = np.zeros((self.num_users, max_len), dtype=np.int32)
        off = self.user_offsets
        for user in range(self.num_users):
            seq = self.items[off[user] : off[user + 1]][-max_len:]
            if len(seq):
                out[user, max_len - len(seq) :] = seq + 1
        return out


def _table_sizes(manifest: Manifest) -> tuple[int, int]:
    stats = manifest.stats
    if "num_users" in stats and "num_items" in stats:
        return int(stats["num_users"]), int(stats["num_items"])
    return manifest.file("users").num_rows, manifest.file("items").num_rows


def is_positive(keys: np.ndarray, users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Whether each (user, item) is among ``keys`` (from :meth:`Interactions.positive_keys`)."""
    query = np.asarray(users, dtype=np.int64) * num_items + np.asarray(items, dtype=np.int64)
    pos = np.searchsorted(keys, query)
    pos = np.minimum(pos, len(keys) - 1)
    return keys[pos] == query if len(keys) else np.zeros(query.shape, dtype=bool)


def sample_negatives(
    rng: np.random.Generator, users: np.ndarray, num: int, keys: np.ndarray, num_items: int, max_rounds: int = 100
) -> np.ndarray:
    """``(len(users), num)`` items drawn uniformly among those each user has no positive with.

    Rejection sampling: draws that hit a positive are redrawn (a user with positives on more
    than ~99 % of the items would need many rounds; after ``max_rounds`` it raises).

    Raises:
        RuntimeError: some draws still hit positives after ``max_rounds`` rounds.
    """
    users = np.asarray(users, dtype=np.int64)
    out = rng.integers(0, num_items, size=(len(users), num), dtype=np.int64)
    bad = is_positive(keys, np.repeat(users[:, None], num, axis=1), out, num_items)
    for _ in range(max_rounds):
        if not bad.any():
            return out
        rows, cols = np.nonzero(bad)
        out[rows, cols] = rng.integers(0, num_items, size=len(rows), dtype=np.int64)
        bad[rows, cols] = is_positive(keys, users[rows], out[rows, cols], num_items)
    if bad.any():
        raise RuntimeError(f"negative sampling: {int(bad.sum())} draws still hit positives after {max_rounds} rounds")
    return out


def rank_batches(num_samples: int, batch_size: int, world_size: int, rank: int, order: np.ndarray) -> list[np.ndarray]:
    """Split a world-wide ``order`` of sample indices into this rank's batches.

    Global batch g is ``order[g * batch_size * world_size : (g + 1) * batch_size * world_size]``
    and rank r takes every ``world_size``-th element of it from r. Every rank gets
    ``ceil(num_samples / (batch_size * world_size))`` batches (the last may be smaller, or even
    empty on high ranks when fewer samples than ranks are left), and each sample lands in
    exactly one batch of one rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    global_batch = batch_size * world_size
    num_batches = -(-num_samples // global_batch)
    return [order[g * global_batch : (g + 1) * global_batch][rank::world_size] for g in range(num_batches)]
