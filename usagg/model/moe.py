"""Task-conditioned Mixture-of-Experts MLP with drop-less, sorted top-k dispatch.

Each token goes to its top-k experts (no capacity limit, no dropped tokens). Dispatch sorts the ``T * k``
routing decisions by expert and gathers the tokens into one contiguous block per expert. It then runs one
matrix multiply per expert and layer, with ``torch._grouped_mm`` on CUDA in bf16 and a loop over experts
elsewhere. An expert therefore only ever processes the tokens routed to it. The naive every-expert-on-every-token layer is kept as
:func:`every_expert_dispatch` for the benchmark baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from usagg.errors import ConfigError
from usagg.model.aux_losses import (
    TaskExpertMutualInformation,
    load_balancing_loss,
    router_z_loss,
)
from usagg.model.router import RoutingContext
from usagg.model.routing_stats import RoutingStatsAccumulator

logger = logging.getLogger(__name__)

DISPATCH_MODES = ("sorted", "every_expert")


class ExpertWeights:
    """The stacked expert parameters, ``fc1 [E, h, D]``, ``fc2 [E, D, h]`` and their biases (a plain holder)."""

    def __init__(self, fc1_w, fc1_b, fc2_w, fc2_b, act: Callable[[torch.Tensor], torch.Tensor]):
        self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b, self.act = fc1_w, fc1_b, fc2_w, fc2_b, act


def sorted_dispatch(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """Combine ``sum_j weights[t, j] * expert_{experts[t, j]}(x[t])`` computing only the chosen experts."""
    num_tokens, top_k = experts_TK.shape
    num_experts = w.fc1_w.shape[0]
    flat_experts = experts_TK.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)  # decision slots grouped by expert
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts_E = torch.bincount(flat_experts, minlength=num_experts)

    x_sorted = _GatherSlots.apply(x_TD, order, inverse, top_k)
    grouped_dtype = _grouped_mm_dtype(x_TD)
    if grouped_dtype is not None:
        y_sorted = _grouped_experts(x_sorted, flat_experts.index_select(0, order), counts_E, w, grouped_dtype)
    else:
        y_sorted = _run_experts(x_sorted, counts_E.tolist(), w)

    # Undo the sort and take the gate-weighted sum over each token's k slots.
    # An elementwise product and sum, because CPU bmm over T tiny [1, k] x [k, D] products loops per token.
    y_slots_TKD = _PermuteRows.apply(y_sorted, inverse, order).view(num_tokens, top_k, -1)
    return (y_slots_TKD * weights_TK.to(y_slots_TKD.dtype).unsqueeze(-1)).sum(dim=1)


class _GatherSlots(torch.autograd.Function):
    """Copy token ``order[i] // k`` to row ``i``; the backward is a gather and a sum instead of a scatter-add.

    PyTorch's backward of ``index_select`` is ``index_add_``, which on CPU falls back to one small copy per
    row. Every token fills exactly ``k`` slots, so the gradient is the slot gradients put back in token
    order (``inverse``) and summed over ``k``.
    """

    @staticmethod
    def forward(ctx, x_TD, order, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x_TD.index_select(0, order // top_k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sorted):
        (inverse,) = ctx.saved_tensors
        grad_TKD = grad_sorted.index_select(0, inverse).view(-1, ctx.top_k, grad_sorted.shape[-1])
        return grad_TKD.sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """Reorder rows by a permutation; the backward applies the inverse permutation (a gather, no scatter)."""

    @staticmethod
    def forward(ctx, x, permutation, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, permutation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _run_experts(x_sorted: torch.Tensor, counts: list[int], w: ExpertWeights) -> torch.Tensor:
    """Run each expert on its contiguous block of rows, one matrix multiply per expert and layer."""
    approximate = _gelu_mode(w.act)
    if approximate is None:  # an activation without a hand-written backward: plain autograd over the experts
        outputs = []
        for chunk, fc1_w, fc1_b, fc2_w, fc2_b in zip(
            x_sorted.split(counts), w.fc1_w.unbind(0), w.fc1_b.unbind(0), w.fc2_w.unbind(0), w.fc2_b.unbind(0)
        ):
            outputs.append(F.linear(w.act(F.linear(chunk, fc1_w, fc1_b)), fc2_w, fc2_b))
        return torch.cat(outputs)
    dtype = x_sorted.dtype
    if torch.is_autocast_enabled(x_sorted.device.type):
        dtype = torch.get_autocast_dtype(x_sorted.device.type)
    with torch.autocast(device_type=x_sorted.device.type, enabled=False):
        return _ExpertMLPs.apply(
            x_sorted.to(dtype), counts, w.fc1_w.to(dtype), w.fc1_b.to(dtype), w.fc2_w.to(dtype), w.fc2_b.to(dtype), approximate
        )


def _gelu_mode(act: Callable) -> str | None:
    if isinstance(act, nn.GELU):
        return act.approximate
    return None


class _ExpertMLPs(torch.autograd.Function):
    """GELU MLP experts over row blocks, with outputs and gradients written into preallocated tensors.

    Hand-written because the autograd version (split, one ``F.linear`` per expert, ``cat``) copies every
    output and weight gradient once more: outputs in a ``cat``, weight gradients in a ``stack``. Those
    copies took a measurable share of the MoE layer's time on CPU. It saves the same tensors as
    a dense MLP: the input, the pre-activation and the activation.
    """

    @staticmethod
    def forward(ctx, x, counts, fc1_w, fc1_b, fc2_w, fc2_b, approximate):
        rows, dim = x.shape
        pre = x.new_empty(rows, fc1_w.shape[1])
        out = x.new_empty(rows, dim)
        blocks = _row_blocks(counts)
        for e, start, stop in blocks:
            torch.addmm(fc1_b[e], x[start:stop], fc1_w[e].t(), out=pre[start:stop])
        act = F.gelu(pre, approximate=approximate)  # one elementwise pass over all experts' rows
        for e, start, stop in blocks:
            torch.addmm(fc2_b[e], act[start:stop], fc2_w[e].t(), out=out[start:stop])
        ctx.save_for_backward(x, pre, act, fc1_w, fc2_w)
        ctx.blocks = blocks
        ctx.approximate = approximate
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, pre, act, fc1_w, fc2_w = ctx.saved_tensors
        need_x, _, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w1 = torch.zeros_like(fc1_w) if need_w1 else None
        grad_b1 = fc1_w.new_zeros(fc1_w.shape[:2]) if need_b1 else None
        grad_w2 = torch.zeros_like(fc2_w) if need_w2 else None
        grad_b2 = fc2_w.new_zeros(fc2_w.shape[:2]) if need_b2 else None

        grad_act = torch.empty_like(act)
        for e, start, stop in ctx.blocks:
            g_out = grad_out[start:stop]
            torch.mm(g_out, fc2_w[e], out=grad_act[start:stop])
            if need_w2:
                torch.mm(g_out.t(), act[start:stop], out=grad_w2[e])
            if need_b2:
                torch.sum(g_out, dim=0, out=grad_b2[e])
        grad_pre = torch.ops.aten.gelu_backward(grad_act, pre, approximate=ctx.approximate)
        for e, start, stop in ctx.blocks:
            g_pre = grad_pre[start:stop]
            if need_w1:
                torch.mm(g_pre.t(), x[start:stop], out=grad_w1[e])
            if need_b1:
                torch.sum(g_pre, dim=0, out=grad_b1[e])
            if need_x:
                torch.mm(g_pre, fc1_w[e], out=grad_x[start:stop])
        return grad_x, None, grad_w1, grad_b1, grad_w2, grad_b2, None


def _row_blocks(counts: list[int]) -> list[tuple[int, int, int]]:
    """Return ``(expert, start, stop)`` of each non-empty block of expert-sorted rows."""
    blocks, start = [], 0
    for e, count in enumerate(counts):
        if count:
            blocks.append((e, start, start + count))
        start += count
    return blocks


def every_expert_dispatch(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """Run every expert on every token and mask by the gates; the naive baseline, E / k times the FLOPs."""
    num_experts = w.fc1_w.shape[0]
    gates_TE = torch.zeros(x_TD.shape[0], num_experts, device=x_TD.device, dtype=weights_TK.dtype)
    gates_TE = gates_TE.scatter(1, experts_TK, weights_TK)
    y_TD = None
    params = zip(w.fc1_w.unbind(0), w.fc1_b.unbind(0), w.fc2_w.unbind(0), w.fc2_b.unbind(0))
    for e, (fc1_w, fc1_b, fc2_w, fc2_b) in enumerate(params):
        out = F.linear(w.act(F.linear(x_TD, fc1_w, fc1_b)), fc2_w, fc2_b)
        term = gates_TE[:, e : e + 1].to(out.dtype) * out
        y_TD = term if y_TD is None else y_TD + term
    return y_TD


# --- grouped matrix multiply on CUDA ---------------------------------------------------------------

_GROUPED_MM_OK: bool | None = None


def _grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Return bf16 when the CUDA grouped matmul applies to ``x`` (CUDA, bf16 or bf16 autocast), else None."""
    global _GROUPED_MM_OK
    if not x.is_cuda or not hasattr(torch, "_grouped_mm"):
        return None
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    )
    if not bf16:
        return None
    if _GROUPED_MM_OK is None:
        _GROUPED_MM_OK = _probe_grouped_mm(x.device)
    return torch.bfloat16 if _GROUPED_MM_OK else None


def _probe_grouped_mm(device: torch.device) -> bool:
    """Check once that ``torch._grouped_mm`` runs forward and backward on this GPU."""
    try:
        a = torch.randn(32, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(2, 16, 16, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs).sum().backward()
        return True
    except RuntimeError as exc:
        logger.warning("torch._grouped_mm is unavailable on %s (%s); MoE dispatch loops over experts", device, exc)
        return False


def _grouped_experts(
    x_sorted: torch.Tensor, sorted_experts: torch.Tensor, counts_E: torch.Tensor, w: ExpertWeights, dtype: torch.dtype
) -> torch.Tensor:
    # NOTE: this CUDA path uses torch._grouped_mm, a private PyTorch API, and has not yet run on a GPU.
    # The CPU tests cover only the per-expert loop.
    offsets = counts_E.cumsum(0).to(torch.int32)
    hidden = torch._grouped_mm(x_sorted.to(dtype), w.fc1_w.to(dtype).transpose(1, 2), offs=offsets)
    hidden = w.act(hidden + w.fc1_b.to(dtype).index_select(0, sorted_experts))
    out = torch._grouped_mm(hidden, w.fc2_w.to(dtype).transpose(1, 2), offs=offsets)
    return out + w.fc2_b.to(dtype).index_select(0, sorted_experts)


# --- the layer ------------------------------------------------------------------------------------


class MoEMlp(nn.Module):
    """Drop-in replacement for a ViT block's MLP: ``E`` experts of width ``hidden``, top-k routing.

    The layer reads the current task from ``context`` (filled by the model), keeps the unweighted
    auxiliary losses of its last forward pass in ``last_aux`` and accumulates routing statistics per task.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        router: nn.Module,
        act_layer: type[nn.Module] = nn.GELU,
        context: RoutingContext | None = None,
        mi_window: int = 16,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"model.top_k: {top_k} must be between 1 and num_experts ({num_experts})")
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = act_layer()
        self.router = router
        self.context = context if context is not None else RoutingContext()
        self.mutual_information = TaskExpertMutualInformation(mi_window)
        self.stats = RoutingStatsAccumulator(num_experts)
        self.record_stats = True
        self.compute_mi = True  # False skips the mutual-information loss (the model sets this when its weight is 0)
        self.dispatch = "sorted"
        self.last_aux: dict[str, torch.Tensor] = {}
        self.reset_experts()

    @classmethod
    def from_dense(cls, mlp: nn.Module, hidden: int, num_experts: int, top_k: int, router: nn.Module, **kwargs) -> MoEMlp:
        """Build a MoE layer that replaces timm's ``Mlp`` ``mlp``, with experts cut from its weights."""
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        plain = isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and isinstance(getattr(mlp, "norm", None), nn.Identity)
        if not plain or fc1.bias is None or fc2.bias is None:
            raise ConfigError(
                f"model.moe_blocks: MoE replaces a plain two-layer MLP with biases (timm Mlp), "
                f"but this backbone's block MLP is {type(mlp).__name__}; choose a backbone with a GELU MLP "
                "(vit_small/base/large_patch16_dinov3) or set moe_blocks: []"
            )
        layer = cls(fc1.in_features, hidden, num_experts, top_k, router, act_layer=type(mlp.act), **kwargs)
        layer.load_dense(fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        layer.dense_hidden = fc1.out_features  # the width a pretrained file's MLP of this block must have
        return layer

    @torch.no_grad()
    def reset_experts(self) -> None:
        """Draw expert weights afresh (truncated normal, std 0.02, zero biases, as timm initialises a ViT)."""
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        self.fc1_bias.zero_()
        self.fc2_bias.zero_()

    @torch.no_grad()
    def load_dense(self, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor, fc2_b: torch.Tensor) -> None:
        """Cut every expert from a dense MLP (``fc1 [H, D]``, ``fc2 [D, H]``).

        Expert ``e`` takes the ``h`` hidden units starting at ``e * H / E``, wrapping around, so each unit
        sits in about ``E * h / H`` experts. Its ``fc2`` is scaled by ``H / h``, which makes each expert an
        unbiased estimate of the dense MLP when units are exchangeable. The top-k gate weights sum to 1, so
        the layer then starts close to the dense block.
        """
        dense_hidden, dim = fc1_w.shape
        if dim != self.dim or fc2_w.shape != (self.dim, dense_hidden):
            raise ConfigError(
                f"dense MLP weights of shape fc1 {tuple(fc1_w.shape)}, fc2 {tuple(fc2_w.shape)} do not fit a MoE "
                f"layer of width {self.dim}"
            )
        scale = dense_hidden / self.hidden
        for e in range(self.num_experts):
            start = e * dense_hidden // self.num_experts
            units = (start + torch.arange(self.hidden, device=fc1_w.device)) % dense_hidden
            self.fc1_weight[e].copy_(fc1_w[units])
            self.fc1_bias[e].copy_(fc1_b[units])
            self.fc2_weight[e].copy_(fc2_w[:, units] * scale)
            self.fc2_bias[e].copy_(fc2_b)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.act)

    def route(self, x_TD: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return router logits and probabilities ``[T, E]`` (float32), top-k gate weights and expert ids ``[T, k]``.

        Gate weights are the softmax probabilities of the chosen experts renormalised to sum to 1.
        """
        logits_TE = self.router(x_TD, batch_size, self.context)
        probs_TE = logits_TE.softmax(dim=-1)
        top_probs_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        weights_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)
        return logits_TE, probs_TE, weights_TK, experts_TK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.shape[0]
        x_TD = x.reshape(-1, self.dim)
        logits_TE, probs_TE, weights_TK, experts_TK = self.route(x_TD, batch_size)
        if self.dispatch == "sorted":
            y_TD = sorted_dispatch(x_TD, weights_TK, experts_TK, self.expert_weights())
        elif self.dispatch == "every_expert":
            y_TD = every_expert_dispatch(x_TD, weights_TK, experts_TK, self.expert_weights())
        else:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; choose one of {', '.join(DISPATCH_MODES)}")

        task = self.context.task or "unknown"
        # Activation checkpointing reruns this forward inside the backward pass; count each batch once.
        recomputing = torch._C._current_graph_task_id() != -1
        record = self.context.record and not recomputing
        training_step = self.training and torch.is_grad_enabled() and record
        if torch.is_grad_enabled():
            mi = self.mutual_information(task, probs_TE, record=training_step) if self.compute_mi else logits_TE.new_zeros(())
            self.last_aux = {"balance": load_balancing_loss(probs_TE, experts_TK), "z": router_z_loss(logits_TE), "mi": mi}
        else:
            self.last_aux = {}  # no auxiliary losses are needed without gradients
        if self.record_stats and record:
            self.stats.update(task, probs_TE.detach(), experts_TK)
        return y_TD.view(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, top_k={self.top_k}"
