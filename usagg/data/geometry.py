"""Map predictions from input pixels back to original image pixels with a dataset item's ``scale`` and ``offset``.

``scale`` (sy, sx) and ``offset`` (oy, ox) describe x_input = sx * x_original + ox in continuous coordinates
(pixel edges on integers). Boxes are in those coordinates; keypoints sit on pixel centres, so they shift by half
a pixel on each side of the map.
"""

from __future__ import annotations

import torch


def boxes_to_original(boxes_xyxy: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Map boxes [..., 4] (x_min, y_min, x_max, y_max) from input to original pixels (unflipped maps only)."""
    sy, sx = scale[..., 0, None], scale[..., 1, None]
    oy, ox = offset[..., 0, None], offset[..., 1, None]
    x = (boxes_xyxy[..., 0::2] - ox) / sx
    y = (boxes_xyxy[..., 1::2] - oy) / sy
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def points_to_original(points_xy: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Map keypoints [..., K, 2] (pixel centres) from input to original pixels."""
    s = scale.flip(-1).unsqueeze(-2)  # (sx, sy) per point
    o = offset.flip(-1).unsqueeze(-2)
    return (points_xy + 0.5 - o) / s - 0.5


def points_to_input(points_xy: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Map keypoints [..., K, 2] (pixel centres) from original to input pixels."""
    s = scale.flip(-1).unsqueeze(-2)
    o = offset.flip(-1).unsqueeze(-2)
    return (points_xy + 0.5) * s + o - 0.5


def dense_to_original(values_CHW: torch.Tensor, orig_size: tuple[int, int], scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Crop the image region out of a dense input-pixel map [C, H, W] (removing letterbox padding) and resize it
    bilinearly to the original (height, width). Valid for evaluation items (no crop or flip)."""
    height, width = int(orig_size[0]), int(orig_size[1])
    top = round(float(offset[0]))
    left = round(float(offset[1]))
    bottom = top + max(1, round(float(scale[0]) * height))
    right = left + max(1, round(float(scale[1]) * width))
    region = values_CHW[:, top:bottom, left:right].unsqueeze(0).float()
    resized = torch.nn.functional.interpolate(region, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0]
