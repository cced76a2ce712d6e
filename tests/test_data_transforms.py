"""Joint transforms keep masks, boxes and keypoints aligned with the image, on real samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_helpers import small_config
from torchvision import tv_tensors

from usagg.config import AugmentConfig, DataConfig
from usagg.data.dataset import TaskDataset, collate_task_batch
from usagg.data.geometry import (
    boxes_to_original,
    dense_to_original,
    points_to_input,
    points_to_original,
)
from usagg.data.sources import discover_fmc_uia, load_task_records
from usagg.data.transforms import JointTransform, denormalize, letterbox_geometry
from usagg.tasks import TaskCard

# Strong geometric augmentation, no intensity change, so the geometry is what is tested.
GEOMETRY_ONLY = AugmentConfig(hflip_p=1.0, scale_jitter=0.4, brightness=0.0, contrast=0.0, speckle_sigma=0.0)


def _card(kind: str, **fields) -> TaskCard:
    base = {
        "segmentation": {"type": "segmentation", "num_classes": 2},
        "detection": {"type": "detection", "num_classes": 1},
        "keypoints": {"type": "regression", "num_keypoints": 2},
    }[kind]
    return TaskCard.model_validate({"name": f"t_{kind}", **base, **fields})


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Continuous box (x_min, y_min, x_max, y_max) of the foreground, x_max/y_max exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _moment_axis(mask: np.ndarray) -> np.ndarray:
    """End points (x, y) of the major axis of the moment ellipse of a filled mask, smaller x first."""
    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], axis=1).astype(float)
    centre = points.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(points.T))
    half = 2.0 * np.sqrt(values[-1]) * vectors[:, -1]
    ends = np.stack([centre - half, centre + half])
    return ends[np.argsort(ends[:, 0])]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_box_follows_real_mask(shared_data, seed):
    """A box computed from a real BUS-BRA mask, transformed with the mask, matches the transformed mask's extent."""
    mask = (np.array(Image.open(shared_data / "busbra_breast" / "masks" / "mask_0002-l.png")) > 0).astype(np.uint8)
    image = np.array(Image.open(shared_data / "busbra_breast" / "images" / "bus_0002-l.png").convert("L"))
    box = torch.tensor([_extent(mask)], dtype=torch.float32)
    cfg = DataConfig(img_size=128, augment=GEOMETRY_ONLY)
    torch.manual_seed(seed)
    transform = JointTransform(_card("detection"), cfg, train=True)
    targets = {
        "boxes": tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=mask.shape),
        "mask": tv_tensors.Mask(torch.from_numpy(mask)),
    }
    _, out, affine = transform(tv_tensors.Image(torch.from_numpy(image)[None]), targets)
    assert affine.scale_x < 0  # flipped
    moved = out["boxes"].as_subclass(torch.Tensor)[0].numpy()
    from_mask = np.array(_extent(out["mask"].numpy()), dtype=float)
    assert np.abs(moved - from_mask).max() <= 1.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keypoints_follow_real_hc18_mask(shared_data, seed):
    """HC18 axis end points from the filled mask, transformed with it, match the axis of the transformed mask."""
    mask = (np.array(Image.open(shared_data / "hc18_fetal_head" / "masks" / "017_2HC.png")) > 0).astype(np.uint8)
    points = torch.tensor(_moment_axis(mask), dtype=torch.float32)
    card = _card("keypoints", allow_hflip=True)  # flip on purpose; the points are re-sorted by x below
    cfg = DataConfig(img_size=224, augment=GEOMETRY_ONLY)
    torch.manual_seed(seed)
    transform = JointTransform(card, cfg, train=True)
    targets = {"keypoints": tv_tensors.KeyPoints(points, canvas_size=mask.shape), "mask": tv_tensors.Mask(torch.from_numpy(mask))}
    _, out, affine = transform(tv_tensors.Image(torch.zeros(1, *mask.shape, dtype=torch.uint8)), targets)
    moved = out["keypoints"].as_subclass(torch.Tensor).numpy()
    moved = moved[np.argsort(moved[:, 0])]
    expected = _moment_axis(out["mask"].numpy())
    assert np.abs(moved - expected).max() < 1.5  # input pixels; the mask is resampled to about 1/4 of its size
    # The affine returned with the sample maps the original points to the same place.
    scale = torch.tensor([affine.scale_y, affine.scale_x])
    offset = torch.tensor([affine.offset_y, affine.offset_x])
    mapped = points_to_input(points, scale, offset).numpy()
    mapped = mapped[np.argsort(mapped[:, 0])]
    assert np.abs(mapped - moved).max() < 1e-3


def test_image_and_mask_stay_aligned(shared_data):
    """An image made from a real mask and the mask itself go through the same geometry."""
    mask = np.array(Image.open(shared_data / "usgra_nerve_vessel" / "masks" / "0008.png"))
    binary = (mask > 0).astype(np.uint8)
    cfg = DataConfig(img_size=(96, 160), augment=GEOMETRY_ONLY)
    torch.manual_seed(5)
    transform = JointTransform(_card("segmentation"), cfg, train=True)
    image_t, out, _ = transform(tv_tensors.Image(torch.from_numpy(binary * 255)[None]), {"mask": tv_tensors.Mask(torch.from_numpy(binary))})
    seen = denormalize(image_t)[0].numpy() > 0.5
    label = out["mask"].numpy().astype(bool)
    iou = (seen & label).sum() / (seen | label).sum()
    assert iou > 0.95


def test_letterbox_keeps_aspect_and_centres():
    assert letterbox_geometry(540, 800, (224, 224), "letterbox") == (151, 224, 36, 0)
    assert letterbox_geometry(540, 800, (224, 224), "stretch") == (224, 224, 0, 0)


def test_eval_item_maps_back_to_original(shared_data):
    cards = {c.name: c for c in discover_fmc_uia(shared_data / "fmc_uia_sample")}
    card = cards["fetal_head_axis"]
    records = load_task_records(card)[:2]
    dataset = TaskDataset(card, records, DataConfig(img_size=224), train=False)
    item = dataset[0]
    assert item["image"].shape == (3, 224, 224)
    assert item["orig_size"].tolist() == [540, 800]
    assert item["scale"].tolist() == pytest.approx([151 / 540, 224 / 800])
    assert item["offset"].tolist() == pytest.approx([36.0, 0.0])
    back = points_to_original(item["target"]["keypoints"], item["scale"], item["offset"])
    assert back.numpy() == pytest.approx(np.array(records[0].keypoints_xy), abs=1e-3)

    seg = cards["nerve_vessel"]
    seg_records = load_task_records(seg)[:1]
    seg_item = TaskDataset(seg, seg_records, DataConfig(img_size=160), train=False)[0]
    onehot = torch.nn.functional.one_hot(seg_item["target"]["mask"], 3).permute(2, 0, 1).float()
    restored = dense_to_original(onehot, tuple(seg_item["orig_size"].tolist()), seg_item["scale"], seg_item["offset"]).argmax(0).numpy()
    original = np.array(Image.open(seg_records[0].mask_path))
    agreement = (restored == original).mean()
    assert agreement > 0.98

    det = cards["breast_lesion_det"]
    det_records = load_task_records(det)[:1]
    det_item = TaskDataset(det, det_records, DataConfig(img_size=224), train=False)[0]
    box_back = boxes_to_original(det_item["target"]["boxes"], det_item["scale"], det_item["offset"])
    assert box_back.numpy()[0] == pytest.approx(np.array(det_records[0].boxes_xyxy[0]), abs=1e-3)


def test_no_flip_when_task_forbids_it(shared_data):
    card = next(c for c in discover_fmc_uia(shared_data / "fmc_uia_sample") if c.name == "fetal_head_axis")
    assert not card.hflip_allowed
    dataset = TaskDataset(card, load_task_records(card)[:3], DataConfig(img_size=64, augment=GEOMETRY_ONLY), train=True)
    for i in range(3):
        assert float(dataset[i]["scale"][1]) > 0


def test_grey_image_replicated_and_normalised(shared_data):
    card = next(c for c in discover_fmc_uia(shared_data / "fmc_uia_sample") if c.name == "fetal_head")
    item = TaskDataset(card, load_task_records(card)[:1], small_config(), train=False)[0]
    image = item["image"]
    assert image.dtype == torch.float32
    assert image.shape == (3, 64, 64)
    restored = denormalize(image)
    assert torch.allclose(restored[0], restored[1], atol=1e-5)
    assert torch.allclose(restored[0], restored[2], atol=1e-5)
    assert item["target"]["mask"].dtype == torch.long


def test_intensity_augmentation_changes_only_pixels(shared_data):
    card = next(c for c in discover_fmc_uia(shared_data / "fmc_uia_sample") if c.name == "breast_lesion")
    records = load_task_records(card)[:1]
    noisy = AugmentConfig(hflip_p=0.0, scale_jitter=0.0, brightness=0.4, contrast=0.4, speckle_sigma=0.3)
    torch.manual_seed(0)
    augmented = TaskDataset(card, records, small_config(augment=noisy), train=True)[0]
    plain = TaskDataset(card, records, small_config(), train=False)[0]
    assert not torch.allclose(augmented["image"], plain["image"])
    assert torch.equal(augmented["target"]["mask"], plain["target"]["mask"])


def test_collate_pads_boxes(shared_data, tmp_path):
    card = next(c for c in discover_fmc_uia(shared_data / "fmc_uia_sample") if c.name == "breast_lesion_det")
    items = TaskDataset(card, load_task_records(card)[:2], small_config(), train=False)
    first, second = items[0], items[1]
    second["target"] = {"boxes": torch.cat([second["target"]["boxes"]] * 3), "box_labels": torch.zeros(3, dtype=torch.long)}
    batch = collate_task_batch([first, second])
    assert batch["target"]["boxes"].shape == (2, 3, 4)
    assert batch["target"]["boxes_valid"].tolist() == [[True, False, False], [True, True, True]]
    assert batch["image"].shape == (2, 3, 64, 64)
    assert batch["task"] == "breast_lesion_det"


def test_collate_rejects_mixed_tasks(shared_data):
    cards = {c.name: c for c in discover_fmc_uia(shared_data / "fmc_uia_sample")}
    a = TaskDataset(cards["breast_2cls"], load_task_records(cards["breast_2cls"])[:1], small_config(), train=False)[0]
    b = TaskDataset(cards["fetal_head"], load_task_records(cards["fetal_head"])[:1], small_config(), train=False)[0]
    with pytest.raises(ValueError, match="contain one task"):
        collate_task_batch([a, b])


def test_cache_returns_same_sample(shared_data):
    card = next(c for c in discover_fmc_uia(shared_data / "fmc_uia_sample") if c.name == "nerve_vessel")
    dataset = TaskDataset(card, load_task_records(card)[:2], small_config(), train=False, cache_images=True)
    first = dataset[1]
    assert 1 in dataset._cache
    assert torch.equal(dataset[1]["image"], first["image"])
