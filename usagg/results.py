"""The results table: the contract between evaluation and analysis.

Long format, one row per (run, task, metric), stored as parquet with a CSV copy beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from usagg.errors import DataError
from usagg.io import atomic_path

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


def empty_results() -> pl.DataFrame:
    return pl.DataFrame(schema=RESULTS_SCHEMA)


def validate_results(df: pl.DataFrame, origin: str = "results table") -> pl.DataFrame:
    """Cast ``df`` to the results schema, or raise naming the missing columns or the first bad row."""
    missing = [c for c in RESULTS_SCHEMA if c not in df.columns]
    if missing:
        raise DataError(
            f"{origin}: missing required column(s) {', '.join(missing)}; "
            f"a results table needs the columns {', '.join(RESULTS_SCHEMA)}"
        )
    try:
        out = df.select([pl.col(c).cast(t, strict=True) for c, t in RESULTS_SCHEMA.items()])
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{origin}: a column has values of the wrong type: {exc}") from None
    for column in RESULTS_SCHEMA:
        if column in NULLABLE_COLUMNS:
            continue
        nulls = out.with_row_index("row").filter(pl.col(column).is_null())
        if nulls.height:
            row = nulls["row"][0] + 2  # +1 for the header line, +1 for 1-based rows
            raise DataError(f"{origin}: row {row}: column {column!r} is empty; every row needs a {column}")
    return out


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
        df = pl.read_parquet(file)
    elif file.suffix == ".csv":
        try:
            df = pl.read_csv(file, schema_overrides={c: t for c, t in RESULTS_SCHEMA.items()}, null_values=["", "NA", "null"])
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{file}: cannot read as a results CSV: {exc}") from None
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
