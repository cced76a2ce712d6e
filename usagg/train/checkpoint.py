"""Checkpoints: safetensors weights plus a torch file with the optimizer, scheduler, sampler and RNG state.

A run keeps two checkpoints in ``<run>/checkpoints/``: ``latest`` (every ``train.checkpoint_every`` steps, for
resuming) and ``best`` (by validation score). Each consists of ``<kind>-<step>.safetensors`` and
``<kind>-<step>.pt``, written atomically, and a pointer ``<kind>.json`` naming them, replaced atomically after both
files are complete. A kill at any moment therefore leaves the previous pointer valid; files that no pointer names
are removed by the next save.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from usagg.errors import ConfigError, TrainingError
from usagg.io import atomic_path, read_json_file, write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
KINDS = ("latest", "best")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the module inside a DistributedDataParallel (or compiled) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as plain Python values and tensors."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | os.PathLike,
    kind: str,
    model: torch.nn.Module,
    step: int,
    training_state: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the ``kind`` checkpoint for ``step`` and return the pointer file.

    ``training_state`` (optimizer, scheduler, sampler, RNG, counters) goes into the ``.pt`` file. ``info`` (for
    example the validation score) goes into the pointer, so it can be read without loading tensors.
    """
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {KINDS}")
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{step:07d}"
    weights_file = folder / f"{stem}.safetensors"
    state_file = folder / f"{stem}.pt"

    with atomic_path(weights_file) as tmp:
        # save_model (not save_file) drops tied duplicates, which save_file rejects.
        save_model(unwrap_model(model), str(tmp), metadata={"step": str(step), "kind": kind})
    with atomic_path(state_file) as tmp:
        torch.save({"step": step, **training_state}, tmp)
    pointer = folder / f"{kind}.json"
    write_json_atomic(pointer, {"step": step, "weights": weights_file.name, "state": state_file.name, **(info or {})})
    _remove_unreferenced(folder, kind, keep={weights_file.name, state_file.name})
    return pointer


def _remove_unreferenced(folder: Path, kind: str, keep: set[str]) -> None:
    for path in folder.glob(f"{kind}-*"):
        if path.name not in keep and path.suffix in (".safetensors", ".pt"):
            path.unlink(missing_ok=True)


def read_pointer(run_dir: str | os.PathLike, kind: str) -> dict[str, Any] | None:
    """Return the ``kind`` pointer of a run, or None when that checkpoint was never written."""
    pointer = checkpoint_dir(run_dir) / f"{kind}.json"
    if not pointer.exists():
        return None
    data = read_json_file(pointer, "the checkpoint pointer", fix="delete it to start over", error=TrainingError)
    for key in ("step", "weights", "state"):
        if not isinstance(data, dict) or key not in data:
            raise TrainingError(f"{pointer}: checkpoint pointer lacks {key!r}; delete it to start over")
    return data


# Checkpoints a run keeps: the one with the best validation score and the latest one.
CHECKPOINT_KINDS = ("best", "latest")


def check_checkpoint_kind(kind: str | None) -> None:
    """Raise ConfigError unless ``kind`` is None (the study's default) or one of ``CHECKPOINT_KINDS``."""
    if kind is not None and kind not in CHECKPOINT_KINDS:
        raise ConfigError(f"checkpoint {kind!r} is invalid; use {' or '.join(CHECKPOINT_KINDS)}")


def load_weights(model: torch.nn.Module, run_dir: str | os.PathLike, kind: str = "best") -> dict[str, Any]:
    """Load the ``kind`` checkpoint's weights into ``model`` (falling back from best to latest); return its pointer."""
    check_checkpoint_kind(kind)
    pointer = read_pointer(run_dir, kind)
    if pointer is None and kind == "best":
        pointer = read_pointer(run_dir, "latest")
        kind = "latest"
    if pointer is None:
        raise TrainingError(
            f"{checkpoint_dir(run_dir)}: no checkpoint found; train the run first (`usagg train STUDY.yaml`)"
        )
    weights_file = checkpoint_dir(run_dir) / pointer["weights"]
    if not weights_file.exists():
        raise TrainingError(f"{weights_file}: weights named by {kind}.json are missing; rerun training to rewrite them")
    missing, unexpected = load_model(unwrap_model(model), str(weights_file), strict=False)
    if missing or unexpected:
        raise TrainingError(
            f"{weights_file}: weights do not fit the model built from the run's config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
            "was config.yaml edited after training?"
        )
    return {"kind": kind, **pointer}


def load_training_state(run_dir: str | os.PathLike, kind: str = "latest") -> dict[str, Any] | None:
    """Return the ``.pt`` training state of the ``kind`` checkpoint, or None when there is none."""
    pointer = read_pointer(run_dir, kind)
    if pointer is None:
        return None
    state_file = checkpoint_dir(run_dir) / pointer["state"]
    if not state_file.exists():
        raise TrainingError(f"{state_file}: training state named by {kind}.json is missing; delete the pointer to restart")
    # The training state is written by the run itself (never downloaded), so full unpickling is acceptable.
    # It contains sampler and RNG state objects that the weights-only loader would reject.
    return torch.load(state_file, map_location="cpu", weights_only=False)
