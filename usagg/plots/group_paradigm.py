"""Group × paradigm figure: per clinical group, Δm under grouped and unified training with confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from usagg.analysis.transfer import MIN_TASKS_FOR_INTERVAL
from usagg.errors import ConfigError
from usagg.plots.common import (
    paradigm_handles,
    pick_fraction,
    pick_split,
    relative_change_for,
    size_rows,
)
from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import (
    SINGLE_COLUMN_IN,
    new_figure,
    ordered_paradigms,
    paradigm_color,
)

ROW_HEIGHT_IN = 0.36
FRAME_HEIGHT_IN = 1.2
PARADIGM_MARKERS = {"grouped": "o", "unified": "s", "pair": "^"}


def group_table(rel: pl.DataFrame, results: pl.DataFrame, interval: str = "seeds") -> pl.DataFrame:
    """Return Δm per paradigm × clinical group with a 95 % interval and the group's training images.

    Δm and both intervals come from :func:`usagg.analysis.transfer.delta_m_table`: ``seeds`` is the t interval
    of the per-seed Δm, ``tasks`` the bootstrap over the group's tasks. The requested one is shown, and the
    other is used when the requested one is undefined (one seed, or fewer than ``MIN_TASKS_FOR_INTERVAL`` tasks). The training size is the count
    reported in the table (``train_images`` rows) when there is one, else the sum of the tasks' mean n_train.
    """
    from usagg.analysis.transfer import delta_m_table

    if interval not in ("seeds", "tasks"):
        raise ConfigError(f"interval {interval!r} is invalid; choose seeds or tasks")
    other = "tasks" if interval == "seeds" else "seeds"
    table = delta_m_table(rel).filter(pl.col("level") == "clinical_group").rename({"level_value": "clinical_group"})
    first_lo, first_hi = pl.col(f"ci_{interval}_lo"), pl.col(f"ci_{interval}_hi")
    second_lo, second_hi = pl.col(f"ci_{other}_lo"), pl.col(f"ci_{other}_hi")
    first_ok = first_lo.is_not_nan() & first_lo.is_not_null()
    second_ok = second_lo.is_not_nan() & second_lo.is_not_null()
    table = table.with_columns(
        pl.when(first_ok).then(first_lo).when(second_ok).then(second_lo).otherwise(None).alias("ci_lo"),
        pl.when(first_ok).then(first_hi).when(second_ok).then(second_hi).otherwise(None).alias("ci_hi"),
        pl.when(first_ok).then(pl.lit(interval)).when(second_ok).then(pl.lit(other)).otherwise(pl.lit("none")).alias("ci_over"),
    )

    # Sizes count every task of the group, also those without a finite relative change (left out of Δm).
    per_task = rel.group_by("paradigm", "clinical_group", "task").agg(pl.col("n_train").mean())
    sums = per_task.group_by("paradigm", "clinical_group").agg(
        pl.col("task").sort().str.join(", ").alias("tasks"),
        pl.len().cast(pl.Int64).alias("group_tasks"),
        pl.when(pl.col("n_train").null_count() == 0).then(pl.col("n_train").sum()).otherwise(None).alias("train_images"),
    )
    table = table.join(sums, on=["paradigm", "clinical_group"], how="left").with_columns(
        pl.when(pl.col("train_images").is_null()).then(pl.lit("unknown")).otherwise(pl.lit("sum of task n_train")).alias("train_images_source")
    )
    reported = _reported_group_sizes(results)
    if reported:
        known = pl.col("clinical_group").is_in(list(reported))
        table = table.with_columns(
            pl.when(known)
            .then(pl.col("clinical_group").replace_strict(reported, default=None, return_dtype=pl.Float64))
            .otherwise(pl.col("train_images"))
            .alias("train_images"),
            pl.when(known).then(pl.lit("reported")).otherwise(pl.col("train_images_source")).alias("train_images_source"),
        )
    return table


def _reported_group_sizes(results: pl.DataFrame) -> dict[str, float]:
    """Training images per clinical group from ``train_images`` rows that describe a whole group."""
    sizes = size_rows(results).filter((pl.col("task_type") == "all") & (pl.col("clinical_group") != "all"))
    return {row["clinical_group"]: float(row["value"]) for row in sizes.iter_rows(named=True)}


@register_figure(
    "group-paradigm",
    "Per clinical group: Δm under grouped and unified training with 95 % intervals, annotated with the group's training images.",
)
def group_paradigm(
    inputs: FigureInputs,
    *,
    fraction: float | None = None,
    split: str | None = None,
    interval: str = "seeds",
) -> FigurePlot:
    """Draw Δm per clinical group at one data fraction (default: the largest) and split (default: test).

    ``interval`` chooses the 95 % interval: ``seeds`` (training randomness) or ``tasks`` (bootstrap over the
    group's tasks); see :func:`group_table`.
    """
    results = inputs.require_results("group-paradigm")
    rel = relative_change_for(inputs, "group-paradigm")
    rel, split = pick_split(rel, split)
    rel, fraction = pick_fraction(rel, fraction)
    table = group_table(rel, results, interval)

    paradigms = ordered_paradigms(table["paradigm"].unique().to_list())
    sizes = table.group_by("clinical_group").agg(pl.col("train_images").max(), pl.col("group_tasks").max())
    # Largest group on top; groups without a known size last.
    sizes = sizes.sort(pl.col("train_images").fill_null(-1.0), "clinical_group", descending=[True, False])
    groups = sizes["clinical_group"].to_list()

    fig = new_figure(SINGLE_COLUMN_IN, FRAME_HEIGHT_IN + ROW_HEIGHT_IN * len(groups))
    ax = fig.add_subplot()
    offsets = np.linspace(-0.16, 0.16, len(paradigms)) if len(paradigms) > 1 else np.zeros(1)
    for offset, paradigm in zip(offsets, paradigms):
        part = table.filter(pl.col("paradigm") == paradigm)
        lookup = {row["clinical_group"]: row for row in part.iter_rows(named=True)}
        for i, group in enumerate(groups):
            row = lookup.get(group)
            if row is None:
                continue
            y = i + offset
            x = row["delta_m"] * 100
            if row["ci_lo"] is not None:
                ax.plot([row["ci_lo"] * 100, row["ci_hi"] * 100], [y, y], color=paradigm_color(paradigm), linewidth=1.1, zorder=2)
            ax.plot([x], [y], marker=PARADIGM_MARKERS.get(paradigm, "D"), color=paradigm_color(paradigm), markersize=4.5, markeredgecolor="white", markeredgewidth=0.4, zorder=3, linestyle="none")

    ax.axvline(0.0, color="#333333", linewidth=0.7, linestyle="--", zorder=1)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([_group_label(row) for row in sizes.iter_rows(named=True)])
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("Δm, mean relative change of the tasks (%)")
    ax.set_title(f"Clinical groups (fraction {fraction:g}, {split} split)")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)

    fig.legend(
        handles=_legend_handles(paradigms, interval=_interval_label(table)),
        loc="outside lower center",
        ncols=len(paradigms) + 1,
        handletextpad=0.3,
        columnspacing=1.0,
    )
    notes = []
    other = "tasks" if interval == "seeds" else "seeds"
    fallback = table.filter(pl.col("ci_over") == other)
    if fallback.height:
        reason = f"fewer than {MIN_TASKS_FOR_INTERVAL} tasks" if interval == "tasks" else "one seed"
        notes.append(
            f"interval over {other} instead of {interval} ({reason}) for "
            + ", ".join(f"{r['paradigm']}/{r['clinical_group']}" for r in fallback.iter_rows(named=True))
        )
    fewer = table.filter(pl.col("n_tasks") < pl.col("group_tasks"))
    if fewer.height:
        notes.append(
            "Δm averages fewer tasks than the label counts, because some tasks have no finite relative change "
            "(task-specific score 0 or missing): "
            + ", ".join(f"{r['paradigm']}/{r['clinical_group']} {r['n_tasks']} of {r['group_tasks']}" for r in fewer.iter_rows(named=True))
        )
    single = table.filter(pl.col("ci_over") == "none")
    if single.height:
        notes.append(
            "no interval (one seed, or a reported value, and fewer than "
            f"{MIN_TASKS_FOR_INTERVAL} tasks for the bootstrap over tasks) for "
            + ", ".join(f"{r['paradigm']}/{r['clinical_group']}" for r in single.iter_rows(named=True))
        )
    return FigurePlot(fig, table.with_columns((pl.col("delta_m") * 100).alias("delta_m_percent"), pl.lit(split).alias("split")), notes)


def _group_label(row: dict) -> str:
    size = row["train_images"]
    tasks = row["group_tasks"]
    count = f"{int(round(size)):,} images" if size is not None and math.isfinite(size) else "size unknown"
    noun = "task" if tasks == 1 else "tasks"
    return f"{row['clinical_group']}\n{count}, {tasks} {noun}"


def _interval_label(table: pl.DataFrame) -> str | None:
    used = sorted(set(table["ci_over"].to_list()) - {"none"})
    if not used:
        return None
    return "95 % CI over " + " or ".join(used)


def _legend_handles(paradigms: list[str], interval: str | None) -> list:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker=PARADIGM_MARKERS.get(p, "D"), color=paradigm_color(p), linestyle="none", markersize=4.5, label=h.get_label())
        for p, h in zip(paradigms, paradigm_handles(paradigms))
    ]
    if interval:
        handles.append(Line2D([], [], color="#555555", linewidth=1.1, label=interval))
    return handles
