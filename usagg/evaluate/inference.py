"""Model inference over a list of records, with every prediction mapped back to original image pixels."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from usagg.config import DataConfig
from usagg.data.record import SampleRecord
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)


@dataclass
class ImagePrediction:
    """One image's prediction in original pixels (x = column, y = row; boxes in pixel-edge coordinates, keypoints
    with pixel centres on integers, as the FMC_UIA CSVs write them)."""

    index: int  # position in the records list
    record: SampleRecord
    orig_size_hw: tuple[int, int]
    spacing_mm_per_px: float | None
    mask_HW: np.ndarray | None = None  # segmentation class indices, uint8 or int64
    probs_C: np.ndarray | None = None  # classification
    boxes_N4: np.ndarray | None = None  # detection, xyxy sorted by descending score
    scores_N: np.ndarray | None = None
    box_labels_N: np.ndarray | None = None
    points_K2: np.ndarray | None = None  # keypoints, xy
    value: float | None = None  # scalar regression, in the task's unit


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless ``amp`` is "off"; a no-op on CPU (training and evaluation stay fp32 there)."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def iter_predictions(
    model: torch.nn.Module,
    card: TaskCard,
    records: Sequence[SampleRecord],
    data_cfg: DataConfig,
    device: torch.device,
    batch_size: int = 16,
    num_workers: int = 0,
    amp: str = "auto",
) -> Iterator[ImagePrediction]:
    """Run ``model`` on ``records`` (no augmentation) and yield one :class:`ImagePrediction` per record, in order."""
    from usagg.data.dataset import TaskDataset
    from usagg.data.loader import build_eval_loader

    if not records:
        return
    dataset = TaskDataset(card, list(records), data_cfg, train=False)
    # Worker start-up costs more than it saves on a split that fits in one batch.
    loader = build_eval_loader(dataset, batch_size, num_workers if len(records) > batch_size else 0)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            with torch.no_grad(), autocast_context(device, amp):
                outputs = model(images, card.name)
                pred = model.predict(outputs, card.name)
            yield from _to_original(card, batch, pred, records)
    finally:
        model.train(was_training)


def _to_original(card: TaskCard, batch: dict, pred: dict, records: Sequence[SampleRecord]) -> Iterator[ImagePrediction]:
    scale = batch["scale"].double().cpu()  # (sy, sx) input px per original px
    offset = batch["offset"].double().cpu()  # (oy, ox) input px
    orig = batch["orig_size"].cpu()
    spacing = batch["spacing_mm_per_px"].double().cpu()
    indices = batch["index"].tolist() if torch.is_tensor(batch["index"]) else list(batch["index"])
    kind = card.kind
    for b, index in enumerate(indices):
        h, w = int(orig[b, 0]), int(orig[b, 1])
        sy, sx = float(scale[b, 0]), float(scale[b, 1])
        oy, ox = float(offset[b, 0]), float(offset[b, 1])
        sp = float(spacing[b])
        item = ImagePrediction(
            index=int(index),
            record=records[int(index)],
            orig_size_hw=(h, w),
            spacing_mm_per_px=sp if np.isfinite(sp) else None,
        )
        if kind == "segmentation":
            item.mask_HW = _mask_to_original(pred["probs"][b], (h, w), (sy, sx), (oy, ox))
        elif kind == "classification":
            item.probs_C = pred["probs"][b].float().cpu().numpy().astype(np.float64)
        elif kind == "detection":
            boxes = pred["boxes"][b].float().cpu().double().reshape(-1, 4)
            scores = pred["scores"][b].float().cpu().double().reshape(-1)
            labels = pred.get("labels")
            labels = labels[b].cpu().reshape(-1) if labels is not None else torch.zeros(len(scores), dtype=torch.long)
            order = torch.argsort(scores, descending=True, stable=True)
            boxes = boxes[order]
            boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - ox) / sx).clamp(0, w)
            boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - oy) / sy).clamp(0, h)
            item.boxes_N4 = boxes.numpy()
            item.scores_N = scores[order].numpy()
            item.box_labels_N = labels[order].numpy()
        elif kind == "keypoints":
            # Keypoints use pixel-centre coordinates, so the edge-coordinate affine applies to x + 0.5.
            points = pred["keypoints"][b].float().cpu().double().reshape(-1, 2)
            points[:, 0] = (points[:, 0] + 0.5 - ox) / sx - 0.5
            points[:, 1] = (points[:, 1] + 0.5 - oy) / sy - 0.5
            item.points_K2 = points.numpy()
        else:
            item.value = float(pred["value"][b].float().cpu())
        yield item


def _mask_to_original(
    probs_CHW: torch.Tensor, size_hw: tuple[int, int], scale_yx: tuple[float, float], offset_yx: tuple[float, float]
) -> np.ndarray:
    """Resample input-space class probabilities at every original pixel centre and take the arg-max class.

    Original pixel (i, j) covers [j, j + 1) x [i, i + 1), so its centre maps to input x = (j + 0.5) * sx + ox
    (likewise y). ``grid_sample`` with ``align_corners=False`` takes coordinates in the same pixel-edge convention,
    so letterbox padding and either resize mode are undone exactly, without cropping by rounded offsets.
    """
    probs = probs_CHW.float().unsqueeze(0)
    _, _, in_h, in_w = probs.shape
    h, w = size_hw
    sy, sx = scale_yx
    oy, ox = offset_yx
    xs = ((torch.arange(w, dtype=torch.float64) + 0.5) * sx + ox) / in_w * 2 - 1
    ys = ((torch.arange(h, dtype=torch.float64) + 0.5) * sy + oy) / in_h * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0).to(probs)
    resampled = F.grid_sample(probs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = resampled[0].argmax(dim=0)
    dtype = torch.uint8 if probs.shape[1] <= 256 else torch.int64
    return labels.to(dtype).cpu().numpy()
