"""Reader for the FMC_UIA challenge layout: ``ROOT/csv_files/*.csv`` with paths relative to ``csv_files/``.

Every CSV has ``image_path, task_id, task_name, num_classes`` and the columns of its task type:
``mask_path`` (segmentation, PNG of class indices), ``mask`` (classification: the integer label),
``x_min, y_min, x_max, y_max`` (detection: one box in pixels) or ``point_{i}_xy`` (``Regression``: JSON ``[x, y]``
in pixels, ``num_classes`` = number of points). The official loaders concatenate all CSVs, so a task's rows are
found by ``task_id`` in any CSV of the folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from usagg.data.problems import ProblemLog
from usagg.data.record import SampleRecord
from usagg.data.sources._common import (
    ROW_COLUMN,
    case_from_path,
    is_empty_cell,
    parse_float,
    parse_int,
    read_csv_strings,
    read_spacing_table,
    report_duplicates,
)
from usagg.tasks import FmcUiaSource, TaskCard, TaskType

logger = logging.getLogger(__name__)

# ``task_name`` values exactly as the challenge writes them (note the capital R).
FMC_UIA_TASK_NAMES: dict[str, TaskType] = {
    "segmentation": TaskType.segmentation,
    "classification": TaskType.classification,
    "detection": TaskType.detection,
    "Regression": TaskType.regression,
}

BASE_COLUMNS = ("image_path", "task_id", "task_name", "num_classes")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
TYPE_COLUMNS: dict[str, tuple[str, ...]] = {
    "segmentation": ("mask_path",),
    "classification": ("mask",),
    "detection": BOX_COLUMNS,
    "Regression": (),  # point_{i}_xy, i = 1..num_classes, checked per task
}

# The explicit schema of the layout. Cells are read as text and parsed per row with these types (``parse_cell``),
# so a bad cell is reported with its row instead of failing the whole file.
FMC_UIA_SCHEMA: dict[str, type[pl.DataType]] = {
    "image_path": pl.String,
    "task_id": pl.String,
    "task_name": pl.String,
    "num_classes": pl.Int64,
    "mask_path": pl.String,
    "mask": pl.Int64,
    "x_min": pl.Float64,
    "y_min": pl.Float64,
    "x_max": pl.Float64,
    "y_max": pl.Float64,
    # point_{i}_xy: pl.String containing JSON "[x, y]"
}


def parse_cell(column: str, text: str | None) -> int | float | str | None:
    """Parse one cell with the type ``FMC_UIA_SCHEMA`` gives its column; None when it is empty or invalid."""
    dtype = FMC_UIA_SCHEMA.get(column, pl.String)
    if dtype == pl.Int64:
        return parse_int(text)
    if dtype == pl.Float64:
        return parse_float(text)
    return text.strip() if text is not None and text.strip() else None


def point_column(index: int) -> str:
    """Return the column of the 1-based point ``index``."""
    return f"point_{index}_xy"


def csv_folder(root: Path) -> Path:
    return root / "csv_files"


def _read_task_tables(root: Path, task_id: str | None, log: ProblemLog, task_label: str) -> list[tuple[Path, pl.DataFrame]]:
    """Read the CSVs of ``root`` and return (file, rows of ``task_id``) pairs; all rows when ``task_id`` is None."""
    folder = csv_folder(root)
    if not folder.is_dir():
        log.error(
            task_label,
            "has no csv_files/ folder, so it is not an FMC_UIA root",
            "point source.root, or the folder given to `usagg data check`, at the folder that contains csv_files/ "
            "(for example data/train)",
            file=root,
        )
        return []
    files = sorted(folder.glob("*.csv"))
    if not files:
        log.error(task_label, "contains no CSV files", "put one CSV per task in csv_files/", file=folder)
        return []
    tables: list[tuple[Path, pl.DataFrame]] = []
    for file in files:
        file_log = ProblemLog(strict=False)
        frame = read_csv_strings(file, task_label if task_id is not None else file.stem, file_log, BASE_COLUMNS)
        _pass_on_problems(file, frame, task_id, task_label, file_log, log)
        if frame is None:
            continue
        if task_id is not None:
            frame = frame.filter(pl.col("task_id").str.strip_chars() == task_id)
        if frame.height:
            tables.append((file, frame))
    return tables


def _pass_on_problems(
    file: Path, frame: pl.DataFrame | None, task_id: str | None, task_label: str, file_log: ProblemLog, log: ProblemLog
) -> None:
    """Add the problems found while reading one CSV to ``log``, so that each is reported once, by the task it concerns.

    A row's problem (a blank row, a row with extra fields) in ``<task_id>.csv`` that contains rows of that task id
    is reported when that task is read, so task discovery (``task_id`` None) and the other tasks leave it out. In
    any other CSV the row could belong to any task, so every task that reads the file reports it. A file that
    cannot be read at all is an error for the task it is named after and a warning for the others.
    """
    if task_id is None:
        for problem in file_log.problems:
            if problem.row is None:
                log.add(problem)
        return
    if file.stem == task_id:
        for problem in file_log.problems:
            log.add(problem)
        return
    if frame is None:
        for problem in file_log.problems:
            log.warning(task_label, f"skipped unreadable CSV: {problem.message}", problem.fix, file=problem.file)
        return
    owned = file.stem in {text.strip() for text in frame["task_id"].to_list() if text}
    if not owned:
        for problem in file_log.problems:
            log.add(problem)


def _load_spacings(source: FmcUiaSource, root: Path, task: str, log: ProblemLog) -> dict[str, float]:
    if source.spacing_csv is None:
        return {}
    table = read_spacing_table(root / source.spacing_csv, task, log, source.spacing_path_column, source.spacing_column)
    base = csv_folder(root)
    return {os.path.normpath(base / path_text): value for path_text, value in table.items()}


def read_fmc_uia(card: TaskCard, source: FmcUiaSource, root: Path, split: str | None, log: ProblemLog) -> list[SampleRecord]:
    """Read the rows of one task from an FMC_UIA root."""
    task_id = source.task_id or card.name
    tables = _read_task_tables(root, task_id, log, card.name)
    if not tables and csv_folder(root).is_dir() and any(csv_folder(root).glob("*.csv")):
        known = sorted(discover_task_ids(root))
        log.error(
            card.name,
            f"no rows with task_id {task_id!r} in {csv_folder(root)}; task ids found: {', '.join(known) or 'none'}",
            "set source.task_id (or the task name) to one of the ids found",
            file=csv_folder(root),
        )
        return []
    spacings = _load_spacings(source, root, card.name, log)
    records: list[SampleRecord] = []
    for file, frame in tables:
        records.extend(_read_rows(card, source, file, frame, split, spacings, log))
    return report_duplicates(records, card.name, log)


def _expected_count(card: TaskCard) -> int | None:
    """Return the ``num_classes`` cell every row must hold: points for Regression, classes otherwise."""
    if card.type is TaskType.regression:
        return card.num_keypoints
    return card.num_classes  # detection: object classes, 1 in every FMC_UIA detection task


def _read_rows(
    card: TaskCard,
    source: FmcUiaSource,
    file: Path,
    frame: pl.DataFrame,
    split: str | None,
    spacings: dict[str, float],
    log: ProblemLog,
) -> list[SampleRecord]:
    task = card.name
    names = frame["task_name"].to_list()
    # The columns of the task type must exist before any row is read.
    type_names = {n.strip() for n in names if n is not None}
    for name in sorted(type_names):
        if name not in FMC_UIA_TASK_NAMES:
            continue
        required = list(TYPE_COLUMNS[name])
        if name == "Regression" and card.num_keypoints:
            required = [point_column(i) for i in range(1, card.num_keypoints + 1)]
        missing = [c for c in required if c not in frame.columns]
        if missing:
            fix = f"add the column(s); {name} rows need {', '.join(required)}"
            if name == "Regression":
                present = sum(1 for i in range(1, len(frame.columns) + 1) if point_column(i) in frame.columns)
                # A card that wants more points than the file has is the likelier mistake.
                fix = f"set num_keypoints: {present} in the task card if the CSV's {present} point column(s) are all, or {fix}"
            log.error(task, f"CSV for task_name {name!r} is missing column(s) {', '.join(missing)}", fix, file=file)
            return []
    expected = _expected_count(card)
    records: list[SampleRecord] = []
    rows = frame.to_dicts()
    for cells in rows:
        row = int(cells[ROW_COLUMN])
        record = _read_row(card, source, file, row, cells, expected, split, spacings, log)
        if record is not None:
            records.append(record)
    return records


@dataclass(frozen=True)
class _Row:
    """One CSV row being read: where it is, for error messages, and the folder its paths are relative to."""

    card: TaskCard
    file: Path
    row: int
    log: ProblemLog

    def error(self, message: str, fix: str) -> None:
        self.log.error(self.card.name, message, fix, file=self.file, row=self.row)

    def path(self, text: str) -> Path:
        return Path(os.path.normpath(self.file.parent / text))


def _read_row(
    card: TaskCard,
    source: FmcUiaSource,
    file: Path,
    row: int,
    cells: dict[str, str | None],
    expected: int | None,
    split: str | None,
    spacings: dict[str, float],
    log: ProblemLog,
) -> SampleRecord | None:
    context = _Row(card, file, row, log)
    if not _check_type_and_count(context, cells, expected):
        return None
    image_text = (cells.get("image_path") or "").strip()
    if not image_text:
        context.error("image_path is empty", "write the image path relative to csv_files/")
        return None
    image_path = context.path(image_text)
    image_found = image_path.is_file()
    if not image_found:
        context.error(f"image file {image_path} not found", "correct image_path (relative to csv_files/) or restore the file")

    fields = _label_fields(context, cells)
    if fields is None or not image_found:
        return None
    return SampleRecord(
        task=card.name,
        image_path=image_path,
        source_file=file,
        row=row,
        case_id=case_from_path(image_path, source.case_regex),
        split=split,
        spacing_mm_per_px=spacings.get(str(image_path)),
        **fields,  # type: ignore[arg-type]
    )


def _check_type_and_count(context: _Row, cells: dict[str, str | None], expected: int | None) -> bool:
    """Check ``task_name`` and ``num_classes`` of a row against the task card."""
    card = context.card
    name = (cells.get("task_name") or "").strip()
    if name not in FMC_UIA_TASK_NAMES:
        context.error(
            f"unknown task type {name!r} in column task_name",
            f"use one of {', '.join(FMC_UIA_TASK_NAMES)} (exact spelling, 'Regression' with a capital R)",
        )
        return False
    if FMC_UIA_TASK_NAMES[name] is not card.type:
        context.error(
            f"task_name is {name!r} but the task card has type {card.type.value!r}",
            "make the card's type match the CSV (or point the card at the right task_id)",
        )
        return False
    text = cells.get("num_classes")
    count = parse_cell("num_classes", text)
    if count is None:
        problem = "num_classes is empty" if is_empty_cell(text) else f"num_classes {text!r} is not an integer"
        context.error(problem, "write the number of classes (points for Regression)")
        return False
    if expected is not None and count != expected:
        what = "num_keypoints" if card.type is TaskType.regression else "num_classes"
        context.error(
            f"num_classes is {count} in this row but the task's {what} is {expected} (from its task card, or "
            "from most of its rows when the card was built from the CSVs)",
            f"correct this row's num_classes, or set {what}: {count} in a study's task card if every row has {count}",
        )
        return False
    return True


def _label_fields(context: _Row, cells: dict[str, str | None]) -> dict[str, object] | None:
    """Parse the label columns of the card's task type into ``SampleRecord`` fields; None if they are invalid."""
    card = context.card
    if card.type is TaskType.segmentation:
        mask_text = (cells.get("mask_path") or "").strip()
        if not mask_text:
            context.error("mask_path is empty", "write the mask path relative to csv_files/")
            return None
        mask_path = context.path(mask_text)
        if not mask_path.is_file():
            context.error(f"mask file {mask_path} not found", "correct mask_path (relative to csv_files/) or restore the file")
            return None
        return {"mask_path": mask_path}

    if card.type is TaskType.classification:
        text = cells.get("mask")
        label = parse_cell("mask", text)
        last = (card.num_classes or 1) - 1
        if label is None:
            if is_empty_cell(text):
                message = "class label in column 'mask' is empty"
            else:
                message = f"class label {text!r} in column 'mask' is not an integer"
            context.error(message, f"write an integer class index 0..{last}")
            return None
        if not 0 <= label <= last:
            context.error(f"class label {label} in column 'mask' is outside 0..{last}", f"use class indices 0..{last} or raise num_classes")
            return None
        return {"label": label}

    if card.type is TaskType.detection:
        values = [parse_cell(c, cells.get(c)) for c in BOX_COLUMNS]
        if any(v is None for v in values):
            bad = [f"{c} is empty" if is_empty_cell(cells.get(c)) else f"{c}={cells.get(c)!r}" for c, v in zip(BOX_COLUMNS, values) if v is None]
            context.error(f"box coordinate(s) empty or not numeric: {', '.join(bad)}", "write pixel coordinates as numbers")
            return None
        x_min, y_min, x_max, y_max = values  # type: ignore[misc]
        if x_max <= x_min or y_max <= y_min:
            context.error(
                f"box ({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g}) has x_max <= x_min or y_max <= y_min",
                "write corners as x_min, y_min, x_max, y_max with max > min (convert [x, y, w, h] boxes first)",
            )
            return None
        return {"boxes_xyxy": ((x_min, y_min, x_max, y_max),), "box_labels": (0,)}

    points = []
    for i in range(1, (card.num_keypoints or 0) + 1):
        column = point_column(i)
        point = parse_point(cells.get(column))
        if point is None:
            text = cells.get(column)
            problem = f"{column} is empty" if is_empty_cell(text) else f"{column} {text!r} is not a JSON point \"[x, y]\""
            context.error(problem, 'write the point as "[x, y]" in pixels')
            return None
        points.append(point)
    return {"keypoints_xy": tuple(points)}


def parse_point(text: str | None) -> tuple[float, float] | None:
    """Parse ``"[x, y]"``; None when it is not a list of two finite numbers."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(value, list) or len(value) != 2:
        return None
    try:
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return x, y


def discover_task_ids(root: Path) -> set[str]:
    """Return the task ids that appear in any readable CSV of ``root``."""
    log = ProblemLog(strict=False)
    ids: set[str] = set()
    for _, frame in _read_task_tables(root, None, log, "discover"):
        ids.update(t.strip() for t in frame["task_id"].to_list() if t)
    return ids


def discover_fmc_uia(root: str | os.PathLike, log: ProblemLog | None = None, val_root: str | os.PathLike | None = None) -> list[TaskCard]:
    """Build one task card per ``task_id`` found in ``root/csv_files``, with type and counts taken from the CSVs.

    Problems (an unreadable CSV, an unknown ``task_name``) are raised as ``DataError`` unless ``log`` collects them.
    """
    root = Path(root).resolve()
    log = log if log is not None else ProblemLog(strict=True)
    tables = _read_task_tables(root, None, log, "")
    by_task: dict[str, list[tuple[Path, dict]]] = {}
    for file, frame in tables:
        for cells in frame.select([ROW_COLUMN, "task_id", "task_name", "num_classes"]).to_dicts():
            task_id = (cells["task_id"] or "").strip()
            if not task_id:
                log.error(file.stem, "task_id is empty", "write the task id in every row", file=file, row=int(cells[ROW_COLUMN]))
                continue
            by_task.setdefault(task_id, []).append((file, cells))
    cards: list[TaskCard] = []
    for task_id in sorted(by_task):
        rows = by_task[task_id]
        names = Counter((c["task_name"] or "").strip() for _, c in rows)
        name = names.most_common(1)[0][0]
        first_file, first = rows[0]
        if name not in FMC_UIA_TASK_NAMES:
            log.error(
                task_id,
                f"unknown task type {name!r} in column task_name",
                f"use one of {', '.join(FMC_UIA_TASK_NAMES)} (exact spelling, 'Regression' with a capital R)",
                file=first_file,
                row=int(first[ROW_COLUMN]),
            )
            continue
        counts = Counter(parse_int(c["num_classes"]) for _, c in rows)
        count = counts.most_common(1)[0][0]
        if count is None or count < 1:
            text = first["num_classes"]
            problem = "num_classes is empty" if is_empty_cell(text) else f"num_classes {text!r} is not a positive integer"
            log.error(task_id, problem, "write the class (or point) count", file=first_file, row=int(first[ROW_COLUMN]))
            continue
        task_type = FMC_UIA_TASK_NAMES[name]
        fields: dict[str, object] = {"name": _card_name(task_id), "type": task_type}
        if task_type is TaskType.regression:
            fields["num_keypoints"] = count
        else:
            fields["num_classes"] = count
        source = {"format": "fmc_uia", "root": root, "task_id": task_id}
        if val_root is not None:
            source["val_root"] = Path(val_root).resolve()
        fields["source"] = source
        try:
            cards.append(TaskCard.model_validate(fields))
        except ValueError as exc:
            log.error(task_id, f"cannot build a task card: {exc}", "check task_name and num_classes in the CSV", file=first_file)
    return cards


def _card_name(task_id: str) -> str:
    """Map a task id to a valid card name (letters, digits, '_', '-', '.')."""
    cleaned = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in task_id)
    return cleaned if cleaned[:1].isalnum() else f"t{cleaned}"
