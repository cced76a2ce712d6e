"""Data-scale figure: relative change against training images, with the fitted regression and its zero crossing."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import offset_copy

from usagg.plots.common import (
    clinical_group_handles,
    compute_relative_change,
    pick_split,
    task_type_handles,
)
from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import (
    DOUBLE_COLUMN_IN,
    SINGLE_COLUMN_IN,
    SMALL_FONT_SIZE,
    clinical_group_markers,
    new_figure,
    ordered_paradigms,
    ordered_task_types,
    paradigm_label,
    task_type_color,
)

PANEL_HEIGHT_IN = 2.3
LEGEND_HEIGHT_IN = 0.9
GRID_POINTS = 60


@register_figure(
    "data-scale",
    "Relative change vs training images (log axis) per aggregated paradigm, with the fitted regression, its 95 % band and zero crossing.",
)
def data_scale(
    inputs: FigureInputs,
    *,
    split: str | None = None,
    n_bootstrap: int = 1000,
) -> FigurePlot:
    """Draw one panel per aggregated paradigm from :func:`usagg.analysis.data_scale.fit_data_scale`."""
    from usagg.analysis.data_scale import fit_data_scale

    rel = compute_relative_change(inputs.require_results("data-scale"))
    rel, split = pick_split(rel, split)
    fit = fit_data_scale(rel, split=split, n_bootstrap=n_bootstrap)
    observations = fit.data
    paradigms = ordered_paradigms(observations["paradigm"].unique().to_list())
    task_types = ordered_task_types(observations["task_type"].unique().to_list())
    markers = clinical_group_markers(observations["clinical_group"].unique().to_list())

    n_panels = len(paradigms)
    width = SINGLE_COLUMN_IN if n_panels == 1 else DOUBLE_COLUMN_IN
    fig = new_figure(width, PANEL_HEIGHT_IN + LEGEND_HEIGHT_IN)
    axes = fig.subplots(1, n_panels, sharex=True, sharey=True, squeeze=False)[0]

    # One fitted line per task type, unless the chosen model has no task-type term (then the lines coincide).
    line_types = task_types if "task_type" in fit.uses else [task_types[0]]
    n_min, n_max = float(observations["n_train"].min()), float(observations["n_train"].max())

    fit_rows: list[dict] = []
    crossing_rows: list[dict] = []
    for ax, paradigm in zip(axes, paradigms):
        points = observations.filter(pl.col("paradigm") == paradigm)
        for (group,), part in points.group_by(["clinical_group"], maintain_order=True):
            ax.scatter(
                part["n_train"].to_numpy(),
                part["rel_change"].to_numpy() * 100,
                c=[task_type_color(t) for t in part["task_type"]],
                marker=markers[group],
                s=9,
                linewidths=0.3,
                edgecolors="white",
                alpha=0.85,
                zorder=3,
            )
        type_ranges: dict[str, tuple[float, float]] = {}
        for task_type in line_types:
            observed = points.filter(pl.col("task_type") == task_type) if "task_type" in fit.uses else points
            if observed.height == 0:
                continue
            # Each line covers only the training sizes its task type was observed at, so the figure does not
            # extrapolate a type's fit (and its widening band) over sizes it never had.
            type_min, type_max = float(observed["n_train"].min()), float(observed["n_train"].max())
            type_ranges[task_type if "task_type" in fit.uses else "all"] = (type_min, type_max)
            if type_max <= type_min:
                continue
            grid = np.logspace(np.log10(type_min), np.log10(type_max), GRID_POINTS)
            mean, lo, hi = fit.predict(grid, task_type, paradigm)
            color = task_type_color(task_type) if "task_type" in fit.uses else "black"
            ax.plot(grid, mean * 100, color=color, linewidth=1.2, zorder=4)
            ax.fill_between(grid, lo * 100, hi * 100, color=color, alpha=0.15, linewidth=0, zorder=2)
            label = task_type if "task_type" in fit.uses else "all"
            fit_rows += [
                {"layer": "fit", "paradigm": paradigm, "task_type": label, "n_train": float(n), "rel_change": float(m), "ci_lo": float(a), "ci_hi": float(b)}
                for n, m, a, b in zip(grid, mean, lo, hi)
            ]
        crossings = fit.crossings
        if "task_type" not in fit.uses:
            # Without a task-type term every type has the same crossing; draw it once, in black.
            crossings = crossings.filter(pl.col("paradigm") == paradigm).head(1).with_columns(pl.lit("all").alias("task_type"))
        crossing_rows += _draw_crossings(ax, crossings, paradigm, [*task_types, "all"], type_ranges)

        ax.axhline(0.0, color="#333333", linewidth=0.7, linestyle="--", zorder=1)
        _log_axis(ax, n_min, n_max)
        ax.set_title(paradigm_label(paradigm))
        ax.set_xlabel("training images (log scale)")
    axes[0].set_ylabel("relative change to task-specific (%)")
    clip_notes = _limit_y(axes, paradigms, observations)

    handles = task_type_handles(task_types, marker="o") + clinical_group_handles(markers)
    if "task_type" not in fit.uses:
        handles.append(Line2D([], [], color="black", linewidth=1.2, label="fit (no task-type term)"))
    handles.append(_crossing_handle())
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 7 if n_panels > 1 else 3),
        handletextpad=0.3,
        columnspacing=0.9,
    )
    fig.suptitle(f"Relative change vs training-set size ({split} split)")

    data = pl.concat(
        [
            observations.select(
                pl.lit("point").alias("layer"),
                "paradigm",
                "task_type",
                "task",
                "clinical_group",
                pl.col("n_train").cast(pl.Float64),
                "data_fraction",
                "seed",
                (pl.col("rel_change") * 100).alias("rel_change_percent"),
            ),
            _rows_frame(fit_rows),
            _rows_frame(crossing_rows),
        ],
        how="diagonal_relaxed",
    )
    notes = [f"fitted model: rel_change ~ {fit.formula} (OLS, HC3 errors; bands are 95 % confidence intervals)"]
    notes += clip_notes + list(fit.messages) + list(fit.warnings)
    return FigurePlot(fig, data, notes)


def _draw_crossings(
    ax, crossings: pl.DataFrame, paradigm: str, task_types: list[str], type_ranges: dict[str, tuple[float, float]]
) -> list[dict]:
    """Mark each zero crossing that lies inside its task type's observed training sizes on the zero line.

    Its bootstrap interval, when bounded, is drawn as a bar just below the zero line, one row per task type,
    so that the intervals of different types do not hide each other.
    """
    rows = []
    for row in crossings.filter(pl.col("paradigm") == paradigm).iter_rows(named=True):
        n_cross = row["n_train_cross"]
        n_min, n_max = type_ranges.get(row["task_type"], (math.nan, math.nan))
        drawn = bool(
            row["within_data_range"] and n_cross is not None and np.isfinite(n_cross) and n_min <= n_cross <= n_max
        )
        if drawn:
            color = "black" if row["task_type"] == "all" else task_type_color(row["task_type"])
            if row["bounded"] and np.isfinite(row["ci_lo"]) and np.isfinite(row["ci_hi"]):
                lo, hi = max(row["ci_lo"], n_min), min(row["ci_hi"], n_max)
                offset = -4.0 - 2.5 * task_types.index(row["task_type"])
                shifted = offset_copy(ax.transData, fig=ax.figure, y=offset, units="points")
                ax.plot([lo, hi], [0, 0], color=color, linewidth=1.6, solid_capstyle="butt", transform=shifted, zorder=5)
            ax.plot([n_cross], [0], marker="D", markersize=4.5, markerfacecolor="white", markeredgecolor=color, markeredgewidth=1.2, zorder=6)
        rows.append(
            {
                "layer": "crossing",
                "paradigm": paradigm,
                "task_type": row["task_type"],
                "n_train": float(n_cross) if n_cross is not None else None,
                "ci_lo": row["ci_lo"],
                "ci_hi": row["ci_hi"],
                "bounded": row["bounded"],
                "drawn": drawn,
                "note": row["note"],
            }
        )
    return rows


def _crossing_handle() -> Line2D:
    return Line2D(
        [], [], linestyle="none", marker="D", markersize=4.5, markerfacecolor="white", markeredgecolor="#333333",
        label="zero crossing (bar: 95 % CI)",
    )


def _limit_y(axes, paradigms: list[str], observations: pl.DataFrame) -> list[str]:
    """Fit the shared y range to the bulk of the points and mark the points beyond it at the edge.

    A task whose task-specific score is near 0 can have a relative change of thousands of percent, which would
    flatten every other point onto the zero line. The range spans the points within three interquartile
    ranges of the quartiles (Tukey's far-out fences) and always includes 0; points beyond it are drawn as
    triangles at the edge, with their count and extreme value written in the panel.
    """
    values = observations["rel_change"].to_numpy() * 100
    q1, q3 = np.percentile(values, [25, 75])
    spread = max(q3 - q1, 1e-9)
    inside = values[(values >= q1 - 3 * spread) & (values <= q3 + 3 * spread)]
    low, high = min(inside.min(), 0.0), max(inside.max(), 0.0)
    if inside.size == values.size:
        return []
    pad = 0.08 * (high - low or 1.0)
    low, high = low - pad, high + pad
    axes[0].set_ylim(low, high)
    notes = []
    for ax, paradigm in zip(axes, paradigms):
        part = observations.filter(pl.col("paradigm") == paradigm)
        y = part["rel_change"].to_numpy() * 100
        for side, beyond, edge, marker in (("above", y > high, high, "^"), ("below", y < low, low, "v")):
            if not beyond.any():
                continue
            colors = [task_type_color(t) for t, out in zip(part["task_type"], beyond) if out]
            ax.scatter(part["n_train"].to_numpy()[beyond], np.full(beyond.sum(), edge), marker=marker, s=22, c=colors, clip_on=False, zorder=6)
            extreme = y[beyond].max() if side == "above" else y[beyond].min()
            text = f"{beyond.sum()} point(s) {side} the range, up to {extreme:+,.0f} %"
            ax.text(0.02, 0.97 if side == "above" else 0.03, text, transform=ax.transAxes, ha="left",
                    va="top" if side == "above" else "bottom", fontsize=SMALL_FONT_SIZE, color="#444444")
            notes.append(f"{paradigm_label(paradigm)}: {text} (drawn as triangles at the axis edge)")
    return notes


def _log_axis(ax, n_min: float, n_max: float) -> None:
    """Put a log scale on x with at least three labelled ticks, also when the sizes span less than a decade."""
    ax.set_xscale("log")
    for subs in ((1.0,), (1.0, 2.0, 5.0), tuple(range(1, 10))):
        ticks = [
            m * 10.0**e
            for e in range(int(np.floor(np.log10(n_min))), int(np.ceil(np.log10(n_max))) + 1)
            for m in subs
            if n_min <= m * 10.0**e <= n_max
        ]
        if len(ticks) >= 3:
            break
    if len(ticks) < 3:
        ticks = sorted({float(f"{v:.2g}") for v in np.geomspace(n_min, n_max, 3)})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    ax.xaxis.set_minor_locator(LogLocator(subs=np.arange(2, 10)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _rows_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows) if rows else pl.DataFrame()
