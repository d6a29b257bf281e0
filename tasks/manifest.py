"""Dataset manifests: the commit marker and table of contents of a dataset version.

A version lives at ``{root}/datasets/{name}/{version}/`` and holds Parquet shards per split
(``train/part-00000.parquet``...), optional side files and ``_manifest.json``, which is written
last: a version without it does not exist for readers.

Readers go through :func:`load_manifest` and :meth:`Manifest.open_shard`, which check each
shard's size and checksum against the manifest and fail with the shard's name on a mismatch.

Every shard carries two digests of its bytes. ``sha256`` is the lineage digest (what the
registry and reviewers compare); ``xxh3_128`` (xxHash3, 128 bits) is the read-time checksum:
it detects the same accidental corruption (a flipped bit, a torn or mixed-up file) at memory
speed, 10-20x faster than sha256 here, so verifying every shard on every read costs the loader
almost nothing. ``checksum="sha256"`` verifies the cryptographic digest instead, for stores
where deliberate tampering is in scope. Manifests written before ``xxh3_128`` existed are
verified with sha256.

The manifest protects itself too. Since ``checksum`` was added to it, a manifest records the
sha256 of its own canonical content and, to name what changed, a short digest of each field
(``splits.train.num_rows``, ``splits.train.shards[3]``, ``stats``...): an edit after the commit
fails :func:`load_manifest` naming the field. Every manifest, older ones included, is also
checked for internal consistency on load (a split's ``num_rows`` is the sum of its shards',
a shard's the sum of its row groups) and each shard against its own Parquet footer when it is
opened (rows and row groups), so a wrong row count never reaches a trainer. Adding the
checksum changed no dataset version id: the id hashes the inputs, not the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from trainflow.tasks.settings import Settings
from trainflow.tasks.storage import Storage, redact_url

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

from trainflow.tasks.layout import MANIFEST_NAME, manifest_path  # noqa: F401  (the store layout lives in trainflow.tasks.layout)

MANIFEST_FORMAT = "trainflow.dataset/1"
CHECKSUMS = ("auto", "xxh3_128", "sha256")


class ShardVerificationError(RuntimeError):
    """A shard is missing, or its size or checksum differs from the manifest.

    The message ends with how to recover: re-run the ``shard`` step (or ``python -m trainflow.tasks.cli
    shard``) on the same source, which verifies the committed version and rewrites it.
    """

    def __init__(self, shard_url: str, reason: str, hint: str | None = None) -> None:
        super().__init__(f"shard {shard_url}: {reason}. {hint or REPAIR_HINT}")
        self.shard_url = shard_url
        self.reason = reason


REPAIR_HINT = (
    "To repair the dataset version, re-run the DAG's shard task (or `python -m trainflow.tasks.cli shard "
    "SOURCE_URL --kind KIND`) on the same source: it verifies the committed version and rewrites "
    "it from the source under the same version id"
)


def repair_hint(data: dict[str, Any]) -> str:
    """How to repair the dataset version a manifest describes, with its own source and kind."""
    source = (data.get("source") or {}).get("url")
    if not source or not data.get("kind"):
        return REPAIR_HINT
    name = f" --name {data['name']}" if data.get("name") else ""
    return (
        "To repair the dataset version, re-run the DAG run's shard task (same params), or "
        f"`python -m trainflow.tasks.cli shard '{source}' --kind {data['kind']}{name}`: it verifies the committed "
        "version and rewrites it from the source under the same version id"
    )


class ManifestError(RuntimeError):
    """A manifest is missing, malformed, or of another format."""


class ManifestIntegrityError(ManifestError):
    """A committed manifest was changed after its commit, or contradicts itself.

    Attributes:
        fields: The fields found wrong (``splits.train.num_rows``...).
    """

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One Parquet file of a split, as the manifest lists it.

    Attributes:
        path: Path relative to the version folder (``train/part-00000.parquet``).
        num_rows: Rows in the file.
        num_bytes: File size in bytes.
        sha256: Hex sha256 of the file's bytes (lineage).
        row_groups: Rows per row group, in file order.
        xxh3_128: Hex xxh3-128 of the file's bytes (the read-time checksum); ``None`` in
            manifests written before it existed.
    """

    path: str
    num_rows: int
    num_bytes: int
    sha256: str
    row_groups: tuple[int, ...]
    xxh3_128: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardInfo:
        return cls(
            path=data["path"],
            num_rows=int(data["num_rows"]),
            num_bytes=int(data["num_bytes"]),
            sha256=data["sha256"],
            row_groups=tuple(int(n) for n in data["row_groups"]),
            xxh3_128=data.get("xxh3_128"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "path": self.path,
            "num_rows": self.num_rows,
            "num_bytes": self.num_bytes,
            "sha256": self.sha256,
            "row_groups": list(self.row_groups),
        }
        if self.xxh3_128 is not None:
            out["xxh3_128"] = self.xxh3_128
        return out


class Manifest:
    """A committed dataset version.

    Args:
        data: The parsed ``_manifest.json``.
        storage: Storage rooted at the version folder.
    """

    def __init__(self, data: dict[str, Any], storage: Storage) -> None:
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"{redact_url(storage.url(MANIFEST_NAME))}: format {data.get('format')!r}, "
                f"expected {MANIFEST_FORMAT!r}"
            )
        self.data = data
        self.storage = storage

    def _shard_error(self, url: str, reason: str) -> ShardVerificationError:
        return ShardVerificationError(url, reason, hint=repair_hint(self.data))

    # identity -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def version(self) -> str:
        return self.data["version"]

    @property
    def kind(self) -> str:
        """The name of the pipeline whose split protocol wrote this dataset."""
        return self.data["kind"]

    @property
    def uri(self) -> str:
        """URL of ``_manifest.json``."""
        return self.storage.url(MANIFEST_NAME)

    @property
    def base_url(self) -> str:
        """URL of the version folder."""
        return self.storage.url()

    @property
    def stats(self) -> dict[str, Any]:
        """Dataset-level numbers (``num_users``, ``num_items``, ``num_sequences``...)."""
        return self.data.get("stats", {})

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def num_rows(self, split: str) -> int:
        return int(self._split(split)["num_rows"])

    def schema(self, split: str) -> list[dict[str, str]]:
        """Fields of ``split`` as ``[{"name": ..., "type": ...}]``."""
        return self._split(split)["schema"]

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of ``split`` in order."""
        return [ShardInfo.from_dict(s) for s in self._split(split)["shards"]]

    def file(self, key: str) -> ShardInfo:
        """A side file (e.g. the id vocabularies) listed under ``files``."""
        try:
            return ShardInfo.from_dict(self.data["files"][key])
        except KeyError:
            raise ManifestError(f"{self.uri}: no file {key!r} in the manifest") from None

    def _split(self, split: str) -> dict[str, Any]:
        try:
            return self.data["splits"][split]
        except KeyError:
            raise ManifestError(
                f"{self.uri}: no split {split!r} (have: {', '.join(self.data['splits'])})"
            ) from None

    # reading ---------------------------------------------------------------------------
    def read_shard_bytes(self, shard: ShardInfo, checksum: str = "auto") -> bytes:
        """The verified bytes of ``shard`` (see :meth:`read_shard_buffer`)."""
        return self.read_shard_buffer(shard, checksum).to_pybytes()

    def read_shard_buffer(self, shard: ShardInfo, checksum: str = "auto") -> pa.Buffer:
        """The verified content of ``shard`` as an Arrow buffer.

        A shard in a local store is memory-mapped (the page cache is read in place, nothing is
        copied; shards are immutable once committed); from a remote store it is fetched whole,
        through the node's shard cache when the settings enable it (:mod:`trainflow.tasks.shardcache`:
        one download per node, then memory-mapped from local disk, verified on every read).

        Args:
            shard: The shard, as the manifest lists it.
            checksum: ``auto`` (xxh3-128 where the manifest has it, else sha256),
                ``xxh3_128`` or ``sha256``.

        Raises:
            ShardVerificationError: the shard is missing, or its size or checksum differ.
            ValueError: an unknown ``checksum``.
        """
        import pyarrow as pa

        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum must be one of {CHECKSUMS}, got {checksum!r}")
        url = redact_url(self.storage.url(shard.path))
        try:
            if self.storage.protocol == "file":
                try:
                    with pa.memory_map(self.storage._abs(shard.path)) as mapped:
                        data = mapped.read_buffer()
                except OSError as exc:  # pyarrow raises its own errors for a missing file
                    if not os.path.exists(self.storage._abs(shard.path)):
                        raise FileNotFoundError(url) from exc
                    raise
            else:
                settings = self.storage.settings
                if settings.shard_cache_bytes and settings.shard_cache_dir is not None:
                    from trainflow.tasks.shardcache import ShardFileCache

                    cache = ShardFileCache(settings.shard_cache_dir, settings.shard_cache_bytes)
                    return cache.get(
                        shard.sha256,
                        shard.num_bytes,
                        fetch=lambda: self._verify(shard, checksum, pa.py_buffer(self.storage.read_bytes(shard.path))),
                        verify=lambda data: self._verify(shard, checksum, data, where=f"cached copy of {url}"),
                    )
                data = pa.py_buffer(self.storage.read_bytes(shard.path))
        except FileNotFoundError:
            raise self._shard_error(url, "missing (listed in the manifest, not in the store)") from None
        return self._verify(shard, checksum, data)

    def _verify(self, shard: ShardInfo, checksum: str, data: pa.Buffer, where: str | None = None) -> pa.Buffer:
        """``data`` if its size and checksum are the manifest's, else ShardVerificationError."""
        url = where or redact_url(self.storage.url(shard.path))
        if data.size != shard.num_bytes:
            raise self._shard_error(
                url, f"size {data.size} bytes, manifest says {shard.num_bytes}: corrupt or truncated"
            )
        algorithm = checksum if checksum != "auto" else ("xxh3_128" if shard.xxh3_128 else "sha256")
        expected = shard.xxh3_128 if algorithm == "xxh3_128" else shard.sha256
        if expected is None:
            raise self._shard_error(url, "the manifest records no xxh3_128 for it (written before it existed)")
        digest = digest_buffer(data, algorithm)
        if digest != expected:
            # Whole digests: two prefixes can agree (the issue saw two equal 16-character ones).
            raise self._shard_error(url, f"{algorithm} of the bytes is {digest}, the manifest says {expected}: corrupt")
        return data

    def open_shard(self, shard: ShardInfo, checksum: str = "auto") -> pq.ParquetFile:
        """A ParquetFile over the verified bytes of ``shard``."""
        return self.parquet_file(shard, self.read_shard_buffer(shard, checksum))

    def parquet_file(self, shard: ShardInfo, data: pa.Buffer) -> pq.ParquetFile:
        """A ParquetFile over ``data`` (the verified bytes of ``shard``), its footer checked
        against the manifest: the rows and row groups a trainer counts steps by.

        Raises:
            ShardVerificationError: unreadable Parquet, or a footer that contradicts the
                manifest's ``num_rows`` / ``row_groups`` (naming the field).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        url = redact_url(self.storage.url(shard.path))
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
        except Exception as exc:  # a checksum match on an unreadable file: wrong manifest
            raise self._shard_error(url, f"not readable Parquet: {exc}") from exc
        meta = parquet.metadata
        footer_groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        if meta.num_rows != shard.num_rows:
            raise self._shard_error(
                url, f"its Parquet footer has {meta.num_rows} rows, the manifest's num_rows says {shard.num_rows}"
            )
        if footer_groups != tuple(shard.row_groups):
            raise self._shard_error(
                url, f"its Parquet footer has row groups {list(footer_groups)}, the manifest's row_groups says "
                f"{list(shard.row_groups)}"
            )
        return parquet

    def iter_batches(
        self, split: str, columns: list[str] | None = None, batch_size: int = 65536
    ) -> Iterator[pa.RecordBatch]:
        """Every row of ``split`` in shard order, as verified record batches."""
        for shard in self.shards(split):
            yield from self.open_shard(shard).iter_batches(batch_size=batch_size, columns=columns)

    def read_table(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """The whole of ``split`` as one table (for small splits: eval, valid)."""
        import pyarrow as pa

        tables = [self.open_shard(s).read(columns=columns) for s in self.shards(split)]
        if not tables:
            raise ManifestError(f"{self.uri}: split {split!r} has no shards")
        return pa.concat_tables(tables)

    def read_file_table(self, key: str) -> pa.Table:
        """A side file (Parquet) listed under ``files``, verified."""
        return self.open_shard(self.file(key)).read()


VERIFY_MODES = ("auto", "sizes", "xxh3_128", "sha256")


def verify_version(manifest: Manifest, mode: str = "auto") -> list[str]:
    """Check every file a committed version lists (shards and side files) against the manifest.

    Args:
        manifest: The version.
        mode: ``sizes`` (one listing of the version folder: each file present with its size),
            ``xxh3_128`` (sizes, then every file read and hashed: memory speed locally, a full
            download from a remote store), ``sha256`` (the full cryptographic re-hash), or
            ``auto``: ``xxh3_128`` for a local store, ``sizes`` for a remote one.

    Returns:
        One line per damaged or missing file (empty: intact).

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {mode!r}")
    if mode == "auto":
        mode = "xxh3_128" if manifest.storage.protocol == "file" else "sizes"
    entries = [shard for split in manifest.splits for shard in manifest.shards(split)]
    entries += [manifest.file(key) for key in manifest.data.get("files") or {}]
    sizes = manifest.storage.list_sizes()
    problems: list[str] = []
    for entry in entries:
        size = sizes.get(entry.path)
        if size is None:
            problems.append(f"{entry.path}: missing")
        elif size != entry.num_bytes:
            problems.append(f"{entry.path}: size {size} bytes, the manifest says {entry.num_bytes}")
        elif mode != "sizes":
            try:
                if manifest.storage.protocol == "file":
                    manifest.read_shard_buffer(entry, mode)
                else:  # the store's bytes, never a cached copy
                    import pyarrow as pa

                    manifest._verify(entry, mode, pa.py_buffer(manifest.storage.read_bytes(entry.path)))
            except ShardVerificationError as exc:
                problems.append(f"{entry.path}: {exc.reason}")
    return problems


def load_manifest(uri: str, settings: Settings | None = None) -> Manifest:
    """Load the committed manifest at ``uri`` (``.../_manifest.json`` or its folder).

    Raises:
        ManifestError: no manifest there (an uncommitted version), or an unreadable one.
    """
    base = uri[: -len(MANIFEST_NAME)].rstrip("/") if uri.endswith(MANIFEST_NAME) else uri.rstrip("/")
    storage = Storage(base, settings)
    try:
        raw = storage.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise ManifestError(
            f"no committed dataset at {redact_url(base)}: {MANIFEST_NAME} is missing "
            "(the version does not exist or its sharding never finished)"
        ) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{redact_url(storage.url(MANIFEST_NAME))} is not valid JSON: {exc}") from exc
    manifest = Manifest(data, storage)
    check_integrity(data, redact_url(manifest.uri))
    return manifest


# --- the manifest's own integrity ---------------------------------------------------------
CHECKSUM_KEY = "checksum"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _field_digests(data: dict[str, Any]) -> dict[str, str]:
    """A short sha256 of each field, fine enough to name what changed."""
    out: dict[str, str] = {}

    def put(path: str, value: Any) -> None:
        out[path] = hashlib.sha256(_canonical(value)).hexdigest()[:16]

    for key, value in data.items():
        if key == CHECKSUM_KEY:
            continue
        if key == "splits" and isinstance(value, dict):
            for split, entry in value.items():
                for field, item in (entry.items() if isinstance(entry, dict) else [("", entry)]):
                    if field == "shards" and isinstance(item, list):
                        put(f"splits.{split}.shards", len(item))
                        for n, shard in enumerate(item):
                            put(f"splits.{split}.shards[{n}]", shard)
                    else:
                        put(f"splits.{split}.{field}".rstrip("."), item)
        elif key == "files" and isinstance(value, dict):
            for name, entry in value.items():
                put(f"files.{name}", entry)
        else:
            put(key, value)
    return out


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its checksum: the sha256 of its canonical JSON and a digest per field."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    return {
        **body,
        CHECKSUM_KEY: {
            "algorithm": "sha256",
            "content": hashlib.sha256(_canonical(body)).hexdigest(),
            "fields": _field_digests(body),
        },
    }


def check_integrity(data: dict[str, Any], where: str) -> None:
    """Check a loaded manifest against its own checksum (when it has one) and for consistency.

    Consistency holds for manifests of every age: a split's ``num_rows`` and ``num_bytes`` are
    the sums of its shards', a shard's ``num_rows`` the sum of its ``row_groups``.

    Raises:
        ManifestIntegrityError: naming each field found wrong and what it should be.
    """
    problems: list[str] = []
    fields: list[str] = []
    for split, entry in (data.get("splits") or {}).items():
        shards = entry.get("shards") or []
        for n, shard in enumerate(shards):
            groups = sum(int(g) for g in shard.get("row_groups", []))
            if int(shard.get("num_rows", -1)) != groups:
                fields.append(f"splits.{split}.shards[{n}].num_rows")
                problems.append(
                    f"splits.{split}.shards[{n}].num_rows is {shard.get('num_rows')}, its row_groups sum to {groups}"
                )
        for field in ("num_rows", "num_bytes"):
            total = sum(int(s.get(field, 0)) for s in shards)
            if field in entry and int(entry[field]) != total:
                fields.append(f"splits.{split}.{field}")
                problems.append(f"splits.{split}.{field} is {entry[field]}, its shards' {field} sum to {total}")
    for name, entry in (data.get("files") or {}).items():
        groups = sum(int(g) for g in entry.get("row_groups", []))
        if "num_rows" in entry and int(entry["num_rows"]) != groups:
            fields.append(f"files.{name}.num_rows")
            problems.append(f"files.{name}.num_rows is {entry['num_rows']}, its row_groups sum to {groups}")
    recorded = data.get(CHECKSUM_KEY)
    if recorded is not None:
        body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
        content = hashlib.sha256(_canonical(body)).hexdigest()
        if not isinstance(recorded, dict) or content != recorded.get("content"):
            expected = recorded.get("fields", {}) if isinstance(recorded, dict) else {}
            actual = _field_digests(body)
            changed = sorted(
                (k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k)),
                key=lambda k: (k.count("["), k),
            )
            fields.extend(k for k in changed if k not in fields)
            problems.append(
                f"content sha256 is {content}, the manifest's checksum says "
                f"{recorded.get('content') if isinstance(recorded, dict) else recorded!r}; "
                f"changed: {', '.join(changed) or 'the checksum itself'}"
            )
    if problems:
        raise ManifestIntegrityError(
            f"{where} was changed after it was committed or contradicts itself: {'; '.join(problems)}. "
            f"{repair_hint(data)}",
            fields,
        )


def digest_buffer(data, algorithm: str) -> str:
    """Hex digest of ``data`` (bytes or any buffer) with ``xxh3_128`` or ``sha256``."""
    view = memoryview(data)
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128_hexdigest(view)
    return hashlib.sha256(view).hexdigest()


def dumps(data: dict[str, Any]) -> bytes:
    """The committed form of a manifest: ``data`` sealed with its checksum (:func:`seal`)."""
    return (json.dumps(seal(data), indent=2, sort_keys=False) + "\n").encode()

