"""Object storage behind one module: the same operations on ``file://`` and ``s3://``.

Every path handed to :class:`Storage` is relative to its root URL (``{root}`` in the design
page) and is checked so that it can never escape it. fsspec is imported lazily, so importing
this module costs nothing at DAG parse time.

Semantics that hold for both backends:

* ``write_bytes`` / ``commit_bytes`` create parent "folders" as needed.
* ``commit_bytes`` is atomic: readers see the old object or the whole new one, never a part
  (a local write goes to a temporary file and is renamed; an S3 PUT is atomic by itself).
* ``list`` returns relative paths, sorted; a missing prefix lists as empty.
* ``delete`` of a missing path is not an error.
* Listings are never cached, so a file written by another process is seen at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from trainflow.tasks.settings import Settings, get_settings, redact_text, redact_url, url_has_credentials

if TYPE_CHECKING:
    import fsspec

log = logging.getLogger(__name__)

_SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:+=@,-]*$")


class StorageError(RuntimeError):
    """An object-store operation failed; the message names the URL (without secrets)."""


class StorageUnavailableError(StorageError):
    """The object store could not be reached after the configured retries."""


class CredentialsInUrlError(ValueError):
    """A URL carries credentials (``s3://KEY:SECRET@bucket``): refused before any library sees
    it, since libraries print the URL in their errors. Bad input: never retried."""


class StorageCredentialsError(StorageError, ValueError):
    """No credentials were found for an S3 URL (or they were refused): a configuration
    error, so it is bad input (a ``ValueError``) that no retry can fix."""


CREDENTIALS_HINT = (
    "give S3 credentials through the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "or AWS_PROFILE / an instance role) or, under Airflow, the connection named by "
    "TRAINFLOW_AWS_CONN_ID (default aws_default: login = access key id, password = secret key)"
)


def refuse_credentials_in_url(url: str, what: str = "URL") -> None:
    """Raise :class:`CredentialsInUrlError` (showing the URL masked) if ``url`` carries any."""
    if url_has_credentials(url):
        raise CredentialsInUrlError(
            f"{what} {redact_url(url)} carries credentials: refused, as a library would print them "
            f"in its errors and logs; remove them from the URL and {CREDENTIALS_HINT}"
        )


def safe_name(value: str, field: str = "name") -> str:
    """Check that ``value`` is usable as one path component under the storage root.

    Args:
        value: A dataset name, version, DAG id or run id.
        field: What the value is, for the error message.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: if the value is empty, absolute, contains a separator or ``..``, or
            characters outside ``[A-Za-z0-9._:+=@,-]``.
    """
    if not isinstance(value, str) or not _SAFE_PART.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{field} {value!r} is not a safe path component: use letters, digits and "
            "'._:+=@,-', start with a letter, digit or '_', and no '..'"
        )
    return value


def _clean_relpath(path: str) -> str:
    if path in ("", "."):
        return ""
    if path.startswith("/") or "\\" in path or "://" in path:
        raise ValueError(f"path {path!r} must be relative to the storage root")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"path {path!r} may not contain '..'")
    return "/".join(parts)


def split_url(url: str) -> tuple[str, str]:
    """Split ``url`` into (protocol, path as fsspec wants it)."""
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    protocol, rest = url.split("://", 1)
    if protocol == "file":
        return "file", "/" + rest.lstrip("/")
    if protocol == "s3a":
        protocol = "s3"
    return protocol, rest.rstrip("/")


def filesystem(url: str, settings: Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it.

    S3 gets the credentials, endpoint and retry policy of ``settings`` and no listings cache.
    """
    import fsspec

    refuse_credentials_in_url(url)
    settings = settings or get_settings()
    protocol, path = split_url(url)
    options: dict[str, Any] = dict(settings.storage_options(url))
    if protocol == "file":
        options["auto_mkdir"] = True
    elif protocol == "s3":
        options["use_listings_cache"] = False
    return fsspec.filesystem(protocol, **options), path


@contextlib.contextmanager
def local_file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``{path}.lock`` (its folder created), for processes of one node."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Storage:
    """Files under one root URL.

    Args:
        root_url: ``file:///abs/path``, a plain local path, or ``s3://bucket/prefix``.
        settings: Credentials and retry policy for S3 (default: from the environment).
    """

    def __init__(self, root_url: str, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.protocol, self._root = split_url(root_url)
        self._fs, _ = filesystem(root_url, self.settings)
        self._fs_pid = os.getpid()
        if self.protocol == "file":
            self.root_url = "file://" + self._root
        else:
            self.root_url = f"{self.protocol}://{self._root}"

    def __repr__(self) -> str:
        return f"Storage({redact_url(self.root_url)!r})"

    @property
    def fs(self):
        """The fsspec filesystem; rebuilt in a forked process (a DataLoader worker), since an
        async filesystem (s3fs) and its event loop cannot be used across ``fork``."""
        if self._fs_pid != os.getpid():
            self._fs, _ = filesystem(self.root_url, self.settings)
            self._fs_pid = os.getpid()
        return self._fs

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Storage:
        """The storage at ``settings.storage_root``."""
        settings = settings or get_settings()
        return cls(settings.storage_root, settings)

    # paths -------------------------------------------------------------------------------
    def _abs(self, path: str) -> str:
        rel = _clean_relpath(path)
        return f"{self._root}/{rel}" if rel else self._root

    def url(self, path: str = "") -> str:
        """The full URL of ``path`` (relative to the root)."""
        rel = _clean_relpath(path)
        return f"{self.root_url}/{rel}" if rel else self.root_url

    def child(self, path: str) -> Storage:
        """A Storage rooted at ``path`` below this one."""
        return Storage(self.url(path), self.settings)

    # operations --------------------------------------------------------------------------
    def _call(self, what: str, path: str, fn, *args, **kwargs):
        if self.protocol != "file" and what != "open":
            # fsspec's sync wrapper cancels the call after this long: botocore's own timeouts
            # do not cover a write to an endpoint that accepts the connection and then hangs.
            kwargs["timeout"] = self.settings.s3.operation_timeout
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except (ValueError, IsADirectoryError, NotADirectoryError):
            raise
        except Exception as exc:  # botocore, aiohttp, OSError...
            detail = redact_text(str(exc)) or f"no answer within {self.settings.s3.operation_timeout:g} s"
            message = f"{what} {redact_url(self.url(path))} failed: {type(exc).__name__}: {detail}"
            if is_credentials_error(exc):
                raise StorageCredentialsError(
                    f"{what} {redact_url(self.url(path))}: no valid S3 credentials "
                    f"({type(exc).__name__}: {detail}); {CREDENTIALS_HINT}"
                ) from exc
            if _is_connection_error(exc):
                raise StorageUnavailableError(
                    f"object store unreachable: {message} (after "
                    f"{self.settings.s3.max_attempts} attempts with backoff, at most "
                    f"{self.settings.s3.operation_timeout:g} s)"
                ) from exc
            raise StorageError(message) from exc

    def exists(self, path: str) -> bool:
        """Whether a file or a non-empty folder exists at ``path``."""
        return bool(self._call("exists", path, self.fs.exists, self._abs(path)))

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a folder (a prefix with objects below it, on S3)."""
        return bool(self._call("isdir", path, self.fs.isdir, self._abs(path)))

    def read_bytes(self, path: str) -> bytes:
        """The whole content of the file at ``path``.

        Raises:
            FileNotFoundError: naming the URL, when it is missing.
        """
        try:
            return self._call("read", path, self.fs.cat_file, self._abs(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {redact_url(self.url(path))}") from None

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` (parents created), replacing any file there."""
        self._call("write", path, self.fs.pipe_file, self._abs(path), data)

    def commit_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically: readers see all of it or the old state."""
        if self.protocol != "file":
            # One PUT: S3 (and S3-compatible stores) never expose a partial object.
            self.write_bytes(path, data)
            return
        self._publish_local(path, data, os.replace)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` with ``data`` only if nothing is there (atomically, whole content).

        Local: a hard link of a complete temporary file (fails if the name exists). S3: a PUT
        with ``If-None-Match: *`` (AWS S3, MinIO, moto; stores without conditional writes
        answer with an error, never with a silent overwrite).

        Returns:
            ``True`` if this call created the file, ``False`` if it already existed.
        """
        if self.protocol != "file":
            try:
                self._call("create", path, self.fs.pipe_file, self._abs(path), data, mode="create")
            except FileExistsError:
                return False
            return True
        try:
            self._publish_local(path, data, os.link)  # link fails if the name exists
            return True
        except FileExistsError:
            return False

    def _publish_local(self, path: str, data: bytes, publish) -> None:
        """Write ``data`` to a synced temporary file beside ``path``, then ``publish(tmp, final)``
        (``os.replace``: atomic overwrite; ``os.link``: atomic create); the temporary goes."""
        final = self._abs(path)
        os.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(final), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            publish(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> IO:
        """A file object for ``path`` (``rb`` or ``wb``); writers create parents."""
        try:
            return self._call("open", path, self.fs.open, self._abs(path), mode, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {redact_url(self.url(path))}") from None

    def size(self, path: str) -> int:
        """Size in bytes of the file at ``path``."""
        try:
            return int(self._call("size", path, self.fs.size, self._abs(path)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {redact_url(self.url(path))}") from None

    def list(self, path: str = "", recursive: bool = False) -> list[str]:
        """Files (and, non-recursively, folders) below ``path``, relative to the root, sorted."""
        base = self._abs(path)
        try:
            if recursive:
                found = self._call("list", path, self.fs.find, base)
            else:
                found = self._call("list", path, self.fs.ls, base, detail=False)
        except FileNotFoundError:
            return []
        root = self._root.rstrip("/") + "/"
        out = []
        for item in found:
            item = item.rstrip("/")
            if self.protocol == "file":
                item = os.path.abspath(item)
            if item.startswith(root):
                rel = item[len(root):]
                if rel and not posixpath.basename(rel).startswith(".tmp-"):
                    out.append(rel)
        return sorted(set(out))

    def list_sizes(self, path: str = "") -> dict[str, int]:
        """Every file below ``path`` with its size in bytes (one listing), relative to the root."""
        try:
            found = self._call("list", path, self.fs.find, self._abs(path), detail=True)
        except FileNotFoundError:
            return {}
        root = self._root.rstrip("/") + "/"
        out: dict[str, int] = {}
        for item, info in found.items():
            item = item.rstrip("/")
            if self.protocol == "file":
                item = os.path.abspath(item)
            if item.startswith(root) and info.get("type", "file") == "file":
                rel = item[len(root):]
                if rel and not posixpath.basename(rel).startswith(".tmp-"):
                    out[rel] = int(info.get("size") or 0)
        return out

    def delete(self, path: str, recursive: bool = False) -> None:
        """Remove the file (or, with ``recursive``, the folder) at ``path``; missing is fine."""
        if not _clean_relpath(path) and recursive:
            raise ValueError("refusing to delete the whole storage root")
        try:
            self._call("delete", path, self.fs.rm, self._abs(path), recursive=recursive)
        except FileNotFoundError:
            pass

    def put_file(self, local_path: str, path: str) -> None:
        """Upload a local file to ``path``."""
        self._call("upload", path, self.fs.put_file, local_path, self._abs(path))

    def get_file(self, path: str, local_path: str) -> None:
        """Download ``path`` to a local file."""
        try:
            self._call("download", path, self.fs.get_file, self._abs(path), local_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {redact_url(self.url(path))}") from None


class LeaseTimeoutError(StorageError):
    """A lease stayed held by someone else for longer than the caller would wait."""


@contextlib.contextmanager
def lease(
    store: Storage,
    path: str,
    *,
    owner: str,
    ttl_s: float = 600.0,
    timeout_s: float = 900.0,
    poll_s: float = 0.5,
) -> Iterator[None]:
    """Hold an exclusive lease on ``path`` of ``store`` for the duration of the block.

    The lease is a small JSON file created with :meth:`Storage.create_exclusive`, so it works
    across processes and machines that share the store. A lease whose holder died is taken
    over once it has expired (``ttl_s`` after it was taken) or, on the same host, as soon as
    the holder's process is gone.

    Args:
        store: Where the lease file lives (the storage root every worker shares).
        path: The lease file, relative to ``store``.
        owner: Who holds it, for the log of whoever waits (no secrets).
        ttl_s: After this many seconds a lease counts as abandoned.
        timeout_s: How long to wait for a lease someone else holds.
        poll_s: Seconds between attempts.

    Raises:
        LeaseTimeoutError: the lease stayed held for ``timeout_s``.
    """
    token = uuid.uuid4().hex
    host = socket.gethostname()
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        body = {"owner": owner, "token": token, "host": host, "pid": os.getpid(), "expires_at": time.time() + ttl_s}
        if store.create_exclusive(path, json.dumps(body).encode()):
            break
        try:
            held = json.loads(store.read_bytes(path))
        except FileNotFoundError:
            continue  # released between our attempt and the read
        except ValueError:
            held = {}
        if _lease_abandoned(held, host):
            log.warning("taking over the abandoned lease %s of %s", redact_url(store.url(path)), held.get("owner"))
            store.delete(path)
            continue
        if time.monotonic() > deadline:
            raise LeaseTimeoutError(
                f"lease {redact_url(store.url(path))} still held by {held.get('owner')!r} after {timeout_s:.0f} s"
            )
        if not waited:
            log.info("waiting for the lease %s held by %s", redact_url(store.url(path)), held.get("owner"))
            waited = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        try:
            current = json.loads(store.read_bytes(path))
        except (FileNotFoundError, ValueError):
            current = {}
        if current.get("token") == token:
            store.delete(path)


def _lease_abandoned(held: dict[str, Any], host: str) -> bool:
    if float(held.get("expires_at", 0)) < time.time():
        return True
    if held.get("host") == host and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _is_connection_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ConnectionRefusedError",
            "ConnectionError",
            "FSTimeoutError",
            "TimeoutError",
        }
    )


def is_credentials_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says the S3 credentials are missing or refused."""
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return True
    codes = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken"}
    for error in _chain(exc):
        response = getattr(error, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code in codes:
            return True
    return False


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
