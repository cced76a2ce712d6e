"""The results table: the contract between evaluation and analysis.

Long format, one row per (run, task, metric), stored as parquet with a CSV copy beside it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from usagg.errors import DataError
from usagg.io import atomic_path
from usagg.tasks import HIGHER_IS_BETTER, TaskType

RESULTS_SCHEMA: dict[str, pl.DataType] = {
    "study": pl.String,
    "run_id": pl.String,
    "paradigm": pl.String,
    "group": pl.String,
    "task": pl.String,
    "task_type": pl.String,
    "organ": pl.String,
    "clinical_group": pl.String,
    "n_train": pl.Int64,
    "data_fraction": pl.Float64,
    "seed": pl.Int64,
    "split": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "higher_is_better": pl.Boolean,
    "source": pl.String,
}

# Cells of a results CSV read as missing values.
CSV_NULL_VALUES = ["", "NA", "null"]

# Per-image scores of one run, kept in its run directory so that bootstrap intervals over test images are possible.
PER_IMAGE_FILE = "per_image_scores.parquet"
PER_IMAGE_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "task": pl.String,
    "split": pl.String,
    "image": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
}

# Columns that may be null: seed for numbers typed in from a publication; organ may be unknown.
NULLABLE_COLUMNS = {"seed", "organ", "value", "n_train"}

# Values of the paradigm column: the reference, the two aggregated paradigms and two-task runs for affinity.
PARADIGMS = ("task_specific", "grouped", "unified", "pair")

# Values of the task_type column. Rows of metric train_images may also count the images of "all" task types.
TASK_TYPES = tuple(task_type.value for task_type in TaskType)
TRAIN_IMAGES_METRIC = "train_images"

# Strings the CSV reader accepts in the boolean column, compared in lower case.
BOOLEAN_STRINGS = {"true": True, "false": False}

# Expected content of each typed column's cells, and the fix for a bad cell, as error messages word them.
CELL_FIXES: dict[str, tuple[str, str]] = {
    "n_train": ("a whole number", "write the task's training-image count (e.g. 240), or leave the cell empty if unknown"),
    "data_fraction": ("a number", "write the fraction of the training set used (e.g. 0.25 or 1.0)"),
    "seed": ("a whole number", "write the training seed (e.g. 0), or leave the cell empty for a number from a publication"),
    "value": ("a number", "write the metric value with a dot as the decimal mark (e.g. 0.83), or leave the cell empty if missing"),
    "higher_is_better": ("true or false", "write true or false"),
}


def empty_results() -> pl.DataFrame:
    return pl.DataFrame(schema=RESULTS_SCHEMA)


def _row_number(index: int) -> int:
    """Return the 1-based row number of 0-based row ``index``; in a CSV file the line after the header is row 1."""
    return index + 1


def _cast_column(df: pl.DataFrame, column: str, dtype: pl.DataType, origin: str) -> pl.Series:
    """Cast one column to ``dtype``, or raise naming the first cell that cannot be read as ``dtype``."""
    source = df.get_column(column)
    if dtype.is_integer() and source.dtype.is_float():
        # A float-to-integer cast truncates 5000.5 to 5000 without a word, so a fractional count is named here.
        fractional = (source.is_not_null() & source.is_not_nan() & (source != source.floor())).arg_true()
        if fractional.len():
            index = int(fractional[0])
            kind, fix = CELL_FIXES.get(column, ("a whole number", "write a whole number"))
            raise DataError(f"{origin}: row {_row_number(index)}: column {column!r} has {source[index]!r}, which is not {kind}; {fix}")
    try:
        if dtype == pl.Boolean and source.dtype == pl.String:
            cast = (
                source.str.strip_chars()
                .str.to_lowercase()
                .replace_strict(BOOLEAN_STRINGS, default=None, return_dtype=pl.Boolean)
            )
        else:
            try:
                return source.cast(dtype, strict=True)
            except pl.exceptions.PolarsError:
                cast = source.cast(dtype, strict=False)
    except pl.exceptions.PolarsError:
        raise DataError(
            f"{origin}: column {column!r} contains {source.dtype} values, which cannot be read as {dtype}; "
            f"write the column as {dtype}"
        ) from None
    bad = (cast.is_null() & source.is_not_null()).arg_true()
    if bad.len():
        index = int(bad[0])
        kind, fix = CELL_FIXES.get(column, (str(dtype), f"write a {dtype} value"))
        raise DataError(
            f"{origin}: row {_row_number(index)}: column {column!r} has {source[index]!r}, which is not {kind}; {fix}"
        )
    return cast


def validate_results(df: pl.DataFrame, origin: str = "results table") -> pl.DataFrame:
    """Cast ``df`` to the results schema, or raise naming the missing columns or the first bad row.

    Rows are numbered from 1, the header not counted, as the data readers number CSV rows.
    """
    missing = [c for c in RESULTS_SCHEMA if c not in df.columns]
    if missing:
        raise DataError(
            f"{origin}: missing required column(s) {', '.join(missing)}{_column_hint(df.columns, missing)}; "
            f"a results table needs the columns {', '.join(RESULTS_SCHEMA)} (the cells of "
            f"{', '.join(c for c in RESULTS_SCHEMA if c in NULLABLE_COLUMNS)} may be empty; see docs/analysis.md)"
        )
    out = pl.DataFrame([_cast_column(df, c, t, origin).alias(c) for c, t in RESULTS_SCHEMA.items()])
    # A space typed before or after a name ("breast_lesion ") would make another task; an empty cell stays empty.
    text = [c for c, t in RESULTS_SCHEMA.items() if t == pl.String]
    out = out.with_columns(pl.col(c).str.strip_chars().replace("", None) for c in text)
    for column in RESULTS_SCHEMA:
        if column in NULLABLE_COLUMNS:
            continue
        nulls = out.with_row_index("row").filter(pl.col(column).is_null())
        if nulls.height:
            row = _row_number(nulls["row"][0])
            raise DataError(f"{origin}: row {row}: column {column!r} is empty; every row needs a {column}")
    indexed = out.with_row_index("row")
    _reject_unknown(indexed, "paradigm", PARADIGMS, origin)
    scores = indexed.filter(pl.col("metric") != TRAIN_IMAGES_METRIC)
    _reject_unknown(scores, "task_type", TASK_TYPES, origin)
    _reject_unknown(indexed, "task_type", (*TASK_TYPES, "all"), origin)
    _check_directions(scores, origin)
    _check_task_types(scores, origin)
    _check_ranges(scores, origin)
    _check_repeated_rows(scores, origin)
    return out


# A results table has one row per run, task, metric and split (per study, as tables of several studies merge).
ROW_KEY = ("study", "run_id", "task", "metric", "split")


def _first_conflict(rows: pl.DataFrame, keys: Sequence[str], column: str | None = None) -> tuple[dict, dict] | None:
    """Return the first two rows that share ``keys`` and differ in ``column`` (any two such rows without one).

    ``rows`` carries the 0-based ``row`` index. Returns None when no two rows conflict.
    """
    spread = pl.len() if column is None else pl.col(column).n_unique()
    clashing = rows.filter(spread.over(keys) > 1).sort("row")
    if clashing.is_empty():
        return None
    first = clashing.row(0, named=True)
    same_keys = pl.all_horizontal([pl.col(k).eq_missing(first[k]) for k in keys])
    differs = pl.col("row") != first["row"] if column is None else pl.col(column).ne_missing(first[column])
    return first, clashing.filter(same_keys & differs).row(0, named=True)


def _check_repeated_rows(indexed: pl.DataFrame, origin: str) -> None:
    """Raise when two score rows have the same run, task, metric and split: the analyses would count both as seeds."""
    conflict = _first_conflict(indexed, ROW_KEY)
    if conflict is not None:
        first, other = conflict
        same = "the same value" if first["value"] == other["value"] else f"values {first['value']:g} and {other['value']:g}"
        raise DataError(
            f"{origin}: rows {_row_number(first['row'])} and {_row_number(other['row'])} both give run "
            f"{first['run_id']!r}, task {first['task']!r}, metric {first['metric']!r}, split {first['split']!r} "
            f"({same}); keep one row per run, task, metric and split, or give a repeated run its own run_id and seed"
        )


# Metrics whose values are fractions; a value outside these bounds is usually a percentage or a typo.
METRIC_RANGES = {
    "dice": (0.0, 1.0), "iou": (0.0, 1.0), "auc": (0.0, 1.0), "accuracy": (0.0, 1.0), "f1_macro": (0.0, 1.0),
    "f1_weighted": (0.0, 1.0), "map50": (0.0, 1.0), "mcc": (-1.0, 1.0),
}


def _check_task_types(scores: pl.DataFrame, origin: str) -> None:
    """Raise when one task of a study has two task types: its rows would be analysed as two tasks."""
    conflict = _first_conflict(scores, ("study", "task"), "task_type")
    if conflict is not None:
        first, other = conflict
        raise DataError(
            f"{origin}: rows {_row_number(first['row'])} and {_row_number(other['row'])}: task {first['task']!r} "
            f"has task_type {first['task_type']!r} in one and {other['task_type']!r} in the other; give every row "
            "of a task its one task type"
        )


def _check_ranges(scores: pl.DataFrame, origin: str) -> None:
    """Raise on a fraction metric outside its range, e.g. a Dice of 91 typed as a percentage."""
    for metric, (low, high) in METRIC_RANGES.items():
        outside = scores.filter(
            (pl.col("metric") == metric) & pl.col("value").is_not_nan() & ((pl.col("value") < low) | (pl.col("value") > high))
        )
        if outside.height:
            row = outside.row(0, named=True)
            hint = f" (write {row['value'] / 100:g} for {row['value']:g} %)" if 1 < row["value"] <= 100 else ""
            raise DataError(
                f"{origin}: row {_row_number(row['row'])}: metric {metric!r} has value {row['value']:g}, outside "
                f"{low:g}..{high:g}; write it as a fraction{hint}"
            )


def _column_hint(present: list[str], missing: list[str]) -> str:
    """Return a hint for a header read as one column (another delimiter) or for misspelled column names."""
    if len(present) == 1:
        for delimiter in (";", "\t", "|"):
            if delimiter in present[0]:
                delimiter_name = "a tab" if delimiter == "\t" else repr(delimiter)
                return (
                    f" (the header was read as one column, so the file seems to separate columns with {delimiter_name}; "
                    "write it comma-separated)"
                )
    unknown = [c for c in present if c not in RESULTS_SCHEMA]
    guesses = []
    for column in missing:
        close = difflib.get_close_matches(column, unknown, n=1)
        if close:
            guesses.append(f"{close[0]!r} for {column!r}")
    return f" (found {', '.join(guesses)}: rename them)" if guesses else ""


def _reject_unknown(indexed: pl.DataFrame, column: str, allowed: tuple[str, ...], origin: str) -> None:
    """Raise naming the first row whose ``column`` is not in ``allowed``, with the closest allowed value."""
    unknown = indexed.filter(~pl.col(column).is_in(allowed))
    if unknown.height == 0:
        return
    value = unknown[column][0]
    close = difflib.get_close_matches(value, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(
        f"{origin}: row {_row_number(unknown['row'][0])}: {column} {value!r} is not a known {column}{hint}; "
        f"use one of {', '.join(allowed)}"
    )


def _check_directions(scores: pl.DataFrame, origin: str) -> None:
    """Raise when higher_is_better contradicts a known metric or differs between rows of one task and metric.

    A wrong direction flips the sign of every relative change of that metric without any other symptom.
    """
    known = scores.filter(pl.col("metric").is_in(list(HIGHER_IS_BETTER)))
    expected = known["metric"].replace_strict(HIGHER_IS_BETTER, return_dtype=pl.Boolean)
    wrong = known.filter(pl.col("higher_is_better") != expected)
    if wrong.height:
        row = wrong.row(0, named=True)
        better = "higher" if HIGHER_IS_BETTER[row["metric"]] else "lower"
        raise DataError(
            f"{origin}: row {_row_number(row['row'])}: metric {row['metric']!r} has higher_is_better "
            f"{str(row['higher_is_better']).lower()}, but a {better} {row['metric']} is better; write "
            f"{str(HIGHER_IS_BETTER[row['metric']]).lower()}"
        )
    conflict = _first_conflict(scores, ("study", "task", "metric"), "higher_is_better")
    if conflict is not None:
        first, other = conflict
        raise DataError(
            f"{origin}: rows {_row_number(first['row'])} and {_row_number(other['row'])}: task {first['task']!r}, "
            f"metric {first['metric']!r} has higher_is_better {str(first['higher_is_better']).lower()} in one and "
            f"{str(other['higher_is_better']).lower()} in the other; give every row of a metric the same direction"
        )


def read_results(path: str | os.PathLike) -> pl.DataFrame:
    """Read a results table from parquet or CSV and validate it against the schema."""
    file = Path(path)
    if file.is_dir():
        candidate = file / "results.parquet"
        if not candidate.exists():
            raise DataError(f"{file}: no results.parquet in this folder; run `usagg results collect {file}` first")
        file = candidate
    if not file.exists():
        raise DataError(f"{file}: results table not found")
    if file.suffix == ".parquet":
        try:
            df = pl.read_parquet(file)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataError(
                f"{file}: cannot read as a parquet file ({str(exc).splitlines()[0]}); if it is a CSV file, "
                f"rename it to .csv"
            ) from None
    elif file.suffix == ".csv":
        try:
            df = pl.read_csv(file, schema_overrides=RESULTS_SCHEMA, null_values=CSV_NULL_VALUES)
        except pl.exceptions.PolarsError as exc:
            # A cell does not parse as its column's type. Read every cell as text, so that validate_results
            # can name the row, the column and the value.
            try:
                df = pl.read_csv(file, infer_schema=False, null_values=CSV_NULL_VALUES)
            except pl.exceptions.PolarsError:
                raise DataError(f"{file}: cannot read as a results CSV: {str(exc).splitlines()[0]}") from None
    else:
        raise DataError(f"{file}: unsupported results format {file.suffix!r}; use .parquet or .csv")
    return validate_results(df, origin=str(file))


def write_results(df: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` atomically as parquet plus a CSV copy with the same stem; return the parquet path."""
    file = Path(path)
    if file.suffix != ".parquet":
        file = file.with_suffix(".parquet")
    table = validate_results(df, origin=str(file))
    with atomic_path(file) as tmp:
        table.write_parquet(tmp)
    with atomic_path(file.with_suffix(".csv")) as tmp:
        table.write_csv(tmp)
    return file


def append_results(df: pl.DataFrame, path: str | os.PathLike, key: tuple[str, ...] = ("run_id", "task", "metric", "split")) -> Path:
    """Merge ``df`` into the table at ``path``, replacing rows with the same key; atomic."""
    file = Path(path)
    new = validate_results(df)
    if file.exists():
        old = read_results(file)
        old = old.join(new.select(key).unique(), on=list(key), how="anti")
        new = pl.concat([old, new], how="vertical")
    return write_results(new, file)
