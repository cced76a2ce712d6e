"""Affinity figure: clustered task-affinity heatmap with a dendrogram, for one method or two side by side."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.colors import ListedColormap, Normalize, TwoSlopeNorm
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import dendrogram, leaves_list, linkage
from scipy.spatial.distance import squareform

from usagg.analysis.affinity import MIN_COVERAGE, affinity_json_has, coverage
from usagg.errors import ConfigError, DataError
from usagg.plots.common import score_rows
from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import (
    DIVERGING_CMAP,
    DOUBLE_COLUMN_IN,
    SEQUENTIAL_CMAP,
    SINGLE_COLUMN_IN,
    SMALL_FONT_SIZE,
    new_figure,
)

logger = logging.getLogger(__name__)

# Methods in the order they are preferred when none is named: measured pair transfer is the ground truth the
# cheaper estimators approximate.
METHODS = ("measured", "lookahead", "gradient", "gradient_magnitude", "experts", "fisher")
METHOD_LABELS = {
    "measured": "measured (pair runs)",
    "lookahead": "lookahead (TAG)",
    "gradient": "gradient cosine",
    "gradient_magnitude": "gradient magnitude similarity",
    "experts": "expert-usage similarity (1 − JSD)",
    "fisher": "Fisher similarity (Task2Vec)",
}
RUN_FILES = {
    "lookahead": "affinity.json",
    "gradient": "affinity.json",
    "gradient_magnitude": "affinity.json",
    "experts": "routing_stats.json",
    "fisher": "affinity.json",
}
# The entry of affinity.json each method reads: a run may record some estimators and not others.
AFFINITY_KEYS = {"lookahead": "lookahead", "gradient": "gradient_cosine", "gradient_magnitude": "gradient_magnitude", "fisher": "fisher"}
ANNOTATE_MAX_TASKS = 10

Matrix = tuple[list[str], np.ndarray]


def _run_source(inputs: FigureInputs, file_name: str) -> Path | None:
    """Return the folder :func:`usagg.analysis.affinity.load_affinity` should search for ``file_name``."""
    if inputs.study_dir is not None and any(inputs.study_dir.rglob(file_name)):
        return inputs.study_dir
    runs = [r for r in inputs.runs if (r.path / file_name).is_file()]
    if not runs:
        return None
    if len(runs) > 1:
        logger.info("affinity: %d runs have %s; using %s", len(runs), file_name, runs[0].path)
    return runs[0].path


def available_methods(inputs: FigureInputs) -> list[str]:
    """Return the affinity methods the inputs can provide, in order of preference."""
    methods = []
    if inputs.results is not None and inputs.results.filter(pl.col("paradigm") == "pair").height:
        methods.append("measured")
    for method in METHODS[1:]:
        source = _run_source(inputs, RUN_FILES[method])
        if source is not None and (method not in AFFINITY_KEYS or affinity_json_has(source, AFFINITY_KEYS[method])):
            methods.append(method)
    return methods


def load_method(inputs: FigureInputs, method: str) -> Matrix:
    """Load the affinity matrix of ``method`` once per inputs, so that its warnings are logged once."""
    if method not in METHODS:
        raise ConfigError(f"affinity method {method!r} is invalid; choose one of {', '.join(METHODS)}")
    key = f"affinity:{method}"
    if key not in inputs.cache:
        inputs.cache[key] = _load_method(inputs, method)
    return inputs.cache[key]


def _load_method(inputs: FigureInputs, method: str) -> Matrix:
    """Load the affinity matrix of ``method`` with :func:`usagg.analysis.affinity.load_affinity`."""
    from usagg.analysis.affinity import gradient_affinity_matrix, load_affinity

    if method == "measured":
        if inputs.results is None:
            raise ConfigError("affinity method 'measured' needs a results table with pair runs")
        tasks, matrix = load_affinity(score_rows(inputs.results), "measured")
        return list(tasks), np.asarray(matrix, dtype=float)
    source = _run_source(inputs, RUN_FILES[method])
    if source is None:
        raise DataError(
            f"affinity method {method!r} needs {RUN_FILES[method]} in a run directory; pass a study output folder "
            f"or run directory that has one (got {inputs.origin})"
        )
    if method == "gradient_magnitude":
        tasks, matrix = gradient_affinity_matrix(source, kind="magnitude")
    else:
        tasks, matrix = load_affinity(source, method)
    return list(tasks), np.asarray(matrix, dtype=float)


def choose_methods(inputs: FigureInputs, methods: list[str] | None, figure: str) -> list[str]:
    """Return ``methods``, or by default the first available method in ``METHODS`` order.

    Pair runs often cover only a few pairs. When measured affinity has values for less than half of the task
    pairs, the default is the next available method followed by measured, so a dense matrix orders the tasks.
    """
    if methods:
        return methods
    found = available_methods(inputs)
    if not found:
        raise DataError(
            f"figure {figure!r} needs an affinity source: pair runs in the results table, or affinity.json / "
            f"routing_stats.json in run directories (got {inputs.origin})"
        )
    if found[0] == "measured" and len(found) > 1 and coverage(load_method(inputs, "measured")[1]) < MIN_COVERAGE:
        return [found[1], "measured"]
    return found[:1]


def cluster_order(matrix: np.ndarray) -> tuple[np.ndarray | None, list[int]]:
    """Return the average-linkage tree of the symmetrised affinity and the leaf order (None for < 3 tasks).

    Distances are ``max(S) − S`` for the symmetrised affinity ``S = (A + Aᵀ) / 2``, so the most affine pairs
    join first; pairs without a value get the largest distance.
    """
    n = matrix.shape[0]
    if n < 3:
        return None, list(range(n))
    sym = (matrix + matrix.T) / 2.0
    sym = np.where(np.isfinite(sym), sym, np.nan)
    top = np.nanmax(sym) if np.isfinite(sym).any() else 0.0
    low = np.nanmin(sym) if np.isfinite(sym).any() else 0.0
    distance = np.where(np.isfinite(sym), top - sym, top - low)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    return tree, leaves_list(tree).tolist()


def _norm(values: np.ndarray) -> tuple[str, Normalize]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return SEQUENTIAL_CMAP, Normalize(0.0, 1.0)
    low, high = float(finite.min()), float(finite.max())
    if low < 0 < high:
        limit = max(abs(low), abs(high))
        return DIVERGING_CMAP, TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    if high <= low:
        high = low + 1.0
    return SEQUENTIAL_CMAP, Normalize(low, high)


@register_figure(
    "affinity",
    "Clustered task-affinity heatmap (rows: source task, columns: target task) with a dendrogram; one or two methods."
)
def affinity(inputs: FigureInputs, *, methods: list[str] | None = None) -> FigurePlot:
    """Draw the affinity of ``methods`` (one or two of measured, lookahead, gradient, gradient_magnitude, experts, fisher).

    With two methods both heatmaps use the task order clustered from the first one, so that cells compare.
    """
    chosen = choose_methods(inputs, methods, "affinity")
    if len(chosen) > 2:
        raise ConfigError(f"the affinity figure shows one or two methods side by side; got {len(chosen)}: {', '.join(chosen)}")
    matrices = {m: load_method(inputs, m) for m in chosen}
    first_tasks = matrices[chosen[0]][0]
    if len(chosen) == 2:
        # The second matrix takes the first one's tasks; tasks it lacks (pairs never trained) stay empty.
        second_tasks = set(matrices[chosen[1]][0])
        if len([t for t in first_tasks if t in second_tasks]) < 2:
            raise DataError(f"methods {chosen[0]} and {chosen[1]} share fewer than two tasks; they cannot be compared")
        matrices[chosen[1]] = _reindex(matrices[chosen[1]], first_tasks)
    tasks, first = matrices[chosen[0]]
    tree, order = cluster_order(first)
    ordered = [tasks[i] for i in order]
    n = len(tasks)

    cell_in = 0.11 if n > ANNOTATE_MAX_TASKS else 0.25
    heat_in = max(1.2, cell_in * n)
    width = SINGLE_COLUMN_IN if len(chosen) == 1 and n <= 12 else DOUBLE_COLUMN_IN
    fig = new_figure(width, heat_in + 1.9)
    if len(chosen) == 1:
        grid = fig.add_gridspec(2, 2, width_ratios=[0.18, 1.0], height_ratios=[1.0, 0.035])
        dendro_ax = fig.add_subplot(grid[0, 0])
        heat_axes = [fig.add_subplot(grid[0, 1])]
        cbar_axes = [fig.add_subplot(grid[1, 1])]
    else:
        grid = fig.add_gridspec(2, 3, width_ratios=[0.18, 1.0, 1.0], height_ratios=[1.0, 0.035])
        dendro_ax = fig.add_subplot(grid[0, 0])
        heat_axes = [fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[0, 2])]
        cbar_axes = [fig.add_subplot(grid[1, 1]), fig.add_subplot(grid[1, 2])]

    rows = []
    for method, ax, cax in zip(chosen, heat_axes, cbar_axes):
        _, matrix = matrices[method]
        values = matrix[np.ix_(order, order)]
        # A task's affinity with itself is no transfer, and its lookahead on its own loss often dwarfs the rest.
        # So the diagonal stays out of the colour scale and is drawn white. Grey marks missing pairs.
        off_diagonal = ~np.eye(n, dtype=bool)
        transfer_values = np.where(off_diagonal, values, np.nan)
        cmap_name, norm = _norm(transfer_values)
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#d9d9d9")
        image = ax.imshow(np.ma.masked_invalid(transfer_values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        diagonal = np.ma.masked_where(off_diagonal, np.zeros((n, n)))
        ax.imshow(diagonal, cmap=ListedColormap(["white"]), aspect="auto", interpolation="nearest")
        ax.set_xticks(range(n))
        ax.set_xticklabels(ordered, rotation=90, fontsize=_label_size(n))
        ax.set_yticks(range(n))
        # Task names are on the right of each heatmap, so with two methods they sit between the panels.
        ax.yaxis.tick_right()
        ax.set_yticklabels(ordered, fontsize=_label_size(n))
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(METHOD_LABELS[method])
        ax.set_xlabel("target task")
        scale_note = ""
        if n <= ANNOTATE_MAX_TASKS:
            exponent = _annotate(ax, transfer_values, cmap, norm)
            if exponent:
                scale_note = f"; cell labels × 10^{-exponent}"
        colorbar = fig.colorbar(image, cax=cax, orientation="horizontal")
        colorbar.ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # labels like -0.015 collide at the default density
        colorbar.set_label(f"affinity ({method}){scale_note}")
        colorbar.ax.tick_params(labelsize=SMALL_FONT_SIZE)
        for i, source in enumerate(ordered):
            for j, target in enumerate(ordered):
                rows.append({"method": method, "source": source, "target": target, "affinity": float(values[i, j]), "row": i, "column": j})
    heat_axes[0].set_ylabel("source task")
    if len(chosen) == 2:
        # The second panel shares the row order; its labels would repeat those between the panels.
        heat_axes[1].tick_params(labelright=False)

    if tree is not None:
        dendrogram(tree, orientation="left", ax=dendro_ax, no_labels=True, color_threshold=0.0, above_threshold_color="#444444")
        dendro_ax.set_ylim(10 * n, 0)  # first leaf at the top, level with the first heatmap row
    dendro_ax.axis("off")
    title = "Task affinity, clustered" if len(chosen) == 1 else f"Task affinity (order: clustering of {chosen[0]})"
    fig.suptitle(title)
    notes = []
    share = coverage(first)
    if tree is not None and share < MIN_COVERAGE:
        notes.append(
            f"{chosen[0]}: only {100 * share:.0f} % of the task pairs have a value, so the clustering and its "
            "order rest on few entries; empty cells are unmeasured pairs"
        )
    return FigurePlot(fig, pl.DataFrame(rows), notes)


def _reindex(matrix: Matrix, tasks: list[str]) -> Matrix:
    """Return ``matrix`` over ``tasks`` in that order, NaN for the tasks it does not have."""
    names, values = matrix
    position = {t: i for i, t in enumerate(names)}
    out = np.full((len(tasks), len(tasks)), np.nan)
    for i, source in enumerate(tasks):
        for j, target in enumerate(tasks):
            if source in position and target in position:
                out[i, j] = values[position[source], position[target]]
    return list(tasks), out


def _label_size(n: int) -> float:
    return SMALL_FONT_SIZE if n <= 20 else SMALL_FONT_SIZE - 1.0


def _annotate(ax, values: np.ndarray, cmap, norm) -> int:
    """Write each finite value in its cell; return the power of ten removed from the labels (0 when none).

    Small affinities (lookahead, measured pair changes) would print as 0.041 and -0.0067, wider than a cell, so a
    matrix whose largest entry is below 0.1 is labelled multiplied by a power of ten, which the colour bar names.
    """
    from usagg.plots.common import text_color_for

    finite = np.abs(values[np.isfinite(values)])
    exponent = math.floor(math.log10(finite.max())) if finite.size and finite.max() > 0 else 0
    exponent = exponent if exponent < -1 else 0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                label = f"{values[i, j] * 10.0**-exponent:.2g}"
                ax.text(j, i, label, ha="center", va="center", fontsize=SMALL_FONT_SIZE - 1, color=text_color_for(cmap, norm, values[i, j]))
    return exponent
