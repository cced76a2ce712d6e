"""Reader for ``root/images`` + ``root/masks`` folders matched by file stem."""

from __future__ import annotations

import os
from pathlib import Path

from usagg.data.decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, MASK_SUFFIXES
from usagg.data.problems import ProblemLog
from usagg.data.record import SampleRecord
from usagg.data.sources._common import (
    case_from_path,
    iter_path_value_rows,
    read_spacing_table,
    split_column_value,
)
from usagg.tasks import MaskFolderSource, TaskCard


def list_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Return the files of ``folder`` (not recursive) with one of ``suffixes``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


def common_prefix(stems: list[str]) -> str:
    """Return the common prefix of ``stems`` cut after its last underscore (``bus_`` from ``bus_0001-l``)."""
    if len(stems) < 2:
        return ""
    prefix = os.path.commonprefix(stems)
    cut = prefix.rfind("_")
    return prefix[: cut + 1] if cut >= 0 else ""


def common_suffix(stems: list[str]) -> str:
    """Return the common suffix of ``stems`` from its first underscore (``_Annotation`` from ``12_HC_Annotation``)."""
    reversed_suffix = common_prefix([stem[::-1] for stem in stems])
    return reversed_suffix[::-1]


def naming_hint(images: list[Path], masks: list[Path], source: MaskFolderSource) -> tuple[dict[str, str], int] | None:
    """Guess the name settings under which the images and masks of a folder pair, when none pair now.

    Returns the settings to change and how many images they pair, or None when the guess pairs none.
    """
    image_stems, mask_stems = [p.stem for p in images], [p.stem for p in masks]
    guess = {
        "image_prefix": source.image_prefix or common_prefix(image_stems),
        "mask_prefix": source.mask_prefix or common_prefix(mask_stems),
        "mask_suffix": source.mask_suffix or common_suffix(mask_stems),
    }
    image_keys = {_key(stem, guess["image_prefix"], "") for stem in image_stems}
    paired = len(image_keys & {_key(stem, guess["mask_prefix"], guess["mask_suffix"]) for stem in mask_stems})
    changed = {name: value for name, value in guess.items() if value != getattr(source, name)}
    return (changed, paired) if paired and changed else None


def _key(stem: str, prefix: str, suffix: str) -> str:
    if prefix and stem.startswith(prefix):
        stem = stem[len(prefix) :]
    if suffix and stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    return stem


def _index_by_key(
    files: list[Path], prefix: str, suffix: str, task: str, log: ProblemLog, what: str
) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in files:
        key = _key(path.stem, prefix, suffix)
        if key in index:
            log.error(
                task,
                f"duplicate {what} entries {index[key].name} and {path.name} share the stem {key!r}",
                f"keep one file per stem in {path.parent}",
                file=path,
            )
            continue
        index[key] = path
    return index


def _unread_mask_files(mask_dir: Path, source: MaskFolderSource) -> dict[str, list[Path]]:
    """Map stem key -> files in the mask folder whose suffix is not a mask format (JPEG, say), for error messages."""
    unread: dict[str, list[Path]] = {}
    for path in sorted(mask_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() not in MASK_SUFFIXES:
            unread.setdefault(_key(path.stem, source.mask_prefix, source.mask_suffix), []).append(path)
    return unread


def _why_not_read(path: Path) -> str:
    """Return the reason a file in the mask folder is not read as a mask."""
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return "JPEG is lossy and not read as a mask (its compression alters class values at edges)"
    if suffix in DICOM_SUFFIXES:
        return "DICOM is not read as a mask"
    return f"{suffix or 'a file without a suffix'} is not a mask format"


def _log_missing_mask(task: str, image_path: Path, expected: Path, unread: list[Path], log: ProblemLog) -> None:
    """Log an image without a mask, naming the files of its stem that are in the mask folder but not read."""
    message = f"no mask for image {image_path.name} (expected {expected})"
    fix = "add the mask, or set image_prefix / mask_prefix / mask_suffix so that names match"
    if unread:
        message += "; " + ", ".join(f"{path.name} was found but {_why_not_read(path)}" for path in unread)
        fix = f"save the mask as PNG ({', '.join(MASK_SUFFIXES)} files are read), with the class index as pixel value"
        if any(path.suffix.lower() in (".jpg", ".jpeg") for path in unread):
            fix += "; export it again from the labelling tool, since converting a JPEG keeps its altered values"
    log.error(task, message, fix, file=image_path)


def _load_split_csv(source: MaskFolderSource, root: Path, task: str, log: ProblemLog) -> dict[str, str]:
    """Map image file name -> split from ``source.split_csv``."""
    if source.split_csv is None:
        return {}
    file = root / source.split_csv
    splits: dict[str, str] = {}
    for row, path_text, split_text in iter_path_value_rows(file, task, log, source.split_path_column, source.split_column):
        ok, split = split_column_value(split_text, task, log, file, row, source.split_column)
        if ok and split is not None:
            splits[Path(path_text).name] = split
    return splits


def _load_spacing_csv(source: MaskFolderSource, root: Path, task: str, log: ProblemLog) -> dict[str, float]:
    """Map image file name -> pixel spacing (mm) from ``source.spacing_csv``."""
    if source.spacing_csv is None:
        return {}
    table = read_spacing_table(root / source.spacing_csv, task, log, source.spacing_path_column, source.spacing_column)
    return {Path(path_text).name: value for path_text, value in table.items()}


def read_mask_folder(card: TaskCard, source: MaskFolderSource, root: Path, split: str | None, log: ProblemLog) -> list[SampleRecord]:
    """Pair images and masks of one folder by stem; split sub-folders (train/, val/, test/) are read when present."""
    task = card.name
    image_dir, mask_dir = root / source.images, root / source.masks
    if not image_dir.is_dir() and split is None:
        parts = [s for s in ("train", "val", "test") if (root / s / source.images).is_dir()]
        if parts:
            records: list[SampleRecord] = []
            for part in parts:
                records.extend(read_mask_folder(card, source, root / part, part, log))
            return records

    for folder, what in ((image_dir, "images"), (mask_dir, "masks")):
        if not folder.is_dir():
            log.error(task, f"{what} folder {folder} not found", f"create it or set source.{what} to the folder name", file=root)
            return []

    images = _index_by_key(list_files(image_dir, IMAGE_SUFFIXES), source.image_prefix, "", task, log, "image")
    masks = _index_by_key(list_files(mask_dir, MASK_SUFFIXES), source.mask_prefix, source.mask_suffix, task, log, "mask")
    unread = _unread_mask_files(mask_dir, source)
    if not images:
        log.error(task, f"no images in {image_dir}", f"put images ({', '.join(IMAGE_SUFFIXES)}) there", file=image_dir)
        return []

    if masks and not set(images) & set(masks):
        hint = naming_hint(list(images.values()), list(masks.values()), source)
        if hint is not None:
            changed, paired = hint
            settings = ", ".join(f"{name}: {value!r}" for name, value in changed.items())
            log.error(
                task,
                f"none of the {len(images)} images in {image_dir} has a mask of the same name in {mask_dir} (for "
                f"example image {next(iter(images.values())).name}, mask {next(iter(masks.values())).name})",
                f"set {settings} in the task card's source, which pairs {paired} of the {len(images)} images",
                file=image_dir,
            )
            return []

    split_by_name = _load_split_csv(source, root, task, log)
    spacing_by_name = _load_spacing_csv(source, root, task, log)
    records = []
    for key, image_path in images.items():
        mask_path = masks.get(key)
        if mask_path is None:
            _log_missing_mask(task, image_path, mask_dir / f"{source.mask_prefix}{key}{source.mask_suffix}.png", unread.get(key, []), log)
            continue
        records.append(
            SampleRecord(
                task=task,
                image_path=Path(os.path.normpath(image_path)),
                mask_path=Path(os.path.normpath(mask_path)),
                source_file=image_path,
                case_id=case_from_path(image_path, source.case_regex),
                split=split_by_name.get(image_path.name, split),
                spacing_mm_per_px=spacing_by_name.get(image_path.name),
            )
        )

    for key in sorted(set(masks) - set(images)):
        log.warning(task, f"mask {masks[key].name} has no image", "remove it or add the image", file=masks[key])
    return records
