"""Metrics against values worked out by hand on tiny drawn masks, labels, boxes and points."""

from __future__ import annotations

import math

import numpy as np
import pytest

from usagg.evaluate.metrics import (
    aggregate_segmentation,
    classification_metrics,
    keypoint_metrics,
    mean_average_precision_50,
    radial_errors,
    scalar_metrics,
    segmentation_image_scores,
    single_box_iou,
)


def _mask(shape, *pixels_by_class):
    """Draw a class-index mask: each argument is (class, list of (row, col))."""
    mask = np.zeros(shape, dtype=np.int64)
    for cls, pixels in pixels_by_class:
        for r, c in pixels:
            mask[r, c] = cls
    return mask


def test_segmentation_dice_hd_hd95_by_hand():
    # Reference: one pixel at (2, 2). Prediction: that pixel and (2, 7), five columns away.
    target = _mask((6, 8), (1, [(2, 2)]))
    pred = _mask((6, 8), (1, [(2, 2), (2, 7)]))
    scores = segmentation_image_scores(pred, target, num_classes=2)
    assert scores.dice[0] == pytest.approx(2 * 1 / (2 + 1))
    assert scores.hd[0] == pytest.approx(5.0)
    # Pooled surface distances: pred->ref [0, 5], ref->pred [0]; 95th percentile of [0, 0, 5] = 0 + 0.9 * 5.
    assert scores.hd95[0] == pytest.approx(4.5)
    assert scores.hd_mm is None


def test_segmentation_hd_counts_interior_pixels():
    # The prediction fills the one-pixel hole of the reference ring. The hole pixel is 1 px from the reference, so
    # the FMC_UIA HD (over all class pixels) is 1, while an HD over boundary pixels only would be 0.
    ring = [(r, c) for r in range(1, 4) for c in range(1, 4) if (r, c) != (2, 2)]
    target = _mask((5, 5), (1, ring))
    pred = _mask((5, 5), (1, ring + [(2, 2)]))
    scores = segmentation_image_scores(pred, target, num_classes=2)
    assert scores.hd[0] == pytest.approx(1.0)
    assert scores.hd95[0] == pytest.approx(0.0)
    assert scores.dice[0] == pytest.approx(2 * 8 / (9 + 8))


def test_segmentation_mm_scales_by_spacing():
    target = _mask((6, 8), (1, [(2, 2)]))
    pred = _mask((6, 8), (1, [(2, 2), (2, 7)]))
    scores = segmentation_image_scores(pred, target, num_classes=2, spacing_mm_per_px=0.5)
    assert scores.hd_mm[0] == pytest.approx(2.5)
    assert scores.hd95_mm[0] == pytest.approx(2.25)


def test_segmentation_empty_masks_fmc_uia_policy():
    empty = np.zeros((6, 8), dtype=np.int64)
    one = _mask((6, 8), (1, [(1, 1), (1, 2)]))
    both_empty = segmentation_image_scores(empty, empty, num_classes=2)
    assert both_empty.dice[0] == 1.0
    assert both_empty.hd[0] == 0.0
    assert both_empty.hd95[0] == 0.0
    pred_empty = segmentation_image_scores(empty, one, num_classes=2)
    assert pred_empty.dice[0] == 0.0
    assert pred_empty.hd[0] == pytest.approx(10.0)  # diagonal of a 6 x 8 image
    ref_empty = segmentation_image_scores(one, empty, num_classes=2, spacing_mm_per_px=0.1)
    assert ref_empty.hd95[0] == pytest.approx(10.0)
    assert ref_empty.hd_mm[0] == pytest.approx(1.0)
    assert "reference only" in ref_empty.empty_note


def test_segmentation_empty_masks_nan_policy():
    empty = np.zeros((6, 8), dtype=np.int64)
    one = _mask((6, 8), (1, [(1, 1)]))
    both_empty = segmentation_image_scores(empty, empty, num_classes=2, empty_mask_policy="nan")
    assert math.isnan(both_empty.dice[0])
    assert math.isnan(both_empty.hd[0])
    one_empty = segmentation_image_scores(empty, one, num_classes=2, empty_mask_policy="nan")
    assert one_empty.dice[0] == 0.0
    assert math.isnan(one_empty.hd[0])


def test_segmentation_multiclass_absent_class():
    # Class 1 matches exactly; class 2 is absent from both masks, so FMC_UIA scores it Dice 1, HD 0.
    target = _mask((4, 4), (1, [(0, 0), (0, 1)]))
    pred = target.copy()
    scores = segmentation_image_scores(pred, target, num_classes=3)
    assert scores.dice.tolist() == [1.0, 1.0]
    assert scores.hd.tolist() == [0.0, 0.0]


def test_segmentation_aggregate_per_class_then_mean():
    # Image A: class 1 Dice 1, class 2 Dice 0 (missed). Image B: class 1 Dice 0.5, class 2 both empty (NaN policy).
    a_target = _mask((4, 4), (1, [(0, 0)]), (2, [(3, 3)]))
    a_pred = _mask((4, 4), (1, [(0, 0)]))
    b_target = _mask((4, 4), (1, [(0, 0), (0, 1)]))
    b_pred = _mask((4, 4), (1, [(0, 0), (1, 0)]))
    a = segmentation_image_scores(a_pred, a_target, 3, empty_mask_policy="nan")
    b = segmentation_image_scores(b_pred, b_target, 3, empty_mask_policy="nan")
    result = aggregate_segmentation([a, b], num_classes=3)
    # class 1: mean(1, 0.5) = 0.75; class 2: image A only = 0 -> mean over classes 0.375.
    assert result.values["dice"] == pytest.approx(0.375)
    assert "hd_mm" not in result.values


def test_segmentation_aggregate_all_undefined_is_nan_with_reason():
    empty = np.zeros((3, 3), dtype=np.int64)
    scores = segmentation_image_scores(empty, empty, 2, empty_mask_policy="nan")
    result = aggregate_segmentation([scores], num_classes=2)
    assert math.isnan(result.values["dice"])
    assert "undefined" in result.reasons["dice"]


def test_segmentation_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differs"):
        segmentation_image_scores(np.zeros((2, 2)), np.zeros((2, 3)), 2)


def test_classification_binary_by_hand():
    labels = [0, 0, 0, 1, 1]
    p1 = np.array([0.2, 0.3, 0.7, 0.8, 0.4])
    probs = np.stack([1 - p1, p1], axis=1)
    result = classification_metrics(probs, labels).values
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["auc"] == pytest.approx(5 / 6)
    assert result["f1_macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert result["f1_weighted"] == pytest.approx(0.6)
    assert result["mcc"] == pytest.approx(1 / 6)


def test_classification_multiclass_auc_by_hand():
    labels = [0, 1, 2, 2]
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.55, 0.2, 0.25]])
    result = classification_metrics(probs, labels).values
    assert result["auc"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert result["accuracy"] == pytest.approx(0.75)


def test_classification_one_class_policies():
    probs = np.array([[0.3, 0.7], [0.6, 0.4]])
    as_nan = classification_metrics(probs, [1, 1], one_class_policy="nan")
    assert math.isnan(as_nan.values["auc"])
    assert math.isnan(as_nan.values["mcc"])
    assert "only class 1" in as_nan.reasons["auc"]
    assert as_nan.values["accuracy"] == pytest.approx(0.5)
    skipped = classification_metrics(probs, [1, 1], one_class_policy="skip")
    assert "auc" not in skipped.values
    assert "mcc" not in skipped.values


def test_classification_constant_prediction_mcc_is_zero():
    probs = np.array([[0.9, 0.1]] * 4)
    result = classification_metrics(probs, [0, 1, 0, 0])
    assert result.values["mcc"] == 0.0
    assert "0/0" in result.reasons["mcc"]


def test_single_box_iou_by_hand():
    iou = single_box_iou([[0, 0, 10, 10], [0, 0, 0, 0]], [[5, 5, 15, 15], [0, 0, 0, 0]])
    assert iou[0] == pytest.approx(25 / 175)
    assert iou[1] == 0.0


def test_map50_by_hand():
    # Image 1: a hit (0.9) and a miss (0.8); image 2: a hit (0.7). PR points (1, 0.5), (0.5, 0.5), (0.67, 1).
    box_a = [0, 0, 10, 10]
    box_b = [20, 20, 30, 30]
    ap, reason = mean_average_precision_50(
        pred_boxes=[np.array([box_a, [50, 50, 60, 60]]), np.array([box_b])],
        pred_scores=[np.array([0.9, 0.8]), np.array([0.7])],
        pred_labels=[np.array([0, 0]), np.array([0])],
        target_boxes=[np.array([box_a]), np.array([box_b])],
        target_labels=[np.array([0]), np.array([0])],
    )
    assert reason is None
    assert ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)


def test_map50_without_references_is_nan():
    ap, reason = mean_average_precision_50([np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0)], [np.zeros((0, 4))], [np.zeros(0)])
    assert math.isnan(ap)
    assert "no reference boxes" in reason


def test_keypoints_mre_px_and_mm():
    errors = radial_errors(np.array([[[0, 0], [3, 4]], [[1, 0], [0, 1]]]), np.zeros((2, 2, 2)))
    assert errors.tolist() == pytest.approx([2.5, 1.0])
    result = keypoint_metrics(errors, np.array([0.2, np.nan]))
    assert result.values["mre_px"] == pytest.approx(1.75)
    assert result.values["mre_mm"] == pytest.approx(0.5)
    assert "1 of 2 images" in result.reasons["mre_mm"]


def test_scalar_metrics_by_hand():
    result = scalar_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0])).values
    assert result["mae"] == pytest.approx(1.0)
    assert result["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert result["r2"] == pytest.approx(1 - 5 / 8)


def test_scalar_r2_constant_reference_is_nan():
    result = scalar_metrics(np.array([1.0, 2.0]), np.array([4.0, 4.0]))
    assert math.isnan(result.values["r2"])
    assert result.values["mae"] == pytest.approx(2.5)


def test_segmentation_without_distances():
    target = _mask((6, 8), (1, [(2, 2)]))
    pred = _mask((6, 8), (1, [(2, 2), (2, 7)]))
    scores = segmentation_image_scores(pred, target, num_classes=2, spacing_mm_per_px=0.5, distances=False)
    assert scores.dice[0] == pytest.approx(2 / 3)
    assert scores.hd is None
    assert scores.hd_mm is None
    result = aggregate_segmentation([scores], num_classes=2)
    assert set(result.values) == {"dice"}
