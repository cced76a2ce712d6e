"""Deterministic train/val/test splits per task, consistent across the tasks of a study, and nested data fractions.

Splits: a split fixed by the source (a split column, split sub-folders, ``val_root`` / ``test_root``) wins; the
remaining images are divided at random from ``data.split_seed``. Images that share a case (patient) id stay in one
split, and classification tasks are stratified by class. A val (test) split is carved only when the source gives
none, from the images without a split and those the source puts in train.

Across a study (``split_study_records``), an image file or a case id that several tasks share lands in one split
for all of them: otherwise a grouped or unified model would train, under one task, on the test images of another,
and the transfer it is meant to measure would be biased. Tasks whose source fixes some splits are split first, and
an image or case that an earlier task placed keeps that split in the later ones. Only the remaining images are
carved at random.

Fractions: for each stratum the training cases are put in one seeded random order, and a fraction takes the
shortest prefix of that order that contains at least ``ceil(fraction * n)`` images. Prefixes of one order are nested,
so the 10 % subset lies inside the 25 % subset. The order is a hash of the seed and the case id (or the image's folder
and file name), so tasks that share training images, and are stratified alike, take the same images at each
fraction, wherever the data lie.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

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


def shared_keys(record: SampleRecord, scope: str | None = None) -> list[str]:
    """Return the keys by which tasks share a sample: its image file and, when the source gives one, its case.

    ``scope`` (from :func:`dataset_scopes`) qualifies the case, so that equal case ids of unrelated datasets
    (patient 217 of HC18 and case 217 of BUS-BRA) do not link their tasks.
    """
    keys = [f"image:{record.image_path}"]
    if record.case_id is not None:
        keys.append(case_key(record) if scope is None else f"case:{scope}:{record.case_id}")
    return keys


def dataset_scopes(records_by_task: Mapping[str, Iterable[SampleRecord]]) -> dict[str, str]:
    """Map each task to a name shared by the tasks it is linked to through common image files (one dataset).

    Tasks that label the same images read one dataset, so their case ids name the same patients. Tasks with no
    image in common may come from datasets whose case ids merely coincide. The name is the first task of the group.
    """
    parent = {task: task for task in records_by_task}
    order = {task: position for position, task in enumerate(records_by_task)}

    def root(task: str) -> str:
        while parent[task] != task:
            parent[task] = parent[parent[task]]
            task = parent[task]
        return task

    owner: dict[Path, str] = {}
    for task, records in records_by_task.items():
        for record in records:
            other = owner.setdefault(record.image_path, task)
            if other != task:
                first, second = sorted((root(task), root(other)), key=order.__getitem__)
                parent[second] = first
    return {task: root(task) for task in records_by_task}


def split_records(
    records: Sequence[SampleRecord],
    card: TaskCard,
    data_cfg,
    placed: Mapping[str, str] | None = None,
    scope: str | None = None,
) -> dict[str, list[SampleRecord]]:
    """Split a task's records into train/val/test (see the module rules); each list keeps the input order.

    ``placed`` maps :func:`shared_keys` (with ``scope``) of images and cases that other tasks of the study have
    already put in a split. A record without a split of its own that matches one joins that split and is not
    carved.
    """
    placed = placed or {}
    assigned: dict[int, str] = {}
    case_split: dict[str, str] = {}
    # Records whose image or case another task has placed: never carved into another split here.
    placed_elsewhere: set[int] = set()
    for index, record in enumerate(records):
        if record.split is not None:
            assigned[index] = record.split
            if record.case_id is not None:
                case_split.setdefault(case_key(record), record.split)
            if any(k in placed for k in shared_keys(record, scope)):
                placed_elsewhere.add(index)
    present = set(assigned.values())  # the splits this task's own source fixes

    free: list[tuple[int, SampleRecord]] = []
    inherited_cases: set[str] = set()
    for index, record in enumerate(records):
        if index in assigned:
            continue
        key = case_key(record)
        fixed = case_split.get(key) if record.case_id is not None else None
        from_other_task = key in inherited_cases
        if fixed is None:
            fixed = next((placed[k] for k in shared_keys(record, scope) if k in placed), None)
            from_other_task = fixed is not None
            if from_other_task and record.case_id is not None:
                case_split[key] = fixed
                inherited_cases.add(key)
        if fixed is not None:  # an unsplit image of a case, or of an image, that already has a split joins it
            assigned[index] = fixed
            if from_other_task:
                placed_elsewhere.add(index)
        else:
            free.append((index, record))

    val_fraction = data_cfg.val_fraction if "val" not in present else 0.0
    test_fraction = data_cfg.test_fraction if "test" not in present else 0.0
    if val_fraction or test_fraction:
        # Missing splits are carved from the images without a split and from those the source puts in train,
        # except images that another task has already placed.
        carvable = [index for index in sorted(assigned) if assigned[index] == "train" and index not in placed_elsewhere]
        free += [(index, records[index]) for index in carvable]
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


def split_study_records(
    cards: Sequence[TaskCard], records: Mapping[str, Sequence[SampleRecord]], data_cfg
) -> dict[str, dict[str, list[SampleRecord]]]:
    """Split every task of a study so that an image or case shared by tasks lands in one split for all of them.

    ``records`` maps task names to their records; tasks missing from it are left out of the result.
    """
    present = [card for card in cards if card.name in records]
    # A task whose source fixes splits goes first, so that the fixed splits are what the other tasks inherit.
    # Classification tasks go next: they are split stratified by class, which a split inherited from another
    # task would not be. So the card order no longer decides whether the classes stay balanced.
    ordered = sorted(
        present,
        key=lambda card: (not any(r.split is not None for r in records[card.name]), card.type is not TaskType.classification),
    )
    scopes = dataset_scopes({card.name: records[card.name] for card in present})
    placed: dict[str, str] = {}
    result: dict[str, dict[str, list[SampleRecord]]] = {}
    for card in ordered:
        splits = split_records(records[card.name], card, data_cfg, placed, scopes[card.name])
        for split, members in splits.items():
            for record in members:
                for key in shared_keys(record, scopes[card.name]):
                    placed.setdefault(key, split)
        result[card.name] = splits
    return {card.name: result[card.name] for card in present}


def cross_task_conflicts(splits: Mapping[str, Mapping[str, Sequence[SampleRecord]]]) -> list[tuple[str, dict[str, str]]]:
    """Return the images and cases that tasks put in different splits, as ``(key, {task: split})``.

    After :func:`split_study_records` these come only from sources that fix different splits for one image.
    """
    scopes = dataset_scopes({task: [r for members in task_splits.values() for r in members] for task, task_splits in splits.items()})
    seen: dict[str, dict[str, str]] = defaultdict(dict)
    for task, task_splits in splits.items():
        for split, members in task_splits.items():
            for record in members:
                for key in shared_keys(record, scopes[task]):
                    seen[key].setdefault(task, split)
    return [(key, by_task) for key, by_task in seen.items() if len(set(by_task.values())) > 1]


def _unit_priority(unit: list[tuple[int, SampleRecord]], seed: int) -> bytes:
    """Return a pseudo-random sort key of a case, fixed by the seed and the case id or the image's file name.

    The image is named by its folder and file name, not its absolute path, so that a dataset moved to another
    place keeps its subsets.
    """
    record = unit[0][1]
    name = f"case:{record.case_id}" if record.case_id is not None else "/".join(Path(record.image_path).parts[-2:])
    return hashlib.blake2b(f"{seed}:{name}".encode("utf-8"), digest_size=8).digest()


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
    for units in _group_units(card, indexed).values():
        # The order depends on the case (or image) and the seed, not on the task. Tasks that share training images
        # then take the same ones, and a joint model is trained on no more images than each task's own run.
        order = sorted(range(len(units)), key=lambda u: _unit_priority(units[u], seed))
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
