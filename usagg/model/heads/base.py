"""The interface every task head implements, and small building blocks the heads share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from usagg.errors import DataError
from usagg.model.backbone import BackboneFeatures


class TaskHead(nn.Module):
    """A light head on the backbone's feature maps: raw outputs, the task loss and predictions in input pixels."""

    kind: str = ""

    def forward(self, features: BackboneFeatures) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(
        self, outputs: dict[str, torch.Tensor], target: dict[str, torch.Tensor], label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the unweighted task loss and its parts (plain floats, for logging)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def require_target(target: dict[str, torch.Tensor], key: str, task_kind: str) -> torch.Tensor:
    if key not in target:
        raise DataError(
            f"{task_kind} target has no {key!r} entry (keys: {', '.join(sorted(target)) or 'none'}); "
            "the batch must come from a TaskDataset of this task"
        )
    return target[key]


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        group_norm(out_channels),
        nn.GELU(),
    )


class MapFusion(nn.Module):
    """Project each feature map to ``out_channels`` with a 1x1 convolution and sum them (same grid)."""

    def __init__(self, embed_dim: int, num_maps: int, out_channels: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv2d(embed_dim, out_channels, 1) for _ in range(num_maps))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        fused = None
        for projection, feature_map in zip(self.projections, maps):
            term = projection(feature_map)
            fused = term if fused is None else fused + term
        return fused


class PooledMLP(nn.Module):
    """Two-layer MLP on the pooled features ``[B, 2D]`` (class token and mean patch token)."""

    def __init__(self, embed_dim: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(pooled)))


def pixel_centres(size: int, stride: float, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the input-pixel coordinates of the centres of ``size`` cells of ``stride`` px.

    Coordinates are continuous, with pixel ``i`` covering ``[i, i + 1)``, so cell ``j`` is centred at
    ``(j + 0.5) * stride``.
    """
    return (torch.arange(size, device=device, dtype=dtype) + 0.5) * stride
