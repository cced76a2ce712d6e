"""Auxiliary losses of the MoE routers: load balancing, router z-loss and task-expert mutual information."""

from __future__ import annotations

import math
from collections import deque

import torch


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Return the Switch Transformer balance loss generalised to top-k routing.

    ``L = E * sum_e f_e * P_e`` (Fedus et al., JMLR 2022, eq. 4), where ``f_e`` is the share of the
    ``T * k`` top-k decisions that picked expert ``e`` (no gradient) and ``P_e`` the mean router probability
    of ``e``. It is 1 when routing is uniform and grows as tokens crowd onto fewer experts (``E / k`` when
    all go to the same ``k`` experts with probability ``1 / k`` each).
    """
    num_experts = probs_TE.shape[-1]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    share_E = counts_E / counts_E.sum().clamp_min(1)
    return num_experts * torch.sum(share_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Return the mean squared log-partition of the router logits (ST-MoE, Zoph et al., 2022, eq. 5)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class TaskExpertMutualInformation:
    """Mod-Squad's task-expert mutual information loss (Chen et al., CVPR 2023), pooled over a window of steps.

    Each batch contains one task, so a per-batch estimate of ``p(task, expert)`` has a single task and zero
    mutual information. Instead, ``p(e | t)`` for every task is pooled from the detached router
    probabilities of the last ``window`` training steps, with the current batch's live (differentiable)
    probabilities added to its own task. Tasks get a uniform prior ``p(t)``. The loss is the conditional
    entropy ``H(T | E) = H(T) - I(T; E)``: minimising it maximises the mutual information, as Mod-Squad
    does, while staying non-negative. It is 0 (with no gradient) while the window holds a single task.
    """

    def __init__(self, window: int):
        self.window: deque[tuple[str, torch.Tensor, int]] = deque(maxlen=window)

    def reset(self) -> None:
        self.window.clear()

    def __call__(self, task: str, probs_TE: torch.Tensor, record: bool) -> torch.Tensor:
        live_sum_E = probs_TE.float().sum(dim=0)
        live_tokens = probs_TE.shape[0]
        sums: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}
        for past_task, past_sum_E, past_tokens in self.window:
            if past_sum_E.device != live_sum_E.device:
                past_sum_E = past_sum_E.to(live_sum_E.device)
            sums[past_task] = sums.get(past_task, 0) + past_sum_E
            tokens[past_task] = tokens.get(past_task, 0) + past_tokens
        sums[task] = sums.get(task, 0) + live_sum_E
        tokens[task] = tokens.get(task, 0) + live_tokens
        if record:
            self.window.append((task, live_sum_E.detach(), live_tokens))
        if len(sums) < 2:
            return live_sum_E.sum() * 0.0

        names = sorted(sums)
        p_e_given_t_TE = torch.stack([sums[name] / tokens[name] for name in names])
        num_tasks = len(names)
        joint_TE = p_e_given_t_TE / num_tasks
        p_e_E = joint_TE.sum(dim=0)
        eps = 1e-9
        mutual_information = torch.sum(joint_TE * (torch.log(p_e_given_t_TE + eps) - torch.log(p_e_E + eps)))
        return math.log(num_tasks) - mutual_information
