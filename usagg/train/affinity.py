"""Recording of the one-run affinity estimators during unified training, written to affinity.json.

Lookahead and gradient similarity are recorded every k steps and averaged; the Fisher affinity is computed
once, on the final weights.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usagg.config import StudyConfig
from usagg.errors import ConfigError, DataError
from usagg.io import read_json_file, write_json_atomic
from usagg.train.plan import RunSpec
from usagg.train.rundata import RunRecords
from usagg.train.rundir import AFFINITY_FILE

logger = logging.getLogger(__name__)

_KEYS = ("lookahead", "gradient_cosine", "gradient_magnitude", "fisher")


class _Mean:
    """Every recorded task x task matrix with its step (the trajectory), their NaN-aware mean and their cost."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seconds = 0.0
        self.history: list[tuple[int, np.ndarray]] = []

    @property
    def records(self) -> int:
        return len(self.history)

    def add(self, matrix: np.ndarray, seconds: float, step: int) -> None:
        self.seconds += seconds
        self.history.append((step, matrix.copy()))

    def mean(self) -> np.ndarray:
        """Return the mean of each entry over the records where it is finite (NaN where it never is)."""
        if not self.history:
            return np.full((self.n, self.n), np.nan)
        stacked = np.stack([matrix for _, matrix in self.history])
        finite = np.isfinite(stacked)
        count = finite.sum(axis=0)
        total = np.where(finite, stacked, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)


class AffinityRecorder:
    """Every k steps, draws one fixed-size batch per task and calls the analysis probes on the live model.

    Batches come from un-augmented copies of the training images, picked by a generator seeded from the run seed
    and the step, so recording never draws from the training random stream. The probes' forward passes leave
    the model's routing statistics alone.
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
        self.fisher_images = cfg.fisher_images
        self.datasets = {t: TaskDataset(records.cards[t], records.split(t, "train"), study.data, train=False) for t in self.tasks}
        self.means = {key: _Mean(len(self.tasks)) for key in _KEYS}

    @classmethod
    def maybe_create(cls, study: StudyConfig, spec: RunSpec, records: RunRecords, model, device) -> "AffinityRecorder | None":
        cfg = study.train
        if spec.paradigm != "unified" or not (cfg.lookahead_every or cfg.gradient_affinity_every or cfg.fisher_images):
            return None
        if len(spec.tasks) < 2:
            logger.info("%s: affinity needs at least two tasks; not recorded", spec.run_id)
            return None
        return cls(study, spec, records, model, device)

    def _indices(self, key: str, task: str, n: int) -> list[int]:
        size = len(self.datasets[task])
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{key}:{task}".encode()))
        return torch.randperm(size, generator=generator)[: min(n, size)].tolist()

    def _batches(self, step: int) -> dict[str, Any]:
        from usagg.data.dataset import collate_task_batch
        from usagg.train.loop import to_device

        batches = {}
        for task, dataset in self.datasets.items():
            batch = collate_task_batch([dataset[i] for i in self._indices(str(step), task, self.batch_size)])
            batches[task] = to_device(batch, self.device)
        return batches

    def _routing_off(self) -> contextlib.AbstractContextManager:
        switch = getattr(self.model, "routing_side_effects_off", None)
        return switch() if switch is not None else contextlib.nullcontext()

    def _loss(self, task: str, batch: dict) -> torch.Tensor:
        outputs = self.model(batch["image"], task)
        loss, _ = self.model.compute_loss(outputs, batch["target"], task)
        return loss

    def maybe_record(self, step: int, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        due_lookahead = bool(self.lookahead_every) and step % self.lookahead_every == 0
        due_gradient = bool(self.gradient_every) and step % self.gradient_every == 0
        if not (due_lookahead or due_gradient):
            return
        batches = self._batches(step)
        shared = self.model.shared_parameters()
        with self._routing_off():
            self._record(step, batches, shared, optimizer, grad_clip, due_lookahead, due_gradient)

    def _record(
        self,
        step: int,
        batches: dict[str, Any],
        shared: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None,
        due_lookahead: bool,
        due_gradient: bool,
    ) -> None:
        from usagg.analysis.affinity_probe import gradient_affinity, lookahead_affinity

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

    def record_fisher(self, step: int) -> None:
        """Compute the Fisher affinity on the current weights from ``fisher_images`` single images per task.

        Called once, after the last training step; does nothing when it is off or already recorded at ``step``.
        The model is in eval mode for the passes (no dropout), and its mode is restored afterwards.
        """
        from usagg.analysis.affinity_probe import fisher_affinity, fisher_embeddings
        from usagg.data.dataset import collate_task_batch
        from usagg.train.loop import to_device

        mean = self.means["fisher"]
        if not self.fisher_images or any(recorded == step for recorded, _ in mean.history):
            return
        start = time.perf_counter()
        samples = {
            task: [to_device(collate_task_batch([dataset[i]]), self.device) for i in self._indices("fisher", task, self.fisher_images)]
            for task, dataset in self.datasets.items()
        }
        with self._routing_off():
            was_training = self.model.training
            self.model.eval()
            try:
                embeddings = fisher_embeddings(self.model, samples, self._loss, self.model.shared_parameters())
            finally:
                self.model.train(was_training)
        mean.add(fisher_affinity(embeddings), time.perf_counter() - start, step)
        counts = self.fisher_counts().values()
        per_task = str(max(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
        logger.info("Fisher affinity from %s image(s) per task in %.1f s", per_task, time.perf_counter() - start)

    def fisher_counts(self) -> dict[str, int]:
        """Return the images per task the Fisher affinity uses: a task with fewer training images uses all."""
        return {task: min(self.fisher_images or 0, len(dataset)) for task, dataset in self.datasets.items()}

    def state_dict(self) -> dict[str, Any]:
        return {key: {"seconds": mean.seconds, "history": list(mean.history)} for key, mean in self.means.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, values in state.items():
            mean = self.means[key]
            if "history" not in values:
                # A checkpoint from before the records were kept one by one holds only their running sum.
                if values.get("records"):
                    logger.warning("%s affinity: the checkpoint has no per-record history; its records start again", key)
                continue
            mean.seconds = float(values.get("seconds", 0.0))
            mean.history = [(int(step), np.asarray(matrix)) for step, matrix in values["history"]]

    def write(self, run_dir: Path, merge: bool = False) -> None:
        """Write affinity.json: rows are source tasks, columns target tasks; unrecorded estimators are omitted.

        Each estimator entry contains the mean ``matrix`` and, under ``records``, every recorded matrix with its step.
        With ``merge``, entries of an existing affinity.json for the same tasks that this recorder did not
        record are kept.
        """
        recorded: dict[str, Any] = {}
        for key, mean in self.means.items():
            if mean.records:
                recorded[key] = {
                    "matrix": _json_matrix(mean.mean()),
                    "n_records": mean.records,
                    "seconds": round(mean.seconds, 3),
                    "records": [{"step": step, "matrix": _json_matrix(m)} for step, m in mean.history],
                }
        if "lookahead" in recorded:
            recorded["lookahead"]["reference"] = self.lookahead_reference
        if "fisher" in recorded:
            recorded["fisher"]["images_per_task"] = self.fisher_counts()
        data: dict[str, Any] = {"tasks": self.tasks}
        existing = read_existing_affinity(run_dir / AFFINITY_FILE, self.tasks) if merge else None
        if existing is not None:
            data.update({k: v for k, v in existing.items() if k != "tasks"})
        data.update(recorded)
        if len(data) > 1:
            write_json_atomic(run_dir / AFFINITY_FILE, data)


def read_existing_affinity(path: Path, tasks: list[str]) -> dict[str, Any] | None:
    """Return the affinity.json at ``path`` for merging, or None when there is none.

    Raises when it cannot be read or lists other tasks, so that entries are never dropped silently.
    """
    if not path.is_file():
        return None
    move = "move it aside to write a new one"
    data = read_json_file(path, "the affinity record", fix=move)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'tasks' and one entry per estimator; {move}")
    if data.get("tasks") != tasks:
        raise DataError(
            f"{path}: lists the tasks {data.get('tasks')!r} but the run trains {tasks!r} in that order; {move}"
        )
    return data


def check_fisher_run(run_dir: str | Path) -> tuple[StudyConfig, RunSpec]:
    """Return a run's config and spec after checking that a Fisher affinity can be added to it.

    The run must be unified (the runs the analysis reads one-run estimators from), and an existing
    affinity.json must be readable and list the run's tasks. Meant to be called before any long work.
    """
    from usagg.train.rundir import load_run

    folder = Path(run_dir)
    study, spec = load_run(folder)
    if spec.paradigm != "unified" or len(spec.tasks) < 2:
        raise ConfigError(
            f"{folder}: run {spec.run_id} is not a unified run of two or more tasks; the Fisher affinity is read "
            f"from unified runs, e.g. {folder.parents[len(Path(spec.run_id).parts) - 1] / 'unified'}/all/frac-1/seed-0"
        )
    read_existing_affinity(folder / AFFINITY_FILE, list(spec.tasks))
    return study, spec


def add_fisher_affinity(
    run_dir: str | Path,
    images: int,
    checkpoint: str = "latest",
    device: str = "auto",
    *,
    model: torch.nn.Module | None = None,
    records: RunRecords | None = None,
) -> tuple[Path, int]:
    """Compute the Fisher affinity of a trained unified run on one of its checkpoints and add it to affinity.json.

    For runs trained without ``train.fisher_images``. Other entries of an existing affinity.json are kept.
    ``model`` and ``records``, when a caller already built them for this run, are used instead of building
    them again. Returns the path of affinity.json and the checkpoint's step.
    """
    from usagg.train import checkpoint as ckpt
    from usagg.train.distributed import resolve_device
    from usagg.train.finalize import build_run_model
    from usagg.train.rundata import RecordCache

    if images < 1:
        raise ConfigError(f"Fisher affinity needs at least 1 image per task; got {images}")
    folder = Path(run_dir)
    study, spec = check_fisher_run(folder)
    study = study.model_copy(update={"train": study.train.model_copy(update={"fisher_images": images})})
    model = model if model is not None else build_run_model(study, spec)
    records = records if records is not None else RecordCache(study).run_records(spec)
    pointer = ckpt.load_weights(model, folder, checkpoint)
    target = resolve_device(device)
    model.to(target)
    recorder = AffinityRecorder(study, spec, records, model, target)
    recorder.record_fisher(int(pointer["step"]))
    recorder.write(folder, merge=True)
    path = folder / AFFINITY_FILE
    logger.info("Fisher affinity (checkpoint %s, step %s) added to %s", checkpoint, pointer["step"], path)
    return path, int(pointer["step"])


def _json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix]
