"""Classification from pooled features: the class token and the mean patch token of the deepest feature block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from usagg.model.backbone import BackboneFeatures
from usagg.model.heads.base import TaskHead, require_target


class ClassificationHead(TaskHead):
    """A linear classifier on ``[CLS, mean(patches)]``, the DINOv3 linear-probe input, trained with cross-entropy."""

    kind = "classification"

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.fc = nn.Linear(2 * embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: BackboneFeatures) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.norm(features.pooled()))}

    def loss(self, outputs, target, label_smoothing: float = 0.0):
        logits = outputs["logits"].float()
        labels = require_target(target, "label", self.kind).to(logits.device).long().reshape(-1)
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return ce, {"ce": float(ce.detach())}

    @torch.no_grad()
    def predict(self, outputs):
        return {"probs": outputs["logits"].float().softmax(dim=-1)}
