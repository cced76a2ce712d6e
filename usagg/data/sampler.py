"""Multi-task batch sampling: one task per step, chosen uniformly, in proportion to size, or temperature-scaled.

Task probabilities are ``p_t ∝ n_t ** (1 / T)`` for temperature sampling, so T = 1 is proportional sampling and
T -> infinity is uniform. Each task walks through its own seeded permutations of its indices, epoch after epoch.
Under DDP every rank draws the same task at a step and takes its own slice of that step's
``batch_size * world_size`` indices, so ranks never share a sample within a step (unless the task has fewer images
than that). The sequence depends only on the seed and the step, so ``load_state_dict`` resumes it exactly.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

Sampling = Literal["uniform", "proportional", "temperature"]


def task_probabilities(task_sizes: Mapping[str, int], sampling: Sampling, temperature: float = 2.0) -> dict[str, float]:
    """Return the probability of drawing each task at a step."""
    sizes = np.array([float(n) for n in task_sizes.values()])
    if sampling == "uniform":
        weights = np.ones_like(sizes)
    elif sampling == "proportional":
        weights = sizes
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = sizes ** (1.0 / temperature)
    else:
        raise ValueError(f"unknown task sampling {sampling!r}; use uniform, proportional or temperature")
    return dict(zip(task_sizes, (weights / weights.sum()).tolist()))


class MultiTaskBatchSampler:
    """Yields ``(task, indices)`` per step for ``num_steps`` steps, single-task batches, deterministic from ``seed``."""

    def __init__(
        self,
        task_sizes: Mapping[str, int],
        batch_size: int,
        num_steps: int,
        sampling: Sampling = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        empty = [t for t, n in task_sizes.items() if n <= 0]
        if empty or not task_sizes:
            raise ValueError(f"every task needs at least one training image; empty: {', '.join(empty) or 'no tasks given'}")
        if batch_size < 1 or num_steps < 0:
            raise ValueError(f"batch_size must be >= 1 and num_steps >= 0, got {batch_size} and {num_steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.task_sizes = dict(task_sizes)
        self.tasks = list(self.task_sizes)
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.sampling = sampling
        self.temperature = temperature
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.probabilities = task_probabilities(self.task_sizes, sampling, temperature)
        self._cumulative = np.cumsum([self.probabilities[t] for t in self.tasks])
        self._step = 0  # steps delivered to the consumer
        self._loader_tracks_consumption = False

    # --- the pure functions of (seed, step) that make the sequence reproducible ---------------------------

    def task_at(self, step: int) -> str:
        """Return the task drawn at ``step``."""
        u = np.random.default_rng([self.seed, 0x7A5C, step]).random()
        return self.tasks[min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.tasks) - 1)]

    def _permutation(self, task: str, epoch: int) -> np.ndarray:
        key = zlib.crc32(task.encode("utf-8"))
        return np.random.default_rng([self.seed, key, epoch]).permutation(self.task_sizes[task])

    def _draws_before(self, step: int) -> dict[str, int]:
        """Return how many steps drew each task before ``step``."""
        draws = {t: 0 for t in self.tasks}
        for s in range(step):
            draws[self.task_at(s)] += 1
        return draws

    def _indices(self, task: str, draw: int) -> list[int]:
        """Return this rank's indices for the ``draw``-th step of ``task``.

        A step takes ``batch_size * world_size`` indices from one permutation, so the ranks' indices never overlap.
        The leftover at the end of a permutation is skipped, and it differs from epoch to epoch. A task with fewer
        images than one step reads on across permutations instead, and may repeat images within a step.
        """
        size = self.task_sizes[task]
        per_step = self.batch_size * self.world_size
        start = self.rank * self.batch_size
        steps_per_epoch = size // per_step
        if steps_per_epoch >= 1:
            epoch, offset = divmod(draw, steps_per_epoch)
            begin = offset * per_step + start
            return [int(i) for i in self._permutation(task, epoch)[begin : begin + self.batch_size]]
        out: list[int] = []
        position = draw * per_step + start
        while len(out) < self.batch_size:
            epoch, offset = divmod(position, size)
            chunk = self._permutation(task, epoch)[offset : offset + self.batch_size - len(out)]
            out.extend(int(i) for i in chunk)
            position += len(chunk)
        return out

    # --- iteration and state ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return max(0, self.num_steps - self._step)

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        start = self._step
        draws = self._draws_before(start)
        for step in range(start, self.num_steps):
            task = self.task_at(step)
            indices = self._indices(task, draws[task])
            draws[task] += 1
            if not self._loader_tracks_consumption:
                self._step = step + 1
            yield task, indices

    def mark_consumed(self, step: int) -> None:
        """Record that the consumer received the batch of ``step - 1`` (used by loaders that prefetch)."""
        self._step = step

    @property
    def step(self) -> int:
        return self._step

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "seed": self.seed,
            "sampling": self.sampling,
            "temperature": self.temperature,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "task_sizes": dict(self.task_sizes),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the sequence saved by ``state_dict``; raises ``ValueError`` if the sampler was built differently."""
        for key in ("seed", "sampling", "temperature", "batch_size", "world_size", "task_sizes"):
            if key in state and state[key] != getattr(self, key) and not (key == "task_sizes" and dict(state[key]) == self.task_sizes):
                raise ValueError(
                    f"cannot resume the task sampler: saved {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    "resume with the same study settings and data"
                )
        step = int(state["step"])
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"saved sampler step {step} is outside 0..{self.num_steps}")
        self._step = step
