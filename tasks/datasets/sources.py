"""Resolve a ``source_url`` into a reader of raw records.

Accepted sources:

* recommendation: a MovieLens release name (``movielens-100k`` ... ``movielens-32m``:
  downloaded once), a ratings file or a folder holding one (``u.data``, ``ratings.dat``,
  ``ratings.csv``), a folder with an NCF split (``*.train.rating``, ``*.test.rating``,
  ``*.test.negative``), or ``synthetic://recommendation?...``;
* driving: a folder of Argoverse-1 forecasting CSV files (or a folder whose ``data/`` holds
  them), or ``synthetic://driving?...``.

Every URL may be local (plain path or ``file://``) or remote (``s3://``...) through fsspec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

from tasks.datasets import argoverse, movielens, synthetic
from tasks.datasets.textio import SourceFormatError
from tasks.settings import Settings, get_settings, redact_url
from tasks.storage import CREDENTIALS_HINT, filesystem, is_credentials_error, refuse_credentials_in_url

log = logging.getLogger(__name__)

KINDS = ("recommendation", "driving")


SUPPORTED_SCHEMES = ("file", "s3", "s3a")
"""URL schemes a source may have besides ``synthetic://`` (plain paths are local files)."""


class SourceNotFoundError(FileNotFoundError):
    """The source URL names nothing readable, or nothing of the expected kind."""


class UnsupportedSourceError(ValueError):
    """The source URL's scheme is not one trainflow reads (``http://``...): bad input."""


class SourceCredentialsError(ValueError):
    """No (valid) credentials for an ``s3://`` source: a configuration error, never retried."""


@dataclasses.dataclass
class RecommendationSource:
    """A raw interaction log, readable as many times as the sharding passes need.

    Attributes:
        url: The source URL as given (secrets redacted when logged).
        default_name: Dataset name used when the caller gives none.
        reader: Which reader parses it (recorded in the manifest).
        reader_version: Bumped when parsing changes (part of the version hash).
        fingerprint: Content identity of the raw data.
        open_interactions: Returns a fresh iterator of RecordBatches of
            (user_id, item_id, rating, timestamp).
        given_split: For NCF-format sources: callables for the train batches, the test
            rows and the test negatives; ``None`` when the split is ours to make.
        bad_rows: Rows with the wrong number of fields seen so far (skipped, counted once
            each, however many passes read the file: see :meth:`add_bad_row`).
    """

    url: str
    default_name: str
    reader: str
    reader_version: str
    fingerprint: str
    open_interactions: Callable[[], Iterator]
    given_split: dict[str, Callable[[], Iterator]] | None = None
    bad_rows: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    kind: str = "recommendation"
    _bad_seen: set[tuple[str, int]] = dataclasses.field(default_factory=set, repr=False)

    def add_bad_row(self, file: str, line: int, text: str) -> None:
        """Record a skipped malformed row once: the sharder reads the source several times."""
        if (file, line) not in self._bad_seen:
            self._bad_seen.add((file, line))
            self.bad_rows.append((file, line, text))


@dataclasses.dataclass
class DrivingSource:
    """A set of driving scenarios.

    Attributes:
        url, default_name, reader, reader_version, fingerprint: as for
            :class:`RecommendationSource`.
        num_sequences: How many scenarios (files) there are.
        open_records: Returns a fresh iterator of sequence records, or of
            :class:`argoverse.SequenceRejected` for unusable scenarios.
    """

    url: str
    default_name: str
    reader: str
    reader_version: str
    fingerprint: str
    num_sequences: int
    open_records: Callable[[], Iterator[dict[str, Any] | argoverse.SequenceRejected]]
    kind: str = "driving"


def _hash(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_fingerprint(fs, path: str) -> list[Any]:
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


def _is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except FileNotFoundError:
        return False


def _stem(url: str) -> str:
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    return tail.split(".", 1)[0] or "dataset"


def resolve_source(url: str, kind: str, settings: Settings | None = None) -> RecommendationSource | DrivingSource:
    """Turn ``url`` into a source of ``kind`` records.

    Raises:
        ValueError: unknown kind, malformed synthetic URL.
        SourceNotFoundError: nothing at the URL, or nothing of ``kind`` there.
        UnsupportedSourceError: a scheme other than ``file``, ``s3``, ``s3a``, ``synthetic``.
        CredentialsInUrlError: credentials inside the URL (refused, shown masked).
        SourceCredentialsError: an ``s3://`` source without valid credentials.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    settings = settings or get_settings()
    if not isinstance(url, str) or not url.strip():
        raise ValueError("source_url must be a non-empty string")
    url = url.strip()
    if url.startswith("synthetic://"):
        generator, params = synthetic.parse_synthetic_url(url)
        if generator != kind:
            raise ValueError(f"source_url {url!r} generates {generator} data, this pipeline needs {kind}")
        return _synthetic_recommendation(url, params) if kind == "recommendation" else _synthetic_driving(url, params)
    if kind == "recommendation" and url in movielens.RELEASES:
        path = movielens.download_release(url, settings.download_dir)
        source = _recommendation_from_url(str(path), settings)
        source.default_name = url
        return source
    if "://" not in url and "/" not in url and not url.startswith("."):
        known = ", ".join(sorted(movielens.RELEASES)) if kind == "recommendation" else "none"
        raise SourceNotFoundError(
            f"source_url {url!r} is neither a URL nor a known dataset name (known: {known})"
        )
    refuse_credentials_in_url(url, "source_url")
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme not in SUPPORTED_SCHEMES:
        raise UnsupportedSourceError(
            f"source_url {redact_url(url)}: the scheme {scheme}:// is not supported; use a local path, "
            "file://, s3:// (or s3a://), synthetic://, or a MovieLens release name "
            f"({', '.join(sorted(movielens.RELEASES))}); download other sources first"
        )
    try:
        if kind == "recommendation":
            return _recommendation_from_url(url, settings)
        return _driving_from_url(url, settings)
    except Exception as exc:
        if is_credentials_error(exc):
            raise SourceCredentialsError(
                f"source_url {redact_url(url)}: no valid S3 credentials to read it "
                f"({type(exc).__name__}); {CREDENTIALS_HINT}"
            ) from None
        raise


def _synthetic_recommendation(url: str, params: dict[str, Any]) -> RecommendationSource:
    config = synthetic.SyntheticRecommendationConfig(**params)
    generator = synthetic.SyntheticRecommendation(config)
    return RecommendationSource(
        url=url,
        default_name="synthetic-recommendation",
        reader="synthetic.recommendation",
        reader_version=synthetic.READER_VERSION,
        fingerprint=_hash(["synthetic.recommendation", dataclasses.asdict(config)]),
        open_interactions=generator.iter_batches,
    )


def _synthetic_driving(url: str, params: dict[str, Any]) -> DrivingSource:
    config = synthetic.SyntheticDrivingConfig(**params)
    generator = synthetic.SyntheticDriving(config)
    return DrivingSource(
        url=url,
        default_name="synthetic-driving",
        reader="synthetic.driving",
        reader_version=synthetic.READER_VERSION,
        fingerprint=_hash(["synthetic.driving", dataclasses.asdict(config)]),
        num_sequences=config.num_sequences,
        open_records=generator.iter_records,
    )


def _recommendation_from_url(url: str, settings: Settings) -> RecommendationSource:
    fs, path = filesystem(url, settings)
    shown = redact_url(url)
    if not fs.exists(path):
        raise SourceNotFoundError(f"source_url {shown}: nothing there")
    if _is_dir(fs, path):
        names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        prefix = movielens.find_ncf_prefix(names)
        if prefix is not None:
            return _ncf_source(url, fs, path, prefix)
        ratings = movielens.find_ratings_file(names)
        if ratings is None:
            raise SourceNotFoundError(
                f"source_url {shown}: no MovieLens ratings file (u.data, ratings.dat, ratings.csv) "
                "and no NCF split (*.train.rating, *.test.rating, *.test.negative) in this folder"
            )
        file_path = posixpath.join(path, ratings)
        name = _stem(url)
    else:
        file_path = path
        ratings = posixpath.basename(path)
        if not (ratings in movielens.RATINGS_FILES or ratings.endswith((".dat", ".csv", ".rating", ".data"))):
            raise SourceNotFoundError(f"source_url {shown}: not a MovieLens ratings file")
        name = _stem(posixpath.dirname(url.rstrip("/")))
    fingerprint = _hash(["movielens", _file_fingerprint(fs, file_path)])
    source = RecommendationSource(
        url=url,
        default_name=name,
        reader=f"movielens.{ratings}",
        reader_version=movielens.READER_VERSION,
        fingerprint=fingerprint,
        open_interactions=lambda: iter(()),
    )

    def open_interactions() -> Iterator:
        with fs.open(file_path, "rb") as handle:
            yield from movielens.read_ratings(
                handle,
                ratings,
                file_label=redact_url(url if file_path == path else url.rstrip("/") + "/" + ratings),
                on_bad_row=lambda line, text: source.add_bad_row(ratings, line, text),
            )

    source.open_interactions = open_interactions
    return source


def _ncf_source(url: str, fs, path: str, prefix: str) -> RecommendationSource:
    files = {part: posixpath.join(path, f"{prefix}.{part}") for part in ("train.rating", "test.rating", "test.negative")}
    fingerprint = _hash(["ncf", [_file_fingerprint(fs, files[k]) for k in sorted(files)]])
    source = RecommendationSource(
        url=url,
        default_name=f"ncf-{prefix}",
        reader="movielens.ncf_split",
        reader_version=movielens.READER_VERSION,
        fingerprint=fingerprint,
        open_interactions=lambda: iter(()),
    )

    def opener(part: str) -> Callable[[], Iterator]:
        def open_part() -> Iterator:
            label = redact_url(url.rstrip("/") + f"/{prefix}.{part}")
            with fs.open(files[part], "rb") as handle:
                if part == "test.negative":
                    yield from movielens.read_ncf_negatives(handle, file_label=label)
                else:
                    yield from movielens.read_ratings(
                        handle,
                        f"{prefix}.{part}",
                        file_label=label,
                        on_bad_row=lambda line, text: source.add_bad_row(f"{prefix}.{part}", line, text),
                    )

        return open_part

    def all_interactions() -> Iterator:
        yield from opener("train.rating")()
        yield from opener("test.rating")()

    source.open_interactions = all_interactions
    source.given_split = {part: opener(part) for part in files}
    return source


def _driving_from_url(url: str, settings: Settings) -> DrivingSource:
    fs, path = filesystem(url, settings)
    shown = redact_url(url)
    if not fs.exists(path) or not _is_dir(fs, path):
        raise SourceNotFoundError(f"source_url {shown}: no such folder of Argoverse CSV files")
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv"))
    base_url = url.rstrip("/")
    if not files and _is_dir(fs, posixpath.join(path, "data")):
        path = posixpath.join(path, "data")
        base_url += "/data"
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv"))
    if not files:
        raise SourceNotFoundError(f"source_url {shown}: no .csv files (Argoverse forecasting) in this folder")
    listing = [_file_fingerprint(fs, f) for f in files]
    fingerprint = _hash(["argoverse", listing])

    def open_records() -> Iterator[dict[str, Any] | argoverse.SequenceRejected]:
        for start in range(0, len(files), 128):
            chunk = files[start : start + 128]
            contents = fs.cat(chunk)
            for file_path in chunk:
                name = posixpath.basename(file_path)
                label = redact_url(f"{base_url}/{name}")
                try:
                    yield argoverse.parse_sequence(contents[file_path], seq_id=name[: -len(".csv")], file_label=label)
                except argoverse.SequenceRejected as rejected:
                    yield rejected

    return DrivingSource(
        url=url,
        default_name=_stem(url.rstrip("/").removesuffix("/data")),
        reader="argoverse.csv",
        reader_version=argoverse.READER_VERSION,
        fingerprint=fingerprint,
        num_sequences=len(files),
        open_records=open_records,
    )


__all__ = [
    "DrivingSource",
    "RecommendationSource",
    "SourceCredentialsError",
    "SourceFormatError",
    "SourceNotFoundError",
    "UnsupportedSourceError",
    "resolve_source",
]
