"""A node-local, content-addressed disk cache of shards read from a remote store (S3).

Without it, every epoch, every DataLoader worker and every rank on a node would fetch the
same shards from the object store again. With it, a shard is downloaded once per node (the
first reader takes a file lock; the others wait for it and then read the file), verified on
the way in, and memory-mapped from local disk afterwards; every read still verifies the
shard's size and checksum, so a cache file damaged on disk is noticed, dropped and fetched
again.

Files are named by the shard's sha256 (``{dir}/ab/abcdef....parquet``): versions that share a
shard share its file, and a name can never hold other content than its digest says (any
that does is caught by the verification). The cache keeps at most ``max_bytes``; when a new
shard would go past it, the least recently used files are deleted (a file still mapped by a
reader stays readable until it is unmapped).

Settings: ``TRAINFLOW_SHARD_CACHE_DIR`` (default ``$TRAINFLOW_DATA_DIR/shard-cache``) and
``TRAINFLOW_SHARD_CACHE_BYTES`` (default 20 GiB; ``0`` turns the cache off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trainflow.tasks.storage import local_file_lock

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


class ShardFileCache:
    """The cache folder ``root``, holding at most ``max_bytes`` of shards."""

    def __init__(self, root: Path | str, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.parquet"

    def get(
        self,
        sha256: str,
        size: int,
        fetch: Callable[[], pa.Buffer],
        verify: Callable[[pa.Buffer], None],
    ) -> pa.Buffer:
        """The shard ``sha256`` from the cache, fetched with ``fetch()`` when it is not there.

        ``fetch`` returns verified bytes from the store; ``verify`` raises on a buffer whose
        size or checksum is wrong. A cached file that fails ``verify`` is deleted and fetched
        again (a warning says so); an error of ``fetch`` is raised as is, and nothing is
        cached then.
        """
        path = self.path(sha256)
        data = self._verified(path, size, verify)
        if data is not None:
            return data
        with local_file_lock(path):
            data = self._verified(path, size, verify)  # another process may have fetched it
            if data is not None:
                return data
            fetched = fetch()
            self._store(path, fetched)
        self._evict(keep=path)
        return self._map(path)

    # --- internals ------------------------------------------------------------------------
    def _verified(self, path: Path, size: int, verify: Callable[[pa.Buffer], None]) -> pa.Buffer | None:
        try:
            if path.stat().st_size != size:
                raise ValueError(f"size {path.stat().st_size}, expected {size}")
            data = self._map(path)
            verify(data)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 (a damaged cache file: drop it, fetch again)
            log.warning("shard cache: %s is damaged (%s); fetching it again", path, exc)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return data

    @staticmethod
    def _map(path: Path) -> pa.Buffer:
        import pyarrow as pa

        with pa.memory_map(str(path)) as mapped:
            return mapped.read_buffer()

    def _store(self, path: Path, data: pa.Buffer) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(memoryview(data))
            os.replace(tmp, path)  # readers see the whole file or none
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _evict(self, keep: Path) -> None:
        files = []
        for entry in self.root.glob("*/*.parquet"):
            try:
                st = entry.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            files.append((st.st_mtime, st.st_size, entry))
        total = sum(size for _, size, _ in files)
        for _, size, entry in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                total -= size
                log.info("shard cache: evicted %s (%.1f MB) to stay under %.1f GB", entry.name, size / 1e6,
                         self.max_bytes / 1e9)
