"""Per-task routing statistics of one MoE layer, accumulated on the device without host syncs."""

from __future__ import annotations

import math

import torch

TOP_SHARE_FRACTION = 0.2  # "top20_share": share of decisions taken by the busiest 20 % of the experts


def summarize_counts(tokens_per_expert: list[int], entropy: float, num_tokens: int) -> dict:
    """Summarise one task's expert usage in one layer, in the format of ``routing_stats.json``.

    ``tokens_per_expert`` counts top-k decisions, so it sums to ``k * num_tokens``. ``entropy`` is the
    mean per-token entropy of the router distribution (nats); ``usage_entropy`` is the entropy (nats) of
    the expert-usage distribution, at most ``log(E)``.
    """
    num_experts = len(tokens_per_expert)
    total = sum(tokens_per_expert)
    busiest = max(1, math.ceil(TOP_SHARE_FRACTION * num_experts))
    top_share = sum(sorted(tokens_per_expert, reverse=True)[:busiest]) / total if total else float("nan")
    usage_entropy = 0.0
    for count in tokens_per_expert:
        if count:
            share = count / total
            usage_entropy -= share * math.log(share)
    return {
        "tokens_per_expert": [int(c) for c in tokens_per_expert],
        "num_tokens": int(num_tokens),
        "entropy": float(entropy),
        "usage_entropy": usage_entropy if total else float("nan"),
        "unused_experts": sum(1 for c in tokens_per_expert if c == 0),
        "top20_share": top_share,
    }


class RoutingStatsAccumulator:
    """Tokens per expert, router entropy and token counts per task, since the last reset."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._counts: dict[str, torch.Tensor] = {}
        self._entropy_sum: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}

    def reset(self) -> None:
        self._counts.clear()
        self._entropy_sum.clear()
        self._tokens.clear()

    @torch.no_grad()
    def update(self, task: str, probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> None:
        counts_E = torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)
        probs = probs_TE.float()
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        if task in self._counts:
            self._counts[task] += counts_E
            self._entropy_sum[task] += entropy
            self._tokens[task] += probs_TE.shape[0]
        else:
            self._counts[task] = counts_E.clone()
            self._entropy_sum[task] = entropy.double()
            self._tokens[task] = probs_TE.shape[0]

    def summary(self) -> dict[str, dict]:
        """Return ``{task: summary}`` (see :func:`summarize_counts`) for every task seen since the reset."""
        out = {}
        for task, counts_E in self._counts.items():
            tokens = self._tokens[task]
            entropy = float(self._entropy_sum[task]) / tokens if tokens else float("nan")
            out[task] = summarize_counts(counts_E.tolist(), entropy, tokens)
        return out
