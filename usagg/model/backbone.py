"""DINOv3 vision transformer from timm, with the block-wise feature maps the task heads read."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn

from usagg.config import ModelConfig
from usagg.errors import ConfigError

logger = logging.getLogger(__name__)

PATCH_SIZE = 16


@dataclass
class BackboneFeatures:
    """Outputs of the feature blocks, after the backbone's final norm.

    ``maps`` holds one ``[B, D, H/16, W/16]`` map per feature block (shallow to deep), ``cls`` the matching
    class-token vectors ``[B, D]`` and ``image_hw`` the input size in pixels.
    """

    maps: list[torch.Tensor]
    cls: list[torch.Tensor]
    image_hw: tuple[int, int]

    def pooled(self) -> torch.Tensor:
        """Concatenate the deepest class token and the mean of its patch tokens, ``[B, 2D]``."""
        deepest = self.maps[-1]
        return torch.cat([self.cls[-1], deepest.mean(dim=(2, 3))], dim=1)


# Blocks of each backbone that ModelConfig accepts, as timm builds them; model.depth may only cut them short.
BACKBONE_DEPTHS = {
    "vit_tiny_patch16_dinov3_qkvb": 12,
    "vit_small_patch16_dinov3": 12,
    "vit_small_patch16_dinov3_qkvb": 12,
    "vit_base_patch16_dinov3": 12,
    "vit_base_patch16_dinov3_qkvb": 12,
    "vit_large_patch16_dinov3": 24,
    "vit_large_patch16_dinov3_qkvb": 24,
}


def model_depth(cfg: ModelConfig) -> int:
    """Return the number of blocks the model will have; raise ConfigError when model.depth exceeds the backbone's."""
    full = BACKBONE_DEPTHS.get(cfg.backbone)
    if full is None:  # a backbone added to ModelConfig but not here: build it on the meta device to count its blocks
        with torch.device("meta"):
            full = len(timm.create_model(cfg.backbone, pretrained=False, num_classes=0).blocks)
    if cfg.depth is not None and cfg.depth > full:
        raise ConfigError(
            f"model.depth: {cfg.depth} is more than the {full} blocks of {cfg.backbone}; model.depth can only "
            f"truncate the backbone, so use 1..{full} or leave it unset"
        )
    return cfg.depth or full


def check_model_config(cfg: ModelConfig) -> None:
    """Check the model settings that need the backbone's depth or the disk, without building the model.

    Called before any run starts (also by ``usagg train --dry-run``), so that a mistake does not first show up
    in a Slurm job.
    """
    depth = model_depth(cfg)
    if cfg.feature_blocks is not None:
        _check_blocks("feature_blocks", cfg.feature_blocks, depth, cfg.backbone)
    if cfg.moe_blocks is not None:
        _check_blocks("moe_blocks", cfg.moe_blocks, depth, cfg.backbone)
    if cfg.pretrained is not None:
        from usagg.model.pretrained import check_weights_file

        check_weights_file(cfg.pretrained)


def default_moe_blocks(depth: int) -> list[int]:
    """Return the second half of the blocks (0-based), e.g. 6..11 of 12."""
    return list(range(depth // 2, depth))


def default_feature_blocks(depth: int) -> list[int]:
    """Return 4 evenly spaced blocks ending at the last one (2, 5, 8, 11 for 12 blocks), without repeats."""
    picks = [round((i + 1) * depth / 4) - 1 for i in range(4)]
    return sorted({max(0, p) for p in picks})


def _check_blocks(name: str, blocks: Sequence[int], depth: int, backbone: str) -> list[int]:
    if name == "feature_blocks" and not blocks:
        raise ConfigError(f"model.feature_blocks: the heads need at least one block; list 0-based indices 0..{depth - 1} or leave it unset")
    for index in blocks:
        if not 0 <= index < depth:
            raise ConfigError(
                f"model.{name}: block {index} is out of range for {backbone} with {depth} blocks; "
                f"use 0-based indices 0..{depth - 1}"
            )
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"model.{name}: block indices repeat ({list(blocks)}); list each block once")
    return sorted(blocks)


def check_image_size(height: int, width: int) -> None:
    """Raise ConfigError unless both sides are positive multiples of the 16 px patch size."""
    if height <= 0 or width <= 0 or height % PATCH_SIZE or width % PATCH_SIZE:
        raise ConfigError(
            f"image size {height}x{width} px is not a multiple of the {PATCH_SIZE} px patch size; "
            f"set data.img_size to multiples of {PATCH_SIZE} (for example 224 or [256, 320])"
        )


class DinoBackbone(nn.Module):
    """A timm DINOv3 ViT (``timm.models.eva.Eva``) that returns the feature maps of chosen blocks.

    Class and register tokens are separated from patch tokens by timm's ``forward_intermediates``
    (``return_prefix_tokens``), which uses the model's own ``num_prefix_tokens``. timm places the class
    token first among the prefix tokens.
    """

    def __init__(self, cfg: ModelConfig, img_size_hw: tuple[int, int]):
        super().__init__()
        check_image_size(*img_size_hw)
        model_depth(cfg)
        kwargs = {
            "pretrained": False,  # weights only ever come from a local file, see usagg.model.pretrained
            "num_classes": 0,
            "img_size": tuple(img_size_hw),
            "dynamic_img_size": True,
            "drop_path_rate": cfg.drop_path,
        }
        if cfg.depth is not None:
            kwargs["depth"] = cfg.depth
        self.vit = timm.create_model(cfg.backbone, **kwargs)
        if self.vit.cls_token is None:
            raise ConfigError(f"model.backbone: {cfg.backbone} has no class token, which the heads need")
        self.name = cfg.backbone
        self.depth = len(self.vit.blocks)
        self.embed_dim = self.vit.embed_dim
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        blocks = cfg.feature_blocks if cfg.feature_blocks is not None else default_feature_blocks(self.depth)
        self.feature_blocks = _check_blocks("feature_blocks", blocks, self.depth, cfg.backbone)
        moe = cfg.moe_blocks if cfg.moe_blocks is not None else default_moe_blocks(self.depth)
        self.moe_blocks = _check_blocks("moe_blocks", moe, self.depth, cfg.backbone)
        if cfg.grad_checkpointing:
            self.vit.set_grad_checkpointing(True)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    def forward(self, images: torch.Tensor) -> BackboneFeatures:
        height, width = images.shape[-2:]
        check_image_size(height, width)
        intermediates = self.vit.forward_intermediates(
            images,
            indices=self.feature_blocks,
            return_prefix_tokens=True,
            norm=True,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        maps = [spatial for spatial, _ in intermediates]
        cls = [prefix[:, 0] for _, prefix in intermediates]
        return BackboneFeatures(maps=maps, cls=cls, image_hw=(int(height), int(width)))

    def layer_id(self, name: str) -> int:
        """Return the layer-decay depth of parameter ``name`` (relative to ``vit``).

        0 is the patch embedding and prefix tokens, ``i + 1`` is block ``i``, ``depth + 1`` the final norm.
        """
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre", "rope")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def apply_finetune(self, mode: str, trainable_blocks: int) -> None:
        """Freeze backbone parameters for ``frozen`` and ``last_n``; MoE experts and routers stay trainable.

        The MoE layers are new, task-conditioned parts of M2DINO, so freezing the backbone keeps them
        trainable. A purely frozen dense baseline sets ``moe_blocks: []`` as well.
        """
        if mode == "full":
            return
        first_trainable = self.depth if mode == "frozen" else max(0, self.depth - trainable_blocks)
        for name, param in self.vit.named_parameters():
            if self.is_moe_param(name):
                continue
            layer = self.layer_id(name)
            trainable = mode == "last_n" and layer >= first_trainable + 1
            param.requires_grad_(trainable)
        frozen = sum(1 for p in self.vit.parameters() if not p.requires_grad)
        logger.info("fine-tuning %s: %d backbone tensors frozen (trainable blocks from %d)", mode, frozen, first_trainable)

    def is_moe_param(self, name: str) -> bool:
        """Return whether ``name`` (relative to ``vit``) belongs to the MoE MLP of a block."""
        parts = name.split(".")
        return parts[0] == "blocks" and len(parts) > 2 and parts[2] == "mlp" and int(parts[1]) in self.moe_blocks
