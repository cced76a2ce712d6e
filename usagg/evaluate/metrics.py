"""Clinical metrics per task kind, computed over a whole split at the original image resolution.

Every function returns a :class:`MetricSet`: metric name -> value, plus the reason for each value that is NaN or
that a convention fixed. Per-image functions return arrays so that callers can keep per-image scores for bootstrap
confidence intervals. Conventions follow the FMC_UIA challenge evaluator, so the numbers are comparable to the
challenge's: segmentation is averaged per image, then per class, detection scores the IoU of one box, and the
mean radial error is averaged per image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)
from torchvision.ops import box_iou

logger = logging.getLogger(__name__)

EmptyMaskPolicy = Literal["fmc_uia", "nan"]
OneClassPolicy = Literal["nan", "skip"]


@dataclass
class MetricSet:
    """Split-level metric values with the reasons behind NaNs and conventional values."""

    values: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def set(self, metric: str, value: float, reason: str | None = None) -> None:
        self.values[metric] = float(value)
        if reason is not None:
            self.reasons[metric] = reason

    def nan(self, metric: str, reason: str) -> None:
        self.set(metric, math.nan, reason)

    def update(self, other: "MetricSet") -> None:
        self.values.update(other.values)
        self.reasons.update(other.reasons)


# --- segmentation ---------------------------------------------------------------------------------


@dataclass
class SegmentationImageScores:
    """Scores of one image, one entry per non-background class (index 0 is class 1)."""

    dice: np.ndarray
    hd: np.ndarray | None  # None when distances were not requested
    hd95: np.ndarray | None
    hd_mm: np.ndarray | None  # None when the pixel spacing is unknown or distances were not requested
    hd95_mm: np.ndarray | None
    empty_note: str | None = None  # which empty-mask rule applied, if any


def segmentation_image_scores(
    pred_HW: np.ndarray,
    target_HW: np.ndarray,
    num_classes: int,
    spacing_mm_per_px: float | None = None,
    empty_mask_policy: EmptyMaskPolicy = "fmc_uia",
    distances: bool = True,
) -> SegmentationImageScores:
    """Score one predicted class-index mask against its reference, per non-background class.

    Dice and the Hausdorff distance (HD) follow the FMC_UIA evaluator: HD is the symmetric Hausdorff distance between
    the two sets of class pixels (what SimpleITK's HausdorffDistanceImageFilter returns). HD95 is the 95th
    percentile of the pooled surface-to-surface distances in both directions, as medpy's ``hd95`` pools them.
    Surface pixels are class pixels with a 4-neighbour outside the class or on the image edge. With ``empty_mask_policy="fmc_uia"`` a class absent
    from both masks scores Dice 1, HD 0, and a class absent from exactly one scores Dice 0, HD = image diagonal; with
    ``"nan"`` both-empty classes are NaN and one-empty classes keep Dice 0 but get NaN distances.
    ``distances=False`` skips HD and HD95, which cost far more than Dice on large masks.
    """
    if pred_HW.shape != target_HW.shape:
        raise ValueError(f"prediction shape {pred_HW.shape} differs from reference shape {target_HW.shape}")
    height, width = target_HW.shape
    diagonal_px = math.hypot(height, width)
    n_fg = num_classes - 1
    dice = np.empty(n_fg)
    hd = np.empty(n_fg)
    hd95 = np.empty(n_fg)
    notes = []

    # One bincount gives every class's prediction size, reference size and overlap.
    pred = pred_HW.astype(np.int64, copy=False)
    target = target_HW.astype(np.int64, copy=False)
    confusion = np.bincount((target * num_classes + pred).ravel(), minlength=num_classes * num_classes)
    confusion = confusion[: num_classes * num_classes].reshape(num_classes, num_classes)
    target_sizes = confusion.sum(axis=1)
    pred_sizes = confusion.sum(axis=0)

    for i, cls in enumerate(range(1, num_classes)):
        n_pred, n_target = int(pred_sizes[cls]), int(target_sizes[cls])
        if n_pred == 0 and n_target == 0:
            notes.append(f"class {cls} empty in both")
            if empty_mask_policy == "fmc_uia":
                dice[i], hd[i], hd95[i] = 1.0, 0.0, 0.0
            else:
                dice[i] = hd[i] = hd95[i] = math.nan
            continue
        if n_pred == 0 or n_target == 0:
            notes.append(f"class {cls} empty in {'prediction' if n_pred == 0 else 'reference'} only")
            dice[i] = 0.0
            hd[i] = hd95[i] = diagonal_px if empty_mask_policy == "fmc_uia" else math.nan
            continue
        dice[i] = 2.0 * confusion[cls, cls] / (n_pred + n_target)
        hd[i], hd95[i] = _hausdorff_pair(pred == cls, target == cls) if distances else (math.nan, math.nan)

    hd_mm = hd95_mm = None
    if not distances:
        return SegmentationImageScores(dice, None, None, None, None, "; ".join(notes) or None)
    if spacing_mm_per_px is not None and math.isfinite(spacing_mm_per_px):
        # Isotropic spacing, so every distance (and the empty-mask diagonal) scales by the same factor.
        hd_mm = hd * spacing_mm_per_px
        hd95_mm = hd95 * spacing_mm_per_px
    return SegmentationImageScores(dice, hd, hd95, hd_mm, hd95_mm, "; ".join(notes) or None)


def _hausdorff_pair(a_HW: np.ndarray, b_HW: np.ndarray) -> tuple[float, float]:
    """Return (HD over class pixels, HD95 over surface pixels) of two non-empty boolean masks, in pixels.

    scipy's exact Euclidean distance transform is used instead of torchmetrics' ``hausdorff_distance``. The masks
    of one split differ in size, so they cannot be batched. The FMC_UIA HD is defined on all class pixels, not
    on edges, and HD95 needs the full distance distribution. Both masks are cropped to the box around their
    union first. Every pixel of both sets lies inside that box and the erosion treats the outside as background
    (``border_value=0``), so distances and surfaces are the same as on the full image.
    """
    rows = np.flatnonzero((a_HW | b_HW).any(axis=1))
    cols = np.flatnonzero((a_HW | b_HW).any(axis=0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a, b = a_HW[crop], b_HW[crop]

    # distance_transform_edt(~b)[p] is the distance from pixel p to the nearest pixel of b.
    dist_to_b = ndimage.distance_transform_edt(~b)
    dist_to_a = ndimage.distance_transform_edt(~a)
    hd = max(dist_to_b[a].max(), dist_to_a[b].max())

    surface_a = a & ~ndimage.binary_erosion(a, border_value=0)
    surface_b = b & ~ndimage.binary_erosion(b, border_value=0)
    dist_to_surface_b = ndimage.distance_transform_edt(~surface_b)
    dist_to_surface_a = ndimage.distance_transform_edt(~surface_a)
    pooled = np.concatenate([dist_to_surface_b[surface_a], dist_to_surface_a[surface_b]])
    hd95 = float(np.percentile(pooled, 95))
    return float(hd), hd95


def aggregate_segmentation(scores: list[SegmentationImageScores], num_classes: int) -> MetricSet:
    """Average per-image scores over images per class, then over the non-background classes (the FMC_UIA order).

    NaN image scores (``empty_mask_policy="nan"``) are left out of the image mean. mm metrics use the images whose
    spacing is known, and they are omitted when no image has one.
    """
    out = MetricSet()
    if not scores:
        for metric in ("dice", "hd", "hd95"):
            out.nan(metric, "the split has no images")
        return out
    for metric in ("dice", "hd", "hd95", "hd_mm", "hd95_mm"):
        arrays = [getattr(s, metric) for s in scores if getattr(s, metric) is not None]
        if not arrays:
            continue  # distances not requested, or mm metrics without any known pixel spacing
        per_image_IC = np.stack(arrays)
        finite_I = np.isfinite(per_image_IC)
        if not finite_I.any():
            out.nan(metric, "every image-class pair is undefined (empty masks under the 'nan' empty-mask policy)")
            continue
        with np.errstate(invalid="ignore"):
            counts_C = finite_I.sum(axis=0)
            per_class_C = np.where(counts_C > 0, np.nansum(per_image_IC, axis=0) / np.maximum(counts_C, 1), np.nan)
        value = float(np.nanmean(per_class_C))
        reason = None
        if np.isnan(per_class_C).any():
            missing = [str(c + 1) for c in np.flatnonzero(np.isnan(per_class_C))]
            reason = f"class(es) {', '.join(missing)} undefined on every image, left out of the class mean"
        if metric.endswith("_mm") and len(arrays) < len(scores):
            note = f"computed on the {len(arrays)} of {len(scores)} images with a known pixel spacing"
            reason = f"{reason}; {note}" if reason else note
        out.set(metric, value, reason)
    return out


# --- classification -------------------------------------------------------------------------------


def classification_metrics(
    probs_NC: torch.Tensor | np.ndarray,
    labels_N: torch.Tensor | np.ndarray,
    one_class_policy: OneClassPolicy = "nan",
) -> MetricSet:
    """Compute accuracy, AUC, macro and weighted F1 and MCC over a whole split.

    AUC is the binary ROC AUC of the positive class (index 1) for two classes and the macro one-vs-rest AUC
    otherwise, over the classes present in the labels. With a single class in the labels AUC and MCC are undefined:
    ``one_class_policy`` makes them NaN (with a reason) or leaves them out.
    """
    probs = torch.as_tensor(np.asarray(probs_NC), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels_N), dtype=torch.long)
    out = MetricSet()
    if labels.numel() == 0:
        for metric in ("accuracy", "auc", "f1_macro", "f1_weighted", "mcc"):
            out.nan(metric, "the split has no images")
        return out
    num_classes = probs.shape[1]
    preds = probs.argmax(dim=1)

    out.set("accuracy", multiclass_accuracy(preds, labels, num_classes=num_classes, average="micro").item())
    # torchmetrics leaves classes absent from both labels and predictions out of the macro mean. sklearn's
    # f1_score, which the FMC_UIA evaluator calls, does the same by default: it scores the labels present in either.
    out.set("f1_macro", multiclass_f1_score(preds, labels, num_classes=num_classes, average="macro").item())
    out.set("f1_weighted", multiclass_f1_score(preds, labels, num_classes=num_classes, average="weighted").item())

    present = torch.unique(labels)
    if present.numel() < 2:
        reason = f"only class {present.item()} occurs in the labels, so AUC and MCC are undefined"
        logger.info("%s (one_class_policy=%s)", reason, one_class_policy)
        if one_class_policy == "nan":
            out.nan("auc", reason)
            out.nan("mcc", reason)
        return out

    if num_classes == 2:
        out.set("auc", binary_auroc(probs[:, 1], labels).item())
    else:
        per_class = multiclass_auroc(probs, labels, num_classes=num_classes, average=None)
        present_mask = torch.zeros(num_classes, dtype=torch.bool)
        present_mask[present] = True
        reason = None
        if not present_mask.all():
            absent = ", ".join(str(c) for c in torch.flatnonzero(~present_mask).tolist())
            reason = f"class(es) {absent} absent from the labels, left out of the one-vs-rest macro mean"
        out.set("auc", per_class[present_mask].mean().item(), reason)

    confusion = multiclass_confusion_matrix(preds, labels, num_classes=num_classes)
    out.set(*_matthews_corrcoef(confusion))
    return out


def _matthews_corrcoef(confusion_CC: torch.Tensor) -> tuple[str, float, str | None]:
    """Multi-class MCC (Gorodkin 2004, R_K) from a confusion matrix with rows = true class.

    Hand-written on torchmetrics' confusion matrix, because torchmetrics 1.9's ``matthews_corrcoef`` replaces the
    0/0 of constant predictions by a limit value: 0.577 for predictions all 0 against labels [0, 1, 0, 0].
    sklearn and the FMC_UIA evaluator report 0 there, and so does this function, with the reason.
    """
    c = confusion_CC.double()
    total = c.sum()
    correct = torch.trace(c)
    true_k = c.sum(dim=1)
    pred_k = c.sum(dim=0)
    numerator = correct * total - (true_k * pred_k).sum()
    denominator = torch.sqrt((total**2 - (pred_k**2).sum()) * (total**2 - (true_k**2).sum()))
    if denominator == 0:
        return "mcc", 0.0, "every prediction is the same class, so MCC is 0/0; reported as 0 (sklearn, FMC_UIA)"
    return "mcc", float(numerator / denominator), None


# --- detection ------------------------------------------------------------------------------------


def single_box_iou(pred_N4: np.ndarray | torch.Tensor, target_N4: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return the IoU of each image's predicted box with its reference box (xyxy, pixels); a zero-area union gives 0."""
    pred = torch.as_tensor(np.asarray(pred_N4), dtype=torch.float64).reshape(-1, 4)
    target = torch.as_tensor(np.asarray(target_N4), dtype=torch.float64).reshape(-1, 4)
    if pred.shape[0] == 0:
        return np.zeros(0)
    # Degenerate boxes (x_max < x_min) get zero width, so their area is never negative.
    pred = torch.cat([pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2])], dim=1)
    iou = torch.diagonal(box_iou(pred, target)).numpy().copy()
    iou[~np.isfinite(iou)] = 0.0
    return iou


def mean_average_precision_50(
    pred_boxes: list[np.ndarray],
    pred_scores: list[np.ndarray],
    pred_labels: list[np.ndarray],
    target_boxes: list[np.ndarray],
    target_labels: list[np.ndarray],
) -> tuple[float, str | None]:
    """Compute COCO-style AP at IoU 0.5 (101-point interpolated precision), averaged over classes with reference boxes.

    Hand-written because torchmetrics' ``MeanAveragePrecision`` (1.9) raises ModuleNotFoundError unless pycocotools
    or faster-coco-eval is installed. Detections are matched greedily by descending score to the unmatched reference
    box of the same class with the highest IoU >= 0.5, as COCO does (no crowd regions, no area ranges).
    """
    classes = sorted({int(c) for labels in target_labels for c in np.asarray(labels).ravel()})
    if not classes:
        return math.nan, "no reference boxes in the split, so AP is undefined"
    recall_grid = np.linspace(0.0, 1.0, 101)
    ap_per_class = []
    for cls in classes:
        n_targets = 0
        records: list[tuple[float, bool]] = []  # (score, is true positive) over all images
        for boxes_p, scores_p, labels_p, boxes_t, labels_t in zip(
            pred_boxes, pred_scores, pred_labels, target_boxes, target_labels
        ):
            tgt = np.asarray(boxes_t, dtype=np.float64).reshape(-1, 4)[np.asarray(labels_t).ravel() == cls]
            keep = np.asarray(labels_p).ravel() == cls
            det = np.asarray(boxes_p, dtype=np.float64).reshape(-1, 4)[keep]
            det_scores = np.asarray(scores_p, dtype=np.float64).ravel()[keep]
            n_targets += len(tgt)
            order = np.argsort(-det_scores, kind="stable")
            matched = np.zeros(len(tgt), dtype=bool)
            ious = box_iou(torch.from_numpy(det[order]), torch.from_numpy(tgt)).numpy() if len(tgt) and len(det) else None
            for rank, score in enumerate(det_scores[order]):
                hit = False
                if ious is not None:
                    candidates = np.where(matched, -1.0, ious[rank])
                    best = int(np.argmax(candidates))
                    if candidates[best] >= 0.5:
                        matched[best] = True
                        hit = True
                records.append((float(score), hit))
        if n_targets == 0:
            continue
        records.sort(key=lambda r: -r[0])
        hits = np.array([r[1] for r in records], dtype=np.float64)
        tp = np.cumsum(hits)
        fp = np.cumsum(1.0 - hits)
        recall = tp / n_targets
        precision = tp / np.maximum(tp + fp, 1e-12)
        # Precision envelope: the best precision at any recall at or beyond each point.
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        idx = np.searchsorted(recall, recall_grid, side="left")
        sampled = np.array([envelope[i] if i < len(envelope) else 0.0 for i in idx])
        ap_per_class.append(float(sampled.mean()))
    return float(np.mean(ap_per_class)), None


# --- regression -----------------------------------------------------------------------------------


def radial_errors(pred_NK2: np.ndarray, target_NK2: np.ndarray) -> np.ndarray:
    """Return per image the mean over points of the distance between predicted and reference points, in pixels."""
    pred = np.asarray(pred_NK2, dtype=np.float64)
    target = np.asarray(target_NK2, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"predicted points {pred.shape} and reference points {target.shape} differ in shape")
    return np.linalg.norm(pred - target, axis=-1).mean(axis=-1)


def keypoint_metrics(errors_px_N: np.ndarray, spacing_mm_per_px_N: np.ndarray | None = None) -> MetricSet:
    """Compute the mean radial error over images in pixels, and in mm over the images with a known pixel spacing."""
    out = MetricSet()
    errors = np.asarray(errors_px_N, dtype=np.float64)
    if errors.size == 0:
        out.nan("mre_px", "the split has no images")
        return out
    out.set("mre_px", float(errors.mean()))
    if spacing_mm_per_px_N is None:
        return out
    spacing = np.asarray(spacing_mm_per_px_N, dtype=np.float64)
    known = np.isfinite(spacing)
    if known.any():
        reason = None
        if not known.all():
            reason = f"computed on the {int(known.sum())} of {known.size} images with a known pixel spacing"
        out.set("mre_mm", float((errors[known] * spacing[known]).mean()), reason)
    return out


def scalar_metrics(pred_N: np.ndarray, target_N: np.ndarray) -> MetricSet:
    """Compute MAE, RMSE and R² of scalar predictions, in the task's unit."""
    pred = torch.as_tensor(np.asarray(pred_N, dtype=np.float64))
    target = torch.as_tensor(np.asarray(target_N, dtype=np.float64))
    out = MetricSet()
    if target.numel() == 0:
        for metric in ("mae", "rmse", "r2"):
            out.nan(metric, "the split has no images")
        return out
    out.set("mae", mean_absolute_error(pred, target).item())
    out.set("rmse", mean_squared_error(pred, target, squared=False).item())
    # R² = 1 - SS_res / SS_tot. torchmetrics returns 1 when SS_tot = 0, but the ratio is undefined there.
    if target.numel() < 2 or torch.all(target == target[0]):
        out.nan("r2", "R² is undefined when the split has fewer than two distinct reference values")
    else:
        out.set("r2", r2_score(pred, target).item())
    return out
