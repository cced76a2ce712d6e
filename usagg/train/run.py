"""Sweeps: run a plan one run after another, and describe a plan (``usagg train --dry-run``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from usagg.config import StudyConfig
from usagg.io import remove_stale_temporaries
from usagg.train import checkpoint as ckpt
from usagg.train.distributed import DistEnv
from usagg.train.loop import RunOutcome, TrainOptions, train_run
from usagg.train.plan import RunSpec, check_budget_sampling, size_run, warn_underfed
from usagg.train.rundata import RecordCache
from usagg.train.rundir import check_finished_config, config_changes, is_finished, list_changes, lock_holder, run_lock

logger = logging.getLogger(__name__)


@dataclass
class PlannedRun:
    """A planned run with its size and its state on disk."""

    spec: RunSpec
    n_train: dict[str, int]
    steps: int
    images: int
    state: str  # new | resume at step k | settings changed since step k | finished | finished with other settings


def describe_plan(study: StudyConfig, specs: Sequence[RunSpec], options: TrainOptions, cache: RecordCache | None = None) -> list[PlannedRun]:
    """Size every planned run (reads each task's records once) and report whether it is new, resumable or done."""
    check_budget_sampling(study)
    cache = cache or RecordCache(study)
    planned = []
    for spec in specs:
        records = cache.run_records(spec)
        size = size_run(study, spec, records.n_train())
        warn_underfed(spec, size)
        run_dir = spec.run_dir(options.output)
        changes = config_changes(run_dir, study, spec)
        changed = f" ({list_changes(changes, limit=2)})" if changes else ""
        pointer = ckpt.read_pointer(run_dir, "latest")
        holder = lock_holder(run_dir)
        if holder is not None:
            state = f"being trained by {holder}"
        elif is_finished(run_dir):
            state = f"finished with other settings{changed}" if changed else "finished"
        elif pointer is None:
            state = "new"
        elif changed:
            state = f"settings changed since step {pointer['step']}{changed}"
        else:
            state = f"resume at step {pointer['step']}"
        planned.append(PlannedRun(spec, size.n_train, size.steps, size.images, state))
    return planned


def execute_plan(
    study: StudyConfig,
    specs: Sequence[RunSpec],
    options: TrainOptions,
    env: DistEnv,
    cache: RecordCache | None = None,
) -> list[RunOutcome]:
    """Train every run in order; finished runs are skipped and interrupted ones resume."""
    check_budget_sampling(study)
    cache = cache or RecordCache(study)
    outcomes = []
    for number, spec in enumerate(specs, start=1):
        run_dir = spec.run_dir(options.output)
        # Under torchrun every rank trains the same run, so the lock (which would keep out the other ranks) is
        # only taken by single-process runs.
        lock = run_lock(run_dir) if env.world_size == 1 else contextlib.nullcontext(None)
        with lock as holder:
            if holder is not None:
                logger.warning(
                    "run %d of %d: %s is being trained by %s; skipped (rerun when it is done)",
                    number, len(specs), spec.run_id, holder,
                )
                outcomes.append(RunOutcome(spec, run_dir, "busy", extra={"holder": holder}))
                continue
            if options.benchmark_steps is None and is_finished(run_dir):
                check_finished_config(run_dir, study, spec)  # before saying it is skipped
                if env.is_main:
                    logger.info("run %d of %d: %s finished earlier, skipped", number, len(specs), spec.run_id)
                outcomes.append(RunOutcome(spec, run_dir, "skipped"))
                continue
            if env.world_size == 1:
                # A write torn by a kill leaves its temporary file; the lock makes this process the only writer.
                for folder in (run_dir, ckpt.checkpoint_dir(run_dir)):
                    for path in remove_stale_temporaries(folder):
                        logger.info("%s: removed %s, left by an interrupted write", spec.run_id, path.name)
            if env.is_main:
                logger.info("run %d of %d: %s (%s)", number, len(specs), spec.run_id, ", ".join(spec.tasks))
            outcomes.append(train_run(study, spec, options, env, cache))
    return outcomes
