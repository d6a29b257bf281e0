"""The recommendation split protocol (NCF, He et al. 2017).

Each user's latest interaction (ties broken by the larger item id) is the ``eval`` positive,
ranked against ``num_negatives`` items the user never interacted with, sampled with a fixed
seed; the second-latest is the ``valid`` positive (with its own negatives) for choosing
hyper-parameters, and stays in ``train`` flagged ``is_valid`` so a trainer can leave it out.
When the source is already an NCF split its test rows and negatives are used as given.

Memory is bounded by the number of users (a few arrays of per-user state) and one block of
rows, never by the number of interactions: the raw data is streamed twice. Moved unchanged
from ``trainflow.tasks.sharding`` (sharder version 3): the same inputs give the same dataset version.
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
from trainflow.trainers.recommendation.sources import RecommendationSource

log = logging.getLogger(__name__)


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


def _latest_two(u: np.ndarray, ts: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's two latest distinct interactions by (timestamp, item id)."""
    order = np.lexsort((i, ts, u))
    u, ts, i = u[order], ts[order], i[order]
    distinct = np.r_[True, (u[1:] != u[:-1]) | (ts[1:] != ts[:-1]) | (i[1:] != i[:-1])]
    u, ts, i = u[distinct], ts[distinct], i[distinct]
    last = np.flatnonzero(np.r_[u[1:] != u[:-1], True])
    group_start = np.r_[0, last[:-1] + 1]
    second = last - 1
    keep = np.sort(np.concatenate([last, second[second >= group_start]]))
    return u[keep], ts[keep], i[keep]


class _DuplicateFinder:
    """Exact duplicate interactions (same user, item and timestamp) in bounded memory.

    Pass 1 appends every row's ``(user, item, timestamp, row number)`` to one of
    ``partitions`` temporary files chosen by user id; :meth:`finish` then sorts one
    partition at a time. In memory at once: one block of rows, then one partition
    (32 bytes x rows / partitions), and in the end the row numbers of the duplicates
    (O(duplicates)), never a set of all rows. The first occurrence in file order is kept.
    """

    _dtype = np.dtype([("u", np.int64), ("i", np.int64), ("ts", np.int64), ("row", np.int64)])

    def __init__(self, tmp_dir: str, partitions: int = 64) -> None:
        self.partitions = partitions
        self.paths = [os.path.join(tmp_dir, f"dedup-{p:03d}.bin") for p in range(partitions)]
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

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (sorted row numbers to drop, users with duplicates, their duplicate counts)."""
        drop, dup_users = [], []
        for handle, path in zip(self.handles, self.paths):
            handle.close()
            records = np.fromfile(path, self._dtype)
            os.remove(path)
            if records.size < 2:
                continue
            records = records[np.lexsort((records["row"], records["ts"], records["i"], records["u"]))]
            same = (
                (records["u"][1:] == records["u"][:-1])
                & (records["i"][1:] == records["i"][:-1])
                & (records["ts"][1:] == records["ts"][:-1])
            )
            later = np.r_[False, same]
            drop.append(records["row"][later])
            dup_users.append(records["u"][later])
        rows = np.sort(np.concatenate(drop)) if drop else np.zeros(0, np.int64)
        users, counts = np.unique(np.concatenate(dup_users) if dup_users else np.zeros(0, np.int64), return_counts=True)
        return rows, users, counts


def _sample_candidates(rng: np.random.Generator, num_items: int, counts: np.ndarray, num_negatives: int) -> list[np.ndarray]:
    """Per user, a uniform ordered sample without replacement, sized so that ``num_negatives``
    usually survive the removal of the user's own items."""
    out = []
    for count in counts.tolist():
        free = max(num_items - count, 1) / num_items
        want = min(num_items, int((num_negatives + 8) / free * 1.15) + 8)
        draws = rng.integers(0, num_items, size=int(want * 1.6) + 16)
        _, first = np.unique(draws, return_index=True)
        out.append(draws[np.sort(first)][:want])
    return out


class _NegativeSets:
    """Candidate negatives for a set of users, invalidated as interactions stream past."""

    def __init__(self, users: np.ndarray, candidates: list[np.ndarray], num_items: int) -> None:
        self.users = users
        self.num_items = num_items
        lengths = np.array([c.size for c in candidates], dtype=np.int64)
        self.offsets = np.r_[0, np.cumsum(lengths)]
        flat_items = np.concatenate(candidates) if candidates else np.zeros(0, np.int64)
        flat_users = np.repeat(users, lengths)
        keys = flat_users * num_items + flat_items
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]
        self.items = flat_items
        self.valid = np.ones(flat_items.size, dtype=bool)

    def observe(self, user_idx: np.ndarray, item_idx: np.ndarray) -> None:
        if self.sorted_keys.size == 0:
            return
        keys = user_idx.astype(np.int64) * self.num_items + item_idx
        pos = np.searchsorted(self.sorted_keys, keys)
        pos = np.minimum(pos, self.sorted_keys.size - 1)
        hit = self.sorted_keys[pos] == keys
        self.valid[self.order[pos[hit]]] = False

    def take(self, k: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The first ``k`` surviving candidates per user, and the users left short."""
        result, short = [], []
        for n in range(len(self.users)):
            lo, hi = self.offsets[n], self.offsets[n + 1]
            survivors = self.items[lo:hi][self.valid[lo:hi]]
            result.append(survivors[:k])
            if survivors.size < k:
                short.append(n)
        return result, np.asarray(short, dtype=np.int64)


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
    k = config.num_negatives

    # Pass 1: id vocabularies, interaction counts and each user's two latest interactions.
    users = np.zeros(0, np.int64)
    user_counts = np.zeros(0, np.int64)
    items = np.zeros(0, np.int64)
    item_counts = np.zeros(0, np.int64)
    top_u = top_ts = top_i = np.zeros(0, np.int64)
    rows_read = 0
    tick = time.monotonic()
    train_opener = given["train.rating"] if given else source.open_interactions
    duplicates = _DuplicateFinder(tmp_dir)
    for batch in train_opener():
        u, i, r, ts = _batch_arrays(batch)
        if not np.isfinite(r).all():
            raise ValueError(f"{redact_url(source.url)}: non-finite rating values")
        duplicates.add(u, i, ts)
        users, user_counts = _merge_vocab(users, user_counts, u)
        items, item_counts = _merge_vocab(items, item_counts, i)
        top_u, top_ts, top_i = _latest_two(np.r_[top_u, u], np.r_[top_ts, ts], np.r_[top_i, i])
        rows_read += batch.num_rows
        if time.monotonic() - tick > 10:
            log.info("pass 1: %d rows read", rows_read)
            tick = time.monotonic()
    # Exact duplicate interactions (same user, item, timestamp) are one interaction: the
    # first occurrence is kept, the others are dropped from train and from the counts.
    duplicate_rows, dup_users, dup_counts = duplicates.finish()
    if duplicate_rows.size:
        user_counts[np.searchsorted(users, dup_users)] -= dup_counts
        log.warning(
            "dropping %d exact duplicate interactions (same user, item and timestamp) from %d users; "
            "the first occurrence of each is kept",
            duplicate_rows.size,
            dup_users.size,
        )
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

    last = np.flatnonzero(np.r_[top_u[1:] != top_u[:-1], True])
    first = np.r_[0, last[:-1] + 1]
    has_two = last > first
    latest_u, latest_ts, latest_i = top_u[last], top_ts[last], top_i[last]
    second_u = top_u[last - 1][has_two]
    second_ts, second_i = top_ts[last - 1][has_two], top_i[last - 1][has_two]
    counts_by_user = dict(zip(users.tolist(), user_counts.tolist()))

    if given:
        test_u, test_ts, test_i = given_test["user"], given_test["ts"], given_test["item"]
        # Valid: the latest training interaction of users who keep another one.
        keep = np.array([counts_by_user[int(x)] >= 2 for x in latest_u], dtype=bool)
        valid_u, valid_ts, valid_i = latest_u[keep], latest_ts[keep], latest_i[keep]
    else:
        test_mask = np.array([counts_by_user[int(x)] >= 2 for x in latest_u], dtype=bool)
        test_u, test_ts, test_i = latest_u[test_mask], latest_ts[test_mask], latest_i[test_mask]
        valid_mask = np.array([counts_by_user[int(x)] >= 3 for x in second_u], dtype=bool)
        valid_u, valid_ts, valid_i = second_u[valid_mask], second_ts[valid_mask], second_i[valid_mask]

    def dense(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(vocab, ids).astype(np.int64)

    test_uidx, valid_uidx = dense(users, test_u), dense(users, valid_u)
    rng = np.random.default_rng([config.seed, 7])
    user_count_dense = user_counts
    valid_sets = _NegativeSets(
        valid_uidx, _sample_candidates(rng, num_items, user_count_dense[valid_uidx], k), num_items
    )
    test_sets = None
    if not given:
        test_sets = _NegativeSets(
            test_uidx, _sample_candidates(rng, num_items, user_count_dense[test_uidx], k), num_items
        )

    # Pass 2: train rows (test interactions removed, valid ones flagged), negatives checked.
    test_ts_by_user = np.full(num_users, np.iinfo(np.int64).min, np.int64)
    test_i_by_user = np.full(num_users, -1, np.int64)
    test_ts_by_user[test_uidx] = test_ts
    test_i_by_user[test_uidx] = test_i
    valid_ts_by_user = np.full(num_users, np.iinfo(np.int64).min, np.int64)
    valid_i_by_user = np.full(num_users, -1, np.int64)
    valid_ts_by_user[valid_uidx] = valid_ts
    valid_i_by_user[valid_uidx] = valid_i
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
            valid_sets.observe(uidx, iidx)
            if test_sets is not None:
                test_sets.observe(uidx, iidx)
            is_test = (ts == test_ts_by_user[uidx]) & (i == test_i_by_user[uidx])
            if given:
                is_test[:] = False
            else:
                dropped_test_copies += int((is_test & ~is_duplicate).sum())
            is_valid = (ts == valid_ts_by_user[uidx]) & (i == valid_i_by_user[uidx])
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
            valid_sets.observe(dense(users, test_u), dense(items, test_i))
        train_entry = train_writer.close()
    finally:
        train_writer.abort()
    if row_offset != duplicates.rows:
        raise ValueError(
            f"{redact_url(source.url)}: the source changed while it was sharded "
            f"({duplicates.rows} rows in pass 1, {row_offset} in pass 2)"
        )
    if not given:
        dropped_test_copies -= test_u.size  # the held-out rows themselves are not "dropped"

    # Negatives: the first k surviving candidates; users left short get an exact resample.
    def finish(sets: _NegativeSets) -> list[np.ndarray]:
        chosen, short = sets.take(k)
        if short.size:
            short_users = sets.users[short]
            seen: dict[int, set[int]] = {int(x): set() for x in short_users}
            for batch in train_opener():
                uidx = dense(users, batch.column("user_id").to_numpy())
                iidx = dense(items, batch.column("item_id").to_numpy())
                mask = np.isin(uidx, short_users)
                for uu, ii in zip(uidx[mask].tolist(), iidx[mask].tolist()):
                    seen[uu].add(ii)
            for uu, ii in zip(test_uidx.tolist(), dense(items, test_i).tolist()):
                if uu in seen:
                    seen[uu].add(ii)
            fallback = np.random.default_rng([config.seed, 13])
            for n in short.tolist():
                uu = int(sets.users[n])
                pool = np.setdiff1d(np.arange(num_items), np.fromiter(seen[uu], np.int64, len(seen[uu])))
                if pool.size < k:
                    raise ValueError(
                        f"user {int(users[uu])} interacted with {num_items - pool.size} of {num_items} items: "
                        f"fewer than num_negatives={k} items are left to sample"
                    )
                chosen[n] = fallback.choice(pool, size=k, replace=False)
            log.info("resampled negatives exactly for %d heavy users", short.size)
        return chosen

    valid_negs = finish(valid_sets)
    if given:
        test_negs = [dense(items, n) for n in given_test["negatives"]]
    else:
        test_negs = finish(test_sets)

    def holdout_table(u_raw, i_raw, ts, negs):
        uidx = dense(users, u_raw)
        iidx = dense(items, i_raw)
        order = np.argsort(uidx, kind="stable")
        return pa.RecordBatch.from_arrays(
            [
                pa.array(uidx[order].astype(np.int32)),
                pa.array(iidx[order].astype(np.int32)),
                pa.array(np.asarray(u_raw)[order]),
                pa.array(np.asarray(i_raw)[order]),
                pa.array(np.asarray(ts)[order]),
                pa.array([negs[j].astype(np.int32) for j in order], pa.list_(pa.int32())),
                pa.array([items[negs[j]] for j in order], pa.list_(pa.int64())),
            ],
            schema=_holdout_schema(),
        )

    splits = {"train": train_entry}
    positives_in_negatives = 0
    for split, (u_raw, i_raw, ts, negs) in {
        "valid": (valid_u, valid_i, valid_ts, valid_negs),
        "eval": (test_u, test_i, test_ts, test_negs),
    }.items():
        table = holdout_table(u_raw, i_raw, ts, negs)
        if split == "eval":
            pos = table.column("item_idx").to_numpy()
            positives_in_negatives = sum(
                int(p in set(n)) for p, n in zip(pos.tolist(), table.column("neg_item_idx").to_pylist())
            )
        with ShardWriter(store, split, _holdout_schema(), config, tmp_dir) as writer:
            writer.write_batch(table)
            splits[split] = writer.close()
    eval_items = dense(items, test_i)
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
        "num_negatives": int(k) if not given else int(max((n.size for n in test_negs), default=0)),
        "eval_positive_among_negatives": int(positives_in_negatives),
        "users_without_eval": int(num_users - test_u.size),
        "split_protocol": "given NCF split" if given else "leave-latest-out (NCF)",
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
