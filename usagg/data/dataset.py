"""``TaskDataset``: decoded, validated and transformed samples of one task, and the batch collation."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from usagg.data.decode import DecodedImage, decode_image, read_mask
from usagg.data.record import SampleRecord
from usagg.data.transforms import JointTransform
from usagg.data.validate import sample_problems
from usagg.errors import DataError
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)


class TaskDataset(Dataset):
    """Samples of one task as dicts (see ``__getitem__``), resized to ``data_cfg.size_hw``.

    ``cache_images`` keeps decoded images and masks in memory (per DataLoader worker process, at original size);
    it defaults to ``data_cfg.cache_images``.
    """

    def __init__(
        self,
        card: TaskCard,
        records: Sequence[SampleRecord],
        data_cfg,
        train: bool,
        cache_images: bool | None = None,
    ) -> None:
        self.card = card
        self.records = list(records)
        self.data_cfg = data_cfg
        self.train = train
        self.transform = JointTransform(card, data_cfg, train)
        self.cache_images = bool(getattr(data_cfg, "cache_images", False)) if cache_images is None else cache_images
        self._cache: dict[int, tuple[DecodedImage, np.ndarray | None]] = {}
        self._default_spacing = card.source.pixel_spacing_mm if card.source is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[DecodedImage, np.ndarray | None]:
        """Decode the image (and mask) of record ``index``, from the cache when enabled."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        record = self.records[index]
        decoded = _decode_for(record, decode_image)
        mask = _decode_for(record, read_mask, record.mask_path) if self.card.kind == "segmentation" else None
        if self.cache_images:
            self._cache[index] = (decoded, mask)
        return decoded, mask

    def spacing_of(self, record: SampleRecord, decoded: DecodedImage) -> float | None:
        """Pixel spacing in mm: the label file's column, else the image header, else the source default."""
        return record.spacing_mm_per_px or decoded.spacing_mm_per_px or self._default_spacing

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return image [3, H, W] (normalised), task, index, image_path, orig_size, scale, offset,
        spacing_mm_per_px and the task's target (see ``collate_task_batch``)."""
        record = self.records[index]
        decoded, mask = self.load(index)
        height, width = decoded.size_hw
        problems = sample_problems(record, self.card, (height, width), mask)
        if problems:
            raise DataError(str(problems[0]))
        pixels = torch.from_numpy(decoded.pixels)
        pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        image = tv_tensors.Image(pixels)
        targets = self._targets(record, mask, (height, width))
        image_t, targets, affine = self.transform(image, targets)
        spacing = self.spacing_of(record, decoded)
        return {
            "image": image_t,
            "task": self.card.name,
            "index": index,
            "image_path": str(record.image_path),
            "orig_size": torch.tensor([height, width], dtype=torch.long),
            "scale": torch.tensor([affine.scale_y, affine.scale_x], dtype=torch.float32),
            "offset": torch.tensor([affine.offset_y, affine.offset_x], dtype=torch.float32),
            "spacing_mm_per_px": torch.tensor(spacing if spacing is not None else math.nan, dtype=torch.float32),
            "target": self._finish_target(record, targets),
        }

    def _targets(self, record: SampleRecord, mask: np.ndarray | None, size_hw: tuple[int, int]) -> dict:
        kind = self.card.kind
        if kind == "segmentation":
            dtype = torch.uint8 if (self.card.num_classes or 0) <= 256 else torch.int32
            return {"mask": tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8 if dtype == torch.uint8 else np.int32)))}
        if kind == "detection":
            boxes = torch.tensor(record.boxes_xyxy or (), dtype=torch.float32).reshape(-1, 4)
            return {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size_hw)}
        if kind == "keypoints":
            points = torch.tensor(record.keypoints_xy, dtype=torch.float32).reshape(-1, 2)
            return {"keypoints": tv_tensors.KeyPoints(points, canvas_size=size_hw)}
        return {}

    def _finish_target(self, record: SampleRecord, targets: dict) -> dict[str, torch.Tensor]:
        kind = self.card.kind
        if kind == "segmentation":
            return {"mask": targets["mask"].as_subclass(torch.Tensor).long()}
        if kind == "classification":
            return {"label": torch.tensor(record.label, dtype=torch.long)}
        if kind == "detection":
            boxes = targets["boxes"].as_subclass(torch.Tensor).float()
            labels = torch.tensor(record.box_labels or (0,) * boxes.shape[0], dtype=torch.long)
            return {"boxes": boxes, "box_labels": labels}
        if kind == "keypoints":
            return {"keypoints": targets["keypoints"].as_subclass(torch.Tensor).float().reshape(-1, 2)}
        return {"value": torch.tensor(record.value, dtype=torch.float32)}


def _decode_for(record: SampleRecord, decoder, path=None):
    """Decode a file, adding the label file and row of the record to a decoding error."""
    target = path if path is not None else record.image_path
    try:
        return decoder(target)
    except DataError as exc:
        if record.source_file is not None and record.row is not None:
            raise DataError(f"task {record.task}: {record.source_file}, row {record.row}: {exc}") from None
        raise DataError(f"task {record.task}: {exc}") from None


def collate_task_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of one task. Detection boxes are padded to the largest count with ``target["boxes_valid"]``."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    task = items[0]["task"]
    other = {item["task"] for item in items} - {task}
    if other:
        raise ValueError(f"a batch must contain one task; got {task!r} and {', '.join(sorted(other))}")
    batch: dict[str, Any] = {
        "task": task,
        "image": torch.stack([item["image"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "image_path": [item["image_path"] for item in items],
        "orig_size": torch.stack([item["orig_size"] for item in items]),
        "scale": torch.stack([item["scale"] for item in items]),
        "offset": torch.stack([item["offset"] for item in items]),
        "spacing_mm_per_px": torch.stack([item["spacing_mm_per_px"] for item in items]),
    }
    targets = [item["target"] for item in items]
    if "boxes" in targets[0]:
        most = max(t["boxes"].shape[0] for t in targets)
        boxes = torch.zeros(len(items), most, 4)
        labels = torch.zeros(len(items), most, dtype=torch.long)
        valid = torch.zeros(len(items), most, dtype=torch.bool)
        for i, t in enumerate(targets):
            n = t["boxes"].shape[0]
            boxes[i, :n] = t["boxes"]
            labels[i, :n] = t["box_labels"]
            valid[i, :n] = True
        batch["target"] = {"boxes": boxes, "box_labels": labels, "boxes_valid": valid}
    else:
        batch["target"] = {key: torch.stack([t[key] for t in targets]) for key in targets[0]}
    return batch
