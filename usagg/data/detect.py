"""Layout detection for ``usagg data check ROOT``: builds task cards for the layouts found in a dataset folder.

Rules: ``csv_files/`` -> fmc_uia (one card per task id); ``images/`` + ``masks/`` -> mask_folder (num_classes
from the largest mask value); a COCO JSON (``images`` and ``annotations`` keys) -> coco; a CSV at the root with an
image path column and a ``label`` / ``class`` column -> class_csv, a ``value`` / ``target`` column -> scalar_csv,
``x1, y1`` columns -> keypoint_csv; several sub-folders of images -> class_folders. A root CSV with an image path
and a ``pixel_size_mm`` column gives the pixel spacing of each image (mask folders, keypoint and scalar CSVs).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path


from usagg.data.decode import IMAGE_SUFFIXES, MASK_SUFFIXES, read_mask
from usagg.data.problems import ProblemLog
from usagg.data.sources._common import parse_int, read_csv_columns
from usagg.data.sources.fmc_uia import _card_name, discover_fmc_uia
from usagg.data.sources.mask_folder import list_files, naming_hint
from usagg.errors import DataError
from usagg.tasks import MaskFolderSource, TaskCard

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "image", "image_path", "file", "filename", "file_name")
LABEL_COLUMNS = ("label", "class", "class_index")
VALUE_COLUMNS = ("value", "target")
SPLIT_COLUMNS = ("split", "source_split", "subset")
CASE_COLUMNS = ("case", "case_id", "patient", "patient_id", "subject_id")
SPACING_COLUMNS = ("pixel_size_mm", "pixel_spacing_mm", "spacing_mm")


def _mask_folder_card(root: Path, name: str) -> TaskCard | None:
    images = list_files(root / "images", IMAGE_SUFFIXES)
    masks = list_files(root / "masks", MASK_SUFFIXES)
    if not images or not masks:
        return None
    image_stems = [p.stem for p in images]
    mask_stems = [p.stem for p in masks]
    source: dict = {"format": "mask_folder", "root": root}
    if not set(image_stems) & set(mask_stems):
        hint = naming_hint(images, masks, MaskFolderSource.model_validate(source))
        if hint is not None:
            source.update(hint[0])
    largest = 1
    for mask_path in masks:
        try:
            largest = max(largest, int(read_mask(mask_path).max(initial=0)))
        except DataError as exc:
            # Reading the task reports the mask with its image; reporting it here too would list it twice.
            logger.debug("%s: left out of the class count: %s", mask_path, exc)
    split_csv = _side_table(root, SPLIT_COLUMNS)
    if split_csv is not None:
        source.update(split_csv=split_csv[0], split_path_column=split_csv[1], split_column=split_csv[2])
    spacing_csv = _side_table(root, SPACING_COLUMNS)
    if spacing_csv is not None:
        source.update(spacing_csv=spacing_csv[0], spacing_path_column=spacing_csv[1], spacing_column=spacing_csv[2])
    card = TaskCard.model_validate(
        {"name": name, "type": "segmentation", "num_classes": largest + 1, "source": source}
    )
    logger.info("%s: mask_folder layout, num_classes %d inferred from the largest mask value", root, largest + 1)
    return card


def _root_csvs(root: Path) -> list[tuple[Path, list[str], list[list[str]]]]:
    """Return (file, header, data records) of each CSV at the root that parses, with the same reader as the tasks."""
    found = []
    for file in sorted(root.glob("*.csv")):
        parsed = read_csv_columns(file)
        if parsed is None:
            logger.info("%s: cannot be parsed as CSV, so it is not used to detect a layout", file)
            continue
        header, records = parsed
        found.append((file, header, records))
    return found


def _side_table(root: Path, value_columns: tuple[str, ...]) -> tuple[str, str, str] | None:
    """Return (file name, path column, value column) of the first root CSV with an image path and one of ``value_columns``."""
    for file, columns, _ in _root_csvs(root):
        path_column = next((c for c in PATH_COLUMNS if c in columns), None)
        value_column = next((c for c in value_columns if c in columns), None)
        if path_column and value_column:
            return file.name, path_column, value_column
    return None


def _csv_cards(root: Path, base: str) -> list[TaskCard]:
    cards = []
    for file, columns, records in _root_csvs(root):
        path_column = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_column is None:
            continue
        label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
        value_column = next((c for c in VALUE_COLUMNS if c in columns), None)
        common = {"csv": file.name, "path_column": path_column, "root": root}
        case_column = next((c for c in CASE_COLUMNS if c in columns), None)
        split_column = next((c for c in SPLIT_COLUMNS if c in columns), None)
        spacing_column = next((c for c in SPACING_COLUMNS if c in columns), None)
        if case_column:
            common["case_column"] = case_column
        if split_column:
            common["split_column"] = split_column
        if label_column is not None:
            index = columns.index(label_column)
            values = [parse_int(fields[index]) for fields in records if index < len(fields)]
            largest = max((v for v in values if v is not None), default=1)
            source = {"format": "class_csv", "label_column": label_column, **common}
            cards.append(TaskCard.model_validate({"name": f"{base}_cls", "type": "classification", "num_classes": max(2, largest + 1), "source": source}))
        elif value_column is not None:
            source = {"format": "scalar_csv", "value_column": value_column, "spacing_column": spacing_column, **common}
            cards.append(TaskCard.model_validate({"name": f"{base}_value", "type": "regression", "target": value_column, "source": source}))
        elif "x1" in columns and "y1" in columns:
            count = 1
            while f"x{count + 1}" in columns and f"y{count + 1}" in columns:
                count += 1
            source = {"format": "keypoint_csv", "spacing_column": spacing_column, **common}
            cards.append(TaskCard.model_validate({"name": f"{base}_points", "type": "regression", "num_keypoints": count, "source": source}))
    return cards


def _coco_card(root: Path, base: str) -> TaskCard | None:
    for file in sorted(root.glob("*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            categories = data.get("categories") or [{"id": 1}]
            images = "images" if (root / "images").is_dir() else "."
            source = {"format": "coco", "root": root, "annotations": file.name, "images": images}
            return TaskCard.model_validate({"name": f"{base}_det", "type": "detection", "num_classes": len(categories), "source": source})
    return None


def _class_folders_card(root: Path, base: str) -> TaskCard | None:
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    with_images = [p for p in folders if list_files(p, IMAGE_SUFFIXES)]
    if len(with_images) >= 2 and len(with_images) == len(folders):
        source = {"format": "class_folders", "root": root}
        return TaskCard.model_validate({"name": f"{base}_cls", "type": "classification", "num_classes": len(folders), "source": source})
    return None


def detect_layouts(root: str | os.PathLike, log: ProblemLog) -> list[TaskCard]:
    """Return task cards for every layout recognised in ``root`` (problems go to ``log``)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; fix: pass a study YAML or an existing dataset folder")
    if (root / "csv_files").is_dir():
        return discover_fmc_uia(root, log)
    base = _card_name(root.name)
    cards: list[TaskCard] = []
    if (root / "images").is_dir() and (root / "masks").is_dir():
        card = _mask_folder_card(root, f"{base}_seg")
        if card is not None:
            cards.append(card)
    coco = _coco_card(root, base)
    if coco is not None:
        cards.append(coco)
    cards.extend(_csv_cards(root, base))
    if not cards:
        folders = _class_folders_card(root, base)
        if folders is not None:
            cards.append(folders)
    if not cards:
        raise DataError(
            f"{root}: no known dataset layout found (looked for csv_files/, images/ + masks/, a COCO JSON, "
            "a CSV with an image path column and a label, value or x1/y1 column, or one folder per class); "
            "fix: write a study YAML with a task card whose source names the format"
        )
    return cards
