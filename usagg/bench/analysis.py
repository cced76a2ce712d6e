"""Benchmark of the analysis stage: the full analysis of a generated 27-task study table, on 2 CPU cores."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from usagg.bench import register_benchmark

TARGET_SECONDS = 10.0


@contextlib.contextmanager
def _two_cores() -> Iterator[int]:
    """Pin this process to at most 2 CPU cores (Linux), restoring the previous affinity afterwards."""
    if not hasattr(os, "sched_getaffinity"):
        yield os.cpu_count() or 1
        return
    previous = os.sched_getaffinity(0)
    cores = set(sorted(previous)[:2])
    os.sched_setaffinity(0, cores)
    try:
        yield len(cores)
    finally:
        os.sched_setaffinity(0, previous)


def naive_relative_change(rows: list[dict[str, Any]]) -> list[float]:
    """Relative change with plain Python dicts and loops: the baseline the polars join is compared with."""
    reference = {}
    for row in rows:
        if row["paradigm"] == "task_specific":
            key = (row["study"], row["task"], row["metric"], row["split"], row["data_fraction"], row["seed"])
            reference[key] = row["value"]
    out = []
    for row in rows:
        if row["paradigm"] in ("task_specific", "pair"):
            continue
        key = (row["study"], row["task"], row["metric"], row["split"], row["data_fraction"], row["seed"])
        ts = reference.get(key)
        if ts is None or ts == 0:
            continue
        sign = 1.0 if row["higher_is_better"] else -1.0
        out.append(sign * (row["value"] - ts) / abs(ts))
    return out


def _best_of(fn, repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


@register_benchmark("analysis", "full analysis of a 27-task x 3-paradigm x 5-fraction x 3-seed results table (target < 10 s on 2 cores)")
def bench_analysis(quick: bool = False) -> dict[str, Any]:
    """Time ``run_full_analysis`` and, as baselines, the relative-change step alone and a plain-Python loop."""
    from usagg.analysis.full import run_full_analysis
    from usagg.analysis.grouping import recommend_groups
    from usagg.analysis.relative import relative_change_with_warnings
    from usagg.analysis.simulate import simulate_relations, simulate_results, simulate_study_dir
    from usagg.results import write_results

    repeats = 1 if quick else 3
    table = simulate_results(n_tasks=27, fractions=(0.1, 0.25, 0.5, 0.75, 1.0), seeds=(0, 1, 2), extra_metrics=True)
    with _two_cores() as cores, tempfile.TemporaryDirectory(prefix="usagg-bench-analysis-") as tmp:
        path = write_results(table, Path(tmp) / "results.parquet")
        full_s, report = _best_of(lambda: run_full_analysis(path, Path(tmp) / "out", n_bootstrap=2000), repeats)
        # A study directory adds per-image bootstraps, the one-run affinity estimators and grouping.
        study = simulate_study_dir(
            Path(tmp) / "study", n_tasks=27, seeds=(0,) if quick else (0, 1, 2), n_images=20 if quick else 100,
            n_clusters=5, pairs=False,
        )
        dir_s, dir_report = _best_of(
            lambda: run_full_analysis(study, Path(tmp) / "out_dir", relations=study / "relations.csv", n_bootstrap=2000),
            repeats,
        )
        rel_s, (rel, _) = _best_of(lambda: relative_change_with_warnings(table), repeats)
        rows = table.filter(pl.col("metric").is_in(["dice", "auc", "iou", "mre_px"])).to_dicts()
        naive_s, naive = _best_of(lambda: naive_relative_change(rows), repeats)
        tasks, relations = simulate_relations(27, 5, seed=1)
        noisy = relations + np.random.default_rng(2).normal(0, 0.2, relations.shape)
        group_s, grouping = _best_of(lambda: recommend_groups((tasks, noisy), "auto", n_random=200), repeats)

    # The two relative-change implementations must agree before their times mean anything.
    matched = np.allclose(np.sort(rel["rel_change"].drop_nulls().to_numpy()), np.sort(np.array(naive)))
    return {
        "cores": cores,
        "rows": table.height,
        "comparisons": report.tables["negative_transfer"].height,
        "full_analysis_s": round(full_s, 3),
        "target_s": TARGET_SECONDS,
        "within_target": full_s < TARGET_SECONDS,
        "steps_last_run_s": {k: v for k, v in report.timings.items() if k != "total"},
        "relative_change_polars_s": round(rel_s, 4),
        "relative_change_naive_loop_s": round(naive_s, 4),
        "relative_change_results_match": bool(matched),
        "study_dir_full_analysis_s": round(dir_s, 3),
        "study_dir_steps_last_run_s": {k: v for k, v in dir_report.timings.items() if k != "total"},
        "study_dir_lookahead_spearman": _score(dir_report, "lookahead"),
        "grouping_27_tasks_auto_s": round(group_s, 3),
        "grouping_method": grouping.method,
        "repeats": repeats,
    }


def _score(report, method: str) -> float | None:
    scores = report.tables.get("affinity_scores")
    if scores is None:
        return None
    row = scores.filter(pl.col("method") == method)
    return round(float(row["spearman_rho"][0]), 3) if row.height else None
