"""One record of the one-run affinity estimators, computed inside a training loop and restored exactly.

Meant to be called every k steps during unified training; the trainer averages the records into affinity.json.
NOTE: under DDP, pass the unwrapped module, since these functions compute gradients with ``torch.autograd.grad``
outside the DDP reducer.

Lookahead (TAG, Fifty et al., NeurIPS 2021): for a source task i, apply the optimizer's real update of the
shared parameters θ_s from task i's loss alone. The update includes AdamW moments, bias correction and weight
decay, plus gradient clipping when the trainer clips. Then, for every target task j,

    Z(i→j) = 1 − L_j(θ_s after the step on i) / L_j(θ_s after the reference step),

and restore θ_s, the optimizer state, the gradients, the buffers and the RNG state before the next source.
Task-specific parameters (heads) are not stepped: only ``shared_params`` receive a gradient. The reference
step (``reference="momentum"``, the default) is the optimizer's step with a zero gradient. It moves θ_s by
AdamW's first moment and weight decay alone. With β1 = 0.9, about nine tenths of every step comes from the
moment of earlier batches, the same for every source, so measured from θ_s each target's column would share one
offset that says nothing about the source. ``reference="current"`` measures from θ_s itself, as written in
Fifty et al. for a plain gradient step.

Gradient similarity on the shared parameters: cosine similarity of the task gradients, and the magnitude
similarity 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) of Yu et al., NeurIPS 2020 (PCGrad).

Fisher embedding (Task2Vec, Achille et al., ICCV 2019): the diagonal of the empirical Fisher information of
task i's loss with respect to the shared parameters, F_i = E_x[(∂L_i(x)/∂θ_s)²] over single training images,
averaged over the weights of each output unit (row of a weight matrix), as Task2Vec averages over the weights of
a filter. Two tasks are similar when the same units carry their information:

    A(i, j) = Pearson correlation of log F_i and log F_j over the units,

on the log scale because the Fisher diagonal spans orders of magnitude between layers, so that on the linear
scale a few units would decide the value. The matrix is symmetric.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

LossFn = Callable[[str, Any], torch.Tensor]


def _clone_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v) for v in value)
    return value


@contextlib.contextmanager
def preserved_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, params: Sequence[torch.nn.Parameter]
) -> Iterator[Callable[[], None]]:
    """Snapshot parameters, gradients, optimizer state, buffers and RNG; restore them on exit.

    Yields a function that restores the snapshot early (used between source tasks). Every parameter in the
    optimizer's groups is covered, not only ``params``, so a probe cannot leak into the heads either.
    """
    all_params: list[torch.nn.Parameter] = list(params)
    if optimizer is not None:
        seen = {id(p) for p in all_params}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    all_params.append(p)
                    seen.add(id(p))
    values = [p.detach().clone() for p in all_params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in all_params]
    opt_state = {p: _clone_state(optimizer.state[p]) for p in all_params if optimizer is not None and p in optimizer.state}
    groups = [{k: _clone_state(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else []
    # NOTE: state kept outside parameters and buffers (e.g. Python-side routing counters) is not restored, so
    # the caller resets such counters itself if the probe's forward passes must not count.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training

    def restore() -> None:
        with torch.no_grad():
            for p, v, g in zip(all_params, values, grads):
                p.copy_(v)
                if g is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            for b, v in buffers:
                b.copy_(v)
        if optimizer is not None:
            for p in all_params:
                if p in opt_state:
                    optimizer.state[p] = _clone_state(opt_state[p])
                elif p in optimizer.state:
                    del optimizer.state[p]
            for group, saved in zip(optimizer.param_groups, groups):
                group.update(_clone_state(saved))
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)

    try:
        yield restore
    finally:
        restore()


def _task_gradients(
    tasks: Sequence[str], batches: Mapping[str, Any], loss_fn: LossFn, shared: Sequence[torch.nn.Parameter]
) -> list[list[torch.Tensor | None]]:
    out = []
    for task in tasks:
        loss = loss_fn(task, batches[task])
        grads = torch.autograd.grad(loss, list(shared), allow_unused=True)
        out.append([None if g is None else g.detach() for g in grads])
    return out


@torch.no_grad()
def _losses(tasks: Sequence[str], batches: Mapping[str, Any], loss_fn: LossFn, rng: tuple[Any, Any]) -> np.ndarray:
    """Evaluate every task's loss from the same RNG state, so dropout masks match between calls."""
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    return np.array([float(loss_fn(task, batches[task]).detach()) for task in tasks], dtype=float)


def _rng_state() -> tuple[Any, Any]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


LOOKAHEAD_REFERENCES = ("momentum", "current")


def lookahead_affinity(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Mapping[str, Any],
    loss_fn: LossFn,
    shared_params: Sequence[torch.nn.Parameter],
    clip_grad_norm: float | None = None,
    reference: str = "momentum",
) -> np.ndarray:
    """Return Z[i, j] = 1 − L_j(after the real optimizer step on task i) / L_j(reference), for tasks in ``batches``.

    ``loss_fn(task, batch)`` runs the forward pass and returns the task's scalar loss. Rows follow the order of
    ``batches`` (source tasks), columns the same order (target tasks). The reference is the loss after the
    optimizer's step with a zero gradient (``"momentum"``) or the current loss (``"current"``). Everything the
    probe touches is restored exactly afterwards (see :func:`preserved_training_state`). A target whose
    reference loss is 0 gets NaN.
    """
    if reference not in LOOKAHEAD_REFERENCES:
        raise ValueError(f"lookahead reference {reference!r} invalid; choose from {', '.join(LOOKAHEAD_REFERENCES)}")
    tasks = list(batches)
    shared = list(shared_params)
    with preserved_training_state(model, optimizer, shared) as restore:
        rng = _rng_state()
        if reference == "momentum":
            _step_shared(optimizer, shared, [torch.zeros_like(p) for p in shared], clip_grad_norm=None)
        base = _losses(tasks, batches, loss_fn, rng)
        restore()
        z = np.full((len(tasks), len(tasks)), np.nan)
        for i, source in enumerate(tasks):
            optimizer.zero_grad(set_to_none=True)
            (grads,) = _task_gradients([source], batches, loss_fn, shared)
            _step_shared(optimizer, shared, grads, clip_grad_norm)
            after = _losses(tasks, batches, loss_fn, rng)
            with np.errstate(divide="ignore", invalid="ignore"):
                z[i] = np.where(base != 0, 1.0 - after / base, np.nan)
            restore()
    return z


def _step_shared(
    optimizer: torch.optim.Optimizer,
    shared: Sequence[torch.nn.Parameter],
    grads: Sequence[torch.Tensor | None],
    clip_grad_norm: float | None,
) -> None:
    """Take one optimizer step that moves only ``shared``, with ``grads`` as their gradients."""
    shared_ids = {id(p) for p in shared}
    for p, g in zip(shared, grads):
        p.grad = None if g is None else g.clone()
    # Parameters outside the shared set keep grad None, so the optimizer leaves them unchanged.
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in shared_ids:
                p.grad = None
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(shared, clip_grad_norm)
    optimizer.step()


def gradient_affinity(
    model: torch.nn.Module,
    batches: Mapping[str, Any],
    loss_fn: LossFn,
    shared_params: Sequence[torch.nn.Parameter],
) -> tuple[np.ndarray, np.ndarray]:
    """Return the cosine-similarity and magnitude-similarity matrices of the task gradients on ``shared_params``.

    Gradients, buffers and RNG state are restored afterwards. A task with a zero gradient gets NaN cosines.
    """
    tasks = list(batches)
    shared = list(shared_params)
    with preserved_training_state(model, None, shared):
        grads = _task_gradients(tasks, batches, loss_fn, shared)
    flat = torch.stack([
        torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(gs, shared)])
        for gs in grads
    ])
    norms = flat.norm(dim=1)
    dots = flat @ flat.T
    outer = norms[:, None] * norms[None, :]
    cosine = torch.where(outer > 0, dots / outer.clamp_min(1e-300), torch.full_like(dots, float("nan")))
    squares = norms[:, None] ** 2 + norms[None, :] ** 2
    magnitude = torch.where(squares > 0, 2 * outer / squares.clamp_min(1e-300), torch.full_like(dots, float("nan")))
    return cosine.cpu().numpy(), magnitude.cpu().numpy()


def fisher_embeddings(
    model: torch.nn.Module,
    samples: Mapping[str, Sequence[Any]],
    loss_fn: LossFn,
    shared_params: Sequence[torch.nn.Parameter],
) -> np.ndarray:
    """Return the per-unit diagonal Fisher of each task, shape (tasks, units), in the order of ``samples``.

    ``samples[task]`` is a list of batches of one image each, and ``loss_fn(task, batch)`` returns that image's
    loss. A parameter of shape (out, ...) contributes ``out`` units, each the mean of its squared gradients over
    the other dimensions. A 1-D parameter contributes one unit per entry. Gradients, buffers and RNG state are
    restored.
    """
    shared = list(shared_params)
    embeddings = []
    with preserved_training_state(model, None, shared):
        for task, batches in samples.items():
            if not batches:
                raise ValueError(f"Fisher embedding of task {task!r} needs at least one image")
            squares = [torch.zeros_like(p, dtype=torch.float64) for p in shared]
            for batch in batches:
                (grads,) = _task_gradients([task], {task: batch}, loss_fn, shared)
                for total, g in zip(squares, grads):
                    if g is not None:
                        total += g.double() ** 2
            units = [_unit_means(total / len(batches)) for total in squares]
            embeddings.append(torch.cat(units).cpu().numpy())
    return np.stack(embeddings)


def _unit_means(fisher: torch.Tensor) -> torch.Tensor:
    if fisher.dim() <= 1:
        return fisher.reshape(-1)
    return fisher.reshape(fisher.shape[0], -1).mean(dim=1)


def fisher_affinity(embeddings_TU: np.ndarray) -> np.ndarray:
    """Return A[i, j] = Pearson correlation of log F_i and log F_j (module docstring), with a NaN diagonal.

    Units whose Fisher is 0 for every task carry no information and are dropped. A 0 left for some tasks is
    raised to the smallest positive value in the embeddings, so its logarithm is finite. A task whose Fisher
    is constant over the units gets NaN.
    """
    fisher = np.asarray(embeddings_TU, dtype=float)
    n_tasks = fisher.shape[0]
    fisher = fisher[:, np.any(fisher > 0, axis=0)]
    matrix = np.full((n_tasks, n_tasks), np.nan)
    if fisher.shape[1] < 2:
        return matrix
    logs = np.log(np.maximum(fisher, fisher[fisher > 0].min()))
    centred = logs - logs.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        matrix = (centred @ centred.T) / np.outer(norms, norms)
    matrix[~np.isfinite(matrix)] = np.nan
    np.fill_diagonal(matrix, np.nan)
    return matrix
