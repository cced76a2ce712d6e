"""Which tasks lose when trained together? Relative change, its uncertainty, flags and Δm at every level."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from usagg.analysis.inference import seed_summary, t_interval
from usagg.analysis.relative import relative_change_with_warnings

# Levels Δm is reported at: the whole study, then each value of these columns.
DELTA_M_LEVELS = ("study", "task_type", "clinical_group", "group")

DELTA_M_SCHEMA = {
    "study": pl.String,
    "paradigm": pl.String,
    "data_fraction": pl.Float64,
    "split": pl.String,
    "level": pl.String,
    "level_value": pl.String,
    "delta_m": pl.Float64,
    "sd_tasks": pl.Float64,
    "sd_seeds": pl.Float64,
    "ci_seeds_lo": pl.Float64,
    "ci_seeds_hi": pl.Float64,
    "ci_tasks_lo": pl.Float64,
    "ci_tasks_hi": pl.Float64,
    "n_tasks": pl.Int64,
    "n_seeds": pl.Int64,
}


@dataclass
class TransferAnalysis:
    """Relative change per run, its summary over seeds with flags, and Δm tables."""

    rel: pl.DataFrame
    summary: pl.DataFrame
    delta_m: pl.DataFrame
    warnings: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # intervals not computed, with the reason

    def flagged(self) -> pl.DataFrame:
        """Return the comparisons flagged as negative transfer."""
        return self.summary.filter(pl.col("negative_transfer").fill_null(False))


# A percentile bootstrap over n tasks draws the smallest task n times with probability n^-n. While that exceeds
# the 2.5 % tail (n <= 3), the interval's bounds are the extreme tasks themselves, not an interval of the mean.
MIN_TASKS_FOR_INTERVAL = 4


def delta_m_table(rel: pl.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pl.DataFrame:
    """Return Δm per study × paradigm × data fraction × split over all tasks, per task type, clinical and training group.

    ``ci_seeds`` is the t interval of the per-seed Δm, which reflects training randomness and needs two seeds.
    ``ci_tasks`` is a percentile bootstrap over tasks of the seed-averaged task means, which reflects the choice
    of tasks and needs ``MIN_TASKS_FOR_INTERVAL`` tasks and ``n_boot`` of 1 or more. Each task counts once per seed because its metrics
    are averaged first.
    """
    valid = rel.filter(pl.col("rel_change").is_not_null() & pl.col("rel_change").is_not_nan())
    # Each study gets its own Δm: tasks and seeds of different studies are never pooled.
    base = ["study", "paradigm", "data_fraction", "split"]
    # Sorted groups make the shared bootstrap generator draw in the same order on every call, so the same
    # table always gives the same intervals (polars' group_by returns groups in arbitrary order).
    per_seed_task = (
        valid.group_by(*base, "seed", "task", "task_type", "clinical_group", "group")
        .agg(pl.col("rel_change").mean())
        .sort(*base, "seed", "task", "group", nulls_last=True)
    )
    rng = np.random.default_rng(seed)
    rows = []
    for level_name in DELTA_M_LEVELS:
        keys = base if level_name == "study" else [*base, level_name]
        for key, part in per_seed_task.group_by(keys, maintain_order=True):
            info = dict(zip(keys, key))
            task_means = part.group_by("task").agg(pl.col("rel_change").mean()).sort("task")["rel_change"].to_numpy()
            seed_means = part.group_by("seed").agg(pl.col("rel_change").mean()).sort("seed")["rel_change"].to_numpy()
            n_tasks, n_seeds = task_means.size, seed_means.size
            ci_seeds = t_interval(seed_means, level) if n_seeds >= 2 else (math.nan, math.nan)
            ci_tasks = (math.nan, math.nan)
            if n_tasks >= MIN_TASKS_FOR_INTERVAL and n_boot > 0:
                draws = task_means[rng.integers(0, n_tasks, size=(n_boot, n_tasks))].mean(axis=1)
                ci_tasks = tuple(np.percentile(draws, [50 * (1 - level), 50 * (1 + level)]).tolist())
            rows.append(
                {
                    "study": info["study"],
                    "paradigm": info["paradigm"],
                    "data_fraction": info["data_fraction"],
                    "split": info["split"],
                    "level": level_name,
                    "level_value": "all" if level_name == "study" else str(info[level_name]),
                    "delta_m": float(task_means.mean()),
                    "sd_tasks": float(task_means.std(ddof=1)) if n_tasks >= 2 else math.nan,
                    "sd_seeds": float(seed_means.std(ddof=1)) if n_seeds >= 2 else math.nan,
                    "ci_seeds_lo": ci_seeds[0],
                    "ci_seeds_hi": ci_seeds[1],
                    "ci_tasks_lo": ci_tasks[0],
                    "ci_tasks_hi": ci_tasks[1],
                    "n_tasks": n_tasks,
                    "n_seeds": n_seeds,
                }
            )
    table = pl.DataFrame(rows, schema=DELTA_M_SCHEMA)
    order = {name: k for k, name in enumerate(DELTA_M_LEVELS)}
    return (
        table.with_columns(pl.col("level").replace_strict(order, return_dtype=pl.Int64).alias("_order"))
        .sort("study", "paradigm", "split", "data_fraction", "_order", "level_value")
        .drop("_order")
    )


def one_task_group_notes(rel: pl.DataFrame) -> list[str]:
    """Name grouped-paradigm groups with one task whose scores equal its task-specific run's in every row.

    A group of one task trains the task-specific model again, and deterministic training gives it a change of
    exactly 0, which pulls grouped Δm towards 0 by its share of the tasks. A group with one task in the table
    but a nonzero change (a publication's table listing one task of a larger group) is not named.
    """
    grouped = rel.filter((pl.col("paradigm") == "grouped") & pl.col("group").is_not_null())
    if grouped.is_empty():
        return []
    sizes = (
        grouped.group_by("study", "group")
        .agg(pl.col("task").unique().sort().alias("tasks"), (pl.col("rel_change").abs() <= 1e-12).all().alias("same"))
        .filter((pl.col("tasks").list.len() == 1) & pl.col("same"))
        .sort("study", "group")
    )
    return [
        f"{row['study']}: group {row['group']!r} holds one task ({row['tasks'][0]}) that scores the same as its "
        "task-specific run, so its change of 0 enters grouped Δm; merge it into another group, or read grouped Δm "
        "as including it"
        for row in sizes.iter_rows(named=True)
    ]


def analyse_transfer(
    results: pl.DataFrame,
    per_image: pl.DataFrame | None = None,
    metrics: Mapping[str, str] | None = None,
    all_metrics: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
) -> TransferAnalysis:
    """Compute relative change, per-comparison statistics with negative-transfer flags, and Δm tables.

    ``n_boot`` is the number of bootstrap replicates of both the image bootstrap and the Δm bootstrap over
    tasks. With 0 those intervals are NaN, and ``messages`` explains why.
    """
    rel, warnings = relative_change_with_warnings(results, metrics, all_metrics)
    summary, notes = seed_summary(rel, per_image, n_boot=n_boot, seed=seed)
    warnings.extend(notes)
    warnings.extend(one_task_group_notes(rel))
    messages = []
    if n_boot < 1 and rel.height:
        text = (
            "negative transfer computed with 0 bootstrap replicates, so without bootstrap intervals: "
            "Δm has no interval over tasks (ci_tasks is empty)"
        )
        if per_image is not None and per_image.height:
            text += (
                ", and comparisons with per-image scores have no image-bootstrap interval (they get the t interval "
                "over seeds where there are two or more seeds, else none: ci_method no_bootstrap)"
            )
        messages.append(text)
    delta_m = delta_m_table(rel, n_boot=n_boot, seed=seed)
    return TransferAnalysis(rel=rel, summary=summary, delta_m=delta_m, warnings=warnings, messages=messages)
