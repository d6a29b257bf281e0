"""Streaming parsing of delimited text files in bounded memory, with errors that name the line."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import IO

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 16 << 20


class SourceFormatError(ValueError):
    """A raw data file could not be parsed; the message names the file and the line."""


def iter_line_blocks(handle: IO[bytes], block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield ``(first_line_number, block)`` with blocks of whole lines (1-based numbers)."""
    leftover = b""
    line_no = 1
    while True:
        chunk = handle.read(block_bytes)
        if not chunk:
            if leftover.strip():
                yield line_no, leftover + b"\n"
            return
        data = leftover + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            leftover = data
            continue
        block, leftover = data[: cut + 1], data[cut + 1 :]
        yield line_no, block
        line_no += block.count(b"\n")


def parse_delimited(
    handle: IO[bytes],
    *,
    file_label: str,
    column_names: list[str],
    column_types: dict,
    delimiter: str = "\t",
    multi_char_delimiter: bytes | None = None,
    skip_header: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    on_bad_row: Callable[[int, str], None] | None = None,
    finite_columns: tuple[str, ...] = (),
    expected_header: str | None = None,
) -> Iterator:
    """Parse a delimited text file into pyarrow RecordBatches, one block of lines at a time.

    Args:
        handle: Binary file object (local or fsspec).
        file_label: How to name the file in errors.
        column_names: Names for the leading columns; extra columns are an error.
        column_types: pyarrow types by column name.
        delimiter: One-character delimiter.
        multi_char_delimiter: A delimiter such as ``b"::"`` (as in ``.dat`` files), replaced by
            ``delimiter`` before parsing.
        skip_header: Skip the first line of the file.
        block_bytes: Bytes per parsed block (bounds memory).
        on_bad_row: Called with (line number, text) for rows with the wrong number of
            fields; they are skipped. Without it such a row raises.
        finite_columns: Floating columns whose values must be finite numbers: NaN, inf and
            empty/null values (``nan``, ``NA``, ``null`` ...) raise.
        expected_header: The header line the format has (with ``skip_header``), quoted when
            no row has the expected number of fields.

    Raises:
        SourceFormatError: naming the file and line of a value that does not parse, or of a
            non-finite value in ``finite_columns``; a file with no data row, or whose every
            row has the wrong number of fields (naming the first such line, the count found
            and the fields, or header, expected).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    first = True
    saw_rows = False
    header: str | None = None
    first_bad: tuple[int, str] | None = None
    num_bad = 0
    for line_no, block in iter_line_blocks(handle, block_bytes):
        if first and skip_header:
            newline = block.find(b"\n")
            header = block[:newline].decode("utf-8", "replace").rstrip("\r")
            block = block[newline + 1 :]
            line_no += 1
        first = False
        if multi_char_delimiter:
            block = block.replace(multi_char_delimiter, delimiter.encode())
        if not block.strip():
            continue
        bad_rows: list[tuple[int, str]] = []

        def handler(row, _bad=bad_rows):
            _bad.append((row.number, row.text))
            return "skip"

        try:
            table = pacsv.read_csv(
                pa.py_buffer(block),
                read_options=pacsv.ReadOptions(column_names=column_names, use_threads=True),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=handler),
                convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
            )
        except pa.ArrowInvalid as exc:
            bad_line, text = _find_bad_line(block, line_no, column_names, column_types, delimiter)
            raise SourceFormatError(
                f"{file_label}, line {bad_line}: cannot parse {text!r} as "
                f"{', '.join(f'{n}:{column_types[n]}' for n in column_names if n in column_types)} ({exc})"
            ) from None
        lines = block.decode("utf-8", "replace").split("\n") if bad_rows else []
        searched = 0
        for number, text in bad_rows:
            if number is None:  # threaded parsing does not know row numbers: find the line
                while searched < len(lines) and lines[searched].rstrip("\r") != text:
                    searched += 1
                number = searched + 1
                searched += 1
            absolute = line_no + number - 1
            num_bad += 1
            if first_bad is None:
                first_bad = (absolute, text)
            if on_bad_row is None:
                raise SourceFormatError(
                    f"{file_label}, line {absolute}: expected {len(column_names)} fields, got {text!r}"
                )
            on_bad_row(absolute, text)
        for name, kind in column_types.items():  # an empty or "NA" field reads as null: refuse it
            if name in column_names and pa.types.is_integer(kind) and table.column(name).null_count:
                bad_line, text = _find_line_where(block, line_no, column_names, name, delimiter, _is_integer)
                raise SourceFormatError(f"{file_label}, line {bad_line}: {name} is empty or not a number: {text!r}")
        for name in finite_columns:
            values = table.column(name)
            if values.null_count or not np.isfinite(values.to_numpy(zero_copy_only=False)).all():
                bad_line, text = _find_line_where(block, line_no, column_names, name, delimiter, _is_finite)
                raise SourceFormatError(f"{file_label}, line {bad_line}: {name} is not a finite number: {text!r}")
        if table.num_rows:
            saw_rows = True
            yield from table.to_batches()
    if not saw_rows and first_bad is not None:
        line, text = first_bad
        found = len(text.split(delimiter))  # a multi-character delimiter was replaced by it
        expected = (
            f"the header {expected_header!r}" if expected_header else ", ".join(column_names)
        )
        got_header = f"; the file's header is {header!r}" if header is not None and header != expected_header else ""
        raise SourceFormatError(
            f"{file_label}: wrong number of fields: every one of the {num_bad} data rows was skipped; "
            f"line {line} has {found} fields, expected {len(column_names)} ({expected}){got_header}: {text[:200]!r}"
        )
    if not saw_rows:
        raise SourceFormatError(f"{file_label}: no data rows (empty file?)")


def _is_integer(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _is_finite(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _find_line_where(block: bytes, first_line: int, names, column: str, delimiter: str, ok) -> tuple[int, str]:
    """Locate the first well-formed line whose ``column`` fails ``ok(field)`` (errors only)."""
    position = names.index(column)
    for offset, raw in enumerate(block.split(b"\n")):
        text = raw.decode("utf-8", "replace").rstrip("\r")
        fields = text.split(delimiter)
        if text and len(fields) == len(names) and not ok(fields[position]):
            return first_line + offset, text
    return first_line, block[:80].decode("utf-8", "replace")


def _find_bad_line(block: bytes, first_line: int, names, types, delimiter) -> tuple[int, str]:
    """Locate the first line whose values do not convert (slow path, errors only)."""
    import pyarrow as pa

    for offset, raw in enumerate(block.split(b"\n")):
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text:
            continue
        fields = text.split(delimiter)
        for name, value in zip(names, fields):
            kind = types.get(name)
            if kind is None:
                continue
            try:
                if pa.types.is_integer(kind):
                    int(value)
                elif pa.types.is_floating(kind):
                    float(value)
            except ValueError:
                return first_line + offset, text
    return first_line, block[:80].decode("utf-8", "replace")
