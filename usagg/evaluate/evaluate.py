"""Evaluation of a model on a split into results rows, per-image scores and NaN reasons."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from usagg.config import StudyConfig
from usagg.data.record import SampleRecord
from usagg.evaluate.inference import ImagePrediction, iter_predictions
from usagg.evaluate.metrics import (
    MetricSet,
    aggregate_segmentation,
    classification_metrics,
    keypoint_metrics,
    mean_average_precision_50,
    radial_errors,
    scalar_metrics,
    segmentation_image_scores,
    single_box_iou,
)
from usagg.results import PER_IMAGE_SCHEMA, RESULTS_SCHEMA, validate_results
from usagg.tasks import TaskCard, metric_higher_is_better
from usagg.train.plan import RunSpec

logger = logging.getLogger(__name__)

@dataclass
class TaskEvaluation:
    """One task's split-level metrics and per-image scores."""

    task: str
    n_images: int
    metrics: MetricSet
    per_image: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # metric -> [(image, value)]


def evaluate_task(
    model: torch.nn.Module,
    card: TaskCard,
    records: Sequence[SampleRecord],
    study: StudyConfig,
    device: torch.device,
    max_boxes: int = 1,
    metrics: set[str] | None = None,
) -> TaskEvaluation:
    """Predict every record of one task and score the whole split at original resolution.

    ``metrics`` names the metrics needed (None: all). It only prunes costly work, for now the segmentation
    distances, so more metrics than requested may come back.
    """
    predictions = iter_predictions(
        model,
        card,
        records,
        study.data,
        device,
        batch_size=study.train.eval_batch_size,
        num_workers=study.data.num_workers,
        amp=study.train.amp,
    )
    return score_predictions(card, predictions, study, len(records), max_boxes=max_boxes, metrics=metrics)


DISTANCE_METRICS = {"hd", "hd95", "hd_mm", "hd95_mm"}


def score_predictions(
    card: TaskCard, predictions, study: StudyConfig, n_images: int, max_boxes: int = 1, metrics: set[str] | None = None
) -> TaskEvaluation:
    """Score an iterable of :class:`ImagePrediction` against the references in their records."""
    policy = study.evaluation
    kind = card.kind
    out = TaskEvaluation(task=card.name, n_images=n_images, metrics=MetricSet())

    def add(metric: str, image: str, value: float) -> None:
        out.per_image.setdefault(metric, []).append((image, float(value)))

    if kind == "segmentation":
        from usagg.data.decode import read_mask

        scores = []
        empty_notes = 0
        distances = metrics is None or bool(metrics & DISTANCE_METRICS)
        for pred in predictions:
            target = read_mask(pred.record.mask_path)
            s = segmentation_image_scores(
                pred.mask_HW, target, card.num_classes, pred.spacing_mm_per_px, policy.empty_mask_policy, distances
            )
            scores.append(s)
            empty_notes += s.empty_note is not None
            image = _image_id(pred)
            for metric in ("dice", "hd", "hd95", "hd_mm", "hd95_mm"):
                values = getattr(s, metric)
                if values is not None:
                    add(metric, image, _nanmean(values))
        out.metrics = aggregate_segmentation(scores, card.num_classes)
        if empty_notes:
            note = f"{empty_notes} image(s) had a class empty in the prediction or reference ({policy.empty_mask_policy} rule)"
            out.metrics.reasons.setdefault("dice", note)

    elif kind == "classification":
        probs, labels = [], []
        for pred in predictions:
            probs.append(pred.probs_C)
            labels.append(int(pred.record.label))
            image = _image_id(pred)
            add("accuracy", image, float(int(np.argmax(pred.probs_C)) == pred.record.label))
            add("label", image, pred.record.label)
            for c, p in enumerate(pred.probs_C):
                add(f"prob_{c}", image, p)
        probs_NC = np.stack(probs) if probs else np.zeros((0, card.num_classes))
        out.metrics = classification_metrics(probs_NC, np.asarray(labels, dtype=np.int64), policy.one_class_policy)

    elif kind == "detection":
        out.metrics = _score_detection(card, predictions, add, max_boxes)

    elif kind == "keypoints":
        errors, spacings = [], []
        for pred in predictions:
            target = np.asarray(pred.record.keypoints_xy, dtype=np.float64)
            error = float(radial_errors(pred.points_K2[None], target[None])[0])
            spacing = pred.spacing_mm_per_px if pred.spacing_mm_per_px is not None else math.nan
            errors.append(error)
            spacings.append(spacing)
            add("mre_px", _image_id(pred), error)
            if math.isfinite(spacing):
                add("mre_mm", _image_id(pred), error * spacing)
        out.metrics = keypoint_metrics(np.asarray(errors), np.asarray(spacings))

    else:
        values, targets = [], []
        for pred in predictions:
            values.append(pred.value)
            targets.append(float(pred.record.value))
            add("mae", _image_id(pred), abs(pred.value - float(pred.record.value)))
            add("prediction", _image_id(pred), pred.value)
        out.metrics = scalar_metrics(np.asarray(values), np.asarray(targets))

    for metric, reason in out.metrics.reasons.items():
        logger.debug("%s %s: %s", card.name, metric, reason)
    return out


def _score_detection(card: TaskCard, predictions, add, max_boxes: int) -> MetricSet:
    """IoU of the top-scoring box against the image's first reference box, and mAP@0.5 for multi-box tasks."""
    metrics = MetricSet()
    top_boxes, ref_boxes = [], []
    all_pred, all_scores, all_labels, all_ref, all_ref_labels = [], [], [], [], []
    several = max_boxes > 1
    skipped = 0
    for pred in predictions:
        refs = np.asarray(pred.record.boxes_xyxy or (), dtype=np.float64).reshape(-1, 4)
        ref_labels = np.asarray(pred.record.box_labels or (0,) * len(refs), dtype=np.int64)
        several = several or len(refs) > 1
        all_pred.append(pred.boxes_N4)
        all_scores.append(pred.scores_N)
        all_labels.append(pred.box_labels_N)
        all_ref.append(refs)
        all_ref_labels.append(ref_labels)
        if len(refs) == 0 or len(pred.boxes_N4) == 0:
            skipped += 1
            continue
        top_boxes.append(pred.boxes_N4[0])
        ref_boxes.append(refs[0])
        iou = float(single_box_iou(pred.boxes_N4[:1], refs[:1])[0])
        add("iou", _image_id(pred), iou)
    if top_boxes:
        reason = f"{skipped} image(s) without a reference or predicted box left out" if skipped else None
        metrics.set("iou", float(single_box_iou(np.stack(top_boxes), np.stack(ref_boxes)).mean()), reason)
    else:
        metrics.nan("iou", "no image has both a reference box and a predicted box")
    if several:
        value, reason = mean_average_precision_50(all_pred, all_scores, all_labels, all_ref, all_ref_labels)
        metrics.set("map50", value, reason)
    return metrics


def _image_id(pred: ImagePrediction) -> str:
    return str(pred.record.image_path)


def _nanmean(values: np.ndarray) -> float:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else math.nan


# --- tables ---------------------------------------------------------------------------------------


def results_rows(
    spec: RunSpec,
    cards: dict[str, TaskCard],
    n_train: dict[str, int],
    split: str,
    evaluations: Sequence[TaskEvaluation],
) -> pl.DataFrame:
    """Rows of the results table (one per task x metric) for one run and split."""
    rows = []
    for ev in evaluations:
        card = cards[ev.task]
        for metric, value in ev.metrics.values.items():
            rows.append(
                {
                    "study": spec.study,
                    "run_id": spec.run_id,
                    "paradigm": spec.paradigm,
                    "group": spec.group,
                    "task": ev.task,
                    "task_type": card.type.value,
                    "organ": card.organ,
                    "clinical_group": card.group,
                    "n_train": n_train[ev.task],
                    "data_fraction": spec.fraction,
                    "seed": spec.seed,
                    "split": split,
                    "metric": metric,
                    "value": value,
                    "higher_is_better": metric_higher_is_better(metric),
                    "source": "run",
                }
            )
    table = pl.DataFrame(rows, schema=RESULTS_SCHEMA) if rows else pl.DataFrame(schema=RESULTS_SCHEMA)
    return validate_results(table, origin=f"run {spec.run_id}")


def per_image_rows(spec: RunSpec, split: str, evaluations: Sequence[TaskEvaluation]) -> pl.DataFrame:
    rows = [
        {"run_id": spec.run_id, "task": ev.task, "split": split, "image": image, "metric": metric, "value": value}
        for ev in evaluations
        for metric, pairs in ev.per_image.items()
        for image, value in pairs
    ]
    return pl.DataFrame(rows, schema=PER_IMAGE_SCHEMA) if rows else pl.DataFrame(schema=PER_IMAGE_SCHEMA)


# --- validation score used to pick the best checkpoint -------------------------------------------------


def primary_metric(card: TaskCard, study: StudyConfig) -> str:
    """Return the card's own ``metric``, else ``evaluation.primary_metrics[kind]``, else the kind's default."""
    if card.metric is not None:
        return card.metric
    overrides = study.evaluation.primary_metrics or {}
    return overrides.get(card.kind, card.primary_metric)


BOUNDED_METRICS = {"dice", "auc", "accuracy", "f1_macro", "f1_weighted", "iou", "map50"}


def task_selection_score(metric: str, value: float, reference: float | None) -> float:
    """Map a primary metric to a higher-is-better score in [0, 1] for checkpoint selection.

    Bounded metrics keep their value, and MCC is mapped from [-1, 1]. Error metrics (HD, MRE, MAE, ...) become
    ``ref / (ref + value)``, where ``ref`` is the run's first validation value. So 0.5 means "as good as at the
    first validation" and 1 means zero error. R² is clipped to [0, 1]. NaN counts as 0.
    """
    if not math.isfinite(value):
        return 0.0
    if metric in BOUNDED_METRICS:
        return value
    if metric == "mcc":
        return (value + 1.0) / 2.0
    if metric == "r2":
        return min(1.0, max(0.0, value))
    ref = reference if reference is not None and math.isfinite(reference) and reference > 0 else 1.0
    return ref / (ref + max(value, 0.0))
