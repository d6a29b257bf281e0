"""The generic table source: Parquet or CSV files on any fsspec URL, split by a key's hash.

A pipeline whose raw data is a table (one row per sample) needs no reader of its own::

    from trainflow.tasks.datasets.table import resolve_table_source, table_split

    PipelineSpec(..., resolve_source=resolve_table_source, split=table_split(key="row_id"), ...)

``source_url`` is one file (``.parquet``, ``.csv``) or a folder of them (every matching file,
in name order; all of one format). The fingerprint is the files' names, sizes and content
hashes (ETags on object stores), so new data is a new dataset version and the same data is a
cache hit. :func:`table_split` assigns each row to ``train`` / ``valid`` / ``eval`` by
:func:`trainflow.tasks.sharding.hash_split` of its key column: deterministic, no randomness, and a row
never moves between splits when rows are added.
"""

from __future__ import annotations

import dataclasses
import logging
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
from trainflow.tasks.datasets.textio import SourceFormatError
from trainflow.tasks.settings import Settings, redact_url
from trainflow.tasks.storage import filesystem

log = logging.getLogger(__name__)

READER_VERSION = "1"
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
SPLITS = ("train", "valid", "eval")


@dataclasses.dataclass
class TableSource:
    """Table files readable as record batches, as many times as the split needs.

    Attributes:
        url: The source URL as given.
        default_name: Dataset name when the run gives none (the file's or folder's stem).
        reader: ``table.parquet`` or ``table.csv`` (recorded in the manifest).
        reader_version: Part of the dataset version.
        fingerprint: Content identity of the files.
        files: The files' paths in the source's filesystem.
        open_batches: Returns a fresh iterator of ``pyarrow.RecordBatch``.
    """

    url: str
    default_name: str
    reader: str
    reader_version: str
    fingerprint: str
    files: list[str]
    open_batches: Callable[[], Iterator[Any]]
    kind: str = ""


def resolve_table_source(url: str, settings: Settings) -> TableSource:
    """A :class:`TableSource` for a Parquet/CSV file or a folder of them.

    Raises:
        SourceNotFoundError: nothing at ``url``, or no table file there.
        SourceFormatError: a folder mixing Parquet and CSV files.
    """
    fs, path = filesystem(url, settings)
    shown = redact_url(url)
    if not fs.exists(path):
        raise SourceNotFoundError(f"source_url {shown}: nothing there")
    if is_dir(fs, path):
        files = sorted(p for p in fs.ls(path, detail=False) if posixpath.splitext(p)[1].lower() in FORMATS)
        name = url_stem(url)
    else:
        files = [path] if posixpath.splitext(path)[1].lower() in FORMATS else []
        name = url_stem(url)
    if not files:
        raise SourceNotFoundError(f"source_url {shown}: no .parquet or .csv file there")
    formats = {FORMATS[posixpath.splitext(p)[1].lower()] for p in files}
    if len(formats) > 1:
        raise SourceFormatError(f"source_url {shown}: mixes {sorted(formats)} files; use one format")
    fmt = formats.pop()

    def open_batches() -> Iterator[Any]:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        for file_path in files:
            with fs.open(file_path, "rb") as handle:
                if fmt == "parquet":
                    yield from pq.ParquetFile(handle).iter_batches(batch_size=65536)
                else:
                    yield from pcsv.open_csv(handle)

    return TableSource(
        url=url,
        default_name=name,
        reader=f"table.{fmt}",
        reader_version=READER_VERSION,
        fingerprint=hash_parts(["table", [file_fingerprint(fs, f) for f in files]]),
        files=files,
        open_batches=open_batches,
    )


def table_split(key: str, columns: list[str] | None = None) -> Callable[..., dict[str, Any]]:
    """A split protocol: each row to ``train`` / ``valid`` / ``eval`` by the hash of its ``key``
    column (:func:`trainflow.tasks.sharding.hash_split` with the sharding config's fractions and seed).

    Args:
        key: The column that identifies a row (an id); rows with the same key share a split.
        columns: Columns to keep (default: all).

    Returns:
        ``split(source, store, config, tmp_dir) -> manifest body`` for
        :attr:`trainflow.tasks.pipelines.PipelineSpec.split`.
    """

    def split(source: TableSource, store, config, tmp_dir: str) -> dict[str, Any]:
        import numpy as np
        import pyarrow as pa

        from trainflow.tasks.sharding import ShardWriter, hash_split

        writers: dict[str, ShardWriter] = {}
        schema = None
        try:
            for batch in source.open_batches():
                if columns is not None:
                    batch = batch.select(columns)
                if key not in batch.schema.names:
                    raise SourceFormatError(
                        f"{redact_url(source.url)}: no key column {key!r} (columns: {batch.schema.names})"
                    )
                if schema is None:
                    schema = batch.schema
                    writers = {s: ShardWriter(store, s, schema, config, tmp_dir) for s in SPLITS}
                elif not batch.schema.equals(schema):
                    raise SourceFormatError(f"{redact_url(source.url)}: the files' schemas differ ({batch.schema} vs {schema})")
                keys = batch.column(key).to_pylist()
                assigned = np.array([hash_split(str(k), config) for k in keys])
                for s in SPLITS:
                    rows = np.flatnonzero(assigned == s)
                    if rows.size:
                        writers[s].write_batch(batch.take(pa.array(rows)))
            if schema is None:
                raise SourceFormatError(f"{redact_url(source.url)}: no rows")
            splits = {s: w.close() for s, w in writers.items()}
        finally:
            for writer in writers.values():
                writer.abort()
        for s, entry in splits.items():
            if entry["num_rows"] == 0:
                log.warning("split %s is empty: too few rows for the configured fractions", s)
        protocol = (
            f"hash split of {key} (eval {config.eval_fraction}, valid {config.valid_fraction}, seed {config.seed})"
        )
        stats = {"split_protocol": protocol, "num_rows": sum(e["num_rows"] for e in splits.values()), "key": key}
        return {"splits": splits, "stats": stats}

    return split
