"""Recommendation sources: a MovieLens release name (``movielens-100k`` ... ``movielens-32m``:
downloaded once), a ratings file or a folder holding one (``u.data``, ``ratings.dat``,
``ratings.csv``), a folder with an NCF split (``*.train.rating``, ``*.test.rating``,
``*.test.negative``), or ``synthetic://recommendation?...``. Reader ids and versions are
unchanged from before the pipeline contract (they are part of every dataset version).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Callable, Iterator

from trainflow.tasks.datasets.sources import (
    SourceNotFoundError,
    file_fingerprint,
    hash_parts,
    is_dir,
    url_stem,
)
from trainflow.tasks.datasets.synthetic import READER_VERSION as SYNTHETIC_READER_VERSION
from trainflow.tasks.datasets.synthetic import check_generator, parse_synthetic_url, synthetic_generator
from trainflow.tasks.settings import Settings, redact_url
from trainflow.tasks.storage import filesystem
from trainflow.trainers.recommendation import movielens, synthetic


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


def resolve_recommendation_source(url: str, settings: Settings) -> RecommendationSource:
    """Turn ``url`` into a source of interactions.

    Raises:
        ValueError: a malformed synthetic URL, or one of another pipeline.
        SourceNotFoundError: nothing at the URL, or no ratings there.
    """
    generator = synthetic_generator(url)
    if generator is not None:
        check_generator(url, "recommendation")
        return _synthetic_recommendation(url)
    if url in movielens.RELEASES:
        path = movielens.download_release(url, settings.download_dir)
        source = _recommendation_from_url(str(path), settings)
        source.default_name = url
        return source
    if "://" not in url and "/" not in url and not url.startswith("."):
        known = ", ".join(sorted(movielens.RELEASES))
        raise SourceNotFoundError(f"source_url {url!r} is neither a URL nor a known dataset name (known: {known})")
    return _recommendation_from_url(url, settings)


def _synthetic_recommendation(url: str) -> RecommendationSource:
    config = parse_synthetic_url(url, synthetic.SyntheticRecommendationConfig)
    generator = synthetic.SyntheticRecommendation(config)
    return RecommendationSource(
        url=url,
        default_name="synthetic-recommendation",
        reader="synthetic.recommendation",
        reader_version=SYNTHETIC_READER_VERSION,
        fingerprint=hash_parts(["synthetic.recommendation", dataclasses.asdict(config)]),
        open_interactions=generator.iter_batches,
    )


def _recommendation_from_url(url: str, settings: Settings) -> RecommendationSource:
    fs, path = filesystem(url, settings)
    shown = redact_url(url)
    if not fs.exists(path):
        raise SourceNotFoundError(f"source_url {shown}: nothing there")
    if is_dir(fs, path):
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
        name = url_stem(url)
    else:
        file_path = path
        ratings = posixpath.basename(path)
        if not (ratings in movielens.RATINGS_FILES or ratings.endswith((".dat", ".csv", ".rating", ".data"))):
            raise SourceNotFoundError(f"source_url {shown}: not a MovieLens ratings file")
        name = url_stem(posixpath.dirname(url.rstrip("/")))
    fingerprint = hash_parts(["movielens", file_fingerprint(fs, file_path)])
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
    fingerprint = hash_parts(["ncf", [file_fingerprint(fs, files[k]) for k in sorted(files)]])
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
