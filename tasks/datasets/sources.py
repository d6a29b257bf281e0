"""Resolve a ``source_url`` into a reader of raw records, through the pipeline's spec.

Which URLs a pipeline reads and how is the pipeline's business
(:attr:`trainflow.tasks.pipelines.PipelineSpec.resolve_source`); this module holds what every reader
shares: the errors, content fingerprints of files on any fsspec URL, and the entry point
:func:`resolve_source`. Every URL may be local (plain path or ``file://``) or remote
(``s3://``...) through fsspec.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from trainflow.tasks.datasets.textio import SourceFormatError
from trainflow.tasks.settings import Settings, get_settings, redact_url
from trainflow.tasks.storage import CREDENTIALS_HINT, is_credentials_error, refuse_credentials_in_url

SUPPORTED_SCHEMES = ("file", "s3", "s3a")
"""URL schemes a source may have besides ``synthetic://`` (plain paths are local files)."""


class SourceNotFoundError(FileNotFoundError):
    """The source URL names nothing readable, or nothing of the expected kind."""


class UnsupportedSourceError(ValueError):
    """The source URL's scheme is not one trainflow reads (``http://``...): bad input."""


class SourceCredentialsError(ValueError):
    """No (valid) credentials for an ``s3://`` source: a configuration error, never retried."""


def hash_parts(parts: Any) -> str:
    """A stable sha256 of JSON-able ``parts`` (a source fingerprint)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(fs, path: str) -> list[Any]:
    """[base name, size, content hash] of one file: the ETag on object stores, sha256 locally."""
    info = fs.info(path)
    size = int(info.get("size") or 0)
    etag = info.get("ETag") or info.get("etag")
    if etag and getattr(fs, "protocol", None) not in ("file", ("file", "local")):
        return [posixpath.basename(path), size, str(etag).strip('"')]
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return [posixpath.basename(path), size, digest.hexdigest()]


def is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except FileNotFoundError:
        return False


def url_stem(url: str) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    return tail.split(".", 1)[0] or "dataset"


def resolve_source(url: str, pipeline: Any, settings: Settings | None = None) -> Any:
    """Turn ``url`` into the source object of ``pipeline`` (a name or a spec).

    Raises:
        trainflow.tasks.pipelines.UnknownPipelineError: no such pipeline.
        ValueError: an empty URL, or one the pipeline refuses as malformed.
        SourceNotFoundError: nothing at the URL, or nothing of the pipeline's kind there.
        UnsupportedSourceError: a scheme other than ``file``, ``s3``, ``s3a``, ``synthetic``.
        CredentialsInUrlError: credentials inside the URL (refused, shown masked).
        SourceCredentialsError: an ``s3://`` source without valid credentials.
    """
    from trainflow.tasks.pipelines import get_pipeline

    spec = get_pipeline(pipeline)
    settings = settings or get_settings()
    if not isinstance(url, str) or not url.strip():
        raise ValueError("source_url must be a non-empty string")
    url = url.strip()
    if "://" in url and not url.startswith("synthetic://"):
        refuse_credentials_in_url(url, "source_url")
        scheme = url.split("://", 1)[0].lower()
        if scheme not in SUPPORTED_SCHEMES:
            raise UnsupportedSourceError(
                f"source_url {redact_url(url)}: the scheme {scheme}:// is not supported; use a local path, "
                f"file://, s3:// (or s3a://), synthetic://, or a dataset name the {spec.name} pipeline knows; "
                "download other sources first"
            )
    try:
        source = spec.resolve_source(url, settings)
    except Exception as exc:
        if is_credentials_error(exc):
            raise SourceCredentialsError(
                f"source_url {redact_url(url)}: no valid S3 credentials to read it "
                f"({type(exc).__name__}); {CREDENTIALS_HINT}"
            ) from None
        raise
    source.kind = spec.name
    return source


__all__ = [
    "SourceCredentialsError",
    "SourceFormatError",
    "SourceNotFoundError",
    "UnsupportedSourceError",
    "file_fingerprint",
    "hash_parts",
    "resolve_source",
    "url_stem",
]
