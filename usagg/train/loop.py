"""The training loop of one run: multi-task batches, AdamW, checkpoints, validation and the final evaluation."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from usagg.config import StudyConfig
from usagg.errors import ConfigError, TrainingError
from usagg.evaluate.inference import autocast_context
from usagg.io import append_jsonl
from usagg.train import checkpoint as ckpt
from usagg.train.affinity import AffinityRecorder
from usagg.train.distributed import DistEnv, all_true, barrier, mean_across_ranks
from usagg.train.optim import LossWeighting, build_optimizer, build_scheduler
from usagg.train.plan import RunSize, RunSpec, size_run, warn_underfed
from usagg.train.progress import TrainProgress
from usagg.train.rundata import RecordCache, RunRecords
from usagg.train.rundir import (
    LOG_FILE,
    check_finished_config,
    is_finished,
    read_run_json,
    truncate_train_log,
    update_run_json,
    write_config,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Per-invocation options that are not part of the study (they do not change what a run learns)."""

    output: Path
    device: str = "auto"
    skip_nonfinite: bool | None = None  # None: the study's train.skip_nonfinite
    progress: bool = True
    # Benchmarks: stop after this many steps, with no validation, checkpoint or final evaluation.
    benchmark_steps: int | None = None


@dataclass
class RunOutcome:
    spec: RunSpec
    run_dir: Path
    status: str  # finished | skipped | busy (another process trains it) | benchmark
    steps: int = 0
    seconds: float = 0.0
    images_per_s: float = math.nan
    results: pl.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TrainModule(nn.Module):
    """The model plus the loss weighting, so DistributedDataParallel synchronises the learned log-variances too."""

    def __init__(self, model: nn.Module, weighting: LossWeighting, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.weighting = weighting
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, task: str, target: dict) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
        outputs = self.model(images, task)
        loss, parts = self.model.compute_loss(outputs, target, task, label_smoothing=self.label_smoothing)
        aux = self.model.aux_loss()
        total = self.weighting(task, loss) + aux
        return total, loss.detach(), parts, aux.detach()


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """Return usagg's version and a digest of its source files, so a run records the code that trained it.

    The version alone does not change between commits of an editable install; the digest does.
    """
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(str(file.relative_to(package)).encode("utf-8"))
        digest.update(file.read_bytes())
    from usagg import __version__

    return {"version": __version__, "digest": digest.hexdigest()[:12]}


def _seed_loader(loader: Any, seed: int) -> None:
    """Give the DataLoader inside ``loader`` its own seeded generator.

    A DataLoader iterator otherwise draws its base seed from the global generator when iteration starts, which
    happens at step 1 in a fresh run but at the resume step in a resumed one, shifting every later random draw.
    Augmentations do not use it: each sample seeds its own draws (``usagg.data.loader.draw_seed``).
    """
    inner = getattr(loader, "loader", None)
    if isinstance(inner, torch.utils.data.DataLoader):
        inner.generator = torch.Generator().manual_seed(seed)


def train_run(
    study: StudyConfig,
    spec: RunSpec,
    options: TrainOptions,
    env: DistEnv,
    cache: RecordCache | None = None,
) -> RunOutcome:
    """Train one run to its step budget (resuming from its latest checkpoint) and evaluate it."""
    run_dir = spec.run_dir(options.output)
    if options.benchmark_steps is None and is_finished(run_dir):
        check_finished_config(run_dir, study, spec)
        logger.debug("%s: finished earlier, skipped", spec.run_id)
        return RunOutcome(spec, run_dir, "skipped")
    cache = cache or RecordCache(study)
    records = cache.run_records(spec)
    size = size_run(study, spec, records.n_train())
    if env.is_main and options.benchmark_steps is None:
        warn_underfed(spec, size)
    trainer = _Trainer(study, spec, options, env, records, size, run_dir)
    return trainer.run()


class _Trainer:
    def __init__(
        self,
        study: StudyConfig,
        spec: RunSpec,
        options: TrainOptions,
        env: DistEnv,
        records: RunRecords,
        size: RunSize,
        run_dir: Path,
    ) -> None:
        self.study = study
        self.cfg = study.train
        self.spec = spec
        self.options = options
        self.env = env
        self.records = records
        self.size = size
        self.run_dir = run_dir
        self.device = env.device
        self.benchmark = options.benchmark_steps is not None
        self.writes = env.is_main  # benchmarks write logs too (into a scratch folder), so logging is timed
        self.skip_nonfinite = self.cfg.skip_nonfinite if options.skip_nonfinite is None else options.skip_nonfinite
        self.eval_every = self.cfg.eval_every or max(1, round(self.cfg.eval_epochs * size.epoch_steps))
        if self.cfg.batch_size % env.world_size:
            raise ConfigError(
                f"train.batch_size {self.cfg.batch_size} is not divisible by the {env.world_size} processes; "
                "the batch size is global, split evenly over the processes"
            )
        # Counters saved with every checkpoint.
        self.step = 0
        self.best_score = -math.inf
        self.best_step: int | None = None
        self.score_reference: dict[str, float] = {}
        self.nonfinite_skipped = 0
        self.train_seconds = 0.0
        self.images_seen = 0
        self.step_seconds: list[float] = []  # wall time of each step of this process, data wait included
        self.data_seconds: list[float] = []  # time of each step spent waiting for its batch

    # --- setup -------------------------------------------------------------------------------------

    def _build(self) -> None:
        from usagg.data.dataset import TaskDataset
        from usagg.data.sampler import MultiTaskBatchSampler
        from usagg.model import build_model

        seed_everything(self.spec.seed, self.cfg.deterministic)
        cards = [self.records.cards[t] for t in self.spec.tasks]
        # A run that resumes takes every weight from its checkpoint, so the pretrained file need not be there.
        resuming = ckpt.read_pointer(self.run_dir, "latest") is not None
        self.model = build_model(self.study.model, cards, self.study.data.size_hw, load_pretrained_file=not resuming)
        report = self.model.pretrained_report
        if report is not None and self.writes:
            update_run_json(self.run_dir, pretrained=report.summary())
        for card in cards:
            if card.kind == "scalar":
                values = torch.tensor([r.value for r in self.records.split(card.name, "train")], dtype=torch.float64)
                std = float(values.std()) if values.numel() > 1 else 1.0
                self.model.set_target_stats(card.name, float(values.mean()), std if std > 0 else 1.0)
        self.model.to(self.device)
        self.weighting = LossWeighting(self.spec.tasks, self.cfg.loss_weighting, self.cfg.loss_weights).to(self.device)
        self.module: nn.Module = TrainModule(self.model, self.weighting, self.cfg.label_smoothing)
        if self.env.distributed:
            self.module = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                # Each step trains one task, so the other tasks' heads (and unrouted experts) get no gradient.
                find_unused_parameters=True,
            )
        self.optimizer = build_optimizer(self.model, self.cfg, self.weighting)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.size.steps)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.datasets = {
            t: TaskDataset(self.records.cards[t], self.records.split(t, "train"), self.study.data, train=True)
            for t in self.spec.tasks
        }
        self.sampler = MultiTaskBatchSampler(
            {t: len(ds) for t, ds in self.datasets.items()},
            batch_size=self.cfg.batch_size // self.env.world_size,
            num_steps=self.size.steps,
            sampling=self.cfg.task_sampling,
            temperature=self.cfg.temperature,
            seed=self.spec.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        self.affinity = AffinityRecorder.maybe_create(self.study, self.spec, self.records, self.model, self.device)

    def _resume(self) -> dict[str, Any] | None:
        if self.benchmark:
            return None
        state = ckpt.load_training_state(self.run_dir, "latest")
        if self.writes:
            # The log continues from the checkpoint's step, or from 0 without a checkpoint. Lines that an interrupted
            # process logged after that step are dropped, because those steps are trained and logged again.
            dropped = truncate_train_log(self.run_dir, state["step"] if state is not None else 0)
            if dropped:
                since = f"after the checkpoint of step {state['step']}" if state is not None else "before the first checkpoint"
                logger.info("%s: dropped %d training-log line(s) logged %s", self.spec.run_id, dropped, since)
        if state is None:
            return None
        ckpt.load_weights(self.model, self.run_dir, "latest")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.weighting.load_state_dict(state["loss_weighting"])
        counters = state["counters"]
        self.step = state["step"]
        self.best_score = counters["best_score"]
        self.best_step = counters["best_step"]
        best = ckpt.read_pointer(self.run_dir, "best")
        if best is not None and best["step"] > self.step and "score" in best:
            # The interrupted process saved a better checkpoint after the one resumed from. It stays the best to
            # beat, so the counters agree with the checkpoint that the evaluation will load.
            self.best_score = float(best["score"])
            self.best_step = int(best["step"])
        self.score_reference = counters["score_reference"]
        self.nonfinite_skipped = counters["nonfinite_skipped"]
        self.train_seconds = counters["train_seconds"]
        self.images_seen = counters["images_seen"]
        if self.affinity is not None and state.get("affinity") is not None:
            self.affinity.load_state_dict(state["affinity"])
        logger.info("%s: resuming at step %d of %d", self.spec.run_id, self.step, self.size.steps)
        if self.writes:
            append_jsonl(self.run_dir / LOG_FILE, {"event": "resume", "step": self.step, "time": time.time()})
        return state

    def _training_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "loss_weighting": self.weighting.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "affinity": self.affinity.state_dict() if self.affinity is not None else None,
            "counters": {
                "best_score": self.best_score,
                "best_step": self.best_step,
                "score_reference": self.score_reference,
                "nonfinite_skipped": self.nonfinite_skipped,
                "train_seconds": self.train_seconds,
                "images_seen": self.images_seen,
            },
        }

    # --- main ----------------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.run_dir, self.study, self.spec)
            code = code_version()
            earlier = (read_run_json(self.run_dir) or {}).get("code")
            if isinstance(earlier, dict) and earlier.get("digest") not in (None, code["digest"]):
                logger.warning(
                    "%s: this run started with other usagg code (%s %s, now %s %s); its steps before and after "
                    "this point come from different code", self.spec.run_id, earlier.get("version"),
                    earlier.get("digest"), code["version"], code["digest"],
                )
            update_run_json(
                self.run_dir,
                spec=self.spec.to_dict(),
                code=code,
                status="running",
                steps=self.size.steps,
                batch_size=self.size.batch_size,
                n_train=self.size.n_train,
                world_size=self.env.world_size,
                device=str(self.device),
            )
        with self._recording_failure():
            self._build()
            state = self._resume()
            from usagg.data.loader import build_multitask_loader

            loader = build_multitask_loader(self.datasets, self.sampler, self.study.data.num_workers)
            _seed_loader(loader, self.spec.seed)
            batches = iter(loader)
            if state is not None:
                ckpt.restore_rng_state(state["rng"])
            self._loop(batches)
        if self.benchmark:
            return RunOutcome(
                self.spec, self.run_dir, "benchmark", steps=self.step, seconds=self.train_seconds,
                images_per_s=self.images_seen / max(self.train_seconds, 1e-9),
                extra={
                    "step_seconds": list(self.step_seconds),
                    "data_seconds": list(self.data_seconds),
                    "model": self.model,
                    "records": self.records,
                },
            )
        results = None
        if self.env.is_main:
            # Training is complete and checkpointed, so a rerun after a failure here goes straight to the evaluation.
            with self._recording_failure(f"evaluation after training (step {self.step}) failed: "):
                results = self._final_evaluation()
            update_run_json(
                self.run_dir,
                status="finished",
                step=self.step,
                train_seconds=round(self.train_seconds, 3),
                images_per_s=round(self.images_seen / max(self.train_seconds, 1e-9), 3),
                nonfinite_skipped=self.nonfinite_skipped,
                best_step=self.best_step,
            )
        barrier(self.env)
        return RunOutcome(
            self.spec,
            self.run_dir,
            "finished",
            steps=self.step,
            seconds=self.train_seconds,
            images_per_s=self.images_seen / max(self.train_seconds, 1e-9),
            results=results,
        )

    @contextlib.contextmanager
    def _recording_failure(self, context: str = "") -> Iterator[None]:
        """Record an interruption or an error in run.json (the error after ``context``), then re-raise it."""
        try:
            yield
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the handler of the usagg command
            if self.writes:
                fields = self._step_field()
                update_run_json(self.run_dir, status="interrupted", **fields)
                if "step" in fields:
                    saved = fields.get("checkpoint_step", 0)
                    logger.warning(
                        "%s: interrupted at step %d; a rerun resumes from %s", self.spec.run_id, fields["step"],
                        f"the checkpoint of step {saved}" if saved else "step 0 (no checkpoint yet)",
                    )
            raise
        except Exception as exc:
            if self.writes:
                update_run_json(self.run_dir, status="failed", error=f"{context}{exc}", **self._step_field())
            raise

    def _step_field(self) -> dict[str, int]:
        """Return the step reached and the step of the latest checkpoint, to record with a failure.

        None before a resumed run has restored its step. A rerun resumes from ``checkpoint_step``, so the steps
        after it are trained again.
        """
        if not self.step:
            return {}
        pointer = ckpt.read_pointer(self.run_dir, "latest")
        return {"step": self.step, "checkpoint_step": int(pointer["step"]) if pointer else 0}

    def _loop(self, batches: Iterator) -> None:
        total_steps = self.options.benchmark_steps or self.size.steps
        total_steps = min(total_steps, self.size.steps)
        log_file = self.run_dir / LOG_FILE
        progress = TrainProgress(self.spec.run_id, total_steps, self.step, enabled=self.options.progress and self.env.is_main)
        tb = self._tensorboard()
        window_images = 0
        window_start = time.perf_counter()
        with progress:
            while self.step < total_steps:
                tick = time.perf_counter()
                task, batch = next(batches)
                self.data_seconds.append(time.perf_counter() - tick)
                self.step += 1
                images = batch["image"].to(self.device, non_blocking=True)
                target = to_device(batch["target"], self.device)
                with autocast_context(self.device, self.cfg.amp):
                    total, task_loss, parts, aux = self.module(images, task, target)
                finite = all_true(self.env, bool(torch.isfinite(total).item()))
                if finite:
                    total.backward()
                    norm = nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)
                    finite = all_true(self.env, bool(torch.isfinite(norm).item()))
                else:
                    # Every rank still runs a backward pass so DDP's gradient reduction stays in step.
                    (torch.nan_to_num(total) * 0.0).backward()
                if finite:
                    self.optimizer.step()
                else:
                    self._handle_nonfinite(task, float(total.detach()))
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()

                n_images = images.shape[0] * self.env.world_size
                self.images_seen += n_images
                window_images += n_images
                self.step_seconds.append(time.perf_counter() - tick)
                self.train_seconds += self.step_seconds[-1]
                progress.update(self.step, task, float(task_loss), window_images / max(time.perf_counter() - window_start, 1e-9))

                if self.affinity is not None and not self.benchmark and self.env.is_main:
                    self.affinity.maybe_record(self.step, self.optimizer, self.cfg.grad_clip)
                if self.step % self.cfg.log_every == 0 or self.step == total_steps:
                    # Under DDP each rank has the loss of its share of the batch, so the log shows the batch mean,
                    # as a single process would. Every rank takes part in the reduction.
                    logged_loss = mean_across_ranks(self.env, float(task_loss))
                    if self.writes:
                        ips = window_images / max(time.perf_counter() - window_start, 1e-9)
                        self._log_step(log_file, tb, task, logged_loss, parts, float(aux), ips)
                        window_images = 0
                        window_start = time.perf_counter()
                if self.benchmark:
                    continue
                if self.step % self.eval_every == 0 or self.step == total_steps:
                    self._validate(log_file, tb)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == total_steps:
                    if self.writes:
                        ckpt.save_checkpoint(self.run_dir, "latest", self.model, self.step, self._training_state())
                        update_run_json(self.run_dir, step=self.step)
                    barrier(self.env)
        if tb is not None:
            tb.close()

    def _handle_nonfinite(self, task: str, loss_value: float) -> None:
        if self.skip_nonfinite:
            self.nonfinite_skipped += 1
            logger.warning(
                "%s: non-finite loss or gradient (%s) on task %s at step %d; batch skipped (%d so far)",
                self.spec.run_id, loss_value, task, self.step, self.nonfinite_skipped,
            )
            if self.writes:
                append_jsonl(
                    self.run_dir / LOG_FILE,
                    {"event": "nonfinite_skipped", "step": self.step, "task": task, "count": self.nonfinite_skipped},
                )
            return
        pointer = ckpt.read_pointer(self.run_dir, "latest")
        last = (
            f"{ckpt.checkpoint_dir(self.run_dir) / pointer['weights']} (step {pointer['step']})" if pointer else "none yet"
        )
        raise TrainingError(
            f"run {self.spec.run_id}: non-finite loss or gradient norm ({loss_value}) on task {task!r} at step {self.step}; "
            f"last good checkpoint: {last}. Lower the learning rates or rerun with --skip-nonfinite to skip such batches"
        )

    def _log_step(self, log_file: Path, tb, task: str, loss: float, parts: dict, aux: float, ips: float) -> None:
        lrs: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            component = str(group.get("group_name", group.get("name", "other"))).split("/")[0]
            lrs[component] = max(lrs.get(component, 0.0), group["lr"])
        record = {
            "step": self.step,
            "epoch": round(self.step / self.size.epoch_steps, 4),
            "task": task,
            "loss": loss,
            "loss_parts": {k: float(v) for k, v in parts.items()},
            "aux_loss": aux,
            "lr": lrs,
            "loss_weights": self.weighting.weights(),
            "images_per_s": round(ips, 3),
            "nonfinite_skipped": self.nonfinite_skipped,
            "time": time.time(),
        }
        append_jsonl(log_file, record)
        routing = self.model.routing_stats(reset=True)
        if routing and routing.get("tasks"):
            append_jsonl(log_file, {"event": "routing", "step": self.step, **routing})
        if tb is not None:
            tb.add_scalar(f"loss/{task}", loss, self.step)
            tb.add_scalar("images_per_s", ips, self.step)
            for name, lr in lrs.items():
                tb.add_scalar(f"lr/{name}", lr, self.step)

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.writes):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("train.tensorboard is set but tensorboard is not installed (pip install 'usagg[tensorboard]')")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    # --- validation and final evaluation ---------------------------------------------------------------

    def _validate(self, log_file: Path, tb) -> None:
        """Score the validation split and keep the best checkpoint; only rank 0 evaluates."""
        if self.env.is_main:
            from usagg.evaluate.evaluate import evaluate_task, primary_metric, task_selection_score

            scores = []
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for task in self.spec.tasks:
                    val = self.records.split(task, "val")
                    if not val:
                        continue
                    card = self.records.cards[task]
                    metric = primary_metric(card, self.study)
                    result = evaluate_task(
                        self.model, card, val, self.study, self.device, self.study.model.max_boxes, metrics={metric}
                    )
                    value = result.metrics.values.get(metric, math.nan)
                    key = f"{task}:{metric}"
                    if key not in self.score_reference and math.isfinite(value):
                        self.score_reference[key] = value
                    scores.append(task_selection_score(metric, value, self.score_reference.get(key)))
                    for name, v in result.metrics.values.items():
                        append_jsonl(log_file, {"event": "eval", "split": "val", "step": self.step, "task": task, "metric": name, "value": v})
                        if tb is not None and math.isfinite(v):
                            tb.add_scalar(f"val/{task}/{name}", v, self.step)
            self.routing_reset()
            if scores:
                score = float(np.mean(scores))
                append_jsonl(log_file, {"event": "eval", "split": "val", "step": self.step, "task": None, "metric": "selection_score", "value": score})
                if score > self.best_score:
                    self.best_score = score
                    self.best_step = self.step
                    ckpt.save_checkpoint(
                        self.run_dir, "best", self.model, self.step, self._training_state(), info={"score": score}
                    )
            elif self.best_step is None:
                logger.warning("%s: no task has validation images; the best checkpoint is the latest one", self.spec.run_id)
        barrier(self.env)

    def routing_reset(self) -> None:
        """Drop routing counts gathered during validation, so the training log only reports training batches."""
        self.model.routing_stats(reset=True)

    def _final_evaluation(self) -> pl.DataFrame:
        from usagg.train.finalize import evaluate_and_write

        if self.affinity is not None:
            self.affinity.record_fisher(self.step)
            self.affinity.write(self.run_dir)
        return evaluate_and_write(
            self.study, self.spec, self.model, self.records, self.run_dir, self.device,
            split=self.study.evaluation.split, checkpoint=self.study.evaluation.checkpoint,
        )
