"""MoE layer: dispatch equivalence, routing modes, auxiliary losses and routing statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from usagg.model.aux_losses import (
    TaskExpertMutualInformation,
    load_balancing_loss,
    router_z_loss,
)
from usagg.model.moe import MoEMlp, every_expert_dispatch, sorted_dispatch
from usagg.model.router import (
    PerTaskRouter,
    RoutingContext,
    TaskRouter,
    TokenTaskRouter,
)
from usagg.model.routing_stats import RoutingStatsAccumulator, summarize_counts

DIM, HIDDEN, EXPERTS, TOP_K, TASK_DIM = 16, 12, 6, 2, 8


def _layer(router: nn.Module, seed: int = 0) -> MoEMlp:
    torch.manual_seed(seed)
    layer = MoEMlp(DIM, HIDDEN, EXPERTS, TOP_K, router)
    with torch.no_grad():  # non-zero biases so that bias gradients are checked too
        layer.fc1_bias.normal_(0, 0.1)
        layer.fc2_bias.normal_(0, 0.1)
    return layer


def _token_task_layer(seed: int = 0) -> MoEMlp:
    layer = _layer(TokenTaskRouter(DIM, TASK_DIM, EXPERTS), seed)
    with torch.no_grad():
        layer.router.proj.weight.normal_(0, 0.5)  # varied routing across tokens
    layer.context.task = "a"
    layer.context.task_embedding = nn.Parameter(torch.randn(TASK_DIM))
    return layer


def _per_token_reference(layer: MoEMlp, x_TD, weights_TK, experts_TK):
    """Plain loop over tokens and their chosen experts."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(DIM, dtype=x_TD.dtype)
        for j in range(experts_TK.shape[1]):
            e = int(experts_TK[t, j])
            hidden = layer.act(x_TD[t] @ layer.fc1_weight[e].T + layer.fc1_bias[e])
            y = y + weights_TK[t, j] * (hidden @ layer.fc2_weight[e].T + layer.fc2_bias[e])
        rows.append(y)
    return torch.stack(rows)


def _grads(layer: MoEMlp, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    out["x"] = x.grad.clone()
    out["task_embedding"] = layer.context.task_embedding.grad.clone()
    return out


def test_sorted_dispatch_matches_per_token_loop():
    layer = _token_task_layer()
    x = torch.randn(3, 7, DIM, dtype=torch.float64)
    layer.double()
    layer.context.task_embedding = nn.Parameter(layer.context.task_embedding.detach().double())
    upstream = torch.randn(3, 7, DIM, dtype=torch.float64)

    x_fast = x.clone().requires_grad_()
    out_fast = layer(x_fast)
    (out_fast * upstream).sum().backward()
    grads_fast = _grads(layer, x_fast)
    layer.zero_grad()
    layer.context.task_embedding.grad = None

    x_ref = x.clone().requires_grad_()
    _, _, weights_TK, experts_TK = layer.route(x_ref.reshape(-1, DIM), 3)
    out_ref = _per_token_reference(layer, x_ref.reshape(-1, DIM), weights_TK, experts_TK).view_as(x)
    (out_ref * upstream).sum().backward()
    grads_ref = _grads(layer, x_ref)

    assert len(set(experts_TK.flatten().tolist())) > 2, "routing should spread over several experts"
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-10)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-9, atol=1e-10, msg=name)


def test_every_expert_baseline_matches_sorted():
    layer = _token_task_layer(seed=1)
    x_TD = torch.randn(20, DIM)
    _, _, weights_TK, experts_TK = layer.route(x_TD, 4)
    fast = sorted_dispatch(x_TD, weights_TK, experts_TK, layer.expert_weights())
    naive = every_expert_dispatch(x_TD, weights_TK, experts_TK, layer.expert_weights())
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-6)


def test_experts_equal_dense_mlp_when_full_width():
    torch.manual_seed(0)
    dense_fc1, dense_fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
    layer = _token_task_layer()
    layer.load_dense(dense_fc1.weight, dense_fc1.bias, dense_fc2.weight, dense_fc2.bias)
    x = torch.randn(2, 5, DIM)
    dense = dense_fc2(nn.functional.gelu(dense_fc1(x)))
    # Expert width equals the dense width here, so every expert is the dense MLP with its units rotated.
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


def test_expert_slices_scale_second_layer():
    torch.manual_seed(0)
    dense_fc1, dense_fc2 = nn.Linear(DIM, 24), nn.Linear(24, DIM)
    layer = _token_task_layer()
    layer.load_dense(dense_fc1.weight, dense_fc1.bias, dense_fc2.weight, dense_fc2.bias)
    # 24 dense units, 6 experts: expert 1 starts at unit 4 and takes 12 units; fc2 is scaled by 24 / 12.
    torch.testing.assert_close(layer.fc1_weight[1], dense_fc1.weight[4:16])
    torch.testing.assert_close(layer.fc2_weight[1], dense_fc2.weight[:, 4:16] * 2)
    torch.testing.assert_close(layer.fc2_bias[5], dense_fc2.bias)
    wrapped = torch.cat([torch.arange(20, 24), torch.arange(0, 8)])
    torch.testing.assert_close(layer.fc1_weight[5], dense_fc1.weight[wrapped])


def test_gradients_reach_only_selected_experts():
    layer = _layer(TaskRouter(TASK_DIM, EXPERTS))
    layer.context.task = "a"
    layer.context.task_embedding = nn.Parameter(torch.randn(TASK_DIM))
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0, 4.0, 0.0]))
    layer(torch.randn(2, 4, DIM)).sum().backward()
    for e in range(EXPERTS):
        norm = layer.fc1_weight.grad[e].abs().sum() + layer.fc2_weight.grad[e].abs().sum() + layer.fc2_bias.grad[e].abs().sum()
        if e in (1, 4):
            assert norm > 0, f"selected expert {e} got no gradient"
        else:
            assert norm == 0, f"unselected expert {e} got a gradient"


def test_task_embedding_changes_routing():
    layer = _token_task_layer()
    x_TD = torch.randn(64, DIM)
    with torch.no_grad():
        layer.router.proj.weight[:, DIM:].normal_(0, 2.0)
    layer.context.task_embedding = torch.randn(TASK_DIM)
    _, _, _, experts_a = layer.route(x_TD, 8)
    layer.context.task_embedding = torch.randn(TASK_DIM)
    _, _, _, experts_b = layer.route(x_TD, 8)
    assert not torch.equal(experts_a, experts_b)


def test_task_router_routes_every_token_alike():
    layer = _layer(TaskRouter(TASK_DIM, EXPERTS))
    layer.context.task = "a"
    layer.context.task_embedding = torch.randn(TASK_DIM)
    _, probs_TE, weights_TK, experts_TK = layer.route(torch.randn(30, DIM), 3)
    assert (experts_TK == experts_TK[0]).all()
    assert (weights_TK == weights_TK[0]).all()
    assert (probs_TE == probs_TE[0]).all()


def test_per_task_router_uses_task_gate():
    router = PerTaskRouter(DIM, EXPERTS, ["a", "b.c"])
    context = RoutingContext(task="b.c")
    x_TD = torch.randn(5, DIM)
    gate = router.gates["b%2Ec"]
    torch.testing.assert_close(router(x_TD, 1, context), gate(x_TD))
    with pytest.raises(KeyError, match="no gate for task 'zzz'"):
        router(x_TD, 1, RoutingContext(task="zzz"))


def test_balance_loss_larger_when_imbalanced():
    tokens = 40
    uniform_probs = torch.full((tokens, EXPERTS), 1 / EXPERTS)
    spread = torch.stack([torch.arange(tokens) % EXPERTS, (torch.arange(tokens) + 1) % EXPERTS], dim=1)
    balanced = load_balancing_loss(uniform_probs, spread)
    crowded_probs = torch.zeros(tokens, EXPERTS)
    crowded_probs[:, :2] = 0.5
    crowded = load_balancing_loss(crowded_probs, torch.tensor([[0, 1]]).expand(tokens, 2))
    assert balanced.item() == pytest.approx(1.0)
    assert crowded.item() == pytest.approx(EXPERTS / 2)
    assert crowded > balanced


def test_z_loss_known_value():
    logits = torch.zeros(3, 4)
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_mutual_information_pools_tasks_over_window():
    mi = TaskExpertMutualInformation(window=4)
    one_hot = torch.eye(4)
    # A single task in the window: no information about the task, loss 0.
    assert mi("a", one_hot[[0, 0]], record=True).item() == 0.0
    # Task b uses a different expert than a: the task is fully determined by the expert, H(T|E) = 0.
    disjoint = mi("b", one_hot[[1, 1]], record=False)
    assert disjoint.item() == pytest.approx(0.0, abs=1e-6)
    # Task b using a's expert: the expert carries no information about the task, H(T|E) = log 2.
    shared = mi("b", one_hot[[0, 0]], record=False)
    assert shared.item() == pytest.approx(math.log(2), abs=1e-6)


def test_mutual_information_gradient_flows_to_live_batch():
    mi = TaskExpertMutualInformation(window=4)
    mi("a", torch.softmax(torch.randn(6, 4), dim=-1), record=True)
    logits = torch.randn(6, 4, requires_grad=True)
    mi("b", logits.softmax(dim=-1), record=True).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert len(mi.window) == 2


def test_routing_summary_known_values():
    summary = summarize_counts([6, 0, 2, 2, 0, 0, 0, 0, 0, 10], entropy=0.5, num_tokens=10)
    assert summary["unused_experts"] == 6
    assert summary["top20_share"] == pytest.approx(16 / 20)  # busiest 2 of 10 experts
    expected_usage = -(0.3 * math.log(0.3) + 2 * 0.1 * math.log(0.1) + 0.5 * math.log(0.5))
    assert summary["usage_entropy"] == pytest.approx(expected_usage)
    assert summary["num_tokens"] == 10


def test_routing_accumulator_counts_per_task():
    stats = RoutingStatsAccumulator(num_experts=3)
    probs = torch.full((4, 3), 1 / 3)
    stats.update("a", probs, torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]]))
    stats.update("a", probs, torch.tensor([[2, 1]]).expand(4, 2))
    stats.update("b", probs, torch.tensor([[1, 2]]).expand(4, 2))
    summary = stats.summary()
    assert summary["a"]["tokens_per_expert"] == [4, 6, 6]
    assert summary["a"]["num_tokens"] == 8
    assert summary["a"]["entropy"] == pytest.approx(math.log(3))
    assert summary["b"]["tokens_per_expert"] == [0, 4, 4]
    assert summary["b"]["unused_experts"] == 1
    stats.reset()
    assert stats.summary() == {}


def test_layer_without_task_raises():
    layer = _layer(TokenTaskRouter(DIM, TASK_DIM, EXPERTS))
    with pytest.raises(RuntimeError, match="task embedding"):
        layer(torch.randn(1, 3, DIM))
