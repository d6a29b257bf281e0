"""MovieLens readers: GroupLens releases and the NCF benchmark split files.

Formats read (all streamed in bounded memory, locally or through fsspec):

* ``u.data`` (ML-100K): ``user \\t item \\t rating \\t timestamp``
* ``ratings.dat`` (ML-1M, ML-10M): ``user::item::rating::timestamp``
* ``ratings.csv`` (ML-20M, 25M, 32M, latest): header ``userId,movieId,rating,timestamp``
* NCF split (He et al. 2017): ``*.train.rating``, ``*.test.rating`` (same columns as u.data,
  0-based ids) and ``*.test.negative`` (``(user,item) \\t neg1 ... negN``)

Known release names (``movielens-100k`` ...) download the official zip from GroupLens once into
the download cache, check its pinned MD5 (GroupLens publishes MD5 sums), and extract the
ratings file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from trainflow.tasks.datasets.textio import SourceFormatError, parse_delimited

log = logging.getLogger(__name__)

GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
READER_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class Release:
    """A GroupLens MovieLens release.

    Attributes:
        zip_name: Archive name under the GroupLens base URL.
        md5: Pinned MD5 of the archive, or ``None`` to check against the ``.md5`` file
            that GroupLens publishes beside it.
        member: Path of the ratings file inside the archive.
        sha256: Optional pinned sha256 of the extracted ratings file.
    """

    zip_name: str
    md5: str | None
    member: str
    sha256: str | None = None


RELEASES: dict[str, Release] = {
    "movielens-100k": Release(
        "ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
        "ml-100k/u.data",
        "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    ),
    "movielens-1m": Release("ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ml-1m/ratings.dat"),
    "movielens-10m": Release("ml-10m.zip", "ce571fd55effeba0271552578f2648bd", "ml-10M100K/ratings.dat"),
    "movielens-20m": Release("ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "ml-20m/ratings.csv"),
    "movielens-25m": Release("ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "ml-25m/ratings.csv"),
    "movielens-32m": Release("ml-32m.zip", None, "ml-32m/ratings.csv"),
}

RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")
RATINGS_CSV_HEADER = "userId,movieId,rating,timestamp"


def interaction_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("rating", pa.float32()),
            ("timestamp", pa.int64()),
        ]
    )


def read_ratings(
    handle,
    file_name: str,
    *,
    file_label: str | None = None,
    on_bad_row: Callable[[int, str], None] | None = None,
) -> Iterator:
    """Stream a MovieLens ratings file as RecordBatches of (user_id, item_id, rating, timestamp).

    Args:
        handle: Binary file object.
        file_name: Its name, which selects the format (``u.data``, ``*.dat``, ``*.csv``,
            ``*.rating``).
        file_label: How to name the file in errors (default ``file_name``).
        on_bad_row: Called for rows with the wrong number of fields (skipped); without it
            such rows raise :class:`SourceFormatError`.

    Raises:
        SourceFormatError: naming the file and line of a value that does not parse or of a
            rating that is not a finite number (NaN, inf, empty).
    """
    import pyarrow as pa

    types = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()}
    names = list(types)
    label = file_label or file_name
    base = os.path.basename(file_name)
    if base.endswith(".csv"):
        kwargs = dict(delimiter=",", skip_header=True, expected_header=RATINGS_CSV_HEADER)
    elif base.endswith(".dat"):
        kwargs = dict(delimiter="\t", multi_char_delimiter=b"::")
    elif base == "u.data" or base.endswith(".rating") or base.endswith(".data"):
        kwargs = dict(delimiter="\t")
    else:
        raise SourceFormatError(f"{label}: not a MovieLens ratings file (u.data, ratings.dat, ratings.csv, *.rating)")
    for batch in parse_delimited(
        handle, file_label=label, column_names=names, column_types=types, on_bad_row=on_bad_row,
        finite_columns=("rating",), **kwargs
    ):
        yield batch.cast(interaction_schema()) if batch.schema != interaction_schema() else batch


def read_ncf_negatives(handle, *, file_label: str) -> Iterator[tuple[int, int, list[int]]]:
    """Stream an NCF ``*.test.negative`` file as (user, item, negatives) per line.

    Raises:
        SourceFormatError: naming the file and line of a malformed row.
    """
    for line_no, raw in enumerate(handle, start=1):
        text = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else raw.strip()
        if not text:
            continue
        fields = text.split("\t")
        head = fields[0]
        try:
            if not (head.startswith("(") and head.endswith(")")):
                raise ValueError("first field is not '(user,item)'")
            user_s, item_s = head[1:-1].split(",")
            negatives = [int(v) for v in fields[1:]]
            yield int(user_s), int(item_s), negatives
        except ValueError as exc:
            raise SourceFormatError(f"{file_label}, line {line_no}: {exc}: {text[:80]!r}") from None


def find_ratings_file(names: list[str]) -> str | None:
    """The ratings file among ``names`` (base names), by MovieLens precedence."""
    for candidate in RATINGS_FILES:
        if candidate in names:
            return candidate
    return None


def find_ncf_prefix(names: list[str]) -> str | None:
    """The common prefix of an NCF split (``ml-1m`` for ``ml-1m.train.rating``...), if complete."""
    for name in names:
        if name.endswith(".train.rating"):
            prefix = name[: -len(".train.rating")]
            if f"{prefix}.test.rating" in names and f"{prefix}.test.negative" in names:
                return prefix
    return None


# --- download ------------------------------------------------------------------------------
def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    os.replace(tmp, dest)


def download_release(name: str, download_dir: Path, base_url: str | None = None) -> Path:
    """Download and extract a MovieLens release once; later calls reuse the cache.

    Args:
        name: A key of :data:`RELEASES` (``movielens-100k`` ...).
        download_dir: Cache folder.
        base_url: Mirror of the GroupLens folder (default: ``TRAINFLOW_MOVIELENS_BASE_URL``
            or the official URL).

    Returns:
        Path of the extracted ratings file.

    Raises:
        KeyError: unknown release name.
        ValueError: the archive's checksum differs from the pinned one (file removed).
    """
    if name not in RELEASES:
        raise KeyError(f"unknown MovieLens release {name!r}; known: {', '.join(sorted(RELEASES))}")
    release = RELEASES[name]
    from trainflow.tasks.settings import extra_setting

    base = (base_url or extra_setting("MOVIELENS_BASE_URL") or GROUPLENS_BASE_URL).rstrip("/") + "/"
    target_dir = Path(download_dir) / name
    ratings = target_dir / release.member
    marker = target_dir / ".complete"
    if marker.exists() and ratings.exists():
        log.info("MovieLens %s: using cached %s", name, ratings)
        return ratings
    target_dir.mkdir(parents=True, exist_ok=True)
    archive = target_dir / release.zip_name
    url = base + release.zip_name
    log.info("MovieLens %s: downloading %s", name, url)
    _fetch(url, archive)
    expected = release.md5
    if expected is None:
        md5_path = target_dir / (release.zip_name + ".md5")
        _fetch(url + ".md5", md5_path)
        expected = md5_path.read_text().split()[0].strip()
    actual = _file_digest(archive, "md5")
    if actual != expected:
        archive.unlink()
        raise ValueError(f"{url}: MD5 {actual} does not match the pinned {expected}; download removed")
    with zipfile.ZipFile(archive) as zf, tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        try:
            zf.extract(release.member, tmp)
        except KeyError:
            raise ValueError(f"{url}: archive has no {release.member}") from None
        extracted = Path(tmp) / release.member
        if release.sha256 and _file_digest(extracted, "sha256") != release.sha256:
            raise ValueError(f"{url}: {release.member} does not match its pinned sha256")
        ratings.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, ratings)
    archive.unlink()
    marker.write_text(expected + "\n")
    return ratings
