"""Helpers shared by the source readers: CSV reading with row-level errors, paths, splits and case ids."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl

from usagg.data.problems import ProblemLog
from usagg.data.record import SampleRecord

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "holdout": "test",
}


# Column that read_csv_strings adds to its frames: the 1-based data row of each record in the file.
ROW_COLUMN = "_csv_row"


def read_csv_strings(path: Path, task: str, log: ProblemLog, required: Iterable[str]) -> pl.DataFrame | None:
    """Read a CSV with every column as text, so that bad values can be reported by row when cast.

    Empty cells are None. ``ROW_COLUMN`` gives each row's 1-based number in the file (the first line after the header
    is row 1), which stays right when other rows are left out. Blank rows (every cell empty) are left out, with a
    warning unless they end the file. Rows with more fields than the header are left out and logged as errors,
    except that empty extra fields (a trailing comma) are dropped.

    Returns None (after logging a problem) when the file is missing, unreadable, empty, lacks a required column or
    has a header but no rows.
    """
    if not path.is_file():
        log.error(task, "CSV file not found", "correct the path in the task card's source", file=path)
        return None
    try:
        header, records = _read_csv_records(path)
    except UnicodeDecodeError as exc:
        log.error(task, f"cannot read the CSV as UTF-8 text ({exc})", "save the file as comma-separated UTF-8 text", file=path)
        return None
    except _CsvSyntaxError as exc:
        log.error(
            task,
            f"cannot parse CSV line {exc.line} ({exc.reason})",
            'quote a value as a whole ("a,b"), write a quote inside a quoted value twice (""), or save the file '
            "as comma-separated UTF-8 text",
            file=path,
        )
        return None
    except OSError as exc:
        log.error(task, f"cannot read CSV ({exc})", "check that the file is readable", file=path)
        return None
    if not header:
        log.error(task, "CSV file is empty (no header and no rows)", "write the header and one row per image", file=path)
        return None
    missing = [c for c in required if c not in header]
    if missing:
        log.error(
            task,
            f"CSV is missing required column(s) {', '.join(missing)}; it has {', '.join(header) or 'none'}",
            "add the column(s) or set the column names in the task card's source",
            file=path,
        )
        return None
    kept = _data_rows(path, task, log, len(header), records)
    if not kept and all(_is_blank_row(fields) for fields in records):
        log.error(task, "CSV has a header but no rows", "add one row per image or remove the task", file=path)
        return None
    names = _unique_names(header)
    columns: dict[str, list] = {name: [_cell(fields, i) for _, fields in kept] for i, name in enumerate(names)}
    columns[ROW_COLUMN] = [row for row, _ in kept]
    return pl.DataFrame(columns, schema={**{name: pl.String for name in names}, ROW_COLUMN: pl.Int64})


class _CsvSyntaxError(Exception):
    """A CSV line the csv module cannot parse, with its 1-based line number in the file."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def _read_csv_records(path: Path) -> tuple[list[str], list[list[str]]]:
    """Return the header and the data records of a CSV file, blank lines before the header skipped.

    The csv module parses the file, not polars, because polars either fails on the whole file at the first row
    with more fields than the header or (with ``truncate_ragged_lines``) cuts the extra fields off without naming
    the row. Each record here is one data row, so its index is the row number the readers report.
    """
    header: list[str] = []
    records: list[list[str]] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            for fields in reader:
                if header:
                    records.append(fields)
                elif not _is_blank_row(fields):
                    header = fields
        except csv.Error as exc:
            raise _CsvSyntaxError(reader.line_num, str(exc)) from None
    return header, records


def read_csv_columns(path: Path) -> tuple[list[str], list[list[str]]] | None:
    """Return a CSV's header and data records without reporting problems, or None when it cannot be parsed.

    For a first look at a file (layout detection); the task's reader reports what is wrong with it later.
    """
    try:
        return _read_csv_records(path)
    except (UnicodeDecodeError, _CsvSyntaxError, OSError):
        return None


def _is_blank_row(fields: list[str]) -> bool:
    """Return whether a record has no text: an empty line, or only commas and spaces."""
    return all(not field.strip() for field in fields)


def _data_rows(path: Path, task: str, log: ProblemLog, width: int, records: list[list[str]]) -> list[tuple[int, list[str]]]:
    """Return ``(row, fields)`` of the records that hold data, logging blank rows and rows with extra fields."""
    last_filled = max((row for row, fields in enumerate(records, start=1) if not _is_blank_row(fields)), default=0)
    kept: list[tuple[int, list[str]]] = []
    for row, fields in enumerate(records, start=1):
        if _is_blank_row(fields):
            # Editors often end a file with blank lines, so only a blank row followed by data is reported.
            if row < last_filled:
                log.warning(task, "the row is blank; skipped", "delete the blank row", file=path, row=row)
            continue
        if len(fields) > width and not _is_blank_row(fields[width:]):
            log.error(
                task,
                f"the row has {len(fields)} fields but the header has {width} columns",
                'quote values that contain commas ("a,b"), or remove the extra field',
                file=path,
                row=row,
            )
            continue
        kept.append((row, fields))
    return kept


def _unique_names(header: list[str]) -> list[str]:
    """Return the header's column names, a repeated name (or one equal to ``ROW_COLUMN``) renamed as polars does."""
    seen = {ROW_COLUMN}
    names: list[str] = []
    for name in header:
        unique, count = name, 0
        while unique in seen:
            unique = f"{name}_duplicated_{count}"
            count += 1
        seen.add(unique)
        names.append(unique)
    return names


def _cell(fields: list[str], index: int) -> str | None:
    """Return a cell's text; None when it is empty or missing from a row shorter than the header."""
    if index >= len(fields) or fields[index] == "":
        return None
    return fields[index]


def is_empty_cell(text: str | None) -> bool:
    """Return whether a CSV cell is empty or only whitespace."""
    return text is None or not text.strip()


def iter_path_value_rows(path: Path, task: str, log: ProblemLog, path_column: str, value_column: str) -> Iterator[tuple[int, str, str | None]]:
    """Yield ``(row, path text, value text)`` for each row of a per-image side table (splits, pixel spacings).

    Rows without a path are skipped; a missing or unreadable file is logged by :func:`read_csv_strings` and yields
    nothing. Rows are 1-based, counted from the first line after the header.
    """
    frame = read_csv_strings(path, task, log, (path_column, value_column))
    if frame is None:
        return
    for row, path_text, value_text in zip(frame[ROW_COLUMN].to_list(), frame[path_column].to_list(), frame[value_column].to_list()):
        if path_text and path_text.strip():
            yield row, path_text.strip(), value_text


def read_spacing_table(path: Path, task: str, log: ProblemLog, path_column: str, spacing_column: str) -> dict[str, float]:
    """Map each row's path text to its pixel spacing (mm per pixel) from a per-image side table.

    Rows with an empty spacing are left out, so those images keep the source default. A spacing that is not a
    positive number is logged with its file and row.
    """
    spacings: dict[str, float] = {}
    for row, path_text, spacing_text in iter_path_value_rows(path, task, log, path_column, spacing_column):
        if spacing_text is None or not spacing_text.strip():
            continue
        value = parse_float(spacing_text)
        if value is None or value <= 0:
            log.error(
                task, f"pixel spacing {spacing_text!r} in column {spacing_column!r} is not a positive number",
                "write mm per pixel, e.g. 0.12, or leave the cell empty", file=path, row=row,
            )
            continue
        spacings[path_text] = value
    return spacings


def parse_float(text: str | None) -> float | None:
    """Parse a number written in a CSV cell; None for empty or non-numeric text."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_int(text: str | None) -> int | None:
    """Parse an integer, accepting integral floats such as ``1.0``; None otherwise."""
    value = parse_float(text)
    if value is None or value != int(value):
        return None
    return int(value)


def format_ranges(values: Iterable[int]) -> str:
    """``2..6, 9`` for 2, 3, 4, 5, 6, 9: sorted integers with runs written as ranges."""
    items = sorted(set(values))
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}..{items[j]}")
        i = j + 1
    return ", ".join(parts)


def resolve(base: Path, text: str) -> Path:
    """Resolve a path written in a label file relative to ``base``; absolute paths stay as they are."""
    path = Path(text.strip())
    return path if path.is_absolute() else base / path


def normalise_split(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    return SPLIT_ALIASES.get(value.strip().lower())


def case_from_path(path: Path, case_regex: str | None) -> str | None:
    """Return the case id from the file stem with the source's ``case_regex``, or None."""
    if case_regex is None:
        return None
    match = re.search(case_regex, path.stem)
    return match.group(1) if match else None


def report_duplicates(records: list[SampleRecord], task: str, log: ProblemLog) -> list[SampleRecord]:
    """Log a problem for every image listed more than once and keep only its first entry."""
    counts = Counter(r.image_path for r in records)
    if all(n == 1 for n in counts.values()):
        return records
    first_row: dict[Path, int | None] = {}
    kept: list[SampleRecord] = []
    for record in records:
        if record.image_path in first_row:
            first = first_row[record.image_path]
            log.error(
                task,
                f"duplicate entry for image {record.image_path}" + (f" (first listed in row {first})" if first else ""),
                "list each image once per task (merge or delete the repeated row)",
                file=record.source_file,
                row=record.row,
            )
            continue
        first_row[record.image_path] = record.row
        kept.append(record)
    return kept


def split_column_value(
    text: str | None, task: str, log: ProblemLog, file: Path, row: int, column: str
) -> tuple[bool, str | None]:
    """Parse a split cell; returns (ok, split). Empty cells mean 'no fixed split'."""
    if text is None or not text.strip():
        return True, None
    split = normalise_split(text)
    if split is None:
        log.error(
            task,
            f"split column {column!r} has value {text!r}",
            "use train, val or test (or leave the cell empty)",
            file=file,
            row=row,
        )
        return False, None
    return True, split
