"""Task-type figure: relative change per task type and paradigm (box plus strip plot) with the Kruskal–Wallis test."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from usagg.plots.common import RELATIVE_CHANGE_LABEL, pick_fraction, pick_split, relative_change_for
from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import (
    DOUBLE_COLUMN_IN,
    SINGLE_COLUMN_IN,
    new_figure,
    ordered_paradigms,
    ordered_task_types,
    paradigm_label,
    task_type_color,
)

HEIGHT_IN = 2.6
JITTER_SEED = 0  # fixed, so that re-rendered figures are identical


@register_figure(
    "task-type",
    "Relative change per task type, one panel per paradigm (box plus strip plot), with the Kruskal–Wallis test across types.",
)
def task_type(
    inputs: FigureInputs,
    *,
    fraction: float | None = None,
    split: str | None = None,
) -> FigurePlot:
    """Draw one observation per task (mean over seeds) at one data fraction (default: the largest)."""
    from usagg.analysis.inference import per_task_means, task_type_sensitivity

    rel = relative_change_for(inputs, "task-type")
    rel, split = pick_split(rel, split)
    rel, fraction = pick_fraction(rel, fraction)
    means = per_task_means(rel, data_fraction=fraction)
    tests = task_type_sensitivity(rel, data_fraction=fraction)

    paradigms = ordered_paradigms(means["paradigm"].unique().to_list())
    types = ordered_task_types(means["task_type"].unique().to_list())
    width = SINGLE_COLUMN_IN if len(paradigms) == 1 else DOUBLE_COLUMN_IN
    fig = new_figure(width, HEIGHT_IN)
    axes = fig.subplots(1, len(paradigms), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(JITTER_SEED)

    for ax, paradigm in zip(axes, paradigms):
        part = means.filter(pl.col("paradigm") == paradigm)
        samples = [part.filter(pl.col("task_type") == t)["rel_change"].to_numpy() * 100 for t in types]
        positions = np.arange(len(types))
        drawn = [i for i, s in enumerate(samples) if s.size]
        boxes = ax.boxplot(
            [samples[i] for i in drawn],
            positions=positions[drawn],
            widths=0.55,
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "black", "linewidth": 1.0},
            whiskerprops={"linewidth": 0.7},
            capprops={"linewidth": 0.7},
            boxprops={"linewidth": 0.7},
        )
        for patch, i in zip(boxes["boxes"], drawn):
            patch.set_facecolor(task_type_color(types[i]))
            patch.set_alpha(0.35)
        for i in drawn:
            jitter = rng.uniform(-0.16, 0.16, samples[i].size)
            ax.scatter(positions[i] + jitter, samples[i], s=9, color=task_type_color(types[i]), edgecolors="white", linewidths=0.3, zorder=3)
        ax.axhline(0.0, color="#333333", linewidth=0.7, linestyle="--", zorder=1)
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{t}\n(n = {s.size})" for t, s in zip(types, samples)])
        ax.set_xlim(-0.6, len(types) - 0.4)
        ax.set_title(f"{paradigm_label(paradigm)}\n{_test_label(tests.get(paradigm))}")
    axes[0].set_ylabel(RELATIVE_CHANGE_LABEL)
    fig.suptitle(f"Relative change by task type (one point per task; fraction {fraction:g}, {split} split)")

    test_rows = pl.DataFrame(
        [{"layer": "kruskal_wallis", "paradigm": p, **tests[p].as_row()} for p in paradigms if p in tests]
    )
    points = means.select(
        pl.lit("task").alias("layer"), "paradigm", "task", "task_type", "clinical_group", "data_fraction",
        (pl.col("rel_change") * 100).alias("rel_change_percent"), "n_seeds",
    )
    data = pl.concat([points, test_rows], how="diagonal_relaxed").with_columns(pl.lit(split).alias("split"))
    notes = [f"{p}: {w}" for p in paradigms if p in tests for w in tests[p].warnings]
    return FigurePlot(fig, data, notes)


def _test_label(test) -> str:
    if test is None or not math.isfinite(test.statistic):
        return "Kruskal–Wallis: not testable"
    return f"Kruskal–Wallis H = {test.statistic:.2f}, p = {_format_p(test.p_value)}, ε² = {test.epsilon2:.2f}"


def _format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
