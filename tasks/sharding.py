"""Raw data → versioned Parquet shards + ``_manifest.json`` (the dataset contract).

A version is ``{root}/datasets/{name}/{version}/`` where ``version`` is a content hash of
(pipeline name, source fingerprint, reader and its version, sharding config, this module's
version). Sharding the same inputs again finds the committed manifest and does nothing (a
cache hit). The manifest is written last and atomically; an interrupted run leaves no
manifest, so no reader sees the partial version, and the next run clears the leftovers and
completes it.

How raw rows become ``train`` / ``valid`` / ``eval`` shards is the pipeline's split protocol
(:attr:`trainflow.tasks.pipelines.PipelineSpec.split`), written with :class:`ShardWriter`; this module
owns the writer, the version, the cache and the commit. :func:`hash_split` is the deterministic
split by a key's hash that a pipeline without its own protocol uses.
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

from trainflow.tasks.datasets.sources import resolve_source
from trainflow.tasks.layout import dataset_dir
from trainflow.tasks.manifest import (
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
from trainflow.tasks.settings import Settings, get_settings, redact_url
from trainflow.tasks.storage import Storage, safe_name

log = logging.getLogger(__name__)

# 2: exact duplicate interactions dropped from train; 3: dictionary encoding only for strings
SHARDER_VERSION = "3"


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """How raw data becomes shards. Every field is part of the version hash.

    Attributes:
        target_shard_bytes: A shard is closed once it reaches this size (compressed).
        row_group_rows: Rows per Parquet row group (the unit of random access).
        num_negatives: Sampled negatives per held-out row, for split protocols that rank
            a positive among negatives.
        seed: Seed of the split protocol's sampling and of the within-block shuffle of rows.
        eval_fraction: Share of keys in the eval split (hash splits).
        valid_fraction: Share of keys in the valid split (hash splits).
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

    The generic path for records that need no split protocol (benchmarks, images): the
    same :class:`ShardWriter` and manifest as :func:`shard_dataset`, readable by
    :class:`trainflow.trainers.loader.ShardLoader`. ``store`` is the version folder; its version id is
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
def dataset_version(source: Any, config: ShardingConfig, split_version: str = "") -> str:
    """The content-addressed version id of sharding ``source`` with ``config`` by a split of
    ``split_version`` (the pipeline's ``PipelineSpec.split_version``; ``""``: not part of it)."""
    parts = {
        "kind": source.kind,
        "source_fingerprint": source.fingerprint,
        "reader": source.reader,
        "reader_version": source.reader_version,
        "sharder_version": SHARDER_VERSION,
        "config": dataclasses.asdict(config),
    }
    if split_version:
        parts["split_version"] = split_version
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def shard_dataset(
    source_url: str,
    pipeline: Any,
    *,
    name: str | None = None,
    config: ShardingConfig | None = None,
    settings: Settings | None = None,
    verify: str | None = None,
) -> dict[str, Any]:
    """Shard ``source_url`` into a committed dataset version, or find the one already there.

    A version already committed is verified before it is reused (see
    :func:`trainflow.tasks.manifest.verify_version`): its manifest against its own checksum, and every
    file it lists. A damaged or missing file, or a damaged manifest, is repaired: the manifest
    is removed first (no reader sees the version meanwhile), the version is rewritten from the
    source under the same version id, and the manifest is committed last.

    Args:
        source_url: See :func:`trainflow.tasks.datasets.sources.resolve_source`.
        pipeline: The pipeline's name or spec (see :mod:`trainflow.tasks.pipelines`).
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
    from trainflow.tasks.pipelines import get_pipeline

    spec = get_pipeline(pipeline)
    source = resolve_source(source_url, spec, settings)
    name = safe_name(name or source.default_name, "dataset name")
    version = dataset_version(source, config, spec.split_version)
    root = Storage.from_settings(settings)
    version_dir = dataset_dir(name, version)
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
        body = spec.split(source, store, config, tmp_dir)
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
        **({"split_version": spec.split_version} if spec.split_version else {}),
        "config": dataclasses.asdict(config),
        **body,
    }
    manifest_data["stats"]["sharding_seconds"] = round(time.monotonic() - started, 3)
    store.commit_bytes(MANIFEST_NAME, dumps(manifest_data))
    manifest = Manifest(manifest_data, store)
    log.info("%s %s", "repaired and committed" if damage else "committed", redact_url(manifest.uri))
    return {**summarize(manifest, cache_hit=False), "repaired": damage}


def split_protocol(manifest: Manifest) -> str:
    """How the dataset was split, as the gate compares it (with the dataset's name).

    Read from the manifest's stats (a split protocol records it there); for manifests written
    before their pipeline recorded it, the pipeline's :attr:`~trainflow.tasks.pipelines.PipelineSpec.split_protocol`
    describes it from their sharding config.
    """
    recorded = manifest.stats.get("split_protocol")
    if recorded:
        return str(recorded)
    from trainflow.tasks.pipelines import UnknownPipelineError, get_pipeline

    try:
        spec = get_pipeline(manifest.kind)
    except UnknownPipelineError:
        return "unknown"
    if spec.split_protocol is None:
        return "unknown"
    return spec.split_protocol(manifest.data.get("config", {}))


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


# --- the generic split ------------------------------------------------------------------------
def hash_split(key: str, config: ShardingConfig) -> str:
    """``eval``, ``valid`` or ``train`` for a row's key: a stable hash of (seed, key), no randomness;
    about ``eval_fraction`` / ``valid_fraction`` of the keys land in eval / valid."""
    value = int.from_bytes(hashlib.sha256(f"{config.seed}:{key}".encode()).digest()[:8], "big") / 2**64
    if value < config.eval_fraction:
        return "eval"
    if value < config.eval_fraction + config.valid_fraction:
        return "valid"
    return "train"


split_of = hash_split  # the name before the pipeline contract
