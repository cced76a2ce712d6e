"""Transfer matrix: relative change of every task (rows) under every aggregated paradigm (columns)."""

from __future__ import annotations

import matplotlib
import numpy as np
import polars as pl
from matplotlib.colors import TwoSlopeNorm, to_rgb
from matplotlib.patches import Rectangle

from usagg.plots.common import (
    RELATIVE_CHANGE_LABEL,
    pick_fraction,
    pick_split,
    relative_change_for,
    task_order,
    task_type_handles,
    text_color_for,
    type_abbreviation,
)
from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import (
    DIVERGING_CMAP,
    DOUBLE_COLUMN_IN,
    FONT_SIZE,
    SINGLE_COLUMN_IN,
    SMALL_FONT_SIZE,
    new_figure,
    ordered_paradigms,
    paradigm_label,
    shorten_middle,
    task_type_color,
    text_width_in,
)

ROW_HEIGHT_IN = 0.17
# Width of a heatmap column, and of the strip, the gaps and the margins around the labels, in inches.
MIN_CELL_IN = 0.5
FIXED_WIDTH_IN = 0.3
# Inches for the title, column labels, colour bar and legend around the rows.
FRAME_HEIGHT_IN = 1.25
COLORBAR_HEIGHT_IN = 0.08
# Bootstrap replicates and seed of the image bootstrap, the defaults of `usagg transfer-matrix`, so that a
# figure of a study folder with per-image scores flags the cells negative_transfer.csv flags.
N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0


def transfer_table(
    rel: pl.DataFrame, per_image: pl.DataFrame | None = None, n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED
) -> pl.DataFrame:
    """Mean relative change per task and paradigm over seeds, with the negative-transfer flag of each cell.

    The flag is the ``negative_transfer`` column of :func:`usagg.analysis.inference.seed_summary`, the table
    written as negative_transfer.csv: the 95 % interval of the relative change lies below 0. A comparison
    without an interval (one seed without per-image scores, or a reported value) has no flag and is not
    marked, whatever the sign of its mean. ``per_image``, ``n_boot`` and ``seed`` are passed to
    ``seed_summary``. A task compared on several metrics has one comparison per metric, and its cell is marked
    when any of them is flagged. ``flag_rule`` lists the table's rule of each comparison.
    """
    from usagg.analysis.inference import seed_summary
    from usagg.analysis.relative import delta_m

    per_cell = delta_m(rel, by=["task", "paradigm"]).select("task", "paradigm", pl.col("delta_m").alias("rel_change"), "n_rows")
    summary, _ = seed_summary(rel, per_image, n_boot=n_boot, seed=seed)
    flags = summary.sort("metric").group_by("task", "paradigm").agg(
        # any() skips nulls, so a cell whose comparisons all lack an interval gets null here, as in the table.
        pl.when(pl.col("negative_transfer").is_not_null().any()).then(pl.col("negative_transfer").any()).alias("negative_transfer"),
        pl.col("ci_lo").first(),
        pl.col("ci_hi").first(),
        pl.col("ci_method").unique(maintain_order=True).str.join("; "),
        pl.col("flag_rule").unique(maintain_order=True).str.join("; "),
    )
    table = per_cell.join(flags, on=["task", "paradigm"], how="left").join(task_order(rel), on="task", how="left")
    return table.with_columns(pl.col("negative_transfer").fill_null(False).alias("marked"))


@register_figure(
    "transfer-matrix",
    "Heatmap of relative change (%) per task (rows, by clinical group) and aggregated paradigm; negative transfer outlined.",
)
def transfer_matrix(
    inputs: FigureInputs,
    *,
    fraction: float | None = None,
    split: str | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
) -> FigurePlot:
    """Draw the transfer matrix at one data fraction (default: the largest) and split (default: test).

    Cells are outlined where negative_transfer.csv flags them. From a study folder, the per-image scores under
    it give image-bootstrap intervals with ``n_bootstrap`` replicates, as in ``usagg transfer-matrix``. The
    flags are identical when that command's ``--bootstrap`` equals ``n_bootstrap``.
    """
    rel = relative_change_for(inputs, "transfer-matrix")
    rel, split = pick_split(rel, split)
    rel, fraction = pick_fraction(rel, fraction)
    per_image = _per_image_scores(inputs)
    table = transfer_table(rel, per_image, n_boot=n_bootstrap, seed=BOOTSTRAP_SEED)
    order = task_order(rel)
    paradigms = ordered_paradigms(table["paradigm"].unique().to_list())
    tasks = order["task"].to_list()

    values = np.full((len(tasks), len(paradigms)), np.nan)
    marked = np.zeros(values.shape, dtype=bool)
    index = {t: i for i, t in enumerate(tasks)}
    for row in table.iter_rows(named=True):
        cell = index[row["task"]], paradigms.index(row["paradigm"])
        values[cell] = row["rel_change"] * 100.0 if row["rel_change"] is not None else np.nan
        marked[cell] = bool(row["marked"])

    without_interval = table["negative_transfer"].null_count() > 0
    fig, notes = _draw(values, marked, order, paradigms, fraction, split, without_interval)
    data = table.with_columns((pl.col("rel_change") * 100).alias("rel_change_percent"), pl.lit(fraction).alias("data_fraction"), pl.lit(split).alias("split"))
    no_interval = table.filter(pl.col("negative_transfer").is_null())
    if no_interval.height:
        below = no_interval.filter(pl.col("rel_change") < 0).height
        notes.append(
            f"{no_interval.height} of {table.height} cell(s) have no 95 % interval ({', '.join(sorted(set(no_interval['ci_method'].drop_nulls())))}) "
            f"and are not outlined, as negative_transfer.csv does not flag them; {below} of them have a negative mean"
        )
    return FigurePlot(fig, data.sort("clinical_group", "task", "paradigm"), notes)


def _per_image_scores(inputs: FigureInputs) -> pl.DataFrame | None:
    """Return the per-image scores under the study folder (as `usagg transfer-matrix` reads them), or None."""
    if inputs.study_dir is None:
        return None
    from usagg.analysis.inputs import read_per_image_scores

    return read_per_image_scores(inputs.study_dir)


def colour_limit(values: np.ndarray) -> tuple[float, bool]:
    """Return the symmetric colour limit in percent and whether some cells lie beyond it.

    The limit is the largest |value| unless that is more than 3 times the 90th percentile of |value|. Then an
    outlier (a +500 % change of a task that scored near 0) would wash out every other cell, so the scale ends at
    the percentile and the outliers take the end colour. The limit is at least 1 %.
    """
    magnitudes = np.abs(values[np.isfinite(values)])
    if magnitudes.size == 0:
        return 1.0, False
    largest = float(magnitudes.max())
    bulk = float(np.percentile(magnitudes, 90))
    if largest <= 3 * bulk or largest <= 1.0:
        return max(largest, 1.0), False
    return max(bulk, 1.0), True


def cell_text(percent: float) -> str:
    """Format a relative change in percent with a sign and one decimal; values that round to 0 show 0.0."""
    if abs(percent) < 0.05:
        return "0.0"
    return f"{percent:+.1f}"


def _draw(
    values: np.ndarray,
    marked: np.ndarray,
    order: pl.DataFrame,
    paradigms: list[str],
    fraction: float,
    split: str,
    without_interval: bool,
):
    """Draw the heatmap and return it with notes on shortened names.

    ``without_interval`` is true when some cells have no interval, which the caption then explains.
    """
    n_rows, n_cols = values.shape
    types = order["task_type"].to_list()
    row_labels = [f"{task} [{type_abbreviation(t)}]" for task, t in zip(order["task"], types)]
    groups = order["clinical_group"].to_list()
    width, row_labels, group_labels, notes = _fit_width(row_labels, groups, n_cols)
    fig = new_figure(width, FRAME_HEIGHT_IN + ROW_HEIGHT_IN * max(n_rows, 2))
    grid = fig.add_gridspec(
        2, 2, width_ratios=[0.15, max(n_cols, 1) * 0.8], height_ratios=[ROW_HEIGHT_IN * max(n_rows, 2), COLORBAR_HEIGHT_IN]
    )
    strip = fig.add_subplot(grid[0, 0])
    ax = fig.add_subplot(grid[0, 1], sharey=strip)
    cbar_ax = fig.add_subplot(grid[1, 1])

    limit, clipped = colour_limit(values)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    cmap = matplotlib.colormaps[DIVERGING_CMAP]
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")

    for i in range(n_rows):
        for j in range(n_cols):
            value = values[i, j]
            if not np.isfinite(value):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=SMALL_FONT_SIZE - 0.5, color="#666666")
                continue
            ax.text(j, i, cell_text(value), ha="center", va="center", fontsize=SMALL_FONT_SIZE - 0.5, color=text_color_for(cmap, norm, value))
            if marked[i, j]:
                ax.add_patch(Rectangle((j - 0.5 + 0.04, i - 0.5 + 0.06), 0.92, 0.88, fill=False, edgecolor="black", linewidth=0.9))

    # Task type strip left of the heatmap; the row labels carry the type abbreviation as well.
    colors = np.array([[to_rgb(task_type_color(t))] for t in types])
    strip.imshow(colors, aspect="auto", interpolation="nearest")
    strip.set_xticks([])
    strip.set_yticks(range(n_rows))
    strip.set_yticklabels(row_labels)
    strip.tick_params(axis="y", length=0)
    for spine in strip.spines.values():
        spine.set_visible(False)

    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([paradigm_label(p) for p in paradigms])
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", length=0)
    ax.tick_params(axis="y", left=False, labelleft=False)
    for spine in ax.spines.values():
        spine.set_visible(False)

    # Clinical groups: white separators between blocks and the group name on the right of the block.
    starts = [i for i in range(n_rows) if i == 0 or groups[i] != groups[i - 1]]
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else n_rows
        if start > 0:
            ax.axhline(start - 0.5, color="white", linewidth=1.5)
            strip.axhline(start - 0.5, color="white", linewidth=1.5)
        ax.annotate(
            group_labels[start],
            xy=(1.0, (start + end - 1) / 2),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            ha="left",
            va="center",
            fontsize=SMALL_FONT_SIZE,
            rotation=0,
        )

    colorbar = fig.colorbar(image, cax=cbar_ax, orientation="horizontal", extend="both" if clipped else "neither")
    colorbar.set_label(RELATIVE_CHANGE_LABEL)
    colorbar.ax.tick_params(labelsize=SMALL_FONT_SIZE)

    fig.suptitle(f"Transfer matrix (data fraction {fraction:g}, {split} split)")
    caption = ["outlined: negative transfer (95 % CI below 0)."]
    if without_interval:
        caption.append("Cells without a CI (one seed, reported value) are not outlined.")
    if not np.isfinite(values).all():
        caption.append("n/a: no finite value (task-specific score 0 or missing).")
    if clipped:
        caption.append(f"Colours end at ±{limit:.0f} %; cells beyond take the end colour.")
    caption.append("Strip: task type")
    fig.legend(
        handles=task_type_handles(types),
        loc="outside lower center",
        ncols=4,
        handlelength=1.0,
        columnspacing=1.0,
        title="\n".join(caption),
    )
    return fig, notes


def _fit_width(row_labels: list[str], groups: list[str], n_cols: int) -> tuple[float, list[str], list[str], list[str]]:
    """Return the figure width that fits the row and group labels, the labels to draw, and notes.

    The figure is single-column wide when the labels fit, wider up to double-column width when they need it.
    Beyond that the longest task names, then group names, are shortened in the middle (the CSV keeps them whole).
    """
    colorbar_label_in = text_width_in([RELATIVE_CHANGE_LABEL], FONT_SIZE)

    def needed(rows: list[str], group_names: list[str]) -> float:
        rows_in, groups_in = text_width_in(rows, SMALL_FONT_SIZE), text_width_in(group_names, SMALL_FONT_SIZE)
        # The colour bar spans the heatmap columns and its label is centred below them, reaching as far into the
        # space of the row labels as into that of the group names.
        heatmap_in = max(n_cols * MIN_CELL_IN, colorbar_label_in - 2 * min(rows_in, groups_in))
        return rows_in + groups_in + heatmap_in + FIXED_WIDTH_IN

    notes = []
    group_labels = list(groups)
    for kind, max_chars in (("task", 40), ("task", 32), ("task", 24), ("group", 16), ("task", 18)):
        if needed(row_labels, group_labels) <= DOUBLE_COLUMN_IN:
            break
        if kind == "task":
            # The " [seg]" suffix stays whole; only the task name is shortened.
            row_labels = [shorten_middle(label[: label.rindex(" [")], max_chars) + label[label.rindex(" [") :] for label in row_labels]
        else:
            group_labels = [shorten_middle(group, max_chars) for group in group_labels]
    for kind, drawn in (("task", [label[: label.rindex(" [")] for label in row_labels]), ("clinical group", group_labels)):
        shortened = len({label for label in drawn if "…" in label})
        if shortened:
            notes.append(
                f"{shortened} {kind} name(s) are shortened in the middle (…) to fit a double-column width; the data "
                "CSV has them whole"
            )
    return min(max(SINGLE_COLUMN_IN, needed(row_labels, group_labels)), DOUBLE_COLUMN_IN), row_labels, group_labels, notes
