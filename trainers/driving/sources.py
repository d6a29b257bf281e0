"""Driving sources: a folder of Argoverse-1 forecasting CSV files (or a folder whose ``data/``
holds them), or ``synthetic://driving?...``. Reader ids and versions are unchanged from before
the pipeline contract (they are part of every dataset version).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

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
from trainflow.trainers.driving import argoverse, synthetic


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


def resolve_driving_source(url: str, settings: Settings) -> DrivingSource:
    """Turn ``url`` into a source of scenarios.

    Raises:
        ValueError: a malformed synthetic URL, or one of another pipeline.
        SourceNotFoundError: nothing at the URL, or no scenario CSV files there.
    """
    generator = synthetic_generator(url)
    if generator is not None:
        check_generator(url, "driving")
        return _synthetic_driving(url)
    if "://" not in url and "/" not in url and not url.startswith("."):
        raise SourceNotFoundError(f"source_url {url!r} is neither a URL nor a known dataset name (known: none)")
    return _driving_from_url(url, settings)


def _synthetic_driving(url: str) -> DrivingSource:
    config = parse_synthetic_url(url, synthetic.SyntheticDrivingConfig)
    generator = synthetic.SyntheticDriving(config)
    return DrivingSource(
        url=url,
        default_name="synthetic-driving",
        reader="synthetic.driving",
        reader_version=SYNTHETIC_READER_VERSION,
        fingerprint=hash_parts(["synthetic.driving", dataclasses.asdict(config)]),
        num_sequences=config.num_sequences,
        open_records=generator.iter_records,
    )


def _driving_from_url(url: str, settings: Settings) -> DrivingSource:
    fs, path = filesystem(url, settings)
    shown = redact_url(url)
    if not fs.exists(path) or not is_dir(fs, path):
        raise SourceNotFoundError(f"source_url {shown}: no such folder of Argoverse CSV files")
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv"))
    base_url = url.rstrip("/")
    if not files and is_dir(fs, posixpath.join(path, "data")):
        path = posixpath.join(path, "data")
        base_url += "/data"
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv"))
    if not files:
        raise SourceNotFoundError(f"source_url {shown}: no .csv files (Argoverse forecasting) in this folder")
    listing = [file_fingerprint(fs, f) for f in files]
    fingerprint = hash_parts(["argoverse", listing])

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
        default_name=url_stem(url.rstrip("/").removesuffix("/data")),
        reader="argoverse.csv",
        reader_version=argoverse.READER_VERSION,
        fingerprint=fingerprint,
        num_sequences=len(files),
        open_records=open_records,
    )
