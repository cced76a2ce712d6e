"""Task heads, built from task cards: one per task kind."""

from __future__ import annotations

from usagg.config import ModelConfig
from usagg.errors import ConfigError
from usagg.model.heads.base import TaskHead
from usagg.model.heads.classification import ClassificationHead
from usagg.model.heads.detection import DenseBoxHead, SingleBoxHead
from usagg.model.heads.keypoints import KeypointHead
from usagg.model.heads.scalar import ScalarHead
from usagg.model.heads.segmentation import SegmentationHead
from usagg.tasks import TaskCard

__all__ = [
    "ClassificationHead",
    "DenseBoxHead",
    "KeypointHead",
    "ScalarHead",
    "SegmentationHead",
    "SingleBoxHead",
    "TaskHead",
    "build_head",
]


def build_head(card: TaskCard, cfg: ModelConfig, embed_dim: int, num_maps: int) -> TaskHead:
    """Build the head for ``card.kind``; its shapes depend only on the card and the model config."""
    kind = card.kind
    channels = cfg.decoder_dim
    if kind == "segmentation":
        return SegmentationHead(embed_dim, num_maps, card.num_classes, channels)
    if kind == "classification":
        return ClassificationHead(embed_dim, card.num_classes)
    if kind == "detection":
        num_classes = card.num_classes or 1
        if cfg.max_boxes > 1:
            return DenseBoxHead(embed_dim, num_maps, num_classes, channels, cfg.max_boxes)
        return SingleBoxHead(embed_dim, num_maps, num_classes, channels)
    if kind == "keypoints":
        return KeypointHead(embed_dim, num_maps, card.num_keypoints, channels)
    if kind == "scalar":
        return ScalarHead(embed_dim, channels)
    raise ConfigError(f"task {card.name!r}: no head for task kind {kind!r}")
