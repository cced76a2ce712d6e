"""Keypoint regression with heatmaps and a soft-argmax, giving sub-pixel points in input pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from usagg.model.backbone import BackboneFeatures
from usagg.model.heads.base import (
    MapFusion,
    TaskHead,
    conv_norm_act,
    pixel_centres,
    require_target,
)

HEATMAP_STRIDE = 4  # input pixels per heatmap cell
TARGET_SIGMA_CELLS = 1.5  # spread of the Gaussian target heatmap, in heatmap cells
HEATMAP_LOSS_WEIGHT = 0.1


class KeypointHead(TaskHead):
    """Predicts one heatmap per point at 1/4 of the input resolution; a spatial softmax gives its expected position.

    The loss is the L1 distance of the soft-argmax points to the targets, in units of the image width and
    height (integral regression, Sun et al., ECCV 2018). A second term, ``HEATMAP_LOSS_WEIGHT`` times the KL
    divergence from a Gaussian target heatmap, keeps the heatmaps peaked. Points with a NaN coordinate are skipped.
    """

    kind = "keypoints"

    def __init__(self, embed_dim: int, num_maps: int, num_keypoints: int, channels: int):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.fuse = MapFusion(embed_dim, num_maps, channels)
        self.refine = conv_norm_act(channels, channels)
        self.up1 = conv_norm_act(channels, channels)
        self.up2 = conv_norm_act(channels, channels)
        self.out = nn.Conv2d(channels, num_keypoints, 1)

    def forward(self, features: BackboneFeatures) -> dict[str, torch.Tensor]:
        x = self.refine(self.fuse(features.maps))
        x = self.up1(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        x = self.up2(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        heatmaps = self.out(x).float()
        return {"heatmaps": heatmaps, "keypoints": self.soft_argmax(heatmaps, features.image_hw)}

    @staticmethod
    def soft_argmax(heatmaps_BKHW: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Return the expected ``(x, y)`` input-pixel position under the spatial softmax of each heatmap."""
        batch, points, height, width = heatmaps_BKHW.shape
        probs = heatmaps_BKHW.flatten(2).softmax(dim=-1).view(batch, points, height, width)
        xs = pixel_centres(width, image_hw[1] / width, heatmaps_BKHW.device)
        ys = pixel_centres(height, image_hw[0] / height, heatmaps_BKHW.device)
        x = (probs.sum(dim=2) * xs).sum(dim=-1)
        y = (probs.sum(dim=3) * ys).sum(dim=-1)
        return torch.stack([x, y], dim=-1)

    def loss(self, outputs, target, label_smoothing: float = 0.0):
        predicted = outputs["keypoints"]
        heatmaps = outputs["heatmaps"]
        points = require_target(target, "keypoints", self.kind).to(predicted.device).float()
        if points.shape[1:] != predicted.shape[1:]:
            raise ValueError(f"keypoint target has shape {tuple(points.shape)}, expected [B, {self.num_keypoints}, 2]")
        valid_BK = torch.isfinite(points).all(dim=-1)
        if not bool(valid_BK.any()):
            zero = predicted.sum() * 0.0
            return zero, {"l1": 0.0, "heatmap_kl": 0.0}
        height, width = heatmaps.shape[-2:]
        image_h, image_w = height * HEATMAP_STRIDE, width * HEATMAP_STRIDE
        scale = predicted.new_tensor([image_w, image_h])
        l1 = ((predicted - points.nan_to_num()).abs() / scale)[valid_BK].mean()

        target_heatmaps = self._gaussian_targets(points.nan_to_num(), height, width, image_h / height, image_w / width)
        log_probs = heatmaps.flatten(2).log_softmax(dim=-1)
        target_probs = target_heatmaps.flatten(2)
        kl_BK = (target_probs * (torch.log(target_probs.clamp_min(1e-12)) - log_probs)).sum(dim=-1)
        kl = kl_BK[valid_BK].mean()
        total = l1 + HEATMAP_LOSS_WEIGHT * kl
        return total, {"l1": float(l1.detach()), "heatmap_kl": float(kl.detach())}

    @staticmethod
    def _gaussian_targets(points_BK2: torch.Tensor, height: int, width: int, stride_y: float, stride_x: float) -> torch.Tensor:
        xs = pixel_centres(width, stride_x, points_BK2.device)
        ys = pixel_centres(height, stride_y, points_BK2.device)
        dx = (xs.view(1, 1, 1, width) - points_BK2[..., 0, None, None]) / stride_x
        dy = (ys.view(1, 1, height, 1) - points_BK2[..., 1, None, None]) / stride_y
        logits = -(dx.square() + dy.square()) / (2 * TARGET_SIGMA_CELLS**2)
        return logits.flatten(2).softmax(dim=-1).view_as(logits)

    @torch.no_grad()
    def predict(self, outputs):
        return {"keypoints": outputs["keypoints"].float()}
