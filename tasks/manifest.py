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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tasks.settings import Settings
from tasks.storage import Storage, redact_url

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

from tasks.layout import MANIFEST_NAME, manifest_path  # noqa: F401  (the store layout lives in tasks.layout)

MANIFEST_FORMAT = "trainflow.dataset/1"
CHECKSUMS = ("auto", "xxh3_128", "sha256")


class ShardVerificationError(RuntimeError):
    """A shard is missing, or its size or checksum differs from the manifest."""

    def __init__(self, shard_url: str, reason: str) -> None:
        super().__init__(f"shard {shard_url}: {reason}")
        self.shard_url = shard_url
        self.reason = reason


class ManifestError(RuntimeError):
    """A manifest is missing, malformed, or of another format."""


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
        through the node's shard cache when the settings enable it (:mod:`tasks.shardcache`:
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
                    from tasks.shardcache import ShardFileCache

                    cache = ShardFileCache(settings.shard_cache_dir, settings.shard_cache_bytes)
                    return cache.get(
                        shard.sha256,
                        shard.num_bytes,
                        fetch=lambda: self._verify(shard, checksum, pa.py_buffer(self.storage.read_bytes(shard.path))),
                        verify=lambda data: self._verify(shard, checksum, data, where=f"cached copy of {url}"),
                    )
                data = pa.py_buffer(self.storage.read_bytes(shard.path))
        except FileNotFoundError:
            raise ShardVerificationError(url, "missing (listed in the manifest, not in the store)") from None
        return self._verify(shard, checksum, data)

    def _verify(self, shard: ShardInfo, checksum: str, data: pa.Buffer, where: str | None = None) -> pa.Buffer:
        """``data`` if its size and checksum are the manifest's, else ShardVerificationError."""
        url = where or redact_url(self.storage.url(shard.path))
        if data.size != shard.num_bytes:
            raise ShardVerificationError(
                url, f"size {data.size} bytes, manifest says {shard.num_bytes}: corrupt or truncated"
            )
        algorithm = checksum if checksum != "auto" else ("xxh3_128" if shard.xxh3_128 else "sha256")
        expected = shard.xxh3_128 if algorithm == "xxh3_128" else shard.sha256
        if expected is None:
            raise ShardVerificationError(url, "the manifest records no xxh3_128 for it (written before it existed)")
        digest = digest_buffer(data, algorithm)
        if digest != expected:
            raise ShardVerificationError(url, f"{algorithm} {digest[:16]}..., manifest says {expected[:16]}...: corrupt")
        return data

    def open_shard(self, shard: ShardInfo, checksum: str = "auto") -> pq.ParquetFile:
        """A ParquetFile over the verified bytes of ``shard``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self.read_shard_buffer(shard, checksum)
        try:
            return pq.ParquetFile(pa.BufferReader(data))
        except Exception as exc:  # a checksum match on an unreadable file: wrong manifest
            raise ShardVerificationError(redact_url(self.storage.url(shard.path)), f"not readable Parquet: {exc}") from exc

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
    return Manifest(data, storage)


def digest_buffer(data, algorithm: str) -> str:
    """Hex digest of ``data`` (bytes or any buffer) with ``xxh3_128`` or ``sha256``."""
    view = memoryview(data)
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128_hexdigest(view)
    return hashlib.sha256(view).hexdigest()


def dumps(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()

