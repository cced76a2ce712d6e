"""Data-loading throughput on the FMC_UIA-layout sample: decoded and transformed samples per second."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from usagg.bench import register_benchmark

logger = logging.getLogger(__name__)


def find_sample_root() -> Path:
    """Locate the FMC_UIA-layout sample: ``$USAGG_DATA/fmc_uia_sample``, else the ``shared/data`` beside the repository."""
    from usagg.errors import DataError

    candidates = []
    if os.environ.get("USAGG_DATA"):
        candidates.append(Path(os.environ["USAGG_DATA"]) / "fmc_uia_sample")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "fmc_uia_sample")
    for candidate in candidates:
        if (candidate / "csv_files").is_dir():
            return candidate
    raise DataError(
        f"FMC_UIA sample not found (looked in {', '.join(str(c) for c in candidates)}); "
        "fix: set USAGG_DATA to the folder that contains fmc_uia_sample/"
    )


def _samples_per_second(loader, steps: int, warmup: int) -> tuple[float, float, int]:
    """Iterate ``loader``; return samples per wall-clock second and per CPU second of this process (both after
    ``warmup`` batches), and the number of samples timed."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    count = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _, batch = next(iterator)
        count += batch["image"].shape[0]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return count / wall, count / max(cpu, 1e-9), count


@register_benchmark("data", "data loading: decoded + transformed samples/s on the FMC_UIA sample at 224 px, 2 workers")
def bench_data(quick: bool = False) -> dict[str, Any]:
    """Measure the multi-task training loader (decode, augment, resize to 224 px, normalise, collate) with 2 workers,
    against the same pipeline in the main process and against decoding alone."""
    import torch

    from usagg.config import DataConfig
    from usagg.data.dataset import TaskDataset
    from usagg.data.decode import decode_image
    from usagg.data.loader import build_multitask_loader
    from usagg.data.sampler import MultiTaskBatchSampler
    from usagg.data.sources import discover_fmc_uia, load_task_records

    root = find_sample_root()
    data_cfg = DataConfig(img_size=224, num_workers=2)
    cards = discover_fmc_uia(root)
    records = {card.name: load_task_records(card) for card in cards}
    datasets = {card.name: TaskDataset(card, records[card.name], data_cfg, train=True) for card in cards}
    sizes = {name: len(d) for name, d in datasets.items()}
    batch_size = 16
    steps = 10 if quick else 40
    warmup = 2 if quick else 4

    def loader(workers: int):
        sampler = MultiTaskBatchSampler(sizes, batch_size, steps + warmup, sampling="uniform", seed=0)
        return build_multitask_loader(datasets, sampler, num_workers=workers, pin_memory=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use one thread each; the main-process baseline gets the same
    # Measure on 2 CPU cores, the target machine, even where more are present (Linux only).
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity is not None and len(affinity) > 2:
        os.sched_setaffinity(0, sorted(affinity)[:2])
    try:
        workers_rate, _, counted = _samples_per_second(loader(2), steps, warmup)
        single_rate, single_cpu_rate, _ = _samples_per_second(loader(0), steps // 2, 1)
    finally:
        torch.set_num_threads(threads)
        if affinity is not None and len(affinity) > 2:
            os.sched_setaffinity(0, affinity)
    paths = [r.image_path for rs in records.values() for r in rs][: (60 if quick else 260)]
    start = time.perf_counter()
    for path in paths:
        decode_image(path)
    decode_rate = len(paths) / (time.perf_counter() - start)
    result = {
        "samples_per_s_2_workers": round(workers_rate, 1),
        "samples_per_s_main_process": round(single_rate, 1),
        "speedup_vs_main_process": round(workers_rate / single_rate, 2),
        "decode_only_per_s_main_process": round(decode_rate, 1),
        # CPU time does not grow when other jobs share the cores, so this estimate is stable on a busy machine:
        # two workers that each get a whole core deliver about twice the single-process rate per CPU second.
        "main_process_samples_per_cpu_s": round(single_cpu_rate, 1),
        "estimated_2_core_samples_per_s": round(2 * single_cpu_rate, 1),
        "img_size": 224,
        "batch_size": batch_size,
        "samples_timed": counted,
        "target_samples_per_s": 200,
        "meets_target": workers_rate >= 200,
        "cpu_cores_used": min(2, len(affinity)) if affinity is not None else os.cpu_count(),
    }
    logger.debug("data loading: %s", result)
    return result
