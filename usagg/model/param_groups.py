"""AdamW parameter groups of M2DINO: learning rate per part, layer-wise decay, no weight decay on norms and biases."""

from __future__ import annotations

from typing import TYPE_CHECKING

from usagg.config import TrainConfig

if TYPE_CHECKING:
    from usagg.model.m2dino import M2DINO

NO_DECAY_NAMES = ("cls_token", "reg_token", "pos_embed")


def _skips_weight_decay(name: str, ndim: int) -> bool:
    """Norm weights, biases, layer-scale gammas, prefix tokens and task embeddings get no weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return ndim <= 1 or leaf.endswith("bias") or leaf in NO_DECAY_NAMES or name.startswith("task_embed.")


def build_param_groups(model: M2DINO, train_cfg: TrainConfig) -> list[dict]:
    """Group the trainable parameters for AdamW.

    - ``backbone``: ``lr_backbone * layer_decay ** (depth + 1 - layer)``, where layer 0 is the patch
      embedding and prefix tokens, ``i + 1`` is block ``i`` and ``depth + 1`` the final norm (BEiT-style
      layer-wise decay, Bao et al., ICLR 2022).
    - ``moe``: experts use ``lr_moe`` with the decay of their block.
    - ``router``: routers and task embeddings are new parameters and use ``lr_moe`` without decay.
    - ``head``: ``lr_head``.

    Frozen parameters are left out. Every group carries ``lr_scale`` (the layer-decay factor) and
    ``param_names``.
    """
    backbone = model.backbone
    depth = backbone.depth
    decay = model.cfg.layer_decay
    groups: dict[tuple[str, int, bool], dict] = {}

    def add(component: str, layer: int, base_lr: float, scale: float, name: str, param) -> None:
        no_decay = _skips_weight_decay(name, param.ndim)
        key = (component, layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": base_lr * scale,
                "weight_decay": 0.0 if no_decay else train_cfg.weight_decay,
                "lr_scale": scale,
                "group_name": f"{component}/layer{layer}/{'no_decay' if no_decay else 'decay'}",
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)

    for name, param in backbone.vit.named_parameters():
        if not param.requires_grad:
            continue
        layer = backbone.layer_id(name)
        scale = decay ** (depth + 1 - layer)
        full_name = f"backbone.vit.{name}"
        if backbone.is_moe_param(name):
            if ".router." in name:
                add("router", -1, train_cfg.lr_moe, 1.0, full_name, param)
            else:
                add("moe", layer, train_cfg.lr_moe, scale, full_name, param)
        else:
            add("backbone", layer, train_cfg.lr_backbone, scale, full_name, param)

    if model.task_embed is not None:
        for name, param in model.task_embed.named_parameters():
            if param.requires_grad:
                add("router", -1, train_cfg.lr_moe, 1.0, f"task_embed.{name}", param)

    for name, param in model.heads.named_parameters():
        if param.requires_grad:
            add("head", -1, train_cfg.lr_head, 1.0, f"heads.{name}", param)

    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], k[1], k[2]))]
