"""Deterministic train/val/test splits per task, and nested stratified data fractions.

Splits: a split fixed by the source (a split column, split sub-folders, ``val_root`` / ``test_root``) wins; the
remaining images are divided at random from ``data.split_seed``. Images that share a case (patient) id stay in one
split, and classification tasks are stratified by class. A val (test) split is carved only when the source gives
none, from the images without a split and those the source puts in train.

Fractions: for each stratum the training cases are put in one seeded random order, and a fraction takes the
shortest prefix of that order that contains at least ``ceil(fraction * n)`` images. Prefixes of one order are nested,
so the 10 % subset lies inside the 25 % subset.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from usagg.data.record import SampleRecord
from usagg.tasks import TaskCard, TaskType

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def case_key(record: SampleRecord) -> str:
    """Return the unit that must not be split: the case id when the source gives one, else the image itself."""
    return f"case:{record.case_id}" if record.case_id is not None else f"image:{record.image_path}"


def _stratum(card: TaskCard, records: Sequence[SampleRecord]) -> str:
    if card.type is TaskType.classification and records[0].label is not None:
        # A case's stratum is the label of its first image (cases rarely mix classes).
        return f"label:{records[0].label}"
    return "all"


def _group_units(card: TaskCard, records: Sequence[tuple[int, SampleRecord]]) -> dict[str, list[list[tuple[int, SampleRecord]]]]:
    """Group (index, record) pairs into cases, and cases into strata, each in first-seen order."""
    cases: dict[str, list[tuple[int, SampleRecord]]] = {}
    for item in records:
        cases.setdefault(case_key(item[1]), []).append(item)
    strata: dict[str, list[list[tuple[int, SampleRecord]]]] = defaultdict(list)
    for members in cases.values():
        strata[_stratum(card, [r for _, r in members])].append(members)
    return dict(sorted(strata.items()))


def split_records(records: Sequence[SampleRecord], card: TaskCard, data_cfg) -> dict[str, list[SampleRecord]]:
    """Split a task's records into train/val/test (see the module rules); each list keeps the input order."""
    assigned: dict[int, str] = {}
    case_split: dict[str, str] = {}
    for index, record in enumerate(records):
        if record.split is not None:
            assigned[index] = record.split
            if record.case_id is not None:
                case_split.setdefault(case_key(record), record.split)

    free: list[tuple[int, SampleRecord]] = []
    for index, record in enumerate(records):
        if index in assigned:
            continue
        fixed = case_split.get(case_key(record)) if record.case_id is not None else None
        if fixed is not None:  # an unsplit image of a case whose other images have a fixed split joins them
            assigned[index] = fixed
        else:
            free.append((index, record))

    present = set(assigned.values())
    val_fraction = data_cfg.val_fraction if "val" not in present else 0.0
    test_fraction = data_cfg.test_fraction if "test" not in present else 0.0
    if val_fraction or test_fraction:
        # Missing splits are carved from the images without a split and from those the source puts in train.
        free += [(index, records[index]) for index in sorted(assigned) if assigned[index] == "train"]
        free.sort(key=lambda item: item[0])

    rng = np.random.default_rng([int(data_cfg.split_seed), _stable_hash(card.name)])
    for units in _group_units(card, free).values():
        order = rng.permutation(len(units))
        n = len(units)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n_test + n_val >= n > 0:
            # Keep at least one training case per stratum; shrink the larger carve-out first.
            while n_test + n_val >= n and (n_test or n_val):
                if n_test >= n_val:
                    n_test -= 1
                else:
                    n_val -= 1
        for rank, unit_index in enumerate(order):
            if rank < n_test:
                split = "test"
            elif rank < n_test + n_val:
                split = "val"
            else:
                split = "train"
            for index, _ in units[unit_index]:
                assigned[index] = split

    result: dict[str, list[SampleRecord]] = {s: [] for s in SPLITS}
    for index, record in enumerate(records):
        result[assigned[index]].append(record)
    logger.debug("task %s split: %s", card.name, {k: len(v) for k, v in result.items()})
    return result


def select_fraction(train_records: Sequence[SampleRecord], card: TaskCard, fraction: float, seed: int) -> list[SampleRecord]:
    """Return a stratified subset holding about ``fraction`` of the training images, nested across fractions.

    Pass the same ``seed`` for every fraction (e.g. ``data.split_seed``) to get nested subsets.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"data fraction {fraction} is outside (0, 1]")
    if fraction >= 1:
        return list(train_records)
    chosen: set[int] = set()
    indexed = list(enumerate(train_records))
    for stratum, units in _group_units(card, indexed).items():
        rng = np.random.default_rng([int(seed), _stable_hash(card.name), _stable_hash(stratum)])
        order = rng.permutation(len(units))
        total = sum(len(u) for u in units)
        target = max(1, math.ceil(fraction * total))
        taken = 0
        for unit_index in order:
            if taken >= target:
                break
            for index, _ in units[unit_index]:
                chosen.add(index)
            taken += len(units[unit_index])
    return [record for index, record in indexed if index in chosen]
