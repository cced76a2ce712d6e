"""DPT-style segmentation decoder (Ranftl et al., ICCV 2021) with a Dice + cross-entropy loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from usagg.model.backbone import BackboneFeatures
from usagg.model.heads.base import TaskHead, require_target

# Resampling factor of each of the 4 DPT levels relative to the 1/16 token grid, finest first.
LEVEL_SCALES = (4.0, 2.0, 1.0, 0.5)
DICE_SMOOTH = 1.0


class Reassemble(nn.Module):
    """Turn one block's tokens into an image-like map at one DPT level.

    The class token is mixed into every patch token ("project" readout), then a 1x1 convolution and a
    resampling step (transposed convolution up, strided convolution down) set the resolution.
    """

    def __init__(self, embed_dim: int, channels: int, scale: float):
        super().__init__()
        self.readout = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU())
        self.project = nn.Conv2d(embed_dim, channels, 1)
        if scale > 1:
            factor = int(scale)
            self.resample: nn.Module = nn.ConvTranspose2d(channels, channels, factor, stride=factor)
        elif scale < 1:
            self.resample = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.resample = nn.Identity()
        self.out = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, feature_map: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = feature_map.shape
        tokens = feature_map.flatten(2).transpose(1, 2)
        tokens = self.readout(torch.cat([tokens, cls.unsqueeze(1).expand(-1, tokens.shape[1], -1)], dim=-1))
        feature_map = tokens.transpose(1, 2).reshape(batch, dim, height, width)
        return self.out(self.resample(self.project(feature_map)))


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Add a refined skip map to the coarser path, refine, and resize to the next level."""

    def __init__(self, channels: int):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels)
        self.path_unit = ResidualConvUnit(channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if skip is not None:
            path = path + self.skip_unit(skip)
        path = self.path_unit(path)
        path = F.interpolate(path, size=size, mode="bilinear", align_corners=False)
        return self.out(path)


class SegmentationHead(TaskHead):
    """Multi-class segmentation (background is class 0) from 4 feature blocks.

    Levels at 4x, 2x, 1x and 1/2x the token grid are fused from coarse to fine. To keep the cost low, the
    output convolutions run at 1/4 and 1/2 of the input resolution, and the logits are upsampled bilinearly
    to the input size.
    """

    kind = "segmentation"

    def __init__(self, embed_dim: int, num_maps: int, num_classes: int, channels: int):
        super().__init__()
        self.num_classes = num_classes
        self.num_maps = num_maps
        self.reassemble = nn.ModuleList(Reassemble(embed_dim, channels, scale) for scale in LEVEL_SCALES)
        self.fusion = nn.ModuleList(FusionBlock(channels) for _ in LEVEL_SCALES)
        half = max(channels // 2, 8)
        self.head = nn.Sequential(
            nn.Conv2d(channels, half, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(half, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, num_classes, 1),
        )

    def forward(self, features: BackboneFeatures) -> dict[str, torch.Tensor]:
        levels = []
        for level, module in enumerate(self.reassemble):
            # With fewer than 4 feature blocks, consecutive levels share a block.
            source = level * len(features.maps) // len(LEVEL_SCALES)
            levels.append(module(features.maps[source], features.cls[source]))
        path = self.fusion[3](levels[3], None, levels[2].shape[-2:])
        path = self.fusion[2](path, levels[2], levels[1].shape[-2:])
        path = self.fusion[1](path, levels[1], levels[0].shape[-2:])
        path = self.fusion[0](path, levels[0], levels[0].shape[-2:])
        logits = self.head(path)
        logits = F.interpolate(logits, size=features.image_hw, mode="bilinear", align_corners=False)
        return {"logits": logits}

    def loss(self, outputs, target, label_smoothing: float = 0.0):
        logits = outputs["logits"]
        mask = require_target(target, "mask", self.kind).to(logits.device).long()
        # Values outside 0..C-1 (for example 255 borders) are ignored by both terms.
        valid = (mask >= 0) & (mask < self.num_classes)
        ce = F.cross_entropy(logits.float(), mask.masked_fill(~valid, -100), ignore_index=-100)
        dice = self._dice_loss(logits, mask, valid)
        return ce + dice, {"ce": float(ce.detach()), "dice_loss": float(dice.detach())}

    def _dice_loss(self, logits: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Return 1 - mean soft Dice over the foreground classes, pooled over the batch.

        Pooling over the batch keeps images whose mask is empty from producing 0/0; background is left
        out because its Dice is close to 1 for most ultrasound images and would hide foreground errors.
        """
        probs = logits.float().softmax(dim=1) * valid.unsqueeze(1)
        one_hot = F.one_hot(mask.clamp(0, self.num_classes - 1), self.num_classes).permute(0, 3, 1, 2).float()
        one_hot = one_hot * valid.unsqueeze(1)
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)
        denominator = probs.sum(dims) + one_hot.sum(dims)
        dice_C = (2 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
        return 1 - dice_C[1:].mean()

    @torch.no_grad()
    def predict(self, outputs):
        return {"probs": outputs["logits"].float().softmax(dim=1)}
