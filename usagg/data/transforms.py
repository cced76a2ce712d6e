"""Joint image/label transforms on torchvision ``tv_tensors``: crop, resize (letterbox or stretch), flips,
intensity and speckle-like noise, normalisation.

Geometry is applied to every tv_tensor of a sample (``Image``, ``Mask``, ``BoundingBoxes``, ``KeyPoints``) with
``torchvision.transforms.v2.functional``, so labels stay aligned with the image. The transform also returns the
affine map from original to input pixels, in continuous coordinates (pixel edges on integers, as for boxes):
``x_input = scale_x * x_original + offset_x`` (negative scale after a flip).

Keypoints use the pixel-centre convention (pixel centres on integers, as FMC_UIA writes them). torchvision 0.29
resizes keypoints as ``x * ratio``, which is exact for edge coordinates only, so keypoints are resized here as
``(x + 0.5) * ratio - 0.5``. Crops, pads and flips use torchvision's keypoint kernels, which already follow the
pixel-centre convention (a horizontal flip maps x to ``width - 1 - x``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from usagg.tasks import TaskCard

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Affine:
    """Per-axis map x_input = scale * x_original + offset, in continuous pixel coordinates."""

    scale_y: float = 1.0
    scale_x: float = 1.0
    offset_y: float = 0.0
    offset_x: float = 0.0

    def then(self, scale_y: float, scale_x: float, offset_y: float, offset_x: float) -> Affine:
        """Compose with a later map x' = scale * x + offset."""
        return Affine(
            self.scale_y * scale_y,
            self.scale_x * scale_x,
            self.offset_y * scale_y + offset_y,
            self.offset_x * scale_x + offset_x,
        )


def letterbox_geometry(height: int, width: int, size_hw: tuple[int, int], mode: str) -> tuple[int, int, int, int]:
    """Return (resized_h, resized_w, pad_top, pad_left) that fit an image of (height, width) into ``size_hw``."""
    out_h, out_w = size_hw
    if mode == "stretch":
        return out_h, out_w, 0, 0
    ratio = min(out_h / height, out_w / width)
    new_h = min(out_h, max(1, round(height * ratio)))
    new_w = min(out_w, max(1, round(width * ratio)))
    return new_h, new_w, (out_h - new_h) // 2, (out_w - new_w) // 2


def _resize_keypoints(points: tv_tensors.KeyPoints, new_h: int, new_w: int) -> tv_tensors.KeyPoints:
    old_h, old_w = points.canvas_size
    ratio = torch.tensor([new_w / old_w, new_h / old_h], dtype=points.dtype)
    moved = (points.as_subclass(torch.Tensor) + 0.5) * ratio - 0.5
    return tv_tensors.wrap(moved, like=points, canvas_size=(new_h, new_w))


def _target_extent(targets: dict) -> tuple[float, float, float, float] | None:
    """Return the continuous (x0, y0, x1, y1) hull of the boxes and keypoints that a crop must keep, or None."""
    hulls = []
    boxes = targets.get("boxes")
    if boxes is not None and boxes.numel():
        b = boxes.as_subclass(torch.Tensor)
        hulls.append((b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()))
    points = targets.get("keypoints")
    if points is not None and points.numel():
        p = points.as_subclass(torch.Tensor).reshape(-1, 2)
        hulls.append((p[:, 0].min() - 0.5, p[:, 1].min() - 0.5, p[:, 0].max() + 0.5, p[:, 1].max() + 0.5))
    if not hulls:
        return None
    return (
        float(min(h[0] for h in hulls)),
        float(min(h[1] for h in hulls)),
        float(max(h[2] for h in hulls)),
        float(max(h[3] for h in hulls)),
    )


def _crop_start(length: int, crop: int, keep_lo: float | None, keep_hi: float | None) -> tuple[int, int]:
    """Pick a random crop start along one axis that keeps [keep_lo, keep_hi]; the full axis when impossible."""
    low, high = 0, length - crop
    if keep_lo is not None and keep_hi is not None:
        low = max(low, math.ceil(keep_hi) - crop)
        high = min(high, math.floor(keep_lo))
    if high < low:
        return 0, length
    return int(torch.randint(low, high + 1, ()).item()), crop


class SpeckleNoise(v2.Transform):
    """Multiplicative noise with a grain of about two pixels, a cheap stand-in for ultrasound speckle.

    Each image gets ``x * (1 + s * n)`` with ``s`` drawn from U(0, ``sigma``) and ``n`` standard normal noise drawn at
    half resolution and upsampled bilinearly. Expects float images in [0, 1].
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, sigma: float, p: float = 0.5) -> None:
        super().__init__()
        self.sigma = sigma
        self.p = p

    def make_params(self, flat_inputs: list) -> dict:
        apply = bool(torch.rand(()) < self.p) and self.sigma > 0
        return {"strength": float(torch.rand(()) * self.sigma) if apply else 0.0}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        if params["strength"] == 0.0:
            return inpt
        height, width = inpt.shape[-2:]
        noise = torch.randn(1, 1, max(1, height // 2), max(1, width // 2))
        noise = torch.nn.functional.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)[0]
        noisy = inpt.as_subclass(torch.Tensor) * (1.0 + params["strength"] * noise)
        return tv_tensors.wrap(noisy.clamp_(0.0, 1.0), like=inpt)


class JointTransform:
    """Training or evaluation transform for one task: geometry on all tv_tensors, intensity on the image only."""

    def __init__(self, card: TaskCard, data_cfg, train: bool) -> None:
        augment = data_cfg.augment
        self.size_hw = data_cfg.size_hw
        self.resize_mode = data_cfg.resize
        self.augment = train and augment.enabled
        self.scale_jitter = augment.scale_jitter if self.augment else 0.0
        self.hflip_p = augment.hflip_p if (self.augment and card.hflip_allowed) else 0.0
        self.vflip_p = augment.hflip_p if (self.augment and card.allow_vflip) else 0.0
        self.intensity = None
        if self.augment and (augment.brightness > 0 or augment.contrast > 0):
            self.intensity = v2.ColorJitter(brightness=augment.brightness or None, contrast=augment.contrast or None)
        self.speckle = SpeckleNoise(augment.speckle_sigma) if self.augment and augment.speckle_sigma > 0 else None
        self.normalize = v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def __call__(self, image: tv_tensors.Image, targets: dict) -> tuple[torch.Tensor, dict, Affine]:
        """Transform a uint8 image [C, H, W] (C = 1 or 3) and its tv_tensor targets.

        Returns the normalised float image [3, H_in, W_in], the transformed targets and the affine map.
        """
        affine = Affine()
        height, width = image.shape[-2:]
        if self.scale_jitter > 0:
            area = 1.0 - float(torch.rand(())) * self.scale_jitter
            crop_h = max(1, round(height * math.sqrt(area)))
            crop_w = max(1, round(width * math.sqrt(area)))
            extent = _target_extent(targets)
            top, crop_h = _crop_start(height, crop_h, *(extent[1::2] if extent else (None, None)))
            left, crop_w = _crop_start(width, crop_w, *(extent[0::2] if extent else (None, None)))
            if (crop_h, crop_w) != (height, width):
                image = F.crop(image, top, left, crop_h, crop_w)
                targets = {k: F.crop(v, top, left, crop_h, crop_w) for k, v in targets.items()}
                affine = affine.then(1.0, 1.0, -top, -left)
                height, width = crop_h, crop_w
        new_h, new_w, pad_top, pad_left = letterbox_geometry(height, width, self.size_hw, self.resize_mode)
        image = F.resize(image, [new_h, new_w], antialias=True)
        targets = {k: self._resize_target(v, new_h, new_w) for k, v in targets.items()}
        affine = affine.then(new_h / height, new_w / width, 0.0, 0.0)
        out_h, out_w = self.size_hw
        pad = [pad_left, pad_top, out_w - new_w - pad_left, out_h - new_h - pad_top]
        if any(pad):
            image = F.pad(image, pad, fill=0)
            targets = {k: F.pad(v, pad, fill=0) for k, v in targets.items()}
            affine = affine.then(1.0, 1.0, pad_top, pad_left)
        if self.hflip_p > 0 and float(torch.rand(())) < self.hflip_p:
            image = F.horizontal_flip(image)
            targets = {k: F.horizontal_flip(v) for k, v in targets.items()}
            affine = affine.then(1.0, -1.0, 0.0, out_w)
        if self.vflip_p > 0 and float(torch.rand(())) < self.vflip_p:
            image = F.vertical_flip(image)
            targets = {k: F.vertical_flip(v) for k, v in targets.items()}
            affine = affine.then(-1.0, 1.0, out_h, 0.0)
        if self.intensity is not None:
            image = self.intensity(image)
        image = F.to_dtype(image, torch.float32, scale=True)
        if self.speckle is not None:
            image = self.speckle(image)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        image = self.normalize(image)
        return image.as_subclass(torch.Tensor).contiguous(), targets, affine

    @staticmethod
    def _resize_target(value, new_h: int, new_w: int):
        if isinstance(value, tv_tensors.KeyPoints):
            return _resize_keypoints(value, new_h, new_w)
        if isinstance(value, tv_tensors.Mask):
            # nearest-exact samples pixel centres, matching the bilinear image resize (align_corners=False).
            return F.resize(value, [new_h, new_w], interpolation=InterpolationMode.NEAREST_EXACT)
        return F.resize(value, [new_h, new_w])


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a [3, H, W] (or batched) image, giving values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (image * std + mean).clamp(0, 1)
