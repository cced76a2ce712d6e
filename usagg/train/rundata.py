"""The records of one run: every task's train (after the data fraction), val and test images."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from usagg.config import StudyConfig
from usagg.data.record import SampleRecord
from usagg.errors import DataError
from usagg.tasks import TaskCard
from usagg.train.plan import RunSpec

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class RunRecords:
    """Records per task and split for one run; ``train`` is already cut to the run's data fraction."""

    cards: dict[str, TaskCard]
    splits: dict[str, dict[str, list[SampleRecord]]]  # task -> split -> records

    def n_train(self) -> dict[str, int]:
        return {task: len(by_split["train"]) for task, by_split in self.splits.items()}

    def split(self, task: str, split: str) -> list[SampleRecord]:
        return self.splits[task][split]


class RecordCache:
    """Reads and splits each task's records once per process; plans and runs of a sweep share it."""

    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self._split: dict[str, dict[str, list[SampleRecord]]] = {}

    def full_splits(self, task: str) -> dict[str, list[SampleRecord]]:
        """Return the task's full train/val/test split; the first call reads and splits every task of the study.

        Tasks are split together so that an image or case they share lands in one split for all of them.
        """
        if not self._split:
            from usagg.data.sources import load_task_records
            from usagg.data.splits import cross_task_conflicts, split_study_records

            records = {}
            for card in self.study.tasks:
                if card.source is None:
                    raise DataError(f"study {self.study.name!r}: task {card.name!r} has no source; add a source: block to its card")
                try:
                    records[card.name] = load_task_records(card)
                except DataError as exc:
                    if card.name == task:
                        raise
                    raise DataError(
                        f"{exc} (task {card.name!r} is read for the run of task {task!r} too, because a study's tasks "
                        "are split together so that an image they share lands in one split; fix it, or remove the "
                        "task from the study)"
                    ) from exc
            self._split = split_study_records(self.study.tasks, records, self.study.data)
            conflicts = cross_task_conflicts(self._split)
            if conflicts:
                key, by_task = conflicts[0]
                logger.warning(
                    "%d image(s) or case(s) are in different splits in different tasks, because their sources fix "
                    "them so (first: %s, %s); a joint model then trains on test images of another task. Run "
                    "`usagg data check` on the study to list them",
                    len(conflicts), key, ", ".join(f"{t}: {s}" for t, s in by_task.items()),
                )
        return self._split[task]

    def run_records(self, spec: RunSpec) -> RunRecords:
        from usagg.data.splits import select_fraction

        cards = {task: self.study.task(task) for task in spec.tasks}
        splits: dict[str, dict[str, list[SampleRecord]]] = {}
        for task, card in cards.items():
            full = self.full_splits(task)
            train = select_fraction(full["train"], card, spec.fraction, spec.seed) if spec.fraction < 1 else full["train"]
            if not train:
                raise DataError(
                    f"task {task!r}: no training images at data fraction {spec.fraction} "
                    f"(the full training split has {len(full['train'])}); use a larger fraction"
                )
            splits[task] = {"train": list(train), "val": list(full.get("val", [])), "test": list(full.get("test", []))}
        return RunRecords(cards=cards, splits=splits)
