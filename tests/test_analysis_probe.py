"""Lookahead, gradient and Fisher affinity probes on tiny torch models with AdamW."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from usagg.analysis.affinity_probe import fisher_affinity, fisher_embeddings, gradient_affinity, lookahead_affinity


class TinyMultiTask(torch.nn.Module):
    def __init__(self, tasks, shared_head=False):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.drop = torch.nn.Dropout(0.3)
        self.register_buffer("calls", torch.zeros(()))
        names = ["shared"] if shared_head else tasks
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(8, 1) for name in names})
        self.shared_head = shared_head

    def forward(self, x, task):
        self.calls += 1
        head = self.heads["shared" if self.shared_head else task]
        return head(self.drop(torch.relu(self.body(x))))


def make_batches(tasks, same=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator)
    batches = {}
    for k, task in enumerate(tasks):
        target = x.sum(dim=1, keepdim=True) if same else x[:, k : k + 1] * (k + 1)
        batches[task] = (x, target)
    return batches


def snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), [
        None if p.grad is None else p.grad.clone() for p in model.parameters()
    ]


def test_probe_restores_parameters_optimizer_grads_and_rng():
    torch.manual_seed(0)
    tasks = ["a", "b", "c"]
    model = TinyMultiTask(tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    batches = make_batches(tasks)

    def loss_fn(task, batch):
        return torch.nn.functional.mse_loss(model(batch[0], task), batch[1])

    loss_fn("a", batches["a"]).backward()
    optimizer.step()  # the moments now hold real state
    optimizer.zero_grad()
    loss_fn("b", batches["b"]).backward()  # a half-accumulated gradient the probe must not disturb
    weights, opt_state, grads = snapshot(model, optimizer)
    rng = torch.get_rng_state()

    z = lookahead_affinity(model, optimizer, batches, loss_fn, list(model.body.parameters()))
    cosine, magnitude = gradient_affinity(model, batches, loss_fn, list(model.body.parameters()))

    assert z.shape == (3, 3)
    assert np.isfinite(z).all()
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = optimizer.state_dict()
    assert after["state"].keys() == opt_state["state"].keys()
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][index][name], value), (index, name)
    assert after["param_groups"] == opt_state["param_groups"]
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)
    assert cosine.diagonal() == pytest.approx(np.ones(3))
    assert magnitude.diagonal() == pytest.approx(np.ones(3))


def test_probe_on_fresh_optimizer_leaves_no_state():
    tasks = ["a", "b"]
    model = TinyMultiTask(tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = make_batches(tasks)
    lookahead_affinity(model, optimizer, batches, lambda t, b: ((model(b[0], t) - b[1]) ** 2).mean(), list(model.body.parameters()))
    assert len(optimizer.state) == 0


def test_identical_tasks_give_symmetric_affinity():
    tasks = ["a", "b", "c"]
    model = TinyMultiTask(tasks, shared_head=True)
    model.eval()  # no dropout: a and b are the same function
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = make_batches(tasks, same=True)
    batches["c"] = (batches["c"][0], -batches["c"][1])

    def loss_fn(task, batch):
        return torch.nn.functional.mse_loss(model(batch[0], task), batch[1])

    z = lookahead_affinity(model, optimizer, batches, loss_fn, list(model.body.parameters()))
    assert z[0, 1] == pytest.approx(z[1, 0])
    assert z[0, 0] == pytest.approx(z[1, 1])
    assert z[0, 1] == pytest.approx(z[0, 0])
    assert z[0, 2] == pytest.approx(z[1, 2])


class Scalar(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))


def test_lookahead_known_value_for_first_adamw_step():
    w0, lr, wd, eps = 1.0, 0.1, 0.01, 1e-8
    targets = {"a": 3.0, "b": -1.0}
    model = Scalar(w0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=eps)

    def loss_fn(task, _batch):
        return (model.w - targets[task]) ** 2

    z_current = lookahead_affinity(model, optimizer, {"a": None, "b": None}, loss_fn, [model.w], reference="current")
    z_momentum = lookahead_affinity(model, optimizer, {"a": None, "b": None}, loss_fn, [model.w])
    # With a fresh optimizer the zero-gradient reference step only applies the decoupled weight decay.
    w_reference = w0 * (1 - lr * wd)
    expected_current = np.zeros((2, 2))
    expected_momentum = np.zeros((2, 2))
    for i, source in enumerate(targets):
        grad = 2 * (w0 - targets[source])
        # First AdamW step: bias-corrected m / sqrt(v) is g / |g|; decoupled decay scales w first.
        w1 = w0 * (1 - lr * wd) - lr * grad / (abs(grad) + eps)
        for j, target in enumerate(targets):
            expected_current[i, j] = 1 - (w1 - targets[target]) ** 2 / (w0 - targets[target]) ** 2
            expected_momentum[i, j] = 1 - (w1 - targets[target]) ** 2 / (w_reference - targets[target]) ** 2
    assert z_current == pytest.approx(expected_current, rel=1e-5)
    assert z_momentum == pytest.approx(expected_momentum, rel=1e-5)
    assert model.w.item() == w0


def test_momentum_reference_removes_shared_offset():
    """Tasks on disjoint coordinates do not affect each other once the common momentum step is the reference."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    targets = {"a": (0, 3.0), "b": (1, -2.0)}  # task -> (coordinate it reads, its optimum)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)

    def loss_fn(task, _batch):
        index, target = targets[task]
        return (model.w[index] - target) ** 2

    for _ in range(5):  # build up first and second moments in both coordinates
        optimizer.zero_grad()
        (loss_fn("a", None) + loss_fn("b", None)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    z_current = lookahead_affinity(model, optimizer, dict.fromkeys(targets), loss_fn, [model.w], reference="current")
    z_momentum = lookahead_affinity(model, optimizer, dict.fromkeys(targets), loss_fn, [model.w])
    assert abs(z_current[0, 1]) > 1e-3  # the momentum in coordinate 1 moves task b's loss whatever the source
    assert z_momentum[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert z_momentum[1, 0] == pytest.approx(0.0, abs=1e-7)
    assert z_momentum[0, 0] > 0


def test_lookahead_rejects_unknown_reference():
    model = Scalar(1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reference 'initial' invalid"):
        lookahead_affinity(model, optimizer, {"a": None}, lambda t, _b: model.w**2, [model.w], reference="initial")


def test_gradient_affinity_known_value():
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    targets = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0, 4.0]), "c": torch.tensor([3.0, 2.0])}

    def loss_fn(task, _batch):
        return ((model.w - targets[task]) ** 2).sum()

    cosine, magnitude = gradient_affinity(model, dict.fromkeys(targets), loss_fn, [model.w])
    grads = {t: 2 * (np.array([1.0, 2.0]) - v.numpy()) for t, v in targets.items()}
    ga, gb = grads["a"], grads["b"]
    assert cosine[0, 1] == pytest.approx(ga @ gb / (np.linalg.norm(ga) * np.linalg.norm(gb)))
    na, nb = np.linalg.norm(ga), np.linalg.norm(gb)
    assert magnitude[0, 1] == pytest.approx(2 * na * nb / (na**2 + nb**2))
    assert cosine == pytest.approx(cosine.T)
    assert model.w.grad is None


def test_zero_loss_target_gives_nan():
    model = Scalar(2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    targets = {"a": 2.0, "b": 0.0}
    z = lookahead_affinity(
        model, optimizer, dict.fromkeys(targets), lambda t, _b: (model.w - targets[t]) ** 2, [model.w], reference="current"
    )
    assert math.isnan(z[1, 0])
    assert math.isnan(z[0, 0])
    assert np.isfinite(z[:, 1]).all()


def test_fisher_embeddings_known_value():
    torch.manual_seed(0)
    body = torch.nn.Linear(3, 2, bias=False)
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(4, 1, 3, generator=generator)
    ys = torch.randn(4, generator=generator)
    samples = {"a": [(xs[k], ys[k]) for k in range(4)], "b": [(xs[k], -ys[k]) for k in range(2)]}

    def loss_fn(task, batch):
        x, y = batch
        return (body(x).sum() - y) ** 2

    before = torch.full_like(body.weight, 0.5)
    body.weight.grad = before.clone()
    embeddings = fisher_embeddings(body, samples, loss_fn, [body.weight])
    assert torch.equal(body.weight.grad, before)  # the probe leaves accumulated gradients alone
    assert embeddings.shape == (2, 2)  # one unit per output row
    w = body.weight.detach().numpy()
    for row, (task, pairs) in enumerate(samples.items()):
        # dL/dW[u, k] = 2 r x_k for every output u, with r the residual. The unit value is the mean over k.
        expected = np.mean([
            np.mean((2 * (float((w @ x.numpy()[0]).sum()) - float(y)) * x.numpy()[0]) ** 2) for x, y in pairs
        ])
        assert embeddings[row] == pytest.approx([expected, expected], rel=1e-6), task


def test_fisher_embeddings_need_images():
    body = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="task 'a' needs at least one image"):
        fisher_embeddings(body, {"a": []}, lambda task, batch: body(batch).sum(), list(body.parameters()))


def test_fisher_affinity_is_log_correlation():
    embeddings = np.array([
        [1.0, 2.0, 4.0, 8.0, 0.0],
        [3.0, 6.0, 12.0, 24.0, 0.0],  # a constant multiple of the first: identical on the log scale
        [8.0, 4.0, 2.0, 1.0, 0.0],  # reversed
        [5.0, 5.0, 5.0, 5.0, 0.0],  # constant: no correlation defined
    ])  # the last unit is 0 for every task and is dropped
    matrix = fisher_affinity(embeddings)
    assert np.isnan(np.diag(matrix)).all()
    assert matrix[0, 1] == pytest.approx(1.0)
    assert matrix[0, 2] == pytest.approx(-1.0)
    assert np.isnan(matrix[3, :]).all()
    assert np.isnan(matrix[:, 3]).all()
    assert matrix == pytest.approx(matrix.T, nan_ok=True)
    with_zero = fisher_affinity(np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 2.0]]))
    expected = np.corrcoef(np.log([1.0, 1.0, 2.0]), np.log([1.0, 1.0, 2.0]))[0, 1]  # 0 raised to the minimum, 1
    assert with_zero[0, 1] == pytest.approx(expected)
