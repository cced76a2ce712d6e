"""Source readers, one per on-disk layout, all yielding ``SampleRecord``; plus layout detection for a dataset root."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from usagg.data.problems import DataProblem, ProblemLog
from usagg.data.record import SampleRecord
from usagg.data.sources.classification import read_class_csv, read_class_folders
from usagg.data.sources.coco import read_coco
from usagg.data.sources.fmc_uia import discover_fmc_uia, read_fmc_uia
from usagg.data.sources.mask_folder import read_mask_folder
from usagg.data.sources.regression import read_keypoint_csv, read_scalar_csv
from usagg.errors import DataError
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)

# format -> reader(card, source, root, split, log) -> records
READERS: dict[str, Callable[..., list[SampleRecord]]] = {
    "fmc_uia": read_fmc_uia,
    "mask_folder": read_mask_folder,
    "class_csv": read_class_csv,
    "class_folders": read_class_folders,
    "coco": read_coco,
    "keypoint_csv": read_keypoint_csv,
    "scalar_csv": read_scalar_csv,
}

__all__ = [
    "READERS",
    "check_task",
    "discover_fmc_uia",
    "load_task_records",
    "read_source",
]


def read_source(card: TaskCard, log: ProblemLog) -> list[SampleRecord]:
    """Read every root of the card's source: root (split from the source or None), val_root ("val"), test_root ("test")."""
    source = card.source
    if source is None:
        log.error(card.name, "task card has no source", "add a source: block (format and root) to the task card")
        return []
    reader = READERS[source.format]
    records: list[SampleRecord] = []
    for root, split in ((source.root, None), (source.val_root, "val"), (source.test_root, "test")):
        if root is None:
            continue
        root = Path(root)
        if not root.exists():
            what = {None: "root", "val": "val_root", "test": "test_root"}[split]
            fix = (
                f"correct source.{what} in the task card (relative paths start at the YAML file's folder), or set "
                "the environment variable the study reads it from (the bundled studies use USAGG_DATA, "
                "FMC_UIA_ROOT or USAGG_SYNTH_ROOT)"
            )
            log.error(card.name, f"source {what} {root} not found", fix, file=root)
            continue
        records.extend(reader(card, source, root, split, log))
    return records


def load_task_records(card: TaskCard) -> list[SampleRecord]:
    """Read a task's records; raises ``DataError`` on the first problem in its label files.

    Files are checked for existence here but not decoded; ``TaskDataset`` raises on the first sample that cannot be
    decoded or whose labels do not fit the image, and ``check_task`` finds every such problem up front.
    """
    log = ProblemLog(strict=True)
    records = read_source(card, log)
    if not records:
        raise DataError(f"task {card.name}: the source yields no images; fix: check source.root and the label files")
    logger.debug("task %s: %d records", card.name, len(records))
    return records


def check_task(card: TaskCard, data_cfg=None) -> tuple[list[SampleRecord], list[DataProblem]]:
    """Read and decode every sample of a task; return the usable records and every problem found."""
    from usagg.data.check import inspect_task

    report = inspect_task(card, data_cfg)
    return report.records, report.problems
