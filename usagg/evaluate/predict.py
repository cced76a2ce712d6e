"""Predictions in the FMC_UIA challenge's submission format, and a scorer that reads them back.

The format (from the challenge's baseline README and ``evaluate.py``):

- ``classification_predictions.json``: a list of ``{"image_path", "task_id", "predicted_class", "predicted_probs"}``;
- ``detection_predictions.json``: ``{"image_path", "task_id", "bbox_normalized", "bbox_pixels"}`` with one
  ``[x_min, y_min, x_max, y_max]`` box, normalised by the image width and height or in pixels;
- ``regression_predictions.json``: ``{"image_path", "task_id", "predicted_points_normalized",
  "predicted_points_pixels"}`` with the points flattened as ``[x1, y1, x2, y2, ...]``;
- segmentation: one greyscale PNG of class indices per image at ``<out>/<mask_path without "../">``.

``image_path`` is the CSV's own string (for example ``../Classification/X/IMAGES/a.png``), because the challenge
matches predictions to rows by that exact text.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from usagg.errors import DataError
from usagg.evaluate.metrics import (
    MetricSet,
    aggregate_segmentation,
    classification_metrics,
    keypoint_metrics,
    radial_errors,
    segmentation_image_scores,
    single_box_iou,
)
from usagg.io import read_json_file, write_json_atomic
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)

JSON_FILES = {
    "classification": "classification_predictions.json",
    "detection": "detection_predictions.json",
    "keypoints": "regression_predictions.json",
}


class _RawRows:
    """The CSV rows as text, so predictions can repeat ``image_path`` and ``mask_path`` exactly."""

    def __init__(self) -> None:
        self._tables: dict[Path, list[dict[str, str | None]]] = {}

    def row(self, file: Path, row: int) -> dict[str, str | None]:
        if file not in self._tables:
            self._tables[file] = pl.read_csv(file, infer_schema=False).to_dicts()
        return self._tables[file][row - 1]


def prediction_mask_path(out_dir: Path, mask_path: str) -> Path:
    """Return where the challenge looks for a predicted mask: ``out_dir`` / ``mask_path`` without any ``../``."""
    relative = mask_path.replace("../", "")
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        raise DataError(f"mask_path {mask_path!r} does not stay inside the output folder once '../' is removed")
    return out_dir / relative


def _task_id(card: TaskCard) -> str:
    return getattr(card.source, "task_id", None) or card.name


def _match_tasks(run_cards: dict[str, TaskCard], csv_cards: list[TaskCard], data_root: Path) -> list[tuple[TaskCard, TaskCard]]:
    """Pair each CSV task of the data root with the run's task of the same task id; warn about the rest."""
    by_id = {_task_id(card): card for card in run_cards.values()}
    pairs = []
    for csv_card in csv_cards:
        run_card = by_id.get(_task_id(csv_card))
        if run_card is None:
            logger.warning("%s: task %s has no head in this run; no predictions written for it", data_root, _task_id(csv_card))
            continue
        if run_card.kind != csv_card.kind or (csv_card.kind != "detection" and run_card.num_classes != csv_card.num_classes):
            raise DataError(
                f"{data_root}: task {_task_id(csv_card)} is a {csv_card.kind} task with "
                f"{csv_card.num_classes or csv_card.num_keypoints} classes/points in the CSV, but the run trained it as "
                f"{run_card.kind} with {run_card.num_classes or run_card.num_keypoints}"
            )
        pairs.append((run_card, csv_card))
    if not pairs:
        raise DataError(
            f"{data_root}: none of its task ids ({', '.join(_task_id(c) for c in csv_cards)}) was trained in this run "
            f"({', '.join(_task_id(c) for c in run_cards.values())}); tasks are matched by task id (a task card's "
            "source.task_id for fmc_uia cards, else its name), so predict with a run whose study trained these "
            "tasks from their FMC_UIA CSVs, or name its task cards after the task ids"
        )
    return pairs


def check_data_root(data_root: str | os.PathLike) -> Path:
    """Return the resolved ``DATA_ROOT`` of ``usagg predict`` if it is a folder with CSV files in ``csv_files/``.

    Otherwise raise DataError. The message names the command-line argument, because the root comes from the
    command line, not from a study's ``source.root``.
    """
    root = Path(data_root).resolve()
    layout = (
        "give the FMC_UIA data folder that contains csv_files/: one CSV per task with its label columns, and the "
        "images and masks those CSVs name (for example data/val)"
    )
    if not root.exists():
        raise DataError(f"DATA_ROOT {data_root}: no such folder; {layout}")
    if not root.is_dir():
        raise DataError(f"DATA_ROOT {data_root} is a file, not a folder; {layout}")
    csv_dir = root / "csv_files"
    if not csv_dir.is_dir():
        raise DataError(f"DATA_ROOT {data_root} has no csv_files/ folder; {layout}")
    if not any(csv_dir.glob("*.csv")):
        raise DataError(f"DATA_ROOT {data_root}: {csv_dir} contains no CSV files; {layout}")
    return root


def write_fmc_uia_predictions(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint: str | None = None,
    device: str = "auto",
) -> dict[str, int]:
    """Predict every image of an FMC_UIA data root with a trained run and write the submission files.

    ``checkpoint`` is ``best`` or ``latest``. None takes the study's ``evaluation.checkpoint``, as
    ``usagg evaluate`` does. The run, the data root, the task ids and every matched task's rows are checked before
    the model is built. Masks are written to a staging folder inside ``out_dir`` and moved into place, and the
    JSON files merged, only after every prediction has succeeded, so a failure leaves ``out_dir`` as it was.
    Returns the number of predictions written per file kind.
    """
    from usagg.data.sources import load_task_records
    from usagg.data.sources.fmc_uia import discover_fmc_uia
    from usagg.train import checkpoint as ckpt
    from usagg.train.distributed import resolve_device
    from usagg.train.finalize import build_run_model
    from usagg.train.rundir import load_run

    ckpt.check_checkpoint_kind(checkpoint)
    study, spec = load_run(run_dir)
    root = check_data_root(data_root)
    pairs = _match_tasks({t: study.task(t) for t in spec.tasks}, discover_fmc_uia(root), root)
    # NOTE: the data layer validates labels while reading, so the data root needs its label columns and mask
    # files, as the challenge's validation data has them. An unlabelled test root is rejected.
    tasks = [(run_card, csv_card, load_task_records(csv_card)) for run_card, csv_card in pairs]
    out = Path(out_dir)
    existing = {kind: _read_existing(out / name) for kind, name in JSON_FILES.items()}
    torch_device = resolve_device(device)
    model = build_run_model(study, spec)
    ckpt.load_weights(model, run_dir, checkpoint or study.evaluation.checkpoint)
    model.to(torch_device)

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".usagg-predict-", dir=out) as staging:
        entries, masks = _predict_into(model, study, tasks, Path(staging), out, torch_device)
        for staged, target in masks:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
    predicted_ids = {kind: {entry["task_id"] for entry in entries[kind]} for kind in JSON_FILES}
    for kind, name in JSON_FILES.items():
        if entries[kind]:
            _merge_into(out / name, existing[kind], entries[kind], predicted_ids[kind])
    summary = {name: len(entries[kind]) for kind, name in JSON_FILES.items()}
    summary["segmentation masks"] = len(masks)
    return summary


def _predict_into(
    model, study, tasks: list[tuple[TaskCard, TaskCard, list]], staging: Path, out: Path, torch_device
) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[Path, Path]]]:
    """Predict every record; return the JSON entries per kind and (staged mask, final path) pairs."""
    from usagg.evaluate.inference import iter_predictions

    raw = _RawRows()
    entries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in JSON_FILES}
    masks: list[tuple[Path, Path]] = []
    for run_card, csv_card, records in tasks:
        predictions = iter_predictions(
            model, run_card, records, study.data, torch_device,
            batch_size=study.train.eval_batch_size, num_workers=study.data.num_workers, amp=study.train.amp,
        )
        for pred in predictions:
            row = raw.row(pred.record.source_file, pred.record.row)
            h, w = pred.orig_size_hw
            base = {"image_path": row["image_path"], "task_id": _task_id(csv_card)}
            if run_card.kind == "segmentation":
                target = prediction_mask_path(out, row["mask_path"])
                staged = staging / f"{len(masks)}.png"
                Image.fromarray(pred.mask_HW.astype(np.uint8), mode="L").save(staged, format="PNG")
                masks.append((staged, target))
            elif run_card.kind == "classification":
                probs = [float(p) for p in pred.probs_C]
                entries["classification"].append({**base, "predicted_class": int(np.argmax(probs)), "predicted_probs": probs})
            elif run_card.kind == "detection":
                box = [float(v) for v in pred.boxes_N4[0]] if len(pred.boxes_N4) else [0.0, 0.0, 0.0, 0.0]
                entry = {**base, "bbox_normalized": [box[0] / w, box[1] / h, box[2] / w, box[3] / h], "bbox_pixels": box}
                if len(pred.boxes_N4) > 1:  # extra keys are ignored by the challenge's evaluator
                    entry["boxes_pixels"] = pred.boxes_N4.tolist()
                    entry["scores"] = pred.scores_N.tolist()
                entries["detection"].append(entry)
            elif run_card.kind == "keypoints":
                points = [float(v) for v in pred.points_K2.reshape(-1)]
                normalised = [v / (w if i % 2 == 0 else h) for i, v in enumerate(points)]
                entries["keypoints"].append({**base, "predicted_points_normalized": normalised, "predicted_points_pixels": points})
            else:
                logger.warning("task %s: scalar regression has no FMC_UIA submission format; skipped", run_card.name)
                break
    return entries, masks


def _read_existing(file: Path) -> list[dict[str, Any]]:
    """Return the entries of a submission file already in the output folder ([] when there is none)."""
    if not file.exists():
        return []
    move = "move the file aside or write to another --out"
    existing = read_json_file(file, "the existing predictions", fix=move)
    if not isinstance(existing, list) or not all(isinstance(e, dict) for e in existing):
        raise DataError(f"{file}: existing predictions are not a JSON list of objects; {move}")
    return existing


def _merge_into(file: Path, existing: list[dict[str, Any]], new_entries: list[dict[str, Any]], task_ids: set[str]) -> None:
    """Write ``new_entries`` into ``file``, keeping the ``existing`` entries of other tasks.

    Task-specific runs each predict one task, so several ``usagg predict`` calls fill one submission folder.
    Entries of ``task_ids`` are replaced, so predicting a task again does not duplicate it.
    """
    other_tasks = [e for e in existing if e.get("task_id") not in task_ids]
    if other_tasks:
        logger.info("%s: kept %d prediction(s) of other tasks", file, len(other_tasks))
    write_json_atomic(file, other_tasks + new_entries)


# --- reading back -------------------------------------------------------------------------------------


def read_fmc_uia_predictions(pred_dir: str | os.PathLike) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """Read the three JSON files into ``{kind: {(task_id, image_path): entry}}``; missing files give empty maps."""
    folder = Path(pred_dir)
    out: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for kind, name in JSON_FILES.items():
        file = folder / name
        entries = read_json_file(file, "the predictions") if file.exists() else []
        keyed = isinstance(entries, list) and all(isinstance(e, dict) and "task_id" in e and "image_path" in e for e in entries)
        if not keyed:
            raise DataError(f"{file}: expected a JSON list of prediction objects, each with task_id and image_path")
        out[kind] = {(e["task_id"], e["image_path"]): e for e in entries}
    return out


def score_fmc_uia(data_root: str | os.PathLike, pred_dir: str | os.PathLike) -> dict[str, MetricSet]:
    """Score submission files against an FMC_UIA root the way the challenge's evaluator does, with our metrics.

    Images without a prediction are left out (as the challenge does); the number scored is in the reasons.
    """
    from usagg.data.decode import read_mask
    from usagg.data.sources import load_task_records
    from usagg.data.sources.fmc_uia import discover_fmc_uia

    root = check_data_root(data_root)
    folder = Path(pred_dir)
    predictions = read_fmc_uia_predictions(folder)
    raw = _RawRows()
    results: dict[str, MetricSet] = {}
    for card in discover_fmc_uia(root):
        task_id = _task_id(card)
        collected: dict[str, list] = defaultdict(list)
        for record in load_task_records(card):
            row = raw.row(record.source_file, record.row)
            key = (task_id, row["image_path"])
            if card.kind == "segmentation":
                pred_file = prediction_mask_path(folder, row["mask_path"])
                if not pred_file.exists():
                    continue
                target = read_mask(record.mask_path)
                pred = np.asarray(Image.open(pred_file).convert("L"), dtype=np.int64)
                if pred.shape != target.shape:
                    resized = Image.fromarray(pred.astype(np.uint8)).resize(target.shape[::-1], Image.NEAREST)
                    pred = np.asarray(resized, dtype=np.int64)
                collected["seg"].append(segmentation_image_scores(pred, target, card.num_classes))
            elif card.kind == "classification" and key in predictions["classification"]:
                collected["probs"].append(predictions["classification"][key]["predicted_probs"])
                collected["labels"].append(record.label)
            elif card.kind == "detection" and key in predictions["detection"]:
                collected["iou"].append(
                    float(single_box_iou([predictions["detection"][key]["bbox_pixels"]], [record.boxes_xyxy[0]])[0])
                )
            elif card.kind == "keypoints" and key in predictions["keypoints"]:
                points = np.asarray(predictions["keypoints"][key]["predicted_points_pixels"], dtype=np.float64).reshape(-1, 2)
                target = np.asarray(record.keypoints_xy, dtype=np.float64)
                collected["mre"].append(float(radial_errors(points[None], target[None])[0]))
        if card.kind == "segmentation":
            metrics = aggregate_segmentation(collected["seg"], card.num_classes) if collected["seg"] else MetricSet()
        elif card.kind == "classification":
            metrics = classification_metrics(np.asarray(collected["probs"]).reshape(-1, card.num_classes), np.asarray(collected["labels"]))
        elif card.kind == "detection":
            metrics = MetricSet()
            if collected["iou"]:
                metrics.set("iou", float(np.mean(collected["iou"])))
        else:
            metrics = keypoint_metrics(np.asarray(collected["mre"]))
        n = len(next(iter(collected.values()), []))
        metrics.reasons["n_scored"] = f"{n} image(s) with a prediction"
        results[task_id] = metrics
    return results
