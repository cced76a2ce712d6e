"""Task-conditioned routers of the MoE layers.

Three modes, all producing router logits ``[T, E]`` for the ``T`` tokens of a single-task batch:

- ``token_task``: one router shared by all tasks whose input is the token concatenated with a learnable
  task embedding (the task-conditioned MoE of M3ViT, Liang et al., NeurIPS 2022).
- ``task``: the router takes only the task embedding as input, so every token of every sample of a task is sent to
  the same experts and each task's sub-network can be read off the router.
- ``per_task``: one router (gate) per task over the tokens (multi-gate MoE, as in Mod-Squad, Chen et al.,
  CVPR 2023).

The task embedding table is shared by all MoE layers and lives in the model. A layer reads the current
task and its embedding from a :class:`RoutingContext`, which the model fills before each forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usagg.model.keys import task_key, task_rng

ROUTER_MODES = ("token_task", "task", "per_task")


@dataclass
class RoutingContext:
    """The task of the batch being processed, shared by the model and its MoE layers."""

    task: str | None = None
    task_embedding: torch.Tensor | None = None  # [task_embed_dim], a row of the model's embedding table
    record: bool = True  # False: forward passes update neither routing statistics nor the MI window

    def require_task(self) -> str:
        if self.task is None:
            raise RuntimeError("MoE layer called without a task; run it through M2DINO.forward(images, task)")
        return self.task

    def require_embedding(self) -> torch.Tensor:
        if self.task_embedding is None:
            raise RuntimeError("MoE router needs a task embedding; run it through M2DINO.forward(images, task)")
        return self.task_embedding


def _init_linear(layer: nn.Linear) -> None:
    nn.init.trunc_normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)


def _fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a linear map in float32 even under autocast, because top-k routing is sensitive to rounding."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


class TokenTaskRouter(nn.Module):
    """Router over ``concat(token, task embedding)``."""

    def __init__(self, dim: int, task_dim: int, num_experts: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim + task_dim, num_experts)
        _init_linear(self.proj)

    def forward(self, x_TD: torch.Tensor, batch_size: int, context: RoutingContext) -> torch.Tensor:
        task_vec = context.require_embedding()
        # W [x; e] + b = W_x x + (W_e e + b): the task part is computed once instead of once per token.
        token_w, task_w = self.proj.weight[:, : self.dim], self.proj.weight[:, self.dim :]
        task_logits_E = _fp32_linear(task_vec, task_w, self.proj.bias)
        return _fp32_linear(x_TD, token_w) + task_logits_E


class TaskRouter(nn.Module):
    """Router over the task embedding alone: one expert choice per task, shared by all tokens."""

    def __init__(self, task_dim: int, num_experts: int):
        super().__init__()
        self.proj = nn.Linear(task_dim, num_experts)
        _init_linear(self.proj)

    def forward(self, x_TD: torch.Tensor, batch_size: int, context: RoutingContext) -> torch.Tensor:
        logits_E = _fp32_linear(context.require_embedding(), self.proj.weight, self.proj.bias)
        return logits_E.expand(x_TD.shape[0], -1)


class PerTaskRouter(nn.Module):
    """One token router per task, kept in a ``ModuleDict`` keyed by task name."""

    def __init__(self, dim: int, num_experts: int, tasks: Sequence[str]):
        super().__init__()
        self.gates = nn.ModuleDict()
        for task in tasks:
            with task_rng(task):
                gate = nn.Linear(dim, num_experts)
                _init_linear(gate)
            self.gates[task_key(task)] = gate

    def forward(self, x_TD: torch.Tensor, batch_size: int, context: RoutingContext) -> torch.Tensor:
        task = context.require_task()
        key = task_key(task)
        if key not in self.gates:
            known = ", ".join(k.replace("%2E", ".") for k in self.gates)
            raise KeyError(f"per-task router has no gate for task {task!r}; known tasks: {known}")
        gate = self.gates[key]
        return _fp32_linear(x_TD, gate.weight, gate.bias)


def build_router(mode: str, dim: int, task_dim: int, num_experts: int, tasks: Sequence[str]) -> nn.Module:
    if mode == "token_task":
        return TokenTaskRouter(dim, task_dim, num_experts)
    if mode == "task":
        return TaskRouter(task_dim, num_experts)
    if mode == "per_task":
        return PerTaskRouter(dim, num_experts, tasks)
    raise ValueError(f"unknown router mode {mode!r}; choose one of {', '.join(ROUTER_MODES)}")
