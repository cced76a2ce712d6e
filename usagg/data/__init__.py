"""Data layer: source readers, decoding, joint transforms, splits and fractions, and multi-task sampling.

Modules: ``sources`` (one reader per on-disk layout, ``load_task_records``, ``check_task``, ``discover_fmc_uia``),
``decode`` (``read_image``, ``read_mask``), ``transforms``, ``dataset`` (``TaskDataset``, ``collate_task_batch``),
``splits`` (``split_records``, ``select_fraction``), ``sampler`` (``MultiTaskBatchSampler``), ``loader``
(``build_multitask_loader``, ``build_eval_loader``), ``geometry`` (input -> original pixel maps), ``check`` and
``show`` (``usagg data check`` / ``show``). The names below are importable from ``usagg.data`` directly; they are
loaded on first use, so that importing the package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SampleRecord": "usagg.data.record",
    "DataProblem": "usagg.data.problems",
    "load_task_records": "usagg.data.sources",
    "check_task": "usagg.data.sources",
    "discover_fmc_uia": "usagg.data.sources",
    "read_image": "usagg.data.decode",
    "read_mask": "usagg.data.decode",
    "split_records": "usagg.data.splits",
    "select_fraction": "usagg.data.splits",
    "TaskDataset": "usagg.data.dataset",
    "collate_task_batch": "usagg.data.dataset",
    "MultiTaskBatchSampler": "usagg.data.sampler",
    "build_multitask_loader": "usagg.data.loader",
    "build_eval_loader": "usagg.data.loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'usagg.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
