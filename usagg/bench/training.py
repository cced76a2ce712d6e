"""Training-loop throughput against the model's own train step, measured in the same process.

The loop trains a unified M2DINO on all six tasks of the FMC_UIA-layout sample at 224 px: real batches from the
multi-task loader (2 workers), loss weighting, gradient clipping, the scheduler, the JSONL log and the progress
counters. The baseline runs the same model, optimiser and task sequence on batches already in memory, so the
ratio of the two rates is what data loading and bookkeeping cost. A validation pass is timed as well and reported
as a share of one epoch of training.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from usagg.bench import register_benchmark

logger = logging.getLogger(__name__)

TARGET_LOOP_VS_STEP = 0.8


def _study(root: Path, quick: bool, out: Path):
    from usagg.config import StudyConfig
    from usagg.data.sources import discover_fmc_uia

    val_root = root.parent / "fmc_uia_sample_val"
    cards = discover_fmc_uia(root, val_root=val_root if (val_root / "csv_files").is_dir() else None)
    model = (
        {"backbone": "vit_tiny_patch16_dinov3_qkvb", "depth": 4, "num_experts": 4, "top_k": 2, "decoder_dim": 32}
        if quick
        # The model benchmark's full setting: ViT-S/16, 8 experts, top-2, 64-wide decoder.
        else {"backbone": "vit_small_patch16_dinov3", "num_experts": 8, "top_k": 2, "decoder_dim": 64}
    )
    return StudyConfig.model_validate(
        {
            "name": "bench_training",
            "output": str(out),
            "tasks": [card.model_dump(mode="json") for card in cards],
            "paradigms": ["unified"],
            "data": {"img_size": 112 if quick else 224, "num_workers": 2},
            "model": model,
            "train": {"budget": "steps", "steps": 1000, "batch_size": 8 if quick else 16, "log_every": 1,
                      "task_sampling": "uniform"},
        }
    )


def _in_memory_steps(trainer_model, study, records, sequence: list[str], device: torch.device) -> list[float]:
    """Time the loop's step (forward, weighted loss, backward, clipping, AdamW, scheduler) on pre-loaded batches."""
    from usagg.data.dataset import TaskDataset, collate_task_batch
    from usagg.train.loop import TrainModule, to_device
    from usagg.train.optim import LossWeighting, build_optimizer, build_scheduler

    cfg = study.train
    batches = {}
    for task in dict.fromkeys(sequence):
        dataset = TaskDataset(records.cards[task], records.split(task, "train"), study.data, train=True)
        items = [dataset[i % len(dataset)] for i in range(cfg.batch_size)]
        batches[task] = to_device(collate_task_batch(items), device)
    weighting = LossWeighting(list(records.cards), cfg.loss_weighting, cfg.loss_weights)
    module = TrainModule(trainer_model, weighting)
    optimizer = build_optimizer(trainer_model, cfg, weighting)
    scheduler = build_scheduler(optimizer, cfg, len(sequence) + len(batches))
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(task: str) -> float:
        batch = batches[task]
        start = time.perf_counter()
        total, _, _, _ = module(batch["image"], task, batch["target"])
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for task in batches:  # the first step of each task allocates its optimiser state
        step(task)
    return [step(task) for task in sequence]


@register_benchmark("training", "training loop images/s on the FMC_UIA sample (unified, 224 px; 112 px with --quick) vs the bare train step")
def bench_training(quick: bool = False) -> dict[str, Any]:
    """Compare the full training loop's images/s with the same model's train step on in-memory batches."""
    from usagg.bench.data import find_sample_root
    from usagg.evaluate.evaluate import evaluate_task, primary_metric
    from usagg.train.distributed import DistEnv, resolve_device
    from usagg.train.loop import TrainOptions, train_run
    from usagg.train.plan import plan_runs

    device = resolve_device("auto")
    warmup, measured = (2, 6) if quick else (2, 8)
    with tempfile.TemporaryDirectory(prefix="usagg-bench-training-") as scratch:
        study = _study(find_sample_root(), quick, Path(scratch))
        spec = plan_runs(study)[0]
        options = TrainOptions(output=Path(scratch), device=str(device.type), progress=False, benchmark_steps=warmup + measured)
        outcome = train_run(study, spec, options, DistEnv(device=device))
        loop_seconds = outcome.extra["step_seconds"][warmup:]
        model, records = outcome.extra["model"], outcome.extra["records"]

        from usagg.data.sampler import MultiTaskBatchSampler

        sampler = MultiTaskBatchSampler(records.n_train(), study.train.batch_size, warmup + measured, "uniform", seed=spec.seed)
        sequence = [sampler.task_at(step) for step in range(warmup + measured)]
        step_seconds = _in_memory_steps(model, study, records, sequence, device)[warmup:]

        val_start = time.perf_counter()
        n_val = 0
        for task, card in records.cards.items():
            val = records.split(task, "val")
            n_val += len(val)
            # As the training loop validates: the primary metric only, so segmentation distances are skipped.
            evaluate_task(model, card, val, study, device, study.model.max_boxes, metrics={primary_metric(card, study)})
        val_seconds = time.perf_counter() - val_start

    batch = study.train.batch_size
    # Per-task step costs differ a lot (segmentation decoders), so both sides run the same task sequence and
    # the rates are total images over total time.
    loop_rate = batch * len(loop_seconds) / sum(loop_seconds)
    step_rate = batch * len(step_seconds) / sum(step_seconds)
    epoch_seconds = sum(records.n_train().values()) / loop_rate
    result = {
        "device": str(device),
        "backbone": study.model.backbone,
        "img_size": study.data.size_hw[0],
        "batch_size": batch,
        "tasks": len(records.cards),
        "steps_measured": measured,
        "loop_images_per_s": round(loop_rate, 2),
        "train_step_images_per_s": round(step_rate, 2),
        "loop_vs_train_step": round(loop_rate / step_rate, 3),
        # The target is set for the full setting. The --quick model is so small that data loading bounds its loop.
        "target_loop_vs_train_step": None if quick else TARGET_LOOP_VS_STEP,
        "meets_target": None if quick else loop_rate / step_rate >= TARGET_LOOP_VS_STEP,
        "loop_step_seconds_median": round(statistics.median(loop_seconds), 3),
        "train_step_seconds_median": round(statistics.median(step_seconds), 3),
        "validation_images": n_val,
        "validation_seconds": round(val_seconds, 2),
        "validation_share_of_epoch": round(val_seconds / (val_seconds + epoch_seconds), 3),
        "torch_threads": torch.get_num_threads(),
    }
    logger.debug("training benchmark: %s", result)
    return result
