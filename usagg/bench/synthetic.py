"""Synthetic benchmark generation speed at 256 x 256: batched rendering on 2 processes against baselines.

Every figure counts finished images (B-mode image plus label map and latents) of the five anatomies in turn.
Baselines measured in the same call: the same simulation one image at a time (batch of 1) in one process,
and drawing the scatterer field alone (two uniform random arrays per image), the floor of any speckle
simulation. Rounds of all measurements are interleaved, so that load from other processes hits them alike,
and each figure is the median over rounds. Because wall-clock rates on a shared machine follow its load, the
CPU time per image of the one-process run is reported too, with the rate two processes would reach at that
cost (an estimate that assumes perfect scaling). The end-to-end figure also encodes PNGs and writes CSVs,
through ``generate_benchmark`` on 2 processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from usagg.bench import register_benchmark
from usagg.data.synthetic.organs import ORGANS
from usagg.data.synthetic.writer import (
    generate_benchmark,
    make_config,
    single_threaded_children,
)

logger = logging.getLogger(__name__)

IMAGE_SIZE = 256
CHUNK = 32
TARGET_IMAGES_PER_S = 300.0  # on 2 CPU cores at 256 x 256


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _render_chunks(job: tuple[int, int, int]) -> int:
    """Render ``count`` images in batches of ``batch`` (organs in turn); returns the number rendered."""
    seed, count, batch = job
    rng = np.random.default_rng(seed)
    organs = list(ORGANS.values())
    done = 0
    step = 0
    while done < count:
        n = min(batch, count - done)
        organs[step % len(organs)].render(rng, n, IMAGE_SIZE)
        done += n
        step += 1
    return done


def _rate(fn, *args) -> tuple[float, float]:
    """Images per second of wall time and CPU milliseconds per image (this process only)."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = fn(*args)
    return count / (time.perf_counter() - wall), (time.process_time() - cpu) * 1e3 / count


def _plain_noise(job: tuple[int, int]) -> int:
    seed, count = job
    rng = np.random.default_rng(seed)
    for _ in range(count):
        rng.random((2, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    return count


def _pool_rate(pool: ProcessPoolExecutor, workers: int, per_worker: int, seed: int) -> float:
    jobs = [(seed + w, per_worker, CHUNK) for w in range(workers)]
    start = time.perf_counter()
    count = sum(pool.map(_render_chunks, jobs))
    return count / (time.perf_counter() - start)


@register_benchmark("synthetic", "Synthetic B-mode generation at 256x256: images/s on 2 processes vs per-image and plain-noise baselines")
def bench_synthetic(quick: bool = False) -> dict[str, Any]:
    if quick:
        return measure_generation(rounds=2, per_worker=2 * CHUNK, single_count=2 * CHUNK, loop_count=10, end_to_end_per_task=16)
    return measure_generation(rounds=3, per_worker=6 * CHUNK, single_count=5 * CHUNK, loop_count=40, end_to_end_per_task=64)


def measure_generation(
    rounds: int, per_worker: int, single_count: int, loop_count: int, end_to_end_per_task: int
) -> dict[str, Any]:
    """Run the interleaved measurements; counts are images per round (``per_worker`` for each of 2 workers)."""
    _render_chunks((0, len(ORGANS), 1))  # build and cache every scan grid first
    context = multiprocessing.get_context("spawn")
    rates: dict[str, list[float]] = {"two_proc": [], "one_proc": [], "one_proc_cpu_ms": [], "per_image": [], "per_image_cpu_ms": [], "noise": []}
    with single_threaded_children(), ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        list(pool.map(_render_chunks, [(0, len(ORGANS), 1)] * 2))  # start both workers, warm their caches
        for r in range(rounds):
            rates["two_proc"].append(_pool_rate(pool, 2, per_worker, seed=100 + r))
            rate, cpu_ms = _rate(_render_chunks, (200 + r, single_count, CHUNK))
            rates["one_proc"].append(rate)
            rates["one_proc_cpu_ms"].append(cpu_ms)
            rate, cpu_ms = _rate(_render_chunks, (300 + r, loop_count, 1))
            rates["per_image"].append(rate)
            rates["per_image_cpu_ms"].append(cpu_ms)
            rates["noise"].append(_rate(_plain_noise, (400 + r, single_count))[0])
    medians = {name: statistics.median(values) for name, values in rates.items()}

    # End to end: rendering, PNG encoding and CSV writing of a 256 px benchmark on 2 processes.
    tasks = ["breast_lesion_seg", "fetal_head_seg", "cardiac_chamber_seg", "thyroid_nodule_seg", "vessel_seg"]
    sizes = {name: end_to_end_per_task for name in tasks}
    eval_size = max(1, end_to_end_per_task // 4)
    config = make_config("medium", seed=0, image_size=IMAGE_SIZE, train_sizes=sizes, val_size=eval_size, test_size=eval_size, tasks=tasks)
    with tempfile.TemporaryDirectory(prefix="usagg-bench-synth-") as tmp:
        summary = generate_benchmark(os.path.join(tmp, "synth"), config, workers=2)

    two_core_estimate = 2 * 1e3 / medians["one_proc_cpu_ms"]
    result = {
        "image_size": IMAGE_SIZE,
        "images_per_s_2_processes": medians["two_proc"],
        "images_per_s_1_process": medians["one_proc"],
        "cpu_ms_per_image_batched": medians["one_proc_cpu_ms"],
        "images_per_s_2_cores_from_cpu_time": two_core_estimate,
        "baseline_images_per_s_per_image_loop": medians["per_image"],
        "baseline_cpu_ms_per_image_per_image_loop": medians["per_image_cpu_ms"],
        "baseline_images_per_s_plain_noise": medians["noise"],
        "ratio_2_processes_vs_per_image_loop": medians["two_proc"] / medians["per_image"],
        "ratio_batched_vs_per_image_cpu_time": medians["per_image_cpu_ms"] / medians["one_proc_cpu_ms"],
        "ratio_1_process_vs_plain_noise": medians["one_proc"] / medians["noise"],
        "end_to_end_images_per_s_2_processes": summary.images_per_s,
        "end_to_end_images": summary.num_images,
        "target_images_per_s": TARGET_IMAGES_PER_S,
        "meets_target_wall_clock": medians["two_proc"] >= TARGET_IMAGES_PER_S,
        "rounds": rounds,
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    logger.info(
        "synthetic generation: %.0f images/s on 2 processes (%.1f ms CPU per image), per-image loop %.0f images/s",
        medians["two_proc"], medians["one_proc_cpu_ms"], medians["per_image"],
    )
    return result
