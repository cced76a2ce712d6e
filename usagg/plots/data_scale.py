"""Data-scale figure: relative change against training images, with the fitted regression and its zero crossing."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import offset_copy

from usagg.errors import ConfigError
from usagg.plots.common import (
    RELATIVE_CHANGE_LABEL,
    clinical_group_handles,
    pick_split,
    relative_change_for,
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
# Opacity of a zero crossing whose interval is not bounded.
UNBOUNDED_ALPHA = 0.4
GRID_POINTS = 60
# Opacity of the 95 % confidence bands: light enough that overlapping bands leave points and lines readable.
BAND_ALPHA = 0.09
# The automatic y range leaves out only points beyond both limits: more than OUTLIER_IQR interquartile ranges
# outside the quartiles (Tukey's far-out fences) and a change of more than OUTLIER_PERCENT.
OUTLIER_IQR = 3.0
OUTLIER_PERCENT = 100.0
# Minimum share of the automatic y range kept under 0 when zero crossings with an interval are drawn.
ZERO_ROOM = 0.12
# Height in points of the arrows that mark points beyond the y range.
ARROW_SIZE = 7.0
# Margin added above and below the y range, as a fraction of the range.
Y_MARGIN = 0.06
# Margin left and right of the sizes, as a fraction of their log range (at least 2 %).
X_MARGIN_SHARE = 0.04
# A band that covers more than this share of its panel's y range, on average, is outlined instead of filled.
WIDE_BAND_SHARE = 0.6


@register_figure(
    "data-scale",
    "Relative change vs training images (log axis) per aggregated paradigm, with the fitted regression, its 95 % band and zero crossing.",
)
def data_scale(
    inputs: FigureInputs,
    *,
    split: str | None = None,
    n_bootstrap: int = 2000,
    ylim: list[float] | None = None,
) -> FigurePlot:
    """Draw one panel per aggregated paradigm from :func:`usagg.analysis.data_scale.fit_data_scale`.

    ``ylim`` is the y range as two numbers in percent (``-O ylim=-90,60``). By default the range spans every
    point except true outliers (see :func:`_limit_y`).
    """
    from usagg.analysis.data_scale import fit_data_scale

    ylim = _check_ylim(ylim)
    rel = relative_change_for(inputs, "data-scale")
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
    bands: list[tuple] = []
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
            band = ax.fill_between(grid, lo * 100, hi * 100, color=color, alpha=BAND_ALPHA, linewidth=0, zorder=2)
            bands.append((ax, grid, lo * 100, hi * 100, color, band))
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
    axes[0].set_ylabel(RELATIVE_CHANGE_LABEL)
    room = any(row["ci_drawn"] for row in crossing_rows)
    clip_notes = _limit_y(axes, paradigms, observations, _rows_frame(fit_rows), ylim, room_below_zero=room)
    outline_notes = _outline_wide_bands(bands)
    clip_notes += outline_notes

    # The legend has a row (or rows) each for task-type colours, line and crossing styles, and clinical-group markers.
    styles = []
    if "task_type" not in fit.uses:
        styles.append(Line2D([], [], color="black", linewidth=1.2, label="fit (no task-type term)"))
    if outline_notes:
        styles.append(Line2D([], [], color="#555555", linewidth=0.7, linestyle=":", label="95 % band (wide: edges only)"))
    drawn_crossings = [row for row in crossing_rows if row["drawn"]]
    styles += _crossing_handles(
        with_interval=any(row["ci_drawn"] for row in drawn_crossings),
        with_unbounded=any(not row["bounded"] for row in drawn_crossings),
        with_bounded=any(row["bounded"] for row in drawn_crossings),
    )
    sections = [task_type_handles(task_types, marker="o"), styles, clinical_group_handles(markers)]
    handles, ncols = _rows_first(sections, 7 if n_panels > 1 else 3)
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=ncols,
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
    if any(row["ci_cut"] for row in crossing_rows):
        notes.append(
            "an arrowhead ends a zero-crossing interval where it reaches beyond its task type's training sizes; "
            "the whole interval is in the crossing rows of the data CSV (ci_lo, ci_hi)"
        )
    return FigurePlot(fig, data, notes)


def _draw_crossings(
    ax, crossings: pl.DataFrame, paradigm: str, task_types: list[str], type_ranges: dict[str, tuple[float, float]]
) -> list[dict]:
    """Mark each zero crossing that lies inside its task type's observed training sizes on the zero line.

    Its bootstrap interval, when bounded, is drawn as a thin capped bar just below the zero line, one row per
    task type, so that the intervals of different types do not hide each other. An end beyond the training sizes
    of the line is cut there and drawn as an arrowhead instead of a cap, so the bar does not read as a fitted line.
    """
    rows = []
    for row in crossings.filter(pl.col("paradigm") == paradigm).iter_rows(named=True):
        n_cross = row["n_train_cross"]
        n_min, n_max = type_ranges.get(row["task_type"], (math.nan, math.nan))
        drawn = bool(
            row["within_data_range"] and n_cross is not None and np.isfinite(n_cross) and n_min <= n_cross <= n_max
        )
        ci_drawn = bool(drawn and row["bounded"] and np.isfinite(row["ci_lo"]) and np.isfinite(row["ci_hi"]))
        ci_cut = bool(ci_drawn and (row["ci_lo"] < n_min or row["ci_hi"] > n_max))
        if drawn:
            color = "black" if row["task_type"] == "all" else task_type_color(row["task_type"])
            if ci_drawn:
                lo, hi = max(row["ci_lo"], n_min), min(row["ci_hi"], n_max)
                offset = -4.5 - 3.5 * task_types.index(row["task_type"])
                shifted = offset_copy(ax.transData, fig=ax.figure, y=offset, units="points")
                ax.plot([lo, hi], [0, 0], color=color, linewidth=0.9, solid_capstyle="butt", transform=shifted, zorder=5)
                for end, cut, head in ((lo, row["ci_lo"] < n_min, "<"), (hi, row["ci_hi"] > n_max, ">")):
                    ax.plot([end], [0], marker=head if cut else "|", markersize=3.5 if cut else 4.5, color=color,
                            markeredgewidth=0.9, linestyle="none", transform=shifted, zorder=5)
            # A crossing whose bootstrap interval is not bounded (the slope's sign is uncertain, or too few tasks to
            # resample) is drawn faded, so that it does not read as a finding.
            ax.plot([n_cross], [0], marker="D", markersize=4.5, markerfacecolor="white", markeredgecolor=color,
                    markeredgewidth=1.2, alpha=1.0 if row["bounded"] else UNBOUNDED_ALPHA, zorder=6)
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
                "ci_drawn": ci_drawn,
                "ci_cut": ci_cut,
                "note": row["note"],
            }
        )
    return rows


def _crossing_handles(with_interval: bool, with_unbounded: bool, with_bounded: bool) -> list[Line2D]:
    """Legend entries of the drawn crossings: bounded ones (with their CI bar when drawn) and faded unbounded ones."""
    style = {"linestyle": "none", "marker": "D", "markersize": 4.5, "markerfacecolor": "white", "markeredgecolor": "#333333"}
    handles = []
    if with_bounded:
        handles.append(Line2D([], [], label="zero crossing (95 % CI)" if with_interval else "zero crossing", **style))
    if with_unbounded:
        handles.append(Line2D([], [], label="uncertain zero crossing", alpha=UNBOUNDED_ALPHA, **style))
    return handles


def _rows_first(sections: list[list], max_columns: int) -> tuple[list, int]:
    """Order legend handles so that they read left to right, row by row, each section starting a new row.

    Matplotlib fills a legend column by column. Here the columns are as many as the widest section needs (at
    most ``max_columns``), a longer section wraps onto further rows, the last row of each section is
    padded with empty entries, and the handles are reordered column by column so that each row reads on from
    the one above.
    """
    sections = [section for section in sections if section]
    if not sections:
        return [], 1
    # A section longer than a row is spread evenly over the rows it needs (10 entries in 7 columns: 5 + 5).
    n_columns = max(math.ceil(len(section) / math.ceil(len(section) / max_columns)) for section in sections)
    rows: list[list] = []
    for section in sections:
        for start in range(0, len(section), n_columns):
            row = section[start : start + n_columns]
            rows.append(row + [Line2D([], [], linestyle="none", label=" ") for _ in range(n_columns - len(row))])
    return [row[c] for c in range(n_columns) for row in rows], n_columns


def _check_ylim(ylim: list[float] | None) -> tuple[float, float] | None:
    if ylim is None:
        return None
    if len(ylim) != 2 or not all(np.isfinite(ylim)) or ylim[0] >= ylim[1]:
        raise ConfigError(
            f"figure 'data-scale': option ylim needs two numbers in percent, the lower one first, "
            f"e.g. -O ylim=-90,60 (got {','.join(f'{v:g}' for v in ylim)})"
        )
    return float(ylim[0]), float(ylim[1])


def _limit_y(
    axes,
    paradigms: list[str],
    observations: pl.DataFrame,
    fits: pl.DataFrame,
    ylim: tuple[float, float] | None,
    room_below_zero: bool = False,
) -> list[str]:
    """Set the shared y range and mark the points beyond it with arrows at the edge.

    ``ylim`` (percent) is used as given. Otherwise the range spans every point and 0, plus a margin of
    ``Y_MARGIN``. Only true outliers are left out: points both more than ``OUTLIER_IQR`` interquartile ranges
    outside the quartiles and beyond ±``OUTLIER_PERCENT`` %. Such a value usually comes from a task-specific
    score near 0, and drawing it would flatten every other point onto the zero line. Fitted lines and their
    bands do not widen the range. Where they reach beyond it, they are cut at the axis and a note reports it.
    ``room_below_zero`` keeps at least ``ZERO_ROOM`` of the range under 0 for the crossing intervals.
    """
    values = observations["rel_change"].to_numpy() * 100
    if ylim is not None:
        low, high = ylim
        rule = "the y range set with the ylim option"
    else:
        q1, q3 = np.percentile(values, [25, 75])
        spread = q3 - q1
        fence_low = min(q1 - OUTLIER_IQR * spread, -OUTLIER_PERCENT)
        fence_high = max(q3 + OUTLIER_IQR * spread, OUTLIER_PERCENT)
        in_range = np.concatenate([values, [0.0]])
        in_range = in_range[(in_range >= fence_low) & (in_range <= fence_high)]
        low, high = float(in_range.min()), float(in_range.max())
        pad = Y_MARGIN * (high - low or 1.0)
        low, high = low - pad, high + pad
        if room_below_zero:
            # The intervals of zero crossings are drawn as bars a few points under the zero line.
            low = min(low, -ZERO_ROOM * (high - low))
        rule = (
            f"the automatic y range, which leaves out only points more than {OUTLIER_IQR:g} interquartile ranges "
            f"outside the quartiles and beyond ±{OUTLIER_PERCENT:g} %; set the range with -O ylim=LO,HI"
        )
    axes[0].set_ylim(low, high)
    notes = []
    n_lines = 0
    for ax, paradigm in zip(axes, paradigms):
        part = observations.filter(pl.col("paradigm") == paradigm)
        y = part["rel_change"].to_numpy() * 100
        lines = []
        for side, beyond, edge in (("above", y > high, high), ("below", y < low, low)):
            if not beyond.any():
                continue
            _edge_arrows(ax, part["n_train"].to_numpy()[beyond], [t for t, out in zip(part["task_type"], beyond) if out], edge, side)
            extreme = y[beyond].max() if side == "above" else y[beyond].min()
            arrow, direction = ("↑", "up") if side == "above" else ("↓", "down")
            text = f"{beyond.sum()} point(s) {side} the range, {direction} to {{}} %"
            # The panel writes the minus sign as the tick labels do (U+2212); the note keeps ASCII.
            lines.append(f"{arrow} " + text.format(f"{extreme:+,.0f}".replace("-", "\N{MINUS SIGN}")))
            notes.append(f"{paradigm_label(paradigm)}: {text.format(f'{extreme:+,.0f}')}, drawn as arrows at the axis edge ({rule})")
        if lines:
            # Above the panel, under its title, so that the count never covers a point.
            ax.annotate(
                "\n".join(lines), xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 2), textcoords="offset points",
                ha="center", va="bottom", fontsize=SMALL_FONT_SIZE, color="#444444",
            )
            n_lines = max(n_lines, len(lines))
        if fits.height:
            fit = fits.filter(pl.col("paradigm") == paradigm)
            for element, beyond in (
                ("fitted line", (pl.col("rel_change") * 100 < low) | (pl.col("rel_change") * 100 > high)),
                ("95 % band", (pl.col("ci_lo") * 100 < low) | (pl.col("ci_hi") * 100 > high)),
            ):
                cut = fit.filter(beyond)["task_type"].unique(maintain_order=True).to_list()
                if cut:
                    notes.append(f"{paradigm_label(paradigm)}: the {element} of {', '.join(cut)} reaches beyond the y range and is cut at the axis")
    if n_lines:
        # The same gap above every panel keeps the panel titles on one line.
        for ax in axes:
            ax.set_title(ax.get_title(), pad=4 + 1.25 * SMALL_FONT_SIZE * n_lines)
    return notes


def _edge_arrows(ax, n_train: np.ndarray, task_types: list[str], edge: float, side: str) -> None:
    """Draw an arrow in the task type's colour for each point beyond the y range, inside the panel at its edge."""
    marker, shift = (r"$\uparrow$", -ARROW_SIZE / 2) if side == "above" else (r"$\downarrow$", ARROW_SIZE / 2)
    inside = offset_copy(ax.transData, fig=ax.figure, y=shift, units="points")
    for task_type in dict.fromkeys(task_types):
        x = [n for n, t in zip(n_train, task_types) if t == task_type]
        ax.plot(x, [edge] * len(x), linestyle="none", marker=marker, markersize=ARROW_SIZE, markeredgewidth=0,
                color=task_type_color(task_type), transform=inside, clip_on=False, zorder=6)


def _outline_wide_bands(bands: list[tuple]) -> list[str]:
    """Draw as dotted edges the bands that would cover most of their panel; return a note if any were.

    With few tasks per type a 95 % band can span more than the whole y range, and filled it would hide the
    points and the other types' bands under one coloured block.
    """
    outlined = []
    for ax, grid, lo, hi, color, band in bands:
        low, high = ax.get_ylim()
        covered = np.clip(hi, low, high) - np.clip(lo, low, high)
        if np.mean(covered) <= WIDE_BAND_SHARE * (high - low):
            continue
        band.remove()
        for edge in (lo, hi):
            ax.plot(grid, edge, color=color, linewidth=0.7, linestyle=":", zorder=2)
        outlined.append(ax.get_title())
    if not outlined:
        return []
    return [
        f"{', '.join(dict.fromkeys(outlined))}: 95 % bands that cover more than {WIDE_BAND_SHARE:.0%} of the y range "
        "are drawn as dotted edges instead of filled"
    ]


def _log_axis(ax, n_min: float, n_max: float) -> None:
    """Put a log scale on x with at least three labelled ticks, also when the sizes span less than a decade.

    The axis reaches a little beyond the smallest and largest size, so that no point sits on the frame.
    """
    ax.set_xscale("log")
    margin = max((n_max / n_min) ** X_MARGIN_SHARE, 1.02) if n_min > 0 else 1.0
    ax.set_xlim(n_min / margin, n_max * margin)
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
