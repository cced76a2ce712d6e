"""Recording of lookahead and gradient affinity during unified training, averaged into affinity.json."""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usagg.config import StudyConfig
from usagg.io import write_json_atomic
from usagg.train.plan import RunSpec
from usagg.train.rundata import RunRecords
from usagg.train.rundir import AFFINITY_FILE

logger = logging.getLogger(__name__)

_KEYS = ("lookahead", "gradient_cosine", "gradient_magnitude")


class _Mean:
    """NaN-aware running mean of a task x task matrix, with every record and its step kept for the trajectory."""

    def __init__(self, n: int) -> None:
        self.total = np.zeros((n, n))
        self.count = np.zeros((n, n))
        self.records = 0
        self.seconds = 0.0
        self.history: list[tuple[int, np.ndarray]] = []

    def add(self, matrix: np.ndarray, seconds: float, step: int) -> None:
        finite = np.isfinite(matrix)
        self.total[finite] += matrix[finite]
        self.count[finite] += 1
        self.records += 1
        self.seconds += seconds
        self.history.append((step, matrix.copy()))

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


class AffinityRecorder:
    """Every k steps, draws one fixed-size batch per task and calls the analysis probes on the live model.

    Batches come from un-augmented copies of the training images, picked by a generator seeded from the run seed
    and the step, so recording never draws from the training random stream.
    """

    def __init__(self, study: StudyConfig, spec: RunSpec, records: RunRecords, model: torch.nn.Module, device: torch.device) -> None:
        from usagg.data.dataset import TaskDataset

        cfg = study.train
        self.tasks = list(spec.tasks)
        self.model = model
        self.device = device
        self.seed = spec.seed
        self.lookahead_every = cfg.lookahead_every
        self.lookahead_reference = cfg.lookahead_reference
        self.gradient_every = cfg.gradient_affinity_every
        self.batch_size = cfg.affinity_batch_size or cfg.batch_size
        self.datasets = {t: TaskDataset(records.cards[t], records.split(t, "train"), study.data, train=False) for t in self.tasks}
        self.means = {key: _Mean(len(self.tasks)) for key in _KEYS}

    @classmethod
    def maybe_create(cls, study: StudyConfig, spec: RunSpec, records: RunRecords, model, device) -> "AffinityRecorder | None":
        cfg = study.train
        if spec.paradigm != "unified" or not (cfg.lookahead_every or cfg.gradient_affinity_every):
            return None
        if len(spec.tasks) < 2:
            logger.info("%s: affinity needs at least two tasks; not recorded", spec.run_id)
            return None
        return cls(study, spec, records, model, device)

    def _batches(self, step: int) -> dict[str, Any]:
        from usagg.data.dataset import collate_task_batch
        from usagg.train.loop import to_device

        batches = {}
        for task, dataset in self.datasets.items():
            generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{step}:{task}".encode()))
            n = min(self.batch_size, len(dataset))
            indices = torch.randperm(len(dataset), generator=generator)[:n].tolist()
            batch = collate_task_batch([dataset[i] for i in indices])
            batches[task] = to_device(batch, self.device)
        return batches

    def _loss(self, task: str, batch: dict) -> torch.Tensor:
        outputs = self.model(batch["image"], task)
        loss, _ = self.model.compute_loss(outputs, batch["target"], task)
        return loss

    def maybe_record(self, step: int, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        from usagg.analysis.affinity_probe import gradient_affinity, lookahead_affinity

        due_lookahead = bool(self.lookahead_every) and step % self.lookahead_every == 0
        due_gradient = bool(self.gradient_every) and step % self.gradient_every == 0
        if not (due_lookahead or due_gradient):
            return
        batches = self._batches(step)
        shared = self.model.shared_parameters()
        # NOTE: probe forward passes add to the model's routing counters, so the next routing log line of the
        # training log includes a few probe batches.
        if due_lookahead:
            start = time.perf_counter()
            z = lookahead_affinity(
                self.model, optimizer, batches, self._loss, shared, clip_grad_norm=grad_clip, reference=self.lookahead_reference
            )
            self.means["lookahead"].add(z, time.perf_counter() - start, step)
        if due_gradient:
            start = time.perf_counter()
            cosine, magnitude = gradient_affinity(self.model, batches, self._loss, shared)
            seconds = time.perf_counter() - start
            self.means["gradient_cosine"].add(cosine, seconds / 2, step)
            self.means["gradient_magnitude"].add(magnitude, seconds / 2, step)

    def state_dict(self) -> dict[str, Any]:
        return {key: vars(mean).copy() for key, mean in self.means.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, values in state.items():
            vars(self.means[key]).update({"history": [], **values})  # older checkpoints have no history

    def write(self, run_dir: Path) -> None:
        """Write affinity.json: rows are source tasks, columns target tasks; unrecorded estimators are omitted.

        Each estimator entry contains the mean ``matrix`` and, under ``records``, every recorded matrix with its step.
        """
        data: dict[str, Any] = {"tasks": self.tasks}
        for key, mean in self.means.items():
            if mean.records:
                data[key] = {
                    "matrix": _json_matrix(mean.mean()),
                    "n_records": mean.records,
                    "seconds": round(mean.seconds, 3),
                    "records": [{"step": step, "matrix": _json_matrix(m)} for step, m in mean.history],
                }
        if "lookahead" in data:
            data["lookahead"]["reference"] = self.lookahead_reference
        if len(data) > 1:
            write_json_atomic(run_dir / AFFINITY_FILE, data)


def _json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix]
