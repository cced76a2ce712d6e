"""Mapping predictions from network input pixels back to original pixels, checked against the data transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from usagg.config import DataConfig
from usagg.evaluate.evaluate import results_rows, score_predictions, task_selection_score
from usagg.evaluate.inference import ImagePrediction, _mask_to_original, _to_original
from usagg.tasks import TaskCard
from usagg.train.plan import RunSpec


def _one_hot(mask_HW: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(mask_HW.long(), num_classes).permute(2, 0, 1).float()


def test_mask_to_original_undoes_scale_and_padding():
    original = torch.zeros(6, 8, dtype=torch.long)
    original[1:4, 2:5] = 1
    # Input of 16 x 16: the image scaled by 2 and padded by 2 rows at the top (letterbox).
    input_mask = torch.zeros(16, 16, dtype=torch.long)
    input_mask[2:14] = original.repeat_interleave(2, 0).repeat_interleave(2, 1)
    back = _mask_to_original(_one_hot(input_mask, 2), (6, 8), (2.0, 2.0), (2.0, 0.0))
    assert back.shape == (6, 8)
    assert np.array_equal(back, original.numpy())


def _sample_card(shared_data, name: str, **fields) -> TaskCard:
    root = shared_data / "fmc_uia_sample_val"
    return TaskCard.model_validate({"name": name, **fields, "source": {"format": "fmc_uia", "root": str(root)}})


def _round_trip(card: TaskCard, data_cfg: DataConfig, make_pred):
    from usagg.data.dataset import TaskDataset, collate_task_batch
    from usagg.data.sources import load_task_records

    records = load_task_records(card)[:3]
    dataset = TaskDataset(card, records, data_cfg, train=False)
    batch = collate_task_batch([dataset[i] for i in range(len(records))])
    return list(_to_original(card, batch, make_pred(batch), records))


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_keypoints_and_boxes_map_back_exactly(shared_data, resize):
    data_cfg = DataConfig(img_size=(32, 48), resize=resize, num_workers=0)
    keypoint_card = _sample_card(shared_data, "fetal_head_axis", type="regression", num_keypoints=2)
    items = _round_trip(keypoint_card, data_cfg, lambda b: {"keypoints": b["target"]["keypoints"]})
    for item in items:
        np.testing.assert_allclose(item.points_K2, np.asarray(item.record.keypoints_xy), atol=1e-3)

    box_card = _sample_card(shared_data, "breast_lesion_det", type="detection")
    items = _round_trip(
        box_card,
        data_cfg,
        lambda b: {"boxes": b["target"]["boxes"], "scores": torch.ones(b["target"]["boxes"].shape[:2])},
    )
    for item in items:
        np.testing.assert_allclose(item.boxes_N4[0], np.asarray(item.record.boxes_xyxy[0]), atol=1e-3)


def test_segmentation_maps_back_to_original_size(shared_data):
    from usagg.data.decode import read_mask

    card = _sample_card(shared_data, "breast_lesion", type="segmentation", num_classes=2)
    data_cfg = DataConfig(img_size=128, num_workers=0)
    items = _round_trip(card, data_cfg, lambda b: {"probs": torch.stack([_one_hot(m, 2) for m in b["target"]["mask"]])})
    for item in items:
        original = read_mask(item.record.mask_path)
        assert item.mask_HW.shape == original.shape
        overlap = np.logical_and(item.mask_HW == 1, original == 1).sum()
        dice = 2 * overlap / ((item.mask_HW == 1).sum() + (original == 1).sum())
        assert dice > 0.95


def test_one_class_split_gives_nan_row_with_reason(tmp_path):
    from usagg.config import StudyConfig
    from usagg.data.record import SampleRecord

    card = TaskCard(name="c", type="classification", num_classes=2)
    study = StudyConfig(name="s", tasks=[card])
    predictions = [
        ImagePrediction(i, SampleRecord(task="c", image_path=tmp_path / f"{i}.png", label=1), (4, 4), None,
                        probs_C=np.array([0.3, 0.7]))
        for i in range(3)
    ]
    evaluation = score_predictions(card, iter(predictions), study, n_images=3)
    assert np.isnan(evaluation.metrics.values["auc"])
    assert "only class 1" in evaluation.metrics.reasons["auc"]
    assert evaluation.metrics.values["accuracy"] == 1.0
    spec = RunSpec("s", "task_specific", "c", ("c",), 1.0, 0)
    rows = results_rows(spec, {"c": card}, {"c": 10}, "test", [evaluation])
    auc = rows.filter(rows["metric"] == "auc")
    assert auc.height == 1
    assert np.isnan(auc["value"][0])
    assert auc["higher_is_better"][0]
    assert set(rows["task_type"]) == {"classification"}


@pytest.mark.parametrize(
    "metric, value, reference, expected",
    [
        ("dice", 0.8, None, 0.8),
        ("mcc", 0.0, None, 0.5),
        ("mre_px", 10.0, 10.0, 0.5),
        ("mre_px", 0.0, 10.0, 1.0),
        ("hd", 30.0, 10.0, 0.25),
        ("r2", -3.0, None, 0.0),
        ("auc", float("nan"), None, 0.0),
    ],
)
def test_selection_score(metric, value, reference, expected):
    assert task_selection_score(metric, value, reference) == pytest.approx(expected)
