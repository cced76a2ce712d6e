"""Readers for classification labels: a CSV of (path, label) and one folder per class."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from usagg.data.decode import IMAGE_SUFFIXES
from usagg.data.problems import ProblemLog
from usagg.data.record import SampleRecord
from usagg.data.sources._common import (
    ROW_COLUMN,
    case_from_path,
    format_ranges,
    is_empty_cell,
    parse_int,
    read_csv_strings,
    report_duplicates,
    resolve,
    split_column_value,
)
from usagg.data.sources.mask_folder import list_files
from usagg.tasks import ClassCsvSource, ClassFoldersSource, TaskCard


def parse_label(text: str | None, card: TaskCard) -> int | None:
    """Parse a class index, or a class name when the card lists ``class_names``."""
    label = parse_int(text)
    if label is None and text is not None and card.class_names:
        name = text.strip()
        if name in card.class_names:
            label = card.class_names.index(name)
    return label


def read_class_csv(card: TaskCard, source: ClassCsvSource, root: Path, split: str | None, log: ProblemLog) -> list[SampleRecord]:
    task = card.name
    file = root / source.csv
    required = [source.path_column, source.label_column]
    required += [c for c in (source.case_column, source.split_column) if c]
    frame = read_csv_strings(file, task, log, required)
    if frame is None:
        return []
    num_classes = card.num_classes or 0
    records: list[SampleRecord] = []
    for cells in frame.to_dicts():
        row = cells[ROW_COLUMN]
        path_text = (cells[source.path_column] or "").strip()
        if not path_text:
            log.error(task, f"column {source.path_column!r} is empty", "write the image path relative to the source root", file=file, row=row)
            continue
        image_path = Path(os.path.normpath(resolve(root, path_text)))
        text = cells[source.label_column]
        label = parse_label(text, card)
        if label is None:
            names = f" or one of {', '.join(card.class_names)}" if card.class_names else ""
            if is_empty_cell(text):
                message = f"class label in column {source.label_column!r} is empty"
            elif card.class_names:
                close = difflib.get_close_matches(text.strip(), list(card.class_names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                message = f"class label {text!r} in column {source.label_column!r} is neither a class index nor a class name{hint}"
            else:
                message = f"class label {text!r} in column {source.label_column!r} is not an integer"
            log.error(task, message, f"write a class index 0..{num_classes - 1}{names}", file=file, row=row)
            continue
        if not 0 <= label < num_classes:
            log.error(task, f"class label {label} in column {source.label_column!r} is outside 0..{num_classes - 1}", f"use class indices 0..{num_classes - 1} or raise num_classes", file=file, row=row)
            continue
        if not image_path.is_file():
            log.error(task, f"image file {image_path} not found", f"correct column {source.path_column!r} (paths are relative to {root}) or restore the file", file=file, row=row)
            continue
        row_split = split
        if source.split_column:
            ok, fixed = split_column_value(cells[source.split_column], task, log, file, row, source.split_column)
            if not ok:
                continue
            row_split = fixed or split
        case = (cells[source.case_column] or "").strip() if source.case_column else ""
        records.append(
            SampleRecord(
                task=task,
                image_path=image_path,
                source_file=file,
                row=row,
                case_id=case or case_from_path(image_path, source.case_regex),
                split=row_split,
                label=label,
            )
        )
    return report_duplicates(records, task, log)


def class_folder_order(names: list[str]) -> list[str]:
    """Return folder names in class order: numeric when every name is an integer (so 10 follows 9), else sorted."""
    if names and all(name.isdecimal() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _check_integer_names(task: str, root: Path, folders: list[str], log: ProblemLog) -> None:
    """Warn when class folders are named by integers other than 0..K-1, which are read as classes 0..K-1.

    With names 0, 1 and 7, folder 7 becomes class 2. The warning states this and that the names skip 2..6, and
    names the folders above the gap with their image counts, because a name like 7 among 0 and 1 is likely a typo.
    """
    if not folders or not all(name.isdecimal() for name in folders):
        return
    values = [int(name) for name in folders]
    if values == list(range(len(values))):
        return
    message = (
        f"class folders are named {', '.join(folders)}; they are read in numeric order as classes "
        f"0..{len(folders) - 1}, so " + ", ".join(f"folder {n} is class {i}" for i, n in enumerate(folders) if int(n) != i)
    )
    gaps = [v for v in range(max(values)) if v not in values]
    if gaps:
        above = [(name, len(list_files(root / name, IMAGE_SUFFIXES))) for name in folders if int(name) > gaps[0]]
        counts = ", ".join(f"{name} ({n} image{'s' if n != 1 else ''})" for name, n in above)
        message += f"; the names skip {format_ranges(gaps)}, and above the gap are folder(s) {counts}"
    log.warning(
        task,
        message,
        "rename the folders to the class indices 0..K-1 (a name above a gap may be a typo), or list the folder "
        "names in class order in source.classes",
        file=root,
    )


def read_class_folders(card: TaskCard, source: ClassFoldersSource, root: Path, split: str | None, log: ProblemLog) -> list[SampleRecord]:
    task = card.name
    if not root.is_dir():
        log.error(task, f"folder {root} not found", "point source.root at the folder holding one sub-folder per class", file=root)
        return []
    folders = class_folder_order([p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")])
    classes = source.classes or card.class_names
    split_parts = [f for f in folders if f in ("train", "val", "test")]
    if split is None and split_parts and len(split_parts) == len(folders) and not (classes and set(split_parts) & set(classes)):
        records: list[SampleRecord] = []
        for part in split_parts:
            records.extend(read_class_folders(card, source, root / part, part, log))
        return records
    if classes is None:
        classes = folders
        _check_integer_names(task, root, folders, log)
    if len(classes) != card.num_classes:
        log.error(
            task,
            f"{len(classes)} class folders ({', '.join(classes)}) but the task card has num_classes {card.num_classes}",
            "set num_classes (or class_names / source.classes) to match the folders",
            file=root,
        )
        return []
    for extra in sorted(set(folders) - set(classes)):
        log.error(task, f"folder {extra!r} is not one of the classes {', '.join(classes)}", "rename it to a class name or list it in source.classes", file=root / extra)
    records = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            log.error(task, f"class folder {folder} not found", f"create it (class {label}) or fix source.classes", file=root)
            continue
        for image_path in list_files(folder, IMAGE_SUFFIXES):
            records.append(
                SampleRecord(
                    task=task,
                    image_path=Path(os.path.normpath(image_path)),
                    source_file=image_path,
                    case_id=case_from_path(image_path, source.case_regex),
                    split=split,
                    label=label,
                    )
            )
    if not records:
        log.error(task, f"no images in the class folders of {root}", f"put images ({', '.join(IMAGE_SUFFIXES)}) in {root}/<class>/", file=root)
    return records
