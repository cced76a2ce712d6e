"""Helpers shared by the source readers: CSV reading with row-level errors, paths, splits and case ids."""

from __future__ import annotations

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


def read_csv_strings(path: Path, task: str, log: ProblemLog, required: Iterable[str]) -> pl.DataFrame | None:
    """Read a CSV with every column as text, so that bad values can be reported by row when cast.

    Returns None (after logging a problem) when the file is missing, unreadable, empty or lacks a required column.
    """
    if not path.is_file():
        log.error(task, "CSV file not found", "correct the path in the task card's source", file=path)
        return None
    try:
        frame = pl.read_csv(path, infer_schema=False, raise_if_empty=True)
    except pl.exceptions.NoDataError:
        log.error(task, "CSV file is empty (no header and no rows)", "write the header and one row per image", file=path)
        return None
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        log.error(task, f"cannot parse CSV ({exc})", "save the file as comma-separated UTF-8 text", file=path)
        return None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        log.error(
            task,
            f"CSV is missing required column(s) {', '.join(missing)}; it has {', '.join(frame.columns) or 'none'}",
            "add the column(s) or set the column names in the task card's source",
            file=path,
        )
        return None
    if frame.height == 0:
        log.error(task, "CSV has a header but no rows", "add one row per image or remove the task", file=path)
        return None
    return frame


def iter_path_value_rows(path: Path, task: str, log: ProblemLog, path_column: str, value_column: str) -> Iterator[tuple[int, str, str | None]]:
    """Yield ``(row, path text, value text)`` for each row of a per-image side table (splits, pixel spacings).

    Rows without a path are skipped; a missing or unreadable file is logged by :func:`read_csv_strings` and yields
    nothing. Rows are 1-based, counted from the first line after the header.
    """
    frame = read_csv_strings(path, task, log, (path_column, value_column))
    if frame is None:
        return
    for row, (path_text, value_text) in enumerate(zip(frame[path_column].to_list(), frame[value_column].to_list()), start=1):
        if path_text and path_text.strip():
            yield row, path_text.strip(), value_text


def read_spacing_table(path: Path, task: str, log: ProblemLog, path_column: str, spacing_column: str) -> dict[str, float]:
    """Map each row's path text to its pixel spacing (mm per pixel) from a per-image side table.

    Rows with an empty spacing are left out, so those images keep the source default; a spacing that is not a
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
