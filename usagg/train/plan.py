"""Run planning: which trainings a study implies, where they live and how long each one trains.

A run is one model trained on one set of tasks: ``task_specific`` (one task), ``grouped`` (one group of the
partition), ``unified`` (every task) or ``pair`` (two tasks, for measured affinity), for one data fraction and seed.
Its directory is ``<output>/<study>/<paradigm>/<group>/frac-<fraction>/seed-<seed>/``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from usagg.config import StudyConfig, partition_problem, read_yaml
from usagg.errors import ConfigError

logger = logging.getLogger(__name__)

PLAN_PARADIGMS = ("task_specific", "grouped", "unified", "pair")
UNIFIED_GROUP = "all"


def format_fraction(fraction: float) -> str:
    """Format a data fraction for run ids and folder names: 1, 0.5, 0.125."""
    return f"{fraction:g}"


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study."""

    study: str
    paradigm: str
    group: str
    tasks: tuple[str, ...]
    fraction: float
    seed: int

    @property
    def run_id(self) -> str:
        """Stable id, also the run directory relative to ``<output>/<study>``."""
        return f"{self.paradigm}/{self.group}/frac-{format_fraction(self.fraction)}/seed-{self.seed}"

    def run_dir(self, output: str | os.PathLike) -> Path:
        return Path(output) / self.study / self.run_id

    def to_dict(self) -> dict:
        return {
            "study": self.study,
            "run_id": self.run_id,
            "paradigm": self.paradigm,
            "group": self.group,
            "tasks": list(self.tasks),
            "fraction": self.fraction,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        return cls(
            study=data["study"],
            paradigm=data["paradigm"],
            group=data["group"],
            tasks=tuple(data["tasks"]),
            fraction=float(data["fraction"]),
            seed=int(data["seed"]),
        )


@dataclass
class RunSize:
    """Training images per task and the step budget of one run."""

    n_train: dict[str, int]
    steps: int
    batch_size: int
    epoch_steps: int  # steps of one pass over every task's training images
    images_per_task: dict[str, float] = field(default_factory=dict)  # expected under the task sampling

    @property
    def images(self) -> int:
        return self.steps * self.batch_size

    def underfed_tasks(self) -> list[str]:
        """Return the tasks expected to get less than one batch of training images under the task sampling."""
        return [task for task, images in self.images_per_task.items() if images < self.batch_size]


def warn_underfed(spec: "RunSpec", size: RunSize) -> None:
    """Warn when a multi-task run's budget leaves a task with less than one expected batch."""
    underfed = size.underfed_tasks() if len(size.n_train) > 1 else []
    if underfed:
        listed = ", ".join(f"{t} (~{size.images_per_task[t]:.0f} images)" for t in underfed)
        logger.warning(
            "%s: %s expected to get less than one batch of %d training images in %d steps, so their results say "
            "little about transfer; raise the budget or use train.task_sampling: uniform",
            spec.run_id, listed + (" is" if len(underfed) == 1 else " are"), size.batch_size, size.steps,
        )


def load_groups_file(path: str | os.PathLike, study: StudyConfig) -> dict[str, list[str]]:
    """Read a ``groups:`` block (group name -> task names) and check it against the study's tasks."""
    file = Path(path)
    raw = read_yaml(file)
    if not isinstance(raw, dict) or not isinstance(raw.get("groups"), dict):
        raise ConfigError(
            f"{file}: expected a mapping with a 'groups:' block of group name -> list of task names, "
            f"for example 'groups: {{breast: [breast_lesion, breast_2cls]}}'"
        )
    groups: dict[str, list[str]] = {}
    for name, members in raw["groups"].items():
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{file}: groups.{name}: expected a non-empty list of task names, got {members!r}")
        groups[str(name)] = list(members)
    problem = partition_problem(groups, [card.name for card in study.tasks], study.name)
    if problem is not None:
        raise ConfigError(f"{file}: {problem}")
    return groups


def plan_runs(
    study: StudyConfig,
    *,
    paradigms: Sequence[str] | None = None,
    groups: dict[str, list[str]] | None = None,
    pairs: bool | Sequence[tuple[str, str]] = False,
    group_filter: Sequence[str] | None = None,
    task_filter: Sequence[str] | None = None,
    fractions: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[RunSpec]:
    """List every run the study implies, after the filters.

    ``paradigms`` defaults to the study's. ``groups`` overrides the grouped paradigm's partition. ``pairs`` adds
    pair runs: True takes the study's ``pairs``, or every pair of tasks when it has none. ``group_filter`` keeps
    runs whose group name is listed, and ``task_filter`` keeps runs that train at least one listed task.
    """
    known_tasks = [card.name for card in study.tasks]
    chosen = list(paradigms) if paradigms else [p.value for p in study.paradigms]
    for paradigm in chosen:
        if paradigm not in PLAN_PARADIGMS:
            raise ConfigError(f"unknown paradigm {paradigm!r}; choose from {', '.join(PLAN_PARADIGMS)}")
    if pairs and "pair" not in chosen:
        chosen.append("pair")
    for task in task_filter or []:
        if task not in known_tasks:
            raise ConfigError(f"--task {task}: not a task of study {study.name!r}; its tasks are {', '.join(known_tasks)}")
    run_fractions = _check_subset("--fraction", fractions, study.fractions)
    run_seeds = _check_subset("--seed", seeds, study.seeds)

    task_sets: list[tuple[str, str, tuple[str, ...]]] = []  # (paradigm, group, tasks)
    for paradigm in chosen:
        if paradigm == "task_specific":
            task_sets += [(paradigm, name, (name,)) for name in known_tasks]
        elif paradigm == "grouped":
            partition = groups if groups is not None else study.group_partition()
            uncovered = [t for t in known_tasks if not any(t in members for members in partition.values())]
            if uncovered:
                logger.warning("the group partition leaves out task(s) %s; they get no grouped run", ", ".join(uncovered))
            task_sets += [(paradigm, name, tuple(members)) for name, members in partition.items()]
        elif paradigm == "unified":
            task_sets.append((paradigm, UNIFIED_GROUP, tuple(known_tasks)))
        elif paradigm == "pair":
            task_sets += [(paradigm, f"{a}+{b}", (a, b)) for a, b in _pairs(study, pairs)]

    specs = []
    for (paradigm, group, tasks), fraction, seed in itertools.product(task_sets, run_fractions, run_seeds):
        if group_filter and group not in group_filter:
            continue
        if task_filter and not set(task_filter) & set(tasks):
            continue
        specs.append(RunSpec(study.name, paradigm, group, tasks, fraction, seed))
    if group_filter:
        names = {s.group for s in specs}
        missing = [g for g in group_filter if g not in names]
        if missing:
            raise ConfigError(f"--group {', '.join(missing)}: no planned run has this group name")
    return specs


def _pairs(study: StudyConfig, pairs: bool | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the pairs to train, each in the study's task order and listed once.

    One order per pair gives each pair one run folder, whether it was listed as (a, b) or (b, a) or came from
    the every-pair enumeration, so changing the study's ``pairs`` never trains a pair twice.
    """
    names = [card.name for card in study.tasks]
    if pairs is True or pairs is False:
        if not study.pairs:
            return list(itertools.combinations(names, 2))
        pairs = study.pairs
    position = {name: i for i, name in enumerate(names)}
    ordered: list[tuple[str, str]] = []
    for pair in pairs:
        canonical = tuple(sorted(pair, key=lambda task: position.get(task, len(names))))
        if canonical not in ordered:
            ordered.append(canonical)  # type: ignore[arg-type]
    return ordered


def _check_subset(option: str, requested: Sequence | None, available: Sequence) -> list:
    if not requested:
        return list(available)
    for value in requested:
        if value not in available:
            raise ConfigError(f"{option} {value}: not in the study's list ({', '.join(str(v) for v in available)})")
    return list(requested)


def budget_steps(study: StudyConfig, n_train: dict[str, int]) -> tuple[int, int]:
    """Return (total steps, steps of one epoch-equivalent) for a run over tasks with ``n_train`` images each.

    The per-task budget is the same in every paradigm. With ``budget: epochs`` a run takes enough steps for each
    task to see ``epochs`` passes over its own images, exact in expectation under proportional task sampling.
    With ``samples`` it takes enough for ``samples_per_task`` images per task, exact in expectation under
    uniform sampling. With ``steps`` it takes a fixed number of steps, whatever the number of tasks.
    """
    cfg = study.train
    total_images = sum(n_train.values())
    epoch_steps = max(1, math.ceil(total_images / cfg.batch_size))
    if cfg.budget == "epochs":
        steps = math.ceil(cfg.epochs * total_images / cfg.batch_size)
    elif cfg.budget == "samples":
        steps = math.ceil(cfg.samples_per_task * len(n_train) / cfg.batch_size)  # type: ignore[operator]
    else:
        steps = int(cfg.steps)  # type: ignore[arg-type]
    return max(1, steps), epoch_steps


def expected_images_per_task(study: StudyConfig, n_train: dict[str, int], steps: int) -> dict[str, float]:
    """Training images each task is expected to see under the study's task sampling."""
    cfg = study.train
    if cfg.task_sampling == "uniform":
        weights = {t: 1.0 for t in n_train}
    elif cfg.task_sampling == "proportional":
        weights = {t: float(n) for t, n in n_train.items()}
    else:
        weights = {t: float(n) ** (1.0 / cfg.temperature) for t, n in n_train.items()}
    total = sum(weights.values()) or 1.0
    return {t: steps * cfg.batch_size * w / total for t, w in weights.items()}


def size_run(study: StudyConfig, spec: RunSpec, n_train: dict[str, int]) -> RunSize:
    steps, epoch_steps = budget_steps(study, n_train)
    return RunSize(
        n_train=dict(n_train),
        steps=steps,
        batch_size=study.train.batch_size,
        epoch_steps=epoch_steps,
        images_per_task=expected_images_per_task(study, n_train, steps),
    )


def check_budget_sampling(study: StudyConfig) -> None:
    """Warn when the task sampling does not match the budget's definition of equal per-task budgets."""
    cfg = study.train
    if cfg.budget == "epochs" and cfg.task_sampling != "proportional":
        logger.warning(
            "train.budget is 'epochs' but train.task_sampling is %r: multi-task runs take the same number of steps, "
            "but each task's share of them follows the sampling, not its data size",
            cfg.task_sampling,
        )
    if cfg.budget == "samples" and cfg.task_sampling != "uniform":
        logger.warning(
            "train.budget is 'samples' but train.task_sampling is %r: tasks see samples_per_task images only "
            "on average over tasks; use task_sampling: uniform for equal images per task",
            cfg.task_sampling,
        )


def iter_tasks(specs: Iterable[RunSpec]) -> list[str]:
    """Task names used by any of ``specs``, in first-seen order."""
    seen: dict[str, None] = {}
    for spec in specs:
        for task in spec.tasks:
            seen.setdefault(task, None)
    return list(seen)
