"""Module names and random streams for per-task parameters."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch


def task_key(task: str) -> str:
    """Return the ``nn.ModuleDict``/``nn.ParameterDict`` key for ``task``.

    PyTorch rejects '.' in module names, and task names may contain it, so '.' becomes '%2E'; task names
    cannot contain '%', so two tasks never share a key.
    """
    return task.replace(".", "%2E")


@contextlib.contextmanager
def task_rng(task: str) -> Iterator[None]:
    """Initialise per-task parameters from a CPU random stream seeded by the global seed and the task name.

    A task's head, embedding and gate then start from the same values whichever other tasks share the
    model, so task-specific, grouped and unified runs of one seed differ only in what they train on.
    """
    seed = (torch.initial_seed() + zlib.crc32(task.encode("utf-8"))) % (2**63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
