"""Dataset manifests: the commit marker and table of contents of a dataset version.

A version lives at ``{root}/datasets/{name}/{version}/`` and holds Parquet shards per split
(``train/part-00000.parquet``...), optional side files and ``_manifest.json``, which is written
last: a version without it does not exist for readers.

Readers go through :func:`load_manifest` and :meth:`Manifest.read_shard`, which check each
shard's size and sha256 against the manifest and fail with the shard's name on a mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tasks.settings import Settings
from tasks.storage import Storage, redact_url

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "trainflow.dataset/1"


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
        sha256: Hex digest of the file's bytes.
        row_groups: Rows per row group, in file order.
    """

    path: str
    num_rows: int
    num_bytes: int
    sha256: str
    row_groups: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardInfo:
        return cls(
            path=data["path"],
            num_rows=int(data["num_rows"]),
            num_bytes=int(data["num_bytes"]),
            sha256=data["sha256"],
            row_groups=tuple(int(n) for n in data["row_groups"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "num_rows": self.num_rows,
            "num_bytes": self.num_bytes,
            "sha256": self.sha256,
            "row_groups": list(self.row_groups),
        }


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
        """``recommendation`` or ``driving``."""
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
    def read_shard_bytes(self, shard: ShardInfo) -> bytes:
        """The verified bytes of ``shard``.

        Raises:
            ShardVerificationError: the shard is missing, or its size or sha256 differ.
        """
        url = redact_url(self.storage.url(shard.path))
        try:
            data = self.storage.read_bytes(shard.path)
        except FileNotFoundError:
            raise ShardVerificationError(url, "missing (listed in the manifest, not in the store)") from None
        if len(data) != shard.num_bytes:
            raise ShardVerificationError(
                url, f"size {len(data)} bytes, manifest says {shard.num_bytes}: corrupt or truncated"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ShardVerificationError(url, f"sha256 {digest[:16]}..., manifest says {shard.sha256[:16]}...: corrupt")
        return data

    def open_shard(self, shard: ShardInfo) -> pq.ParquetFile:
        """A ParquetFile over the verified bytes of ``shard``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self.read_shard_bytes(shard)
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


def manifest_path(name: str, version: str) -> str:
    """Path of a version's manifest relative to the storage root."""
    return f"datasets/{name}/{version}/{MANIFEST_NAME}"


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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_info_for(path: str, data: bytes) -> ShardInfo:
    """Describe a Parquet file about to be written at ``path`` with content ``data``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    return ShardInfo(
        path=path,
        num_rows=meta.num_rows,
        num_bytes=len(data),
        sha256=sha256_bytes(data),
        row_groups=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
    )


def dumps(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()

