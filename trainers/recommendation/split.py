"""The recommendation split protocol (NCF, He et al. 2017).

Each user's latest interaction (ties broken by the larger item id) is the ``eval`` positive,
ranked against ``num_negatives`` items the user never interacted with, sampled with a fixed
seed; the second-latest is the ``valid`` positive (with its own negatives) for choosing
hyper-parameters, and stays in ``train`` flagged ``is_valid`` so a trainer can leave it out.
When the source is already an NCF split its test rows and negatives are used as given.

A source whose ``split_protocol`` is ``sasrec`` (a SASRec sequence file) is split the SASRec
paper's way instead (:data:`~trainflow.trainers.recommendation.sources.SASREC_PROTOCOL`): only users with
at least 4 interactions get a valid and an eval item (the second-to-last and the last), and
the 100 negatives of each are drawn from the items the user has no *train* interaction with.

Memory is bounded by one block of rows, one of 64 user partitions of pass 1 and one block of
users' negatives, plus a few numbers per user (its id, count, held-out interactions: about
100 bytes), never by a per-user Python object or candidate list: the raw data is streamed
twice. Pass 1 writes every row to a user partition on disk, from which come each user's
count, its two latest interactions and the exact duplicates; pass 2 writes train and the
pairs a user may not get as negatives, on disk by ranges of users; then the negatives are
drawn exactly (rejection against the block's sorted pairs) one block of
:data:`NEGATIVE_BLOCK_USERS` users at a time and written as they are drawn. Split version 2
(``PipelineSpec.split_version``, part of the dataset version): version 1 (sharder version 3)
kept per-user candidate lists, about 15 KB a user, and drew other negatives for the same seed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from trainflow.tasks.settings import redact_url
from trainflow.tasks.sharding import ShardingConfig, ShardWriter, write_side_file
from trainflow.tasks.storage import Storage
from trainflow.trainers.recommendation.sources import SASREC_PROTOCOL, RecommendationSource

log = logging.getLogger(__name__)

SASREC_MIN_INTERACTIONS = 4
"""The SASRec protocol: users with fewer interactions are train-only."""
SASREC_NEGATIVES = 100
"""The SASRec protocol: negatives per held-out item (``ShardingConfig.num_negatives`` is not used)."""


def _batch_arrays(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        batch.column("user_id").to_numpy(),
        batch.column("item_id").to_numpy(),
        batch.column("rating").to_numpy(),
        batch.column("timestamp").to_numpy(),
    )


def _merge_vocab(vocab: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new, new_counts = np.unique(ids, return_counts=True)
    all_ids = np.concatenate([vocab, new])
    all_counts = np.concatenate([counts, new_counts])
    merged, inverse = np.unique(all_ids, return_inverse=True)
    return merged, np.bincount(inverse, weights=all_counts, minlength=merged.size).astype(np.int64)


class _UserPartitions:
    """Per-user statistics and exact duplicates in bounded memory (pass 1).

    Every row's ``(user, item, timestamp, row number)`` is appended to one of ``partitions``
    temporary files chosen by user id; :meth:`finish` then sorts one partition at a time and
    derives, per user: the number of distinct interactions and the two latest distinct
    ``(timestamp, item)`` pairs; and the row numbers of exact duplicates (same user, item and
    timestamp; the first occurrence in file order is kept). In memory at once: one block of
    rows, then one partition (32 bytes x rows / partitions), and in the end a few numbers per
    user (the user id, its count and its two latest interactions: 48 bytes) and the row
    numbers of the duplicates, never a set of all rows nor a per-user Python object.
    """

    _dtype = np.dtype([("u", np.int64), ("i", np.int64), ("ts", np.int64), ("row", np.int64)])

    def __init__(self, tmp_dir: str, partitions: int = 64) -> None:
        self.partitions = partitions
        self.paths = [os.path.join(tmp_dir, f"users-{p:03d}.bin") for p in range(partitions)]
        self.handles = [open(path, "wb") for path in self.paths]  # noqa: SIM115 (closed in finish)
        self.rows = 0

    def add(self, u: np.ndarray, i: np.ndarray, ts: np.ndarray) -> None:
        records = np.empty(u.size, self._dtype)
        records["u"], records["i"], records["ts"] = u, i, ts
        records["row"] = np.arange(self.rows, self.rows + u.size)
        self.rows += u.size
        part = u % self.partitions
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1))
        for p in range(self.partitions):
            if bounds[p + 1] > bounds[p]:
                records[order[bounds[p] : bounds[p + 1]]].tofile(self.handles[p])

    def finish(self) -> dict[str, np.ndarray]:
        """Per user (sorted by id): ``users``, ``counts`` (distinct interactions), ``latest_ts``,
        ``latest_i``, ``second_ts``, ``second_i`` (``has_second`` says which exist); and
        ``drop`` (sorted row numbers of the exact duplicates), ``dup_users``, ``dup_counts``."""
        keys = ("users", "counts", "latest_ts", "latest_i", "second_ts", "second_i", "has_second")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*keys, "drop", "dup_users")}
        for handle, path in zip(self.handles, self.paths):
            handle.close()
            records = np.fromfile(path, self._dtype)
            os.remove(path)
            if records.size == 0:
                continue
            # By user, then time, then item: duplicates are adjacent (first occurrence first)
            # and each user's latest interactions are the last of its group.
            records = records[np.lexsort((records["row"], records["i"], records["ts"], records["u"]))]
            u, i, ts = records["u"], records["i"], records["ts"]
            later = np.r_[False, (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (ts[1:] == ts[:-1])]
            parts["drop"].append(records["row"][later])
            parts["dup_users"].append(u[later])
            u, i, ts = u[~later], i[~later], ts[~later]
            last = np.flatnonzero(np.r_[u[1:] != u[:-1], True])
            first = np.r_[0, last[:-1] + 1]
            has_second = last > first
            parts["users"].append(u[last])
            parts["counts"].append(last - first + 1)
            parts["latest_ts"].append(ts[last])
            parts["latest_i"].append(i[last])
            parts["second_ts"].append(ts[last - 1])  # meaningless where has_second is False
            parts["second_i"].append(i[last - 1])
            parts["has_second"].append(has_second)
            del records, u, i, ts
        empty = {k: np.zeros(0, bool if k == "has_second" else np.int64) for k in keys}
        out = {k: np.concatenate(v) if v else empty[k] for k, v in parts.items() if k in keys}
        order = np.argsort(out["users"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
        out["drop"] = np.sort(np.concatenate(parts["drop"])) if parts["drop"] else np.zeros(0, np.int64)
        dup = np.concatenate(parts["dup_users"]) if parts["dup_users"] else np.zeros(0, np.int64)
        out["dup_users"], out["dup_counts"] = np.unique(dup, return_counts=True)
        return out


NEGATIVE_BLOCK_USERS = 8192
"""Users whose negatives are sampled together (at most): the unit of the sharder's per-user memory."""
SEEN_ROWS_PER_FILE = 2_000_000
"""About this many (user, item) pairs a temporary file of seen pairs (whole users per file)."""
SEEN_FILES_MAX = 512
"""At most this many temporary files of seen pairs (past SEEN_FILES_MAX x SEEN_ROWS_PER_FILE
pairs the files grow instead)."""


class _SeenPairs:
    """Every ``(user index, item index)`` pair a user may not get as a negative, on disk,
    partitioned into files of contiguous user-index ranges holding about
    :data:`SEEN_ROWS_PER_FILE` pairs each (by the users' interaction counts) (pass 2); read back
    one file at a time, so that sampling the negatives of a block of users holds only one
    file's pairs: bounded in rows, whatever the number of users or of interactions."""

    _dtype = np.dtype([("u", np.int32), ("i", np.int32)])

    def __init__(self, tmp_dir: str, counts: np.ndarray) -> None:
        ends = np.cumsum(counts)
        total = int(ends[-1]) if ends.size else 0
        files = max(1, min(SEEN_FILES_MAX, -(-total // SEEN_ROWS_PER_FILE)))
        cuts = np.searchsorted(ends, np.arange(1, files) * (total / files), side="right")
        self.starts = np.unique(np.r_[0, cuts, counts.size]).astype(np.int64)  # file f: users [starts[f], starts[f+1])
        self.files = self.starts.size - 1
        self.paths = [os.path.join(tmp_dir, f"seen-{f:03d}.bin") for f in range(self.files)]
        self.handles = [open(path, "wb") for path in self.paths]  # noqa: SIM115 (closed in close)

    def add(self, uidx: np.ndarray, iidx: np.ndarray) -> None:
        if uidx.size == 0:
            return
        records = np.empty(uidx.size, self._dtype)
        records["u"], records["i"] = uidx, iidx
        part = np.searchsorted(self.starts, uidx, side="right") - 1
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.files + 1))
        for f in range(self.files):
            if bounds[f + 1] > bounds[f]:
                records[order[bounds[f] : bounds[f + 1]]].tofile(self.handles[f])

    def close(self) -> None:
        for handle in self.handles:
            handle.close()

    def read(self, f: int, num_items: int) -> np.ndarray:
        """File ``f``'s pairs as sorted unique keys ``user * num_items + item`` (the file is removed)."""
        records = np.fromfile(self.paths[f], self._dtype)
        os.remove(self.paths[f])
        return np.unique(records["u"].astype(np.int64) * num_items + records["i"])


def _sample_negatives(
    rng: np.random.Generator, uidx: np.ndarray, seen_keys: np.ndarray, num_items: int, k: int, users: np.ndarray
) -> np.ndarray:
    """``k`` negatives per user of ``uidx`` (one block): items the user has no pair with in
    ``seen_keys`` (sorted ``user * num_items + item``), distinct, uniform, deterministic given
    ``rng``. Each user's draws are one row of a matrix, kept in draw order: the first ``k``
    distinct unseen; a user left short (one who saw most items) is drawn again exactly, from
    the list of every item it has not seen."""
    n = uidx.size
    out = np.empty((n, k), np.int64)
    if n == 0:
        return out
    width = int((k + 8) * 1.6) + 16
    draws = rng.integers(0, num_items, size=(n, width))
    # Each row sorted (stably: a repeated item's first draw comes first), so that a repeat is
    # next to its first draw, and the keys user * num_items + item of all rows are in one
    # increasing order (rows are in user order), which makes the look-up in seen_keys a
    # sequential walk rather than random probes.
    order = np.argsort(draws, axis=1, kind="stable")
    items = np.take_along_axis(draws, order, axis=1)
    bad = np.zeros((n, width), bool)
    bad[:, 1:] = items[:, 1:] == items[:, :-1]  # a repeat of the draw before it
    if seen_keys.size:
        keys = (uidx[:, None].astype(np.int64) * num_items + items).ravel()
        pos = np.minimum(np.searchsorted(seen_keys, keys), seen_keys.size - 1)
        bad |= (seen_keys[pos] == keys).reshape(n, width)
    ok = np.empty((n, width), bool)
    np.put_along_axis(ok, order, ~bad, axis=1)  # back to draw order
    rank = np.cumsum(ok, axis=1, dtype=np.int32)
    short = rank[:, -1] < k
    take = ok & (rank <= k) & ~short[:, None]
    out[~short] = draws[take].reshape(-1, k)
    for row in np.flatnonzero(short).tolist():
        user = int(uidx[row])
        lo, hi = np.searchsorted(seen_keys, [user * num_items, (user + 1) * num_items])
        pool = np.setdiff1d(np.arange(num_items), seen_keys[lo:hi] - user * num_items)
        if pool.size < k:
            raise ValueError(
                f"user {int(users[user])} interacted with {num_items - pool.size} of {num_items} items: "
                f"fewer than num_negatives={k} items are left to sample"
            )
        out[row] = rng.choice(pool, size=k, replace=False)
    return out


def _train_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("user_idx", pa.int32()),
            ("item_idx", pa.int32()),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("rating", pa.float32()),
            ("timestamp", pa.int64()),
            ("is_valid", pa.bool_()),
        ]
    )


def _holdout_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("user_idx", pa.int32()),
            ("item_idx", pa.int32()),
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("timestamp", pa.int64()),
            ("neg_item_idx", pa.list_(pa.int32())),
            ("neg_item_id", pa.list_(pa.int64())),
        ]
    )


def shard_recommendation(
    source: RecommendationSource, store: Storage, config: ShardingConfig, tmp_dir: str
) -> dict[str, Any]:
    import pyarrow as pa

    given = source.given_split
    sasrec = getattr(source, "split_protocol", "ncf") == SASREC_PROTOCOL
    k = SASREC_NEGATIVES if sasrec else config.num_negatives
    min_test, min_valid = (SASREC_MIN_INTERACTIONS, SASREC_MIN_INTERACTIONS) if sasrec else (2, 3)

    # Pass 1: the item vocabulary; every row to a user partition on disk, from which come the
    # user vocabulary, interaction counts, each user's two latest interactions and duplicates.
    items = np.zeros(0, np.int64)
    item_counts = np.zeros(0, np.int64)
    rows_read = 0
    tick = time.monotonic()
    train_opener = given["train.rating"] if given else source.open_interactions
    partitions = _UserPartitions(tmp_dir)
    for batch in train_opener():
        u, i, r, ts = _batch_arrays(batch)
        if not np.isfinite(r).all():
            raise ValueError(f"{redact_url(source.url)}: non-finite rating values")
        partitions.add(u, i, ts)
        items, item_counts = _merge_vocab(items, item_counts, i)
        rows_read += batch.num_rows
        if time.monotonic() - tick > 10:
            log.info("pass 1: %d rows read", rows_read)
            tick = time.monotonic()
    per_user = partitions.finish()
    # Exact duplicate interactions (same user, item, timestamp) are one interaction: the
    # first occurrence is kept, the others are dropped from train (the counts are distinct).
    duplicate_rows = per_user["drop"]
    users, user_counts = per_user["users"], per_user["counts"]
    if duplicate_rows.size:
        log.warning(
            "dropping %d exact duplicate interactions (same user, item and timestamp) from %d users; "
            "the first occurrence of each is kept",
            duplicate_rows.size,
            per_user["dup_users"].size,
        )
    latest_u, latest_ts, latest_i = users, per_user["latest_ts"], per_user["latest_i"]
    has_two = per_user["has_second"]
    second_u, second_ts, second_i = users[has_two], per_user["second_ts"][has_two], per_user["second_i"][has_two]
    del per_user
    given_test: dict[str, np.ndarray] = {}
    if given:
        test_batches = list(given["test.rating"]())
        test = pa.Table.from_batches(test_batches)
        tu, ti, _, tts = (test.column(c).to_numpy() for c in ("user_id", "item_id", "rating", "timestamp"))
        negs_user, negs_item, negs = [], [], []
        for user, item, negatives in given["test.negative"]():
            negs_user.append(user)
            negs_item.append(item)
            negs.append(np.asarray(negatives, dtype=np.int64))
        neg_lengths = {n.size for n in negs}
        users, user_counts = _merge_vocab(users, user_counts, tu)
        items, _ = _merge_vocab(items, item_counts, np.concatenate([ti, *negs]) if negs else ti)
        item_counts = np.zeros(items.size, np.int64)
        lookup = {int(uu): n for n, uu in enumerate(negs_user)}
        if len(lookup) != tu.size or any(lookup.get(int(uu)) is None for uu in tu):
            raise ValueError(
                f"{redact_url(source.url)}: test.negative does not list exactly the users of test.rating"
            )
        given_test = {"user": tu, "item": ti, "ts": tts, "negatives": [negs[lookup[int(uu)]] for uu in tu]}
        rows_read += tu.size
        log.info("NCF split given: %d test users, negatives per user %s", tu.size, sorted(neg_lengths))
    if users.size == 0:
        raise ValueError(f"{redact_url(source.url)}: no interactions")
    num_users, num_items = users.size, items.size
    log.info("pass 1 done: %d interactions, %d users, %d items", rows_read, num_users, num_items)

    def dense(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(vocab, ids).astype(np.int64)

    def count_of(ids: np.ndarray) -> np.ndarray:
        return user_counts[dense(users, ids)]

    if given:
        test_u, test_ts, test_i = given_test["user"], given_test["ts"], given_test["item"]
        # Valid: the latest training interaction of users who keep another one.
        keep = count_of(latest_u) >= 2
        valid_u, valid_ts, valid_i = latest_u[keep], latest_ts[keep], latest_i[keep]
    else:
        test_mask = count_of(latest_u) >= min_test
        test_u, test_ts, test_i = latest_u[test_mask], latest_ts[test_mask], latest_i[test_mask]
        valid_mask = count_of(second_u) >= min_valid
        valid_u, valid_ts, valid_i = second_u[valid_mask], second_ts[valid_mask], second_i[valid_mask]
    del latest_u, latest_ts, latest_i, second_u, second_ts, second_i

    test_uidx, valid_uidx = dense(users, test_u), dense(users, valid_u)

    # Pass 2: train rows (test interactions removed, valid ones flagged); the pairs a user may
    # not get as negatives go to disk by blocks of users.
    test_ts_by_user = np.full(num_users, np.iinfo(np.int64).min, np.int64)
    test_i_by_user = np.full(num_users, -1, np.int64)
    test_ts_by_user[test_uidx] = test_ts
    test_i_by_user[test_uidx] = test_i
    valid_ts_by_user = np.full(num_users, np.iinfo(np.int64).min, np.int64)
    valid_i_by_user = np.full(num_users, -1, np.int64)
    valid_ts_by_user[valid_uidx] = valid_ts
    valid_i_by_user[valid_uidx] = valid_i
    seen_pairs = _SeenPairs(tmp_dir, user_counts + 1)  # + 1: a given test item
    train_writer = ShardWriter(store, "train", _train_schema(), config, tmp_dir)
    try:
        train_item_counts = np.zeros(num_items, np.int64)
        dropped_test_copies = 0
        row_offset = 0
        for block, batch in enumerate(train_opener()):
            u, i, r, ts = _batch_arrays(batch)
            uidx, iidx = dense(users, u), dense(items, i)
            rows = np.arange(row_offset, row_offset + u.size)
            row_offset += u.size
            is_duplicate = np.isin(rows, duplicate_rows, assume_unique=True)
            is_test = (ts == test_ts_by_user[uidx]) & (i == test_i_by_user[uidx])
            is_valid = (ts == valid_ts_by_user[uidx]) & (i == valid_i_by_user[uidx])
            seen = ~(is_test | is_valid) if sasrec else ~is_duplicate  # SASRec: train items only
            seen_pairs.add(uidx[seen], iidx[seen])
            if given:
                is_test[:] = False
            else:
                dropped_test_copies += int((is_test & ~is_duplicate).sum())
            keep = ~is_test & ~is_duplicate
            perm = np.random.default_rng([config.seed, 11, block]).permutation(int(keep.sum()))
            sel = np.flatnonzero(keep)[perm]
            np.add.at(train_item_counts, iidx[sel], 1)
            train_writer.write_batch(
                pa.RecordBatch.from_arrays(
                    [
                        pa.array(uidx[sel].astype(np.int32)),
                        pa.array(iidx[sel].astype(np.int32)),
                        pa.array(u[sel]),
                        pa.array(i[sel]),
                        pa.array(r[sel].astype(np.float32)),
                        pa.array(ts[sel]),
                        pa.array(is_valid[sel]),
                    ],
                    schema=_train_schema(),
                )
            )
        if given:  # the given test items are interactions too: never valid negatives
            seen_pairs.add(dense(users, test_u), dense(items, test_i))
        train_entry = train_writer.close()
    finally:
        train_writer.abort()
        seen_pairs.close()
    del test_ts_by_user, test_i_by_user, valid_ts_by_user, valid_i_by_user
    if row_offset != partitions.rows:
        raise ValueError(
            f"{redact_url(source.url)}: the source changed while it was sharded "
            f"({partitions.rows} rows in pass 1, {row_offset} in pass 2)"
        )
    if not given:
        dropped_test_copies -= test_u.size  # the held-out rows themselves are not "dropped"

    # Negatives, one block of users at a time, written as they are drawn (in user order).
    # SASRec: a held-out item is never its own negative (it is not a train item otherwise).
    valid_iidx = dense(items, valid_i)
    test_iidx = dense(items, test_i)

    def holdout_batch(uidx, iidx, u_raw, i_raw, ts, negs) -> Any:
        return pa.RecordBatch.from_arrays(
            [
                pa.array(uidx.astype(np.int32)),
                pa.array(iidx.astype(np.int32)),
                pa.array(np.asarray(u_raw, np.int64)),
                pa.array(np.asarray(i_raw, np.int64)),
                pa.array(np.asarray(ts, np.int64)),
                pa.FixedSizeListArray.from_arrays(pa.array(negs.astype(np.int32).ravel()), negs.shape[1]).cast(
                    pa.list_(pa.int32())
                ),
                pa.FixedSizeListArray.from_arrays(pa.array(items[negs].ravel()), negs.shape[1]).cast(
                    pa.list_(pa.int64())
                ),
            ],
            schema=_holdout_schema(),
        )

    def in_block(uidx: np.ndarray, lo: int, hi: int) -> slice:
        a, b = np.searchsorted(uidx, [lo, hi])
        return slice(int(a), int(b))

    def with_own(keys: np.ndarray, uidx: np.ndarray, iidx: np.ndarray) -> np.ndarray:
        return np.union1d(keys, uidx * num_items + iidx) if uidx.size else keys

    splits = {"train": train_entry}
    positives_in_negatives = 0
    writers = {"valid": ShardWriter(store, "valid", _holdout_schema(), config, tmp_dir)}
    if not given:
        writers["eval"] = ShardWriter(store, "eval", _holdout_schema(), config, tmp_dir)
    try:
        block = -1
        for f in range(seen_pairs.files):
            keys = seen_pairs.read(f, num_items)
            first_user, end_user = int(seen_pairs.starts[f]), int(seen_pairs.starts[f + 1])
            for lo in range(first_user, end_user, NEGATIVE_BLOCK_USERS):
                hi = min(lo + NEGATIVE_BLOCK_USERS, end_user)
                block += 1
                a, b = np.searchsorted(keys, [lo * num_items, hi * num_items])
                block_keys = keys[a:b]
                v = in_block(valid_uidx, lo, hi)
                v_keys = with_own(block_keys, valid_uidx[v], valid_iidx[v]) if sasrec else block_keys
                negs = _sample_negatives(
                    np.random.default_rng([config.seed, 7, block]), valid_uidx[v], v_keys, num_items, k, users
                )
                writers["valid"].write_batch(
                    holdout_batch(valid_uidx[v], valid_iidx[v], valid_u[v], valid_i[v], valid_ts[v], negs)
                )
                if given:
                    continue
                t = in_block(test_uidx, lo, hi)
                t_keys = with_own(block_keys, test_uidx[t], test_iidx[t]) if sasrec else block_keys
                negs = _sample_negatives(
                    np.random.default_rng([config.seed, 9, block]), test_uidx[t], t_keys, num_items, k, users
                )
                positives_in_negatives += int((negs == test_iidx[t][:, None]).any(axis=1).sum())
                writers["eval"].write_batch(
                    holdout_batch(test_uidx[t], test_iidx[t], test_u[t], test_i[t], test_ts[t], negs)
                )
        if given:  # the given negatives, as given; rows in user order
            order = np.argsort(test_uidx, kind="stable")
            negs_list = [dense(items, given_test["negatives"][j]) for j in order]
            lengths = np.array([n.size for n in negs_list], np.int64)
            flat = np.concatenate(negs_list) if negs_list else np.zeros(0, np.int64)
            offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
            positives_in_negatives = int(
                (np.repeat(test_iidx[order], lengths) == flat).sum()
            )
            table = pa.RecordBatch.from_arrays(
                [
                    pa.array(test_uidx[order].astype(np.int32)),
                    pa.array(test_iidx[order].astype(np.int32)),
                    pa.array(np.asarray(test_u)[order]),
                    pa.array(np.asarray(test_i)[order]),
                    pa.array(np.asarray(test_ts)[order]),
                    pa.ListArray.from_arrays(offsets, pa.array(flat.astype(np.int32))),
                    pa.ListArray.from_arrays(offsets, pa.array(items[flat])),
                ],
                schema=_holdout_schema(),
            )
            writers["eval"] = ShardWriter(store, "eval", _holdout_schema(), config, tmp_dir)
            writers["eval"].write_batch(table)
        for split, writer in writers.items():
            splits[split] = writer.close()
    finally:
        for writer in writers.values():
            writer.abort()
    test_negs_k = k if not given else int(max((n.size for n in given_test["negatives"]), default=0))
    eval_items = test_iidx
    num_train_items = int((train_item_counts > 0).sum())

    files = {
        "users": write_side_file(
            store, "users.parquet", pa.table({"user_id": pa.array(users, pa.int64())}), tmp_dir
        ).to_dict(),
        "items": write_side_file(
            store,
            "items.parquet",
            pa.table(
                {
                    "item_id": pa.array(items, pa.int64()),
                    "num_train_interactions": pa.array(train_item_counts, pa.int64()),
                }
            ),
            tmp_dir,
        ).to_dict(),
    }
    stats = {
        "num_interactions": int(rows_read),
        "duplicate_interactions_removed": int(duplicate_rows.size),
        "num_users": int(num_users),
        "num_items": int(num_items),
        "num_train_items": num_train_items,
        "num_eval_items_unseen_in_train": int((train_item_counts[eval_items] == 0).sum()),
        "num_negatives": test_negs_k,
        "eval_positive_among_negatives": int(positives_in_negatives),
        "users_without_eval": int(num_users - test_u.size),
        "split_protocol": "given NCF split" if given else (
            "leave-last-two-out, 100 negatives not in train (SASRec)" if sasrec else "leave-latest-out (NCF)"),
    }
    cleaning = {
        "skipped_malformed_rows": len(source.bad_rows),
        "skipped_malformed_examples": [
            {"file": f, "line": line, "text": text[:120]} for f, line, text in source.bad_rows[:10]
        ],
        "duplicate_eval_interactions_removed_from_train": max(0, int(dropped_test_copies)),
        "duplicate_interactions_removed": int(duplicate_rows.size),
    }
    if source.bad_rows:
        log.warning(
            "skipped %d malformed rows (first: %s line %d)",
            len(source.bad_rows),
            source.bad_rows[0][0],
            source.bad_rows[0][1],
        )
    return {"splits": splits, "files": files, "stats": stats, "cleaning": cleaning}
