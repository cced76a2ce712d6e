"""Expert-usage figure: share of each task's tokens routed to each expert, one heatmap per MoE layer."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl

from usagg.errors import DataError
from usagg.io import read_json_file
from usagg.plots.common import order_tasks
from usagg.plots.inputs import FigureInputs, RunInfo
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import (
    DOUBLE_COLUMN_IN,
    SEQUENTIAL_CMAP,
    SINGLE_COLUMN_IN,
    SMALL_FONT_SIZE,
    new_figure,
)

logger = logging.getLogger(__name__)

ROW_HEIGHT_IN = 0.125
FRAME_HEIGHT_IN = 1.1
MAX_COLUMNS = 3


def read_routing_stats(path: Path) -> dict:
    """Read and check a routing_stats.json file (tokens per expert per task per MoE block)."""
    stats = read_json_file(path, "the routing statistics")
    if not isinstance(stats, dict):
        raise DataError(f"{path}: routing statistics must be a JSON object with num_experts, layers and tasks")
    for key in ("num_experts", "tasks"):
        if key not in stats:
            raise DataError(f"{path}: routing statistics have no {key!r} key; expected num_experts, layers and tasks")
    experts = int(stats["num_experts"])
    for task, blocks in stats["tasks"].items():
        for block, entry in blocks.items():
            tokens = entry.get("tokens_per_expert")
            if not isinstance(tokens, list) or len(tokens) != experts:
                raise DataError(
                    f"{path}: tasks.{task}.{block}.tokens_per_expert must be a list of {experts} counts, got {tokens!r}"
                )
    return stats


def routing_table(stats: dict) -> pl.DataFrame:
    """Flatten routing statistics into one row per task × block × expert with the task's token share."""
    rows = []
    for task, blocks in stats["tasks"].items():
        for block, entry in blocks.items():
            tokens = np.asarray(entry["tokens_per_expert"], dtype=float)
            total = tokens.sum()
            for expert, count in enumerate(tokens):
                rows.append(
                    {
                        "task": task,
                        "block": int(block),
                        "expert": expert,
                        "tokens": count,
                        "share": count / total if total > 0 else math.nan,
                        "entropy": float(entry.get("entropy", math.nan)),
                    }
                )
    return pl.DataFrame(rows, schema={"task": pl.String, "block": pl.Int64, "expert": pl.Int64, "tokens": pl.Float64, "share": pl.Float64, "entropy": pl.Float64})


def _choose_run(runs: list[RunInfo], requested: str | None) -> RunInfo:
    """Return the run to draw: among all runs, or those whose label or path contains ``requested``, the one with
    the most tasks (the unified run when there is one), then the largest data fraction, then the lowest seed."""
    if requested:
        matches = [r for r in runs if requested in r.label or requested in str(r.path)]
        if not matches:
            listed = "; ".join(r.label for r in runs)
            raise DataError(f"no run with routing statistics matches {requested!r}; runs with routing statistics: {listed}")
        runs = matches

    def key(run: RunInfo):
        stats = read_routing_stats(run.path / "routing_stats.json")
        return (-len(stats.get("tasks", {})), -(run.data_fraction or 0.0), run.seed or 0, str(run.path))

    return sorted(runs, key=key)[0]


@register_figure(
    "expert-usage",
    "Share of each task's tokens per expert, one task × expert heatmap per MoE layer (from routing_stats.json)."
)
def expert_usage(inputs: FigureInputs, *, run: str | None = None) -> FigurePlot:
    """Draw the routing statistics of one run (default: the run with the most tasks)."""
    chosen = _choose_run(inputs.require_runs("expert-usage", "routing_stats.json"), run)
    stats = read_routing_stats(chosen.path / "routing_stats.json")
    table = routing_table(stats)
    if table.height == 0:
        raise DataError(f"{chosen.path / 'routing_stats.json'}: no task has routing statistics")
    tasks, groups = order_tasks(table["task"].unique().to_list(), inputs.results, chosen.path)
    # Row indices where a new clinical group starts; a white line separates the groups.
    boundaries = [i for i in range(1, len(tasks)) if groups[i] != groups[i - 1]]
    blocks = sorted(table["block"].unique().to_list())
    experts = int(stats["num_experts"])

    n_cols = min(MAX_COLUMNS, len(blocks))
    n_rows = math.ceil(len(blocks) / n_cols)
    width = SINGLE_COLUMN_IN if n_cols == 1 else DOUBLE_COLUMN_IN
    panel_height = ROW_HEIGHT_IN * max(len(tasks), 4) + 0.45
    fig = new_figure(width, FRAME_HEIGHT_IN + panel_height * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True)
    cmap = matplotlib.colormaps[SEQUENTIAL_CMAP]
    vmax = float(np.nanmax(table["share"].to_numpy())) if table.height else 1.0
    index = {t: i for i, t in enumerate(tasks)}

    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(blocks):
            ax.set_visible(False)
            continue
        block = blocks[k]
        part = table.filter(pl.col("block") == block)
        matrix = np.full((len(tasks), experts), np.nan)
        for row in part.iter_rows(named=True):
            matrix[index[row["task"]], row["expert"]] = row["share"]
        image = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        for start in boundaries:
            ax.axhline(start - 0.5, color="white", linewidth=1.2)
        entropy = part.group_by("task").agg(pl.col("entropy").first())["entropy"].mean()
        title = f"block {block}" + (f"\nmean entropy {entropy:.2f} nats" if entropy is not None and math.isfinite(entropy) else "")
        ax.set_title(title, fontsize=SMALL_FONT_SIZE + 1)
        ax.set_xticks(range(experts))
        ax.set_xticklabels([str(e) for e in range(experts)])
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(tasks)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if k % n_cols:
            ax.tick_params(labelleft=False)
        if k // n_cols == n_rows - 1 or k + n_cols >= len(blocks):
            ax.set_xlabel("expert")
            ax.tick_params(labelbottom=True)

    colorbar = fig.colorbar(image, ax=axes.ravel().tolist(), location="bottom", shrink=0.5, aspect=40, pad=0.02)
    colorbar.set_label("share of the task's tokens routed to the expert")
    # On two lines: a long run label beside the title would not fit a single-column figure.
    fig.suptitle(f"Expert usage per MoE layer\n{chosen.label}; {experts} experts")
    data = table.with_columns(pl.lit(chosen.label).alias("run"))
    return FigurePlot(fig, data)
