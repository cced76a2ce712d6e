"""Scalar regression (for example head circumference in mm) from pooled features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usagg.model.backbone import BackboneFeatures
from usagg.model.heads.base import PooledMLP, TaskHead, require_target


class ScalarHead(TaskHead):
    """Predicts the standardised target ``(y - mean) / std`` with a smooth L1 loss.

    ``target_mean`` and ``target_std`` are buffers, so they are saved with the weights; the trainer sets them
    from the training split with ``M2DINO.set_target_stats`` before training.
    """

    kind = "scalar"

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.mlp = PooledMLP(embed_dim, hidden, 1)
        self.register_buffer("target_mean", torch.tensor(0.0))
        self.register_buffer("target_std", torch.tensor(1.0))

    def set_target_stats(self, mean: float, std: float) -> None:
        if not std > 0:
            raise ValueError(f"target standard deviation must be positive, got {std}")
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(float(std))

    def forward(self, features: BackboneFeatures) -> dict[str, torch.Tensor]:
        return {"standardized": self.mlp(features.pooled()).squeeze(-1)}

    def loss(self, outputs, target, label_smoothing: float = 0.0):
        prediction = outputs["standardized"].float()
        value = require_target(target, "value", self.kind).to(prediction.device).float().reshape(-1)
        valid = torch.isfinite(value)
        standardized = (value - self.target_mean) / self.target_std
        if not bool(valid.any()):
            zero = prediction.sum() * 0.0
            return zero, {"smooth_l1": 0.0}
        loss = F.smooth_l1_loss(prediction[valid], standardized[valid], beta=1.0)
        return loss, {"smooth_l1": float(loss.detach())}

    @torch.no_grad()
    def predict(self, outputs):
        return {"value": outputs["standardized"].float() * self.target_std + self.target_mean}
