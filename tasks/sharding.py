"""Raw data → versioned Parquet shards + ``_manifest.json`` (the dataset contract).

A version is ``{root}/datasets/{name}/{version}/`` where ``version`` is a content hash of
(source fingerprint, reader and its version, sharding config, this module's version).
Sharding the same inputs again finds the committed manifest and does nothing (a cache hit).
The manifest is written last and atomically; an interrupted run leaves no manifest, so no
reader sees the partial version, and the next run clears the leftovers and completes it.

Recommendation (NCF protocol, He et al. 2017): each user's latest interaction (ties broken
by the larger item id) is the ``eval`` positive, ranked against ``num_negatives`` items the
user never interacted with, sampled with a fixed seed; the second-latest is the ``valid``
positive (with its own negatives) for choosing hyper-parameters, and stays in ``train``
flagged ``is_valid`` so a trainer can leave it out. When the source is already an NCF split
its test rows and negatives are used as given.

Driving: one row per scenario; ``eval``, ``valid`` and ``train`` are assigned by a hash of
the scenario id, so the split is deterministic and the eval set is never trained on.

Memory is bounded by the number of users (a few arrays of per-user state) and one block of
rows, never by the number of interactions: the raw data is streamed twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from tasks.datasets import argoverse
from tasks.datasets.sources import DrivingSource, RecommendationSource, resolve_source
from tasks.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    digest_buffer,
    dumps,
    load_manifest,
    verify_version,
)
from tasks.settings import Settings, get_settings, redact_url
from tasks.storage import Storage, safe_name

log = logging.getLogger(__name__)

# 2: exact duplicate interactions dropped from train; 3: dictionary encoding only for strings
SHARDER_VERSION = "3"


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """How raw data becomes shards. Every field is part of the version hash.

    Attributes:
        target_shard_bytes: A shard is closed once it reaches this size (compressed).
        row_group_rows: Rows per Parquet row group (the unit of random access).
        num_negatives: Sampled negatives per eval/valid user (recommendation).
        seed: Seed of negative sampling and of the within-block shuffle of train rows.
        eval_fraction: Share of scenarios in the eval split (driving).
        valid_fraction: Share of scenarios in the valid split (driving).
        compression: Parquet codec.
    """

    target_shard_bytes: int = 128 << 20
    row_group_rows: int = 32768
    num_negatives: int = 99
    seed: int = 0
    eval_fraction: float = 0.2
    valid_fraction: float = 0.1
    compression: str = "zstd"

    def __post_init__(self) -> None:
        if self.target_shard_bytes < 1024:
            raise ValueError(f"target_shard_bytes must be at least 1024, got {self.target_shard_bytes}")
        if self.row_group_rows < 1:
            raise ValueError(f"row_group_rows must be at least 1, got {self.row_group_rows}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}")
        if not (0 < self.eval_fraction < 1 and 0 <= self.valid_fraction < 1):
            raise ValueError(
                f"eval_fraction must be in (0, 1) and valid_fraction in [0, 1), got "
                f"{self.eval_fraction} and {self.valid_fraction}"
            )
        if self.eval_fraction + self.valid_fraction >= 1:
            raise ValueError("eval_fraction + valid_fraction must leave rows for train")
        if self.compression not in ("zstd", "snappy", "gzip", "lz4", "none"):
            raise ValueError(f"compression must be zstd, snappy, gzip, lz4 or none, got {self.compression!r}")


# --- shard writing -----------------------------------------------------------------------
class ShardWriter:
    """Writes one split as ``{split}/part-NNNNN.parquet`` files of about ``target_bytes``.

    Rows are buffered up to one row group and encoded by pyarrow straight into a local
    temporary file; when the file reaches the target size it is closed and *finished* on a
    background thread (its sha256 and xxh3-128 computed from the page cache, then moved into
    a local store or uploaded) while the next shard is being encoded. Memory stays at one row
    group plus what the page cache holds; at most ``_IN_FLIGHT`` finished-but-not-published
    shards wait on local disk.
    """

    _IN_FLIGHT = 2

    def __init__(self, storage: Storage, split: str, schema, config: ShardingConfig, tmp_dir: str) -> None:
        self.storage = storage
        self.split = split
        self.schema = schema
        self.config = config
        self.tmp_dir = tmp_dir
        self.shards: list[ShardInfo] = []
        self._pending: list = []
        self._pending_rows = 0
        self._writer = None
        self._sink = None
        self._tmp_path: str | None = None
        self._num_shards = 0
        self._finishing: collections.deque = collections.deque()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def write_batch(self, batch) -> None:
        if batch.num_rows == 0:
            return
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.config.row_group_rows:
            self._flush_row_group(self.config.row_group_rows)

    def _flush_row_group(self, rows: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_batches(self._pending, schema=self.schema)
        head, tail = table.slice(0, rows), table.slice(rows)
        self._pending = tail.to_batches() if tail.num_rows else []
        self._pending_rows = tail.num_rows
        if self._writer is None:
            fd, self._tmp_path = tempfile.mkstemp(suffix=".parquet", dir=self.tmp_dir)
            os.close(fd)
            compression = None if self.config.compression == "none" else self.config.compression
            # Dictionaries only for strings: numbers (ids, timestamps) wrote 1.7x faster and 30%
            # smaller with zstd without them (5M interactions: 0.30 s / 24.5 MB vs 0.50 s /
            # 34.8 MB), and large binary values (images) gain nothing from dictionaries or
            # min/max statistics, which cost more than the rest of the write
            # (benchmarks/sharding_write.py, docs/benchmarks.md).
            dictionary = [f.name for f in self.schema if _wants_dictionary(f.type)]
            statistics = [f.name for f in self.schema if not _is_blob(f.type)]
            self._sink = pa.OSFile(self._tmp_path, "wb")
            self._writer = pq.ParquetWriter(
                self._sink,
                self.schema,
                compression=compression,
                use_dictionary=dictionary,
                write_statistics=statistics,
            )
            self._row_groups = []
        self._writer.write_table(head, row_group_size=rows)
        self._row_groups.append(head.num_rows)
        if self._sink.tell() >= self.config.target_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        size = self._sink.tell()
        self._sink.close()
        path = f"{self.split}/part-{self._num_shards:05d}.parquet"
        self._num_shards += 1
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"shard-{self.split}")
        job = self._pool.submit(self._finish, self._tmp_path, path, size, tuple(self._row_groups))
        self._tmp_path = None
        self._finishing.append(job)
        while len(self._finishing) > self._IN_FLIGHT or (self._finishing and self._finishing[0].done()):
            self.shards.append(self._finishing.popleft().result())

    def _finish(self, tmp_path: str, path: str, size: int, row_groups: tuple[int, ...]) -> ShardInfo:
        """Hash a closed shard file and publish it (runs on the writer's background thread)."""
        import pyarrow as pa

        try:
            if os.path.getsize(tmp_path) != size:
                raise RuntimeError(f"shard {path}: wrote {size} bytes, the file has {os.path.getsize(tmp_path)}")
            with pa.memory_map(tmp_path) as mapped:  # the pages just written, from the page cache
                data = mapped.read_buffer()
                info = ShardInfo(
                    path=path,
                    num_rows=sum(row_groups),
                    num_bytes=size,
                    sha256=digest_buffer(data, "sha256"),
                    row_groups=row_groups,
                    xxh3_128=digest_buffer(data, "xxh3_128"),
                )
                del data
            if self.storage.protocol == "file":  # a local store: move the file rather than copy it
                target = self.storage._abs(path)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(tmp_path, target)
            else:
                self.storage.put_file(tmp_path, path)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        log.info("wrote %s: %d rows, %.1f MB", path, info.num_rows, info.num_bytes / 1e6)
        return info

    def close(self) -> dict[str, Any]:
        """Flush and upload what is left; returns the split's manifest entry."""
        try:
            if self._pending_rows:
                self._flush_row_group(self._pending_rows)
            self._close_shard()
            while self._finishing:
                self.shards.append(self._finishing.popleft().result())
        finally:
            self.abort()
        return {
            "num_rows": sum(s.num_rows for s in self.shards),
            "num_bytes": sum(s.num_bytes for s in self.shards),
            "schema": schema_fields(self.schema),
            "shards": [s.to_dict() for s in self.shards],
        }

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def abort(self) -> None:
        """Stop the background thread after the shards it holds (used on failure; idempotent)."""
        if self._writer is not None:
            try:
                self._writer.close()
                self._sink.close()
            except Exception:  # noqa: BLE001 (already failing: leave the temporary file to the caller's folder)
                pass
            self._writer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _wants_dictionary(typ) -> bool:
    import pyarrow as pa

    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return _wants_dictionary(typ.value_type)
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_dictionary(typ)


def _is_blob(typ) -> bool:
    import pyarrow as pa

    return pa.types.is_fixed_size_binary(typ) or pa.types.is_binary(typ) or pa.types.is_large_binary(typ)


def schema_fields(schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def write_side_file(storage: Storage, path: str, table, tmp_dir: str) -> ShardInfo:
    """Write a small Parquet table (e.g. an id vocabulary) and describe it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fd, tmp = tempfile.mkstemp(suffix=".parquet", dir=tmp_dir)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as handle:
            data = handle.read()
        storage.write_bytes(path, data)
    finally:
        os.remove(tmp)
    meta = pq.read_metadata(pa.BufferReader(data))
    return ShardInfo(
        path=path,
        num_rows=meta.num_rows,
        num_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        row_groups=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
        xxh3_128=digest_buffer(data, "xxh3_128"),
    )


def shard_batches(
    batches,
    schema,
    store: Storage,
    *,
    name: str,
    kind: str,
    split: str = "train",
    config: ShardingConfig | None = None,
    stats: dict[str, Any] | None = None,
) -> Manifest:
    """Write record batches of ``schema`` as one split and commit a manifest in ``store``.

    The generic path for records that need no per-kind protocol (benchmarks, images): the
    same :class:`ShardWriter` and manifest as :func:`shard_dataset`, readable by
    :class:`trainers.loader.ShardLoader`. ``store`` is the version folder; its version id is
    its last path component.

    Raises:
        ValueError: a batch whose schema differs from ``schema`` (the field is named).
    """
    config = config or ShardingConfig()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trainflow-shard-") as tmp_dir:
        with ShardWriter(store, split, schema, config, tmp_dir) as writer:
            for batch in batches:
                if not batch.schema.equals(schema):
                    theirs = {f.name: str(f.type) for f in batch.schema}
                    mine = {f.name: str(f.type) for f in schema}
                    bad = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
                    raise ValueError(f"batch schema differs from the dataset schema in field(s) {bad}")
                writer.write_batch(batch)
            entry = writer.close()
    data = {
        "format": MANIFEST_FORMAT,
        "name": safe_name(name, "dataset name"),
        "version": store.url().rstrip("/").rsplit("/", 1)[-1],
        "kind": kind,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "sharder_version": SHARDER_VERSION,
        "config": dataclasses.asdict(config),
        "splits": {split: entry},
        "stats": {**(stats or {}), "sharding_seconds": round(time.monotonic() - started, 3)},
    }
    store.commit_bytes(MANIFEST_NAME, dumps(data))
    return Manifest(data, store)


# --- entry point -------------------------------------------------------------------------
def dataset_version(source: RecommendationSource | DrivingSource, config: ShardingConfig) -> str:
    """The content-addressed version id of sharding ``source`` with ``config``."""
    parts = {
        "kind": source.kind,
        "source_fingerprint": source.fingerprint,
        "reader": source.reader,
        "reader_version": source.reader_version,
        "sharder_version": SHARDER_VERSION,
        "config": dataclasses.asdict(config),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def shard_dataset(
    source_url: str,
    kind: str,
    *,
    name: str | None = None,
    config: ShardingConfig | None = None,
    settings: Settings | None = None,
    verify: str | None = None,
) -> dict[str, Any]:
    """Shard ``source_url`` into a committed dataset version, or find the one already there.

    A version already committed is verified before it is reused (see
    :func:`tasks.manifest.verify_version`): its manifest against its own checksum, and every
    file it lists. A damaged or missing file, or a damaged manifest, is repaired: the manifest
    is removed first (no reader sees the version meanwhile), the version is rewritten from the
    source under the same version id, and the manifest is committed last.

    Args:
        source_url: See :func:`tasks.datasets.sources.resolve_source`.
        kind: ``recommendation`` or ``driving``.
        name: Dataset name (a safe path component); default: derived from the source.
        config: Sharding config (default: :class:`ShardingConfig`).
        settings: Storage root and credentials (default: from the environment).
        verify: How a committed version is checked before reuse: ``auto`` (sizes and xxh3-128
            for a local store, sizes for a remote one), ``sizes``, ``xxh3_128``, ``sha256``
            (the full re-hash); default the setting ``TRAINFLOW_SHARD_VERIFY`` (``auto``).

    Returns:
        JSON-able summary: ``manifest_uri``, ``name``, ``version``, ``cache_hit``,
        ``repaired`` (the damage found and repaired, or an empty list), per-split
        ``num_rows``, and ``stats``.
    """
    settings = settings or get_settings()
    config = config or ShardingConfig()
    source = resolve_source(source_url, kind, settings)
    name = safe_name(name or source.default_name, "dataset name")
    version = dataset_version(source, config)
    root = Storage.from_settings(settings)
    version_dir = f"datasets/{name}/{version}"
    store = root.child(version_dir)
    verify = verify or settings.shard_verify
    damage: list[str] = []
    if store.exists(MANIFEST_NAME):
        try:
            manifest = load_manifest(store.url(MANIFEST_NAME), settings)
            damage = verify_version(manifest, verify)
        except ManifestError as exc:
            damage = [f"{MANIFEST_NAME}: {exc}"]
        if not damage:
            log.info(
                "cache hit: dataset %s version %s is already committed at %s and verified (%s); nothing to do",
                name,
                version,
                redact_url(manifest.uri),
                verify,
            )
            return summarize(manifest, cache_hit=True)
        log.warning(
            "dataset %s version %s is damaged (%d problem(s): %s); repairing it: rewriting it from the "
            "source under the same version id, the manifest committed last",
            name,
            version,
            len(damage),
            "; ".join(damage[:5]),
        )
        store.delete(MANIFEST_NAME)  # uncommitted first: no reader uses the version while it is rewritten
    leftovers = store.list(recursive=True)
    if leftovers:
        if not damage:
            log.warning(
                "dataset %s version %s: removing %d files left by an interrupted run", name, version, len(leftovers)
            )
        for path in leftovers:
            store.delete(path)
    log.info(
        "sharding %s (%s) into %s (version %s)",
        redact_url(source.url),
        source.reader,
        redact_url(store.url()),
        version,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trainflow-shard-") as tmp_dir:
        if isinstance(source, RecommendationSource):
            body = _shard_recommendation(source, store, config, tmp_dir)
        else:
            body = _shard_driving(source, store, config, tmp_dir)
    manifest_data = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "kind": source.kind,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "source": {
            "url": redact_url(source.url),
            "fingerprint": source.fingerprint,
            "reader": source.reader,
            "reader_version": source.reader_version,
        },
        "sharder_version": SHARDER_VERSION,
        "config": dataclasses.asdict(config),
        **body,
    }
    manifest_data["stats"]["sharding_seconds"] = round(time.monotonic() - started, 3)
    store.commit_bytes(MANIFEST_NAME, dumps(manifest_data))
    manifest = Manifest(manifest_data, store)
    log.info("%s %s", "repaired and committed" if damage else "committed", redact_url(manifest.uri))
    return {**summarize(manifest, cache_hit=False), "repaired": damage}


def _driving_split_protocol(config: dict[str, Any]) -> str:
    return (
        f"scenario hash split (eval {config.get('eval_fraction')}, valid {config.get('valid_fraction')}, "
        f"seed {config.get('seed')})"
    )


def split_protocol(manifest: Manifest) -> str:
    """How the dataset was split, as the gate compares it (with the dataset's name).

    Read from the manifest's stats; manifests written before driving recorded it get the
    same description from their sharding config.
    """
    recorded = manifest.stats.get("split_protocol")
    if recorded:
        return str(recorded)
    return _driving_split_protocol(manifest.data.get("config", {})) if manifest.kind == "driving" else "unknown"


def summarize(manifest: Manifest, cache_hit: bool) -> dict[str, Any]:
    """The small JSON an Airflow task returns for a dataset version."""
    return {
        "manifest_uri": redact_url(manifest.uri),
        "name": manifest.name,
        "version": manifest.version,
        "kind": manifest.kind,
        "cache_hit": cache_hit,
        "repaired": [],
        "split_protocol": split_protocol(manifest),
        "splits": {split: manifest.num_rows(split) for split in manifest.splits},
        "stats": manifest.stats,
    }


# --- recommendation ----------------------------------------------------------------------
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


def _shard_recommendation(
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


# --- driving -------------------------------------------------------------------------------
def split_of(seq_id: str, config: ShardingConfig) -> str:
    """``eval``, ``valid`` or ``train`` for a scenario id: a stable hash, no randomness."""
    value = int.from_bytes(hashlib.sha256(f"{config.seed}:{seq_id}".encode()).digest()[:8], "big") / 2**64
    if value < config.eval_fraction:
        return "eval"
    if value < config.eval_fraction + config.valid_fraction:
        return "valid"
    return "train"


def _shard_driving(source: DrivingSource, store: Storage, config: ShardingConfig, tmp_dir: str) -> dict[str, Any]:
    schema = argoverse.sequence_schema()
    writers = {split: ShardWriter(store, split, schema, config, tmp_dir) for split in ("train", "valid", "eval")}
    try:
        buffers: dict[str, list[dict[str, Any]]] = {split: [] for split in writers}
        rejected: dict[str, int] = {}
        examples: list[str] = []
        cities: dict[str, int] = {}
        tracks = 0
        done = 0
        tick = time.monotonic()
        flush_rows = min(config.row_group_rows, 256)
        for record in source.open_records():
            done += 1
            if isinstance(record, argoverse.SequenceRejected):
                rejected[record.reason] = rejected.get(record.reason, 0) + 1
                if len(examples) < 10:
                    examples.append(str(record))
                continue
            split = split_of(record["seq_id"], config)
            buffers[split].append(record)
            cities[record["city"]] = cities.get(record["city"], 0) + 1
            tracks += int(record["tracks_xy"].shape[0])
            if len(buffers[split]) >= flush_rows:
                writers[split].write_batch(argoverse.records_to_batch(buffers[split]))
                buffers[split] = []
            if time.monotonic() - tick > 10:
                log.info("read %d of %d scenarios", done, source.num_sequences)
                tick = time.monotonic()
        splits = {}
        for split, writer in writers.items():
            if buffers[split]:
                writer.write_batch(argoverse.records_to_batch(buffers[split]))
            splits[split] = writer.close()
    finally:
        for writer in writers.values():
            writer.abort()
    kept = sum(entry["num_rows"] for entry in splits.values())
    if kept == 0:
        raise ValueError(f"{redact_url(source.url)}: no usable scenario (rejected: {rejected})")
    if rejected:
        log.warning("rejected %d scenarios: %s (first: %s)", sum(rejected.values()), rejected, examples[0])
    for split, entry in splits.items():
        if entry["num_rows"] == 0:
            log.warning("split %s is empty: too few scenarios for the configured fractions", split)
    stats = {
        "split_protocol": _driving_split_protocol(dataclasses.asdict(config)),
        "num_sequences": kept,
        "num_tracks": tracks,
        "num_frames": argoverse.NUM_FRAMES,
        "frame_rate_hz": 10,
        "cities": cities,
    }
    cleaning = {"rejected_sequences": rejected, "rejected_examples": examples}
    return {"splits": splits, "files": {}, "stats": stats, "cleaning": cleaning}
