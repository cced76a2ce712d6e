"""Evaluate a trained run on a split and write its results, per-image scores and routing statistics."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import polars as pl
import torch

from usagg.config import StudyConfig
from usagg.errors import ConfigError, DataError
from usagg.evaluate.evaluate import evaluate_task, per_image_rows, results_rows
from usagg.io import write_json_atomic
from usagg.train import checkpoint as ckpt
from usagg.train.distributed import resolve_device
from usagg.train.plan import RunSpec
from usagg.train.rundata import RecordCache, RunRecords
from usagg.train.rundir import ROUTING_FILE, load_run, study_dir, unfinished_reason, write_evaluation

logger = logging.getLogger(__name__)


def evaluate_and_write(
    study: StudyConfig,
    spec: RunSpec,
    model: torch.nn.Module,
    records: RunRecords,
    run_dir: Path,
    device: torch.device,
    split: str,
    checkpoint: str = "best",
    merge: bool = True,
) -> pl.DataFrame:
    """Load the chosen checkpoint into ``model``, evaluate every task on ``split`` and store the outputs.

    Writes ``results.parquet`` (+ CSV), ``per_image_scores.parquet``, ``results_meta.json`` (policies, checkpoint
    and the reason for every NaN or conventional value) and ``routing_stats.json`` (routing on this split), and
    with ``merge`` merges the rows into ``<output>/<study>/results.parquet``. Returns the run's rows for this split.
    """
    pointer = ckpt.load_weights(model, run_dir, checkpoint)
    model.to(device)
    model.routing_stats(reset=True)
    started = time.perf_counter()
    evaluations = []
    for task in spec.tasks:
        task_records = records.split(task, split)
        if not task_records:
            logger.warning("%s: task %s has no %s images; no results for it", spec.run_id, task, split)
            continue
        evaluations.append(
            evaluate_task(model, records.cards[task], task_records, study, device, study.model.max_boxes)
        )
    for ev in evaluations:
        for metric, reason in ev.metrics.reasons.items():
            logger.info("%s %s %s: %s", spec.run_id, ev.task, metric, reason)
    results = results_rows(spec, records.cards, records.n_train(), split, evaluations)
    per_image = per_image_rows(spec, split, evaluations)
    meta = {
        "checkpoint": pointer["kind"],
        "checkpoint_step": pointer["step"],
        "empty_mask_policy": study.evaluation.empty_mask_policy,
        "one_class_policy": study.evaluation.one_class_policy,
        "n_images": {ev.task: ev.n_images for ev in evaluations},
        "reasons": {ev.task: ev.metrics.reasons for ev in evaluations if ev.metrics.reasons},
        "seconds": round(time.perf_counter() - started, 3),
    }
    routing = model.routing_stats(reset=True)
    if routing:
        write_json_atomic(run_dir / ROUTING_FILE, {**routing, "split": split, "checkpoint_step": pointer["step"]})
    write_evaluation(run_dir, study_dir(study, _output_of(run_dir, spec)), split, results, per_image, meta, merge=merge)
    logger.info("%s: evaluated %d task(s) on %s (checkpoint %s, step %s)", spec.run_id, len(evaluations), split, pointer["kind"], pointer["step"])
    return results


def _output_of(run_dir: Path, spec: RunSpec) -> Path:
    """Return the output root of a run directory: the folder above ``<study>/<run_id>``."""
    depth = len(Path(spec.run_id).parts) + 1
    return run_dir.resolve().parents[depth - 1]


def build_run_model(study: StudyConfig, spec: RunSpec) -> torch.nn.Module:
    """Build a run's model to load one of its checkpoints into (evaluate, predict, Fisher affinity).

    ``model.pretrained`` is not read: the checkpoint replaces every weight, so the pretrained file need not be
    present, and the warning about training from random weights, which ``build_model`` gives, does not apply.
    """
    from usagg.model import M2DINO

    cards = [study.task(t) for t in spec.tasks]
    return M2DINO(study.model, cards, study.data.size_hw)


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    fisher_images: int | None = None,
    allow_unfinished: bool = False,
) -> pl.DataFrame:
    """Evaluate a saved run on demand (``usagg evaluate``) and return the rows it wrote.

    A run that stopped before its last step raises ``DataError`` unless ``allow_unfinished`` is set. Its rows
    are then kept in the run folder only, not merged into the study's results table. With ``fisher_images``, also
    add the Fisher affinity of ``checkpoint`` (default latest) to the run's affinity.json, on the same model and
    records. The run is checked for it before anything is written.
    """
    from usagg.train.affinity import add_fisher_affinity, check_fisher_run

    if split not in (None, "val", "test"):
        raise ConfigError(f"split {split!r} is invalid; evaluate on val or test")
    ckpt.check_checkpoint_kind(checkpoint)
    folder = Path(run_dir)
    study, spec = load_run(folder)
    unfinished = unfinished_reason(folder)
    if unfinished and not allow_unfinished:
        raise DataError(
            f"{folder}: the run is not finished ({unfinished}), so its checkpoint is not the trained model; "
            "finish it with usagg train STUDY (a rerun resumes), or pass --allow-unfinished to score the "
            "checkpoint anyway (its rows then stay in the run folder and are not added to the study's results table)"
        )
    if unfinished:
        logger.warning("%s: evaluating an unfinished run (%s); its rows are not added to the study's results table", spec.run_id, unfinished)
    if fisher_images is not None:
        check_fisher_run(folder)
    records = RecordCache(study).run_records(spec)
    model = build_run_model(study, spec)
    rows = evaluate_and_write(
        study,
        spec,
        model,
        records,
        folder,
        resolve_device(device),
        split=split or study.evaluation.split,
        checkpoint=checkpoint or study.evaluation.checkpoint,
        merge=not unfinished,
    )
    if fisher_images is not None:
        add_fisher_affinity(folder, fisher_images, checkpoint or "latest", device, model=model, records=records)
    return rows
