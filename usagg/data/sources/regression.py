"""Readers for regression labels: keypoints as x/y columns, and scalar values (with unit and pixel spacing)."""

from __future__ import annotations

import os
from pathlib import Path

from usagg.data.problems import ProblemLog
from usagg.data.record import SampleRecord
from usagg.data.sources._common import (
    ROW_COLUMN,
    case_from_path,
    is_empty_cell,
    parse_float,
    read_csv_strings,
    report_duplicates,
    resolve,
    split_column_value,
)
from usagg.tasks import KeypointCsvSource, ScalarCsvSource, TaskCard


def default_point_columns(num_keypoints: int) -> list[tuple[str, str]]:
    return [(f"x{i}", f"y{i}") for i in range(1, num_keypoints + 1)]


def _common_fields(
    card: TaskCard,
    source: KeypointCsvSource | ScalarCsvSource,
    root: Path,
    file: Path,
    row: int,
    cells: dict[str, str | None],
    split: str | None,
    log: ProblemLog,
) -> dict | None:
    """Parse the image path, case, split and spacing columns shared by both readers; None if the row is unusable."""
    task = card.name
    path_text = (cells[source.path_column] or "").strip()
    if not path_text:
        log.error(task, f"column {source.path_column!r} is empty", "write the image path relative to the source root", file=file, row=row)
        return None
    image_path = Path(os.path.normpath(resolve(root, path_text)))
    if not image_path.is_file():
        log.error(task, f"image file {image_path} not found", f"correct column {source.path_column!r} (paths are relative to {root}) or restore the file", file=file, row=row)
        return None
    row_split = split
    if source.split_column:
        ok, fixed = split_column_value(cells[source.split_column], task, log, file, row, source.split_column)
        if not ok:
            return None
        row_split = fixed or split
    spacing = None  # the dataset falls back to the file header, then to source.pixel_spacing_mm
    if source.spacing_column:
        text = cells[source.spacing_column]
        if text is not None and text.strip():
            value = parse_float(text)
            if value is None or value <= 0:
                log.error(task, f"pixel spacing {text!r} in column {source.spacing_column!r} is not a positive number", "write mm per pixel, e.g. 0.12, or leave the cell empty", file=file, row=row)
                return None
            spacing = value
    case = (cells[source.case_column] or "").strip() if source.case_column else ""
    return {
        "task": task,
        "image_path": image_path,
        "source_file": file,
        "row": row,
        "case_id": case or case_from_path(image_path, source.case_regex),
        "split": row_split,
        "spacing_mm_per_px": spacing,
    }


def _optional_columns(source: KeypointCsvSource | ScalarCsvSource) -> list[str]:
    return [c for c in (source.case_column, source.split_column, source.spacing_column) if c]


def _keypoint_message(x_column: str, y_column: str, cells: dict[str, str | None]) -> str:
    """Describe a keypoint whose x or y cell is empty or not a number."""
    empty = [c for c in (x_column, y_column) if is_empty_cell(cells[c])]
    if len(empty) == 2:
        return f"keypoint ({x_column}, {y_column}): columns {x_column!r} and {y_column!r} are empty"
    if empty:
        return f"keypoint ({x_column}, {y_column}): column {empty[0]!r} is empty"
    return f"keypoint ({x_column}, {y_column}) = ({cells[x_column]!r}, {cells[y_column]!r}) is not numeric"


def read_keypoint_csv(card: TaskCard, source: KeypointCsvSource, root: Path, split: str | None, log: ProblemLog) -> list[SampleRecord]:
    task = card.name
    file = root / source.csv
    count = card.num_keypoints or 0
    columns = source.point_columns or default_point_columns(count)
    if len(columns) != count:
        log.error(task, f"source.point_columns names {len(columns)} points but num_keypoints is {count}", "list one (x, y) column pair per point", file=file)
        return []
    required = [source.path_column] + [c for pair in columns for c in pair] + _optional_columns(source)
    frame = read_csv_strings(file, task, log, required)
    if frame is None:
        return []
    records: list[SampleRecord] = []
    for cells in frame.to_dicts():
        row = cells[ROW_COLUMN]
        points = []
        for x_column, y_column in columns:
            x, y = parse_float(cells[x_column]), parse_float(cells[y_column])
            if x is None or y is None:
                log.error(task, _keypoint_message(x_column, y_column, cells), "write x and y in pixels (missing points are not supported)", file=file, row=row)
                break
            points.append((x, y))
        if len(points) != count:
            continue
        fields = _common_fields(card, source, root, file, row, cells, split, log)
        if fields is not None:
            records.append(SampleRecord(keypoints_xy=tuple(points), **fields))
    return report_duplicates(records, task, log)


def read_scalar_csv(card: TaskCard, source: ScalarCsvSource, root: Path, split: str | None, log: ProblemLog) -> list[SampleRecord]:
    task = card.name
    file = root / source.csv
    required = [source.path_column, source.value_column] + _optional_columns(source)
    if source.unit_column:
        required.append(source.unit_column)
    frame = read_csv_strings(file, task, log, required)
    if frame is None:
        return []
    records: list[SampleRecord] = []
    for cells in frame.to_dicts():
        row = cells[ROW_COLUMN]
        text = cells[source.value_column]
        value = parse_float(text)
        if value is None:
            if is_empty_cell(text):
                message = f"value in column {source.value_column!r} is empty"
            else:
                message = f"value {text!r} in column {source.value_column!r} is not a number"
            log.error(task, message, "write the target value as a number", file=file, row=row)
            continue
        if source.unit_column:
            unit = (cells[source.unit_column] or "").strip()
            if card.unit is not None and unit and unit != card.unit:
                log.error(task, f"unit {unit!r} differs from the task card's unit {card.unit!r}", "convert the value to the card's unit or change the card", file=file, row=row)
                continue
        fields = _common_fields(card, source, root, file, row, cells, split, log)
        if fields is not None:
            records.append(SampleRecord(value=value, **fields))
    return report_duplicates(records, task, log)
