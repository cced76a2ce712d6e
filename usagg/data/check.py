"""``usagg data check``: read and decode every sample, collect every problem, and summarise each task."""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usagg.data.problems import DataProblem, ProblemLog
from usagg.data.record import SampleRecord
from usagg.data.sources import read_source
from usagg.data.sources._common import format_ranges
from usagg.data.splits import SPLITS, case_key, cross_task_conflicts, split_records, split_study_records
from usagg.data.validate import load_sample
from usagg.errors import DataError
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)

STUDY_SUFFIXES = (".yaml", ".yml")


@dataclass
class TaskReport:
    """Findings of ``data check`` for one task."""

    card: TaskCard
    records: list[SampleRecord]  # usable records (read and decoded without a fatal problem)
    problems: list[DataProblem]
    splits: dict[str, list[SampleRecord]] = field(default_factory=dict)
    # split -> class name -> count: images per class (classification), images containing the class
    # (segmentation), boxes per class (detection).
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    size_min_hw: tuple[int, int] | None = None
    size_max_hw: tuple[int, int] | None = None
    with_spacing: int = 0
    value_range: tuple[float, float] | None = None
    boxes_per_image: tuple[int, int] | None = None
    # id(record) -> classes its mask contains, from decoding; used to count classes once splits are known
    present_by_record: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def errors(self) -> list[DataProblem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[DataProblem]:
        return [p for p in self.problems if not p.fatal]

    @property
    def split_counts(self) -> dict[str, int]:
        return {s: len(self.splits.get(s, [])) for s in SPLITS}

    def labels_text(self) -> str:
        card = self.card
        if card.kind == "keypoints":
            return f"{card.num_keypoints} points"
        if card.kind == "scalar":
            return f"{card.target}" + (f" ({card.unit})" if card.unit else "")
        if card.kind == "detection":
            return f"{card.num_classes} box class" + ("es" if (card.num_classes or 1) > 1 else "")
        return f"{card.num_classes} classes"


@dataclass
class _Decoded:
    size_hw: tuple[int, int] | None
    classes_present: tuple[int, ...]
    spacing: float | None
    problems: list[DataProblem]


def _decode_record(record: SampleRecord, card: TaskCard) -> _Decoded:
    decoded, mask, problems = load_sample(record, card)
    if decoded is None:
        return _Decoded(None, (), None, problems)
    present: tuple[int, ...] = ()
    if mask is not None:
        counts = np.bincount(mask.ravel().clip(0, None)) if mask.size else np.zeros(1, dtype=np.int64)
        present = tuple(int(c) for c in np.flatnonzero(counts))
    return _Decoded(decoded.size_hw, present, decoded.spacing_mm_per_px, problems)


def inspect_task(
    card: TaskCard,
    data_cfg=None,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> TaskReport:
    """Read the task's source, decode every image and mask, and summarise splits, classes and sizes."""
    from usagg.config import DataConfig

    data_cfg = data_cfg or DataConfig()
    report = _read_and_decode(card, threads, on_progress)
    report.splits = split_records(report.records, card, data_cfg) if report.records else {s: [] for s in SPLITS}
    _summarise_splits(report)
    return report


def _read_and_decode(card: TaskCard, threads: int | None, on_progress: Callable[[int], None] | None) -> TaskReport:
    """Read the task's source and decode every sample; the report has no splits yet."""
    log = ProblemLog(strict=False)
    listed = read_source(card, log)
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = []
        for result in pool.map(lambda r: _decode_record(r, card), listed):
            results.append(result)
            if on_progress is not None:
                on_progress(1)
    report = TaskReport(card=card, records=[], problems=list(log.problems))
    sizes: list[tuple[int, int]] = []
    present_by_record: dict[int, tuple[int, ...]] = {}
    for record, result in zip(listed, results):
        report.problems.extend(result.problems)
        if any(p.fatal for p in result.problems):
            continue
        present_by_record[id(record)] = result.classes_present
        report.records.append(record)
        if result.size_hw is not None:
            sizes.append(result.size_hw)
        spacing = record.spacing_mm_per_px or result.spacing or (card.source.pixel_spacing_mm if card.source else None)
        report.with_spacing += spacing is not None
    if sizes:
        heights = [s[0] for s in sizes]
        widths = [s[1] for s in sizes]
        report.size_min_hw = (min(heights), min(widths))
        report.size_max_hw = (max(heights), max(widths))
    if not listed and not report.errors:
        report.problems.append(DataProblem(card.name, "the source lists no images", "check source.root and the label files"))
    report.present_by_record = present_by_record
    return report


def _summarise_splits(report: TaskReport) -> None:
    """Count classes per split and report label gaps and split problems, once ``report.splits`` is set."""
    _count_classes(report, report.present_by_record)
    gaps = _check_label_gaps(report, report.present_by_record)
    _check_splits(report, skip=gaps)


def _class_name(card: TaskCard, index: int) -> str:
    if card.class_names and 0 <= index < len(card.class_names):
        return card.class_names[index]
    return str(index)


def _count_classes(report: TaskReport, present_by_record: dict[int, tuple[int, ...]]) -> None:
    card = report.card
    for split, records in report.splits.items():
        counts: Counter[str] = Counter()
        for record in records:
            if card.kind == "classification":
                counts[_class_name(card, record.label)] += 1
            elif card.kind == "segmentation":
                for c in present_by_record.get(id(record), ()):
                    if c > 0:
                        counts[_class_name(card, c)] += 1
            elif card.kind == "detection":
                for label in record.box_labels or ():
                    counts[_class_name(card, label)] += 1
        if counts:
            report.class_counts[split] = dict(sorted(counts.items()))
    if card.kind == "scalar" and report.records:
        values = [r.value for r in report.records if r.value is not None]
        report.value_range = (min(values), max(values))
    if card.kind == "detection" and report.records:
        per_image = [len(r.boxes_xyxy or ()) for r in report.records]
        report.boxes_per_image = (min(per_image), max(per_image))


def _where_label(card: TaskCard, record: SampleRecord) -> tuple[Path, int | None]:
    """Return the file (and row) that contains a record's class label or mask value."""
    if card.kind == "segmentation" and record.mask_path is not None:
        return record.mask_path, None
    return record.source_file or record.image_path, record.row


def _places(card: TaskCard, records: list[SampleRecord], limit: int = 5) -> str:
    """Return where the records' labels are written: ``labels.csv rows 3, 9`` or ``a.png, b.png and 4 more``."""
    rows_by_file: dict[str, list[int]] = {}
    files: list[str] = []
    for record in records:
        file, row = _where_label(card, record)
        if row is None:
            files.append(file.name)
        else:
            rows_by_file.setdefault(file.name, []).append(row)

    def listed(items: list) -> str:
        return ", ".join(str(i) for i in items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    parts = [f"{name} row{'s' if len(rows) > 1 else ''} {listed(rows)}" for name, rows in rows_by_file.items()]
    if files:
        parts.append(listed(files))
    return "; ".join(parts)


def _check_label_gaps(report: TaskReport, present_by_record: dict[int, tuple[int, ...]]) -> set[int]:
    """Report class labels (or mask values) that skip values, e.g. 0, 1 and a stray 7.

    A layout detected from a folder takes num_classes from the largest label, so a typo such as 7 among 0/1
    makes classes 2..6 that no image has. The problem names the file and row of the labels above the first gap,
    rarest first, since a typo is likely among them. It is an error for classification (those classes would have
    no training image) and a warning for masks. Returns the classes the problem covers (the skipped ones and
    those above the gap), which the per-split class check leaves out.
    """
    card = report.card
    holders: dict[int, list[SampleRecord]] = defaultdict(list)
    if card.kind == "classification":
        for record in report.records:
            if record.label is not None:
                holders[record.label].append(record)
    elif card.kind == "segmentation":
        for record in report.records:
            for value in present_by_record.get(id(record), ()):
                holders[value].append(record)
    if not holders:
        return set()
    found = sorted(holders)
    gaps = [c for c in range(found[-1]) if c not in holders]
    if not gaps:
        return set()
    above = sorted((c for c in found if c > gaps[0]), key=lambda c: (len(holders[c]), -c))
    subject, unit = ("class labels", "image") if card.kind == "classification" else ("mask values", "mask")
    details = [f"{_label_text(card, value)} in {_places(card, holders[value])}" for value in above[:3]]
    if len(above) > 3:
        details.append(f"{len(above) - 3} more value(s)")
    single = len(above) == 1 and len(holders[above[0]]) == 1
    file, row = _where_label(card, holders[above[0]][0]) if single else (None, None)
    report.problems.append(
        DataProblem(
            card.name,
            f"{subject} skip {format_ranges(gaps)}: found {', '.join(str(c) for c in found)} with num_classes {card.num_classes}, "
            f"so no {unit} has class {format_ranges(gaps)}; above the gap: " + "; ".join(details),
            "correct the value(s) above the gap where they are typos; otherwise number the classes 0..K-1 without "
            "gaps, or set num_classes and class_names in a task card",
            file=file,
            row=row,
            fatal=card.kind == "classification",
        )
    )
    return set(gaps) | set(above)


def _label_text(card: TaskCard, value: int) -> str:
    name = _class_name(card, value)
    return f"{value} ({name})" if name != str(value) else str(value)


def _check_splits(report: TaskReport, skip: set[int] = frozenset()) -> None:
    """Report cases in several fixed splits, an empty train split and classes missing from a split.

    Classes in ``skip`` (reported as a gap in the labels) are left out of the missing-class problems.
    """
    card = report.card
    seen: dict[str, set[str]] = defaultdict(set)
    for split, records in report.splits.items():
        for record in records:
            if record.case_id is not None:
                seen[case_key(record)].add(split)
    leaking = sorted(k for k, v in seen.items() if len(v) > 1)
    if leaking:
        shown = ", ".join(k.removeprefix("case:") for k in leaking[:5]) + (" ..." if len(leaking) > 5 else "")
        report.problems.append(
            DataProblem(
                card.name,
                f"{len(leaking)} case(s) have images in more than one split of the source ({shown})",
                "move all images of a case into one split, or remove the fixed split so usagg splits by case",
                fatal=False,
            )
        )
    if report.records and not report.splits.get("train"):
        report.problems.append(DataProblem(card.name, "the train split is empty", "lower val_fraction / test_fraction or add training images"))
    if card.kind == "classification" and report.records:
        for split in SPLITS:
            if not report.splits.get(split):
                continue
            counts = report.class_counts.get(split, {})
            missing = [
                _class_name(card, c)
                for c in range(card.num_classes or 0)
                if c not in skip and counts.get(_class_name(card, c), 0) == 0
            ]
            if missing:
                report.problems.append(
                    DataProblem(
                        card.name,
                        f"class(es) {', '.join(missing)} have no image in the {split} split",
                        "add images of those classes or check num_classes",
                        fatal=split == "train",
                    )
                )


@dataclass
class DataCheckReport:
    """``data check`` over a study or a dataset root: one ``TaskReport`` per task plus problems found before them."""

    path: Path
    kind: str  # "study" or the detected layouts
    tasks: list[TaskReport]
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def all_problems(self) -> list[DataProblem]:
        return self.problems + [p for t in self.tasks for p in t.problems]

    @property
    def has_errors(self) -> bool:
        return any(p.fatal for p in self.all_problems)


def cards_for_path(path: str | os.PathLike, log: ProblemLog):
    """Return (cards, data config, kind) for a study YAML or a dataset root whose layout is detected."""
    from usagg.config import DataConfig, load_study
    from usagg.data.detect import detect_layouts

    target = Path(path)
    if not target.exists():
        if target.suffix.lower() in STUDY_SUFFIXES:
            raise DataError(
                f"{target.resolve()}: study file not found; fix: correct the path to the study YAML"
            )
        raise DataError(
            f"{target.resolve()}: dataset folder not found; fix: correct the path, or pass a study YAML "
            f"({', '.join(STUDY_SUFFIXES)}) instead"
        )
    if target.is_file():
        study = load_study(target)
        return list(study.tasks), study.data, "study"
    cards = detect_layouts(target, log)
    kinds = sorted({c.source.format for c in cards if c.source is not None})
    return cards, DataConfig(), "dataset folder (" + ", ".join(kinds) + ")"


def select_cards(path: str | os.PathLike, tasks: list[str] | None, log: ProblemLog):
    """Return (cards, data config, kind, other cards) for a study YAML or a dataset root.

    With ``tasks`` only those are checked; the other cards are still read (not decoded) for the shared splits.
    """
    cards, data_cfg, kind = cards_for_path(path, log)
    others: list[TaskCard] = []
    if tasks:
        unknown = sorted(set(tasks) - {c.name for c in cards})
        if unknown:
            raise DataError(f"{path}: unknown task(s) {', '.join(unknown)}; tasks here: {', '.join(c.name for c in cards)}")
        others = [c for c in cards if c.name not in tasks]
        cards = [c for c in cards if c.name in tasks]
    return cards, data_cfg, kind, others


def read_split_context(cards: Sequence[TaskCard]) -> dict[str, list[SampleRecord]]:
    """Read the records of tasks that are not checked or drawn, to split the others as training does.

    Training splits every task of a study together, so an image or case shared with one of these tasks lands in
    the split that task gives it. Their problems are not reported here; checking those tasks reports them.
    """
    return {card.name: read_source(card, ProblemLog(strict=False)) for card in cards}


def inspect_path(
    path: str | os.PathLike,
    tasks: list[str] | None = None,
    on_task: Callable[[TaskCard, int], Callable[[int], None] | None] | None = None,
) -> DataCheckReport:
    """Check a study YAML or a dataset root; ``tasks`` limits the check to some task names."""
    log = ProblemLog(strict=False)
    cards, data_cfg, kind, others = select_cards(path, tasks, log)
    return inspect_cards(path, cards, data_cfg, kind, log.problems, on_task, others)


def inspect_cards(
    path: str | os.PathLike,
    cards: list[TaskCard],
    data_cfg,
    kind: str,
    problems: list[DataProblem] | None = None,
    on_task: Callable[[TaskCard, int], Callable[[int], None] | None] | None = None,
    others: Sequence[TaskCard] = (),
) -> DataCheckReport:
    """Check the tasks of ``cards`` (from :func:`select_cards`); ``problems`` are those found while selecting them.

    The tasks are split together with ``others`` (the study's tasks left out of the check), as training splits
    them, so the report shows the splits training will use.
    """
    reports = []
    for card in cards:
        progress = on_task(card, 0) if on_task is not None else None
        reports.append(_read_and_decode(card, None, progress))
    records = {**read_split_context(others), **{r.card.name: r.records for r in reports}}
    splits = split_study_records([*others, *cards], records, data_cfg)
    for report in reports:
        report.splits = splits[report.card.name]
        _summarise_splits(report)
    found = list(problems or []) + _cross_task_problems(splits)
    return DataCheckReport(path=Path(path), kind=kind, tasks=reports, problems=found)


def _cross_task_problems(splits: dict[str, dict[str, list[SampleRecord]]]) -> list[DataProblem]:
    """Return one warning per image or case that the tasks' own sources put in different splits (up to 20)."""
    conflicts = cross_task_conflicts(splits)
    problems = [
        DataProblem(
            "",
            f"{key.replace(':', ' ', 1)} is in different splits in different tasks "
            f"({', '.join(f'{task}: {split}' for task, split in by_task.items())}), so a joint model trains on "
            "test or validation images of another task",
            "give the tasks the same split for the images they share (split column, split folders, val_root, test_root)",
            fatal=False,
        )
        for key, by_task in conflicts[:20]
    ]
    if len(conflicts) > 20:
        problems.append(DataProblem("", f"... and {len(conflicts) - 20} more images or cases in different splits", fatal=False))
    return problems
