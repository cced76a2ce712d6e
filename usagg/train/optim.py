"""Optimiser, learning-rate schedule and per-task loss weighting."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from usagg.config import TrainConfig
from usagg.errors import ConfigError

logger = logging.getLogger(__name__)


class LossWeighting(nn.Module):
    """Weights one task's loss before the backward pass.

    - ``equal``: every task loss counts once.
    - ``fixed``: ``train.loss_weights[task]`` times the loss.
    - ``uncertainty``: homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018) with a learned
      ``s_t = log(sigma_t^2)`` per task and the positive regulariser of Liebel and Koerner (2018):
      ``0.5 * exp(-s_t) * L_t + 0.5 * log(1 + exp(s_t))``. Kendall's ``+ s_t / 2`` term lets the total fall to
      minus infinity as ``L_t -> 0``; with ``log(1 + sigma^2)`` the total stays >= 0 for non-negative task losses.
    """

    def __init__(self, tasks: Sequence[str], mode: str = "equal", weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.mode = mode
        self.tasks = list(tasks)
        self.fixed: dict[str, float] = {}
        if mode == "fixed":
            missing = [t for t in self.tasks if t not in (weights or {})]
            if missing:
                raise ConfigError(
                    f"train.loss_weights: no weight for task(s) {', '.join(missing)}; "
                    "loss_weighting 'fixed' needs one weight per task of every run"
                )
            self.fixed = {t: float(weights[t]) for t in self.tasks}  # type: ignore[index]
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(())) for t in self.tasks} if mode == "uncertainty" else {}
        )

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        if self.mode == "fixed":
            return self.fixed[task] * loss
        if self.mode == "uncertainty":
            log_var = self.log_vars[task]
            return 0.5 * torch.exp(-log_var) * loss + 0.5 * nn.functional.softplus(log_var)
        return loss

    def weights(self) -> dict[str, float]:
        """Current effective weight of each task loss, for the training log."""
        if self.mode == "fixed":
            return dict(self.fixed)
        if self.mode == "uncertainty":
            return {t: float(0.5 * torch.exp(-p.detach())) for t, p in self.log_vars.items()}
        return {t: 1.0 for t in self.tasks}


def build_optimizer(model: nn.Module, cfg: TrainConfig, loss_weighting: LossWeighting | None = None) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (backbone, MoE + router, heads) plus the loss-weighting parameters.

    ``model.param_groups(cfg)`` sets the learning rate of each group and leaves norms, biases and embeddings
    without weight decay. Learned log-variances get the head learning rate and no weight decay.
    """
    groups = list(model.param_groups(cfg))  # type: ignore[operator]
    if loss_weighting is not None and len(loss_weighting.log_vars):
        names = [f"loss_weighting.{name}" for name, _ in loss_weighting.named_parameters()]
        group = {"params": list(loss_weighting.parameters()), "lr": cfg.lr_head, "weight_decay": 0.0, "group_name": "loss_weighting"}
        if any("param_names" in g for g in groups):  # torch requires names on every group or on none
            group["param_names"] = names
        groups.append(group)
    for group in groups:
        group.setdefault("weight_decay", cfg.weight_decay)
    # The fused kernel (CPU and CUDA, torch >= 2.4) updates all tensors of a group at once. The default per-tensor
    # loop costs about as much as the backward pass of a tiny model with many parameter groups.
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr_head, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused)


class WarmupCosine:
    """Learning-rate factor: linear warm-up from ``1 / warmup_steps`` to 1, then cosine decay to ``min_factor``."""

    def __init__(self, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> None:
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, min(warmup_steps, self.total_steps - 1))
        self.min_factor = min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(cfg.warmup_fraction * total_steps)
    factor = WarmupCosine(total_steps, warmup, cfg.min_lr_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
