"""``usagg data check``: read and decode every sample, collect every problem, and summarise each task."""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usagg.data.decode import decode_image, read_mask
from usagg.data.problems import DataProblem, ProblemLog, problem_from_error
from usagg.data.record import SampleRecord
from usagg.data.sources import read_source
from usagg.data.splits import SPLITS, case_key, split_records
from usagg.data.validate import sample_problems
from usagg.errors import DataError
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)


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
    problems: list[DataProblem] = []
    where = {"file": record.source_file or record.image_path, "row": record.row}
    try:
        decoded = decode_image(record.image_path)
    except DataError as exc:
        return _Decoded(None, (), None, [problem_from_error(card.name, exc, **where)])
    mask = None
    present: tuple[int, ...] = ()
    if card.kind == "segmentation" and record.mask_path is not None:
        try:
            mask = read_mask(record.mask_path)
        except DataError as exc:
            return _Decoded(decoded.size_hw, (), decoded.spacing_mm_per_px, [problem_from_error(card.name, exc, **where)])
        counts = np.bincount(mask.ravel().clip(0, None)) if mask.size else np.zeros(1, dtype=np.int64)
        present = tuple(int(c) for c in np.flatnonzero(counts))
    problems.extend(sample_problems(record, card, decoded.size_hw, mask))
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
    report.splits = split_records(report.records, card, data_cfg) if report.records else {s: [] for s in SPLITS}
    _count_classes(report, present_by_record)
    _check_splits(report)
    return report


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


def _check_splits(report: TaskReport) -> None:
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
            missing = [_class_name(card, c) for c in range(card.num_classes or 0) if counts.get(_class_name(card, c), 0) == 0]
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
    if target.is_file():
        study = load_study(target)
        return list(study.tasks), study.data, "study"
    cards = detect_layouts(target, log)
    kinds = sorted({c.source.format for c in cards if c.source is not None})
    return cards, DataConfig(), "dataset folder (" + ", ".join(kinds) + ")"


def inspect_path(
    path: str | os.PathLike,
    tasks: list[str] | None = None,
    on_task: Callable[[TaskCard, int], Callable[[int], None] | None] | None = None,
) -> DataCheckReport:
    """Check a study YAML or a dataset root; ``tasks`` limits the check to some task names."""
    log = ProblemLog(strict=False)
    cards, data_cfg, kind = cards_for_path(path, log)
    if tasks:
        unknown = sorted(set(tasks) - {c.name for c in cards})
        if unknown:
            raise DataError(f"{path}: unknown task(s) {', '.join(unknown)}; tasks here: {', '.join(c.name for c in cards)}")
        cards = [c for c in cards if c.name in tasks]
    reports = []
    for card in cards:
        progress = on_task(card, 0) if on_task is not None else None
        reports.append(inspect_task(card, data_cfg, on_progress=progress))
    return DataCheckReport(path=Path(path), kind=kind, tasks=reports, problems=list(log.problems))
