"""Task heads on synthetic feature maps: shapes, losses with known values, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from usagg.model.backbone import BackboneFeatures
from usagg.model.heads import (
    ClassificationHead,
    DenseBoxHead,
    KeypointHead,
    ScalarHead,
    SegmentationHead,
    SingleBoxHead,
)

DIM, MAPS, CHANNELS = 24, 2, 16
IMAGE_HW = (64, 48)  # 4 x 3 token grid


def _features(batch: int = 2, requires_grad: bool = True, seed: int = 0) -> BackboneFeatures:
    generator = torch.Generator().manual_seed(seed)
    grid = (IMAGE_HW[0] // 16, IMAGE_HW[1] // 16)
    maps = [torch.randn(batch, DIM, *grid, generator=generator).requires_grad_(requires_grad) for _ in range(MAPS)]
    cls = [torch.randn(batch, DIM, generator=generator).requires_grad_(requires_grad) for _ in range(MAPS)]
    return BackboneFeatures(maps=maps, cls=cls, image_hw=IMAGE_HW)


def _assert_gradients(head: torch.nn.Module, features: BackboneFeatures, loss: torch.Tensor) -> None:
    loss.backward()
    assert torch.isfinite(loss)
    assert features.maps[-1].grad is not None
    assert features.maps[-1].grad.abs().sum() > 0
    with_grad = [name for name, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad, "no head parameter received a gradient"


def test_segmentation_shapes_loss_and_gradients():
    torch.manual_seed(0)
    head = SegmentationHead(DIM, MAPS, num_classes=3, channels=CHANNELS)
    features = _features()
    outputs = head(features)
    assert outputs["logits"].shape == (2, 3, *IMAGE_HW)
    mask = torch.randint(0, 3, (2, *IMAGE_HW))
    loss, parts = head.loss(outputs, {"mask": mask})
    assert set(parts) == {"ce", "dice_loss"}
    _assert_gradients(head, features, loss)
    probs = head.predict(outputs)["probs"]
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, *IMAGE_HW))


def test_dice_loss_zero_for_perfect_logits():
    head = SegmentationHead(DIM, MAPS, num_classes=3, channels=CHANNELS)
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :4] = 1
    mask[0, 6:, :2] = 2
    logits = torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 50
    _, parts = head.loss({"logits": logits}, {"mask": mask})
    assert parts["dice_loss"] == pytest.approx(0.0, abs=1e-4)
    assert parts["ce"] == pytest.approx(0.0, abs=1e-4)


def test_segmentation_ignores_out_of_range_labels():
    head = SegmentationHead(DIM, MAPS, num_classes=2, channels=CHANNELS)
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, 0] = 1
    logits = torch.nn.functional.one_hot(mask, 2).permute(0, 3, 1, 2).float() * 50
    border = mask.clone()
    border[0, 3] = 255
    wrong_logits = logits.clone()
    wrong_logits[0, :, 3] = torch.tensor([-50.0, 50.0]).view(2, 1)  # wrong only where the label is 255
    loss_clean, _ = head.loss({"logits": logits}, {"mask": mask})
    loss_border, _ = head.loss({"logits": wrong_logits}, {"mask": border})
    assert loss_border.item() == pytest.approx(loss_clean.item(), abs=1e-4)


def test_classification_loss_and_label_smoothing():
    torch.manual_seed(0)
    head = ClassificationHead(DIM, num_classes=4)
    features = _features()
    outputs = head(features)
    assert outputs["logits"].shape == (2, 4)
    labels = torch.tensor([1, 3])
    plain, _ = head.loss(outputs, {"label": labels})
    smoothed, _ = head.loss(outputs, {"label": labels}, label_smoothing=0.2)
    assert smoothed.item() != pytest.approx(plain.item())
    _assert_gradients(head, features, plain)
    assert head.predict(outputs)["probs"].shape == (2, 4)


def test_scalar_head_standardises_target():
    torch.manual_seed(0)
    head = ScalarHead(DIM, hidden=CHANNELS)
    head.set_target_stats(mean=150.0, std=20.0)
    outputs = {"standardized": torch.tensor([0.0, 1.0], requires_grad=True)}
    prediction = head.predict(outputs)["value"]
    torch.testing.assert_close(prediction, torch.tensor([150.0, 170.0]))
    loss, _ = head.loss(outputs, {"value": torch.tensor([150.0, 170.0])})
    assert loss.item() == pytest.approx(0.0)
    loss, _ = head.loss(outputs, {"value": torch.tensor([190.0, float("nan")])})  # z = 2 vs 0: smooth L1 = 1.5
    assert loss.item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="positive"):
        head.set_target_stats(0.0, 0.0)
    features = _features()
    loss, _ = head.loss(head(features), {"value": torch.tensor([140.0, 160.0])})
    _assert_gradients(head, features, loss)


def test_soft_argmax_peak_maps_to_cell_centre():
    heatmaps = torch.full((1, 2, 16, 12), -1e4)
    heatmaps[0, 0, 5, 2] = 0.0  # row 5, column 2
    heatmaps[0, 1, 0, 11] = 0.0
    points = KeypointHead.soft_argmax(heatmaps, IMAGE_HW)  # 4 px per cell
    torch.testing.assert_close(points[0, 0], torch.tensor([2.5 * 4, 5.5 * 4]))
    torch.testing.assert_close(points[0, 1], torch.tensor([11.5 * 4, 0.5 * 4]))


def test_soft_argmax_interpolates_between_cells():
    heatmaps = torch.full((1, 1, 16, 12), -1e4)
    heatmaps[0, 0, 3, 4] = 0.0
    heatmaps[0, 0, 3, 5] = 0.0  # two equal peaks: the point lies halfway, a sub-cell position
    point = KeypointHead.soft_argmax(heatmaps, IMAGE_HW)[0, 0]
    torch.testing.assert_close(point, torch.tensor([5.0 * 4, 3.5 * 4]))


def test_keypoint_head_loss_skips_missing_points():
    torch.manual_seed(0)
    head = KeypointHead(DIM, MAPS, num_keypoints=3, channels=CHANNELS)
    features = _features()
    outputs = head(features)
    assert outputs["heatmaps"].shape == (2, 3, IMAGE_HW[0] // 4, IMAGE_HW[1] // 4)
    assert outputs["keypoints"].shape == (2, 3, 2)
    points = torch.rand(2, 3, 2) * torch.tensor([48.0, 64.0])
    points[1, 2] = float("nan")
    loss, parts = head.loss(outputs, {"keypoints": points})
    assert math.isfinite(parts["l1"])
    assert math.isfinite(parts["heatmap_kl"])
    _assert_gradients(head, features, loss)


def test_single_box_head_shapes_loss_and_gradients():
    torch.manual_seed(0)
    head = SingleBoxHead(DIM, MAPS, num_classes=1, channels=CHANNELS)
    features = _features()
    outputs = head(features)
    assert outputs["boxes"].shape == (2, 1, 4)
    boxes = outputs["boxes"][:, 0]
    assert (boxes[:, 2] <= IMAGE_HW[1]).all()
    assert (boxes[:, 3] <= IMAGE_HW[0]).all()
    assert (boxes >= 0).all()
    target = {
        "boxes": torch.tensor([[[4.0, 6.0, 30.0, 40.0]], [[0.0, 0.0, 0.0, 0.0]]]),
        "boxes_valid": torch.tensor([[True], [False]]),
    }
    loss, parts = head.loss(outputs, target)
    assert set(parts) == {"objectness", "l1", "giou"}
    _assert_gradients(head, features, loss)
    prediction = head.predict(outputs)
    assert prediction["boxes"].shape == (2, 1, 4)
    assert prediction["scores"].shape == (2, 1)
    assert ((prediction["scores"] >= 0) & (prediction["scores"] <= 1)).all()


def test_single_box_head_with_classes():
    head = SingleBoxHead(DIM, MAPS, num_classes=3, channels=CHANNELS)
    features = _features()
    outputs = head(features)
    target = {"boxes": torch.tensor([[5.0, 5.0, 20.0, 30.0], [1.0, 2.0, 40.0, 60.0]]), "box_labels": torch.tensor([2, 0])}
    loss, parts = head.loss(outputs, target)
    assert "class_ce" in parts
    _assert_gradients(head, features, loss)
    assert head.predict(outputs)["labels"].shape == (2, 1)


def test_dense_box_assignment_prefers_smaller_box():
    head = DenseBoxHead(DIM, MAPS, num_classes=2, channels=CHANNELS, max_boxes=5)
    centres = torch.tensor([[4.0, 4.0], [12.0, 4.0], [28.0, 28.0], [60.0, 60.0]])
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 0.0, 16.0, 8.0], [50.0, 50.0, 51.0, 51.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([True, True, True, False])
    assigned = head._assign(centres, boxes, valid)
    # (12, 4) lies in both boxes 0 and 1 and goes to the smaller box 1. Box 2 contains no centre, so it takes
    # the nearest location (60, 60). The invalid box 3 is never used.
    assert assigned.tolist() == [0, 1, 0, 2]


def test_dense_box_head_loss_and_predictions():
    torch.manual_seed(0)
    head = DenseBoxHead(DIM, MAPS, num_classes=2, channels=CHANNELS, max_boxes=4)
    features = _features()
    outputs = head(features)
    locations = (IMAGE_HW[0] // 8) * (IMAGE_HW[1] // 8)
    assert outputs["class_logits"].shape == (2, locations, 2)
    assert outputs["boxes"].shape == (2, locations, 4)
    target = {
        "boxes": torch.tensor([[[2.0, 2.0, 20.0, 30.0], [24.0, 30.0, 46.0, 60.0]], [[5.0, 5.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0]]]),
        "boxes_valid": torch.tensor([[True, True], [True, False]]),
        "box_labels": torch.tensor([[0, 1], [1, 0]]),
    }
    loss, parts = head.loss(outputs, target)
    assert set(parts) == {"focal", "giou", "centerness"}
    _assert_gradients(head, features, loss)
    prediction = head.predict(outputs)
    assert prediction["boxes"].shape == (2, 4, 4)
    assert prediction["scores"].shape == (2, 4)
    assert prediction["labels"].shape == (2, 4)
    assert (prediction["boxes"][..., 2] <= IMAGE_HW[1]).all()


def test_head_reports_missing_target_key():
    from usagg.errors import DataError

    head = ClassificationHead(DIM, num_classes=2)
    with pytest.raises(DataError, match="no 'label' entry"):
        head.loss(head(_features()), {"mask": torch.zeros(1)})


def test_dense_box_head_without_boxes():
    head = DenseBoxHead(DIM, MAPS, num_classes=1, channels=CHANNELS, max_boxes=3)
    features = _features()
    target = {"boxes": torch.zeros(2, 0, 4), "boxes_valid": torch.zeros(2, 0, dtype=torch.bool)}
    loss, parts = head.loss(head(features), target)
    assert set(parts) == {"focal"}
    _assert_gradients(head, features, loss)
