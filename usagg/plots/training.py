"""Training figure: training-loss and validation-metric curves per task for one or more runs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from usagg.errors import DataError
from usagg.plots.common import order_tasks
from usagg.plots.inputs import FigureInputs, RunInfo
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import (
    DOUBLE_COLUMN_IN,
    SINGLE_COLUMN_IN,
    SMALL_FONT_SIZE,
    new_figure,
    ordered_paradigms,
    paradigm_color,
    paradigm_label,
)

logger = logging.getLogger(__name__)

LOSS_HEIGHT_IN = 0.62
METRIC_HEIGHT_IN = 0.55
FRAME_HEIGHT_IN = 1.0
LINESTYLES = ("-", "--", ":", "-.")
SHORT_LOG_POINTS = 5
LONG_TASK_NAME = 20  # characters; longer panel titles do not fit half a single-column figure

TRAIN_SCHEMA = {"step": pl.Int64, "epoch": pl.Float64, "task": pl.String, "loss": pl.Float64}
EVAL_SCHEMA = {"step": pl.Int64, "task": pl.String, "metric": pl.String, "value": pl.Float64}


def read_train_log(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read train_log.jsonl into training-step rows and evaluation rows.

    A torn last line (a run killed while writing) is skipped with a warning; any other bad line raises.
    """
    train_rows, eval_rows = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the training log: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: line %d is incomplete (the run was probably interrupted); skipped", path, number)
                continue
            raise DataError(f"{path}: line {number} is not valid JSON; each line must be one JSON object") from None
        if record.get("event") == "eval":
            if record.get("value") is None or record.get("task") is None:
                continue
            eval_rows.append({k: record.get(k) for k in EVAL_SCHEMA})
        elif "loss" in record and "step" in record:
            train_rows.append({k: record.get(k) for k in TRAIN_SCHEMA})
    return pl.DataFrame(train_rows, schema=TRAIN_SCHEMA), pl.DataFrame(eval_rows, schema=EVAL_SCHEMA)


def _select_runs(runs: list[RunInfo], requested: list[str] | None) -> list[RunInfo]:
    """Pick the runs to draw: those matching ``requested``, else every paradigm at the largest fraction and first seed."""
    if requested:
        chosen = [r for r in runs if any(w in r.label or w in str(r.path) for w in requested)]
        if not chosen:
            listed = "; ".join(r.label for r in runs)
            raise DataError(f"no run with a training log matches {', '.join(requested)}; runs with training logs: {listed}")
        return chosen
    fractions = [r.data_fraction for r in runs if r.data_fraction is not None]
    seeds = [r.seed for r in runs if r.seed is not None]
    top = max(fractions) if fractions else None
    first_seed = min(seeds) if seeds else None
    return [
        r for r in runs
        if (top is None or r.data_fraction == top) and (first_seed is None or r.seed == first_seed)
    ]


def _reject_same_run_id(chosen: list[RunInfo]) -> None:
    """Raise when two chosen runs have the same run id (one study trained into two output folders).

    Lines and styles are keyed by paradigm, group, fraction and seed, so such runs would be drawn as one line.
    """
    seen: dict[str, RunInfo] = {}
    for run in chosen:
        if run.label in seen:
            raise DataError(
                f"runs {seen[run.label].path} and {run.path} have the same run id ({run.label}), so the figure would "
                "draw them as one line; draw each folder in its own figure, or choose runs by path with "
                "-O runs=PART_OF_PATH"
            )
        seen[run.label] = run


def _smooth(values: np.ndarray) -> np.ndarray:
    """Moving average over about a tenth of the points, so that noisy per-step losses show their trend."""
    window = max(1, values.size // 10)
    if window == 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


@register_figure(
    "training",
    "Training loss (smoothed) and validation metric per task against epochs, one colour per paradigm, for one or more runs."
)
def training(inputs: FigureInputs, *, runs: list[str] | None = None, max_columns: int = 4) -> FigurePlot:
    """Draw one loss panel over one validation panel per task, for the chosen runs (default: see ``_select_runs``)."""
    chosen = _select_runs(inputs.require_runs("training", "train_log.jsonl"), runs)
    _reject_same_run_id(chosen)
    frames_train, frames_eval = [], []
    for run in chosen:
        train, evals = read_train_log(run.path / "train_log.jsonl")
        label = run.label
        # Evaluation lines carry steps only. A run's epoch grows linearly with its step (a fixed number of
        # images per step), so the ratio of the last logged line places them on the epoch axis.
        logged = train.filter(pl.col("epoch").is_not_null() & (pl.col("step") > 0))
        if logged.height:
            last = logged.sort("step").row(-1, named=True)
            epochs_per_step = float(last["epoch"]) / float(last["step"])
            evals = evals.with_columns((pl.col("step").cast(pl.Float64) * epochs_per_step).alias("epoch"))
        else:
            train = train.with_columns(pl.col("step").cast(pl.Float64).alias("epoch"))
            evals = evals.with_columns(pl.col("step").cast(pl.Float64).alias("epoch"))
        meta = [
            pl.lit(label).alias("run"),
            pl.lit(run.paradigm).alias("paradigm"),
            pl.lit(run.data_fraction).cast(pl.Float64).alias("data_fraction"),
            pl.lit(run.seed).cast(pl.Int64).alias("seed"),
        ]
        frames_train.append(train.with_columns(meta))
        frames_eval.append(evals.with_columns(meta))
    train_all = pl.concat(frames_train, how="diagonal_relaxed")
    eval_all = pl.concat(frames_eval, how="diagonal_relaxed")
    if train_all.height == 0:
        raise DataError("the chosen training logs have no training-step lines (with step and loss)")

    names = sorted(set(train_all["task"].drop_nulls().to_list()) | set(eval_all["task"].drop_nulls().to_list()))
    # The run with the most tasks has the resolved config that names them all.
    widest = max(chosen, key=lambda r: train_all.filter(pl.col("run") == r.label)["task"].n_unique())
    tasks, _ = order_tasks(names, inputs.results, widest.path)
    eval_all = _primary_metric_rows(eval_all)
    n_cols = max(1, min(max_columns, len(tasks)))
    n_rows = math.ceil(len(tasks) / n_cols)
    # Two panels of long task names (over LONG_TASK_NAME characters) need the double-column width for their titles.
    narrow = n_cols == 1 or (n_cols == 2 and max(len(t) for t in tasks) <= LONG_TASK_NAME)
    width = SINGLE_COLUMN_IN if narrow else DOUBLE_COLUMN_IN
    fig = new_figure(width, FRAME_HEIGHT_IN + n_rows * (LOSS_HEIGHT_IN + METRIC_HEIGHT_IN))
    grid = fig.add_gridspec(2 * n_rows, n_cols, height_ratios=[LOSS_HEIGHT_IN, METRIC_HEIGHT_IN] * n_rows)
    run_styles = _run_styles(chosen)

    shared_x = None
    for k, task in enumerate(tasks):
        row, col = divmod(k, n_cols)
        loss_ax = fig.add_subplot(grid[2 * row, col], sharex=shared_x)
        shared_x = shared_x or loss_ax
        metric_ax = fig.add_subplot(grid[2 * row + 1, col], sharex=shared_x)
        metric_names = set()
        for run in chosen:
            color, linestyle = run_styles[_style_key(run)]
            part = train_all.filter((pl.col("run") == run.label) & (pl.col("task") == task)).sort("step")
            if part.height:
                # Markers keep short logs (a few logged steps) visible.
                marker = "o" if part.height < SHORT_LOG_POINTS else None
                loss_ax.plot(
                    part["epoch"].to_numpy(), _smooth(part["loss"].to_numpy()),
                    color=color, linestyle=linestyle, linewidth=0.9, marker=marker, markersize=2.0,
                )
            evals = eval_all.filter((pl.col("run") == run.label) & (pl.col("task") == task)).sort("step")
            for metric, metric_part in evals.group_by("metric", maintain_order=True):
                metric_names.add(metric[0])
                metric_ax.plot(metric_part["epoch"].to_numpy(), metric_part["value"].to_numpy(), color=color, linestyle=linestyle, marker="o", markersize=2.0, linewidth=0.9)
        loss_ax.set_title(task, fontsize=SMALL_FONT_SIZE + 0.5)
        for ax, missing in ((loss_ax, "no training loss logged"), (metric_ax, "no validation logged")):
            ax.yaxis.set_major_locator(MaxNLocator(3))
            ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
            ax.tick_params(labelsize=SMALL_FONT_SIZE - 0.5)
            if not ax.get_lines():
                # An empty panel would show matplotlib's default 0-1 range as if it were data.
                ax.tick_params(axis="y", left=False, labelleft=False)
                ax.text(0.5, 0.5, missing, transform=ax.transAxes, ha="center", va="center", fontsize=SMALL_FONT_SIZE - 0.5, color="#777777")
            else:
                _widen_flat_range(ax)
        loss_ax.tick_params(labelbottom=False)
        metric_ax.set_ylabel(" / ".join(sorted(metric_names)) or "metric", fontsize=SMALL_FONT_SIZE - 0.5)
        if col == 0:
            loss_ax.set_ylabel("loss", fontsize=SMALL_FONT_SIZE - 0.5)
        last_in_column = k + n_cols >= len(tasks)
        if last_in_column:
            metric_ax.set_xlabel("epoch", fontsize=SMALL_FONT_SIZE)
        else:
            metric_ax.tick_params(labelbottom=False)

    fig.legend(handles=_legend(run_styles), loc="outside lower center", ncols=min(4, len(run_styles)), handlelength=2.0)
    title = "Training loss (smoothed) and validation metric per task"
    fractions = {run.data_fraction for run in chosen}
    seeds = {run.seed for run in chosen}
    if len(fractions) == 1 and len(seeds) == 1 and None not in fractions | seeds:
        # The legend names fraction and seed only when runs differ in them, so the title names the shared ones.
        title += f" (data fraction {fractions.pop():g}, seed {seeds.pop()})"
    if width == SINGLE_COLUMN_IN:
        # A single-column figure is too narrow for the title on one line.
        title = title.replace(" and validation metric", "\nand validation metric")
    fig.suptitle(title)
    data = pl.concat(
        [
            train_all.select(pl.lit("train").alias("kind"), "run", "paradigm", "data_fraction", "seed", "task", "step", "epoch", pl.lit("loss").alias("metric"), pl.col("loss").alias("value")),
            eval_all.select(pl.lit("eval").alias("kind"), "run", "paradigm", "data_fraction", "seed", "task", "step", "epoch", "metric", "value"),
        ],
        how="diagonal_relaxed",
    )
    return FigurePlot(fig, data)


def _widen_flat_range(ax) -> None:
    """Give a flat curve (an AUC of 1 throughout, say) a readable range instead of rounding-noise ticks."""
    low, high = ax.get_ylim()
    middle = (low + high) / 2
    scale = max(abs(middle), 1.0)
    if high - low < 1e-3 * scale:
        ax.set_ylim(middle - 0.01 * scale, middle + 0.01 * scale)


def _primary_metric_rows(evals: pl.DataFrame) -> pl.DataFrame:
    """Keep one validation metric per task: its type's primary metric when logged, else the first one logged.

    Logs hold every metric (Dice and Hausdorff distances, say), whose scales do not share an axis.
    """
    from usagg.analysis.relative import DEFAULT_PRIMARY_METRICS

    preference = [m for metrics in DEFAULT_PRIMARY_METRICS.values() for m in metrics]
    keep = []
    for _, part in evals.group_by("task", maintain_order=True):
        logged = part["metric"].unique(maintain_order=True).to_list()
        chosen = next((m for m in preference if m in logged), logged[0])
        keep.append(part.filter(pl.col("metric") == chosen))
    return pl.concat(keep) if keep else evals


def _style_key(run: RunInfo) -> tuple[str, float | None, int | None]:
    return (run.paradigm, run.data_fraction, run.seed)


def _run_styles(runs: list[RunInfo]) -> dict[tuple[str, float | None, int | None], tuple[str, str]]:
    """Colour by paradigm, and a line style per data fraction and seed within a paradigm.

    The runs of one paradigm at one fraction and seed (task-specific runs, grouped runs of different groups)
    train different tasks, so they never share a panel and share a style.
    """
    styles: dict[tuple[str, float | None, int | None], tuple[str, str]] = {}
    for paradigm in ordered_paradigms({r.paradigm for r in runs}):
        keys = sorted({_style_key(r) for r in runs if r.paradigm == paradigm}, key=lambda k: (k[1] or 0.0, k[2] or 0))
        for i, key in enumerate(keys):
            styles[key] = (paradigm_color(paradigm), LINESTYLES[i % len(LINESTYLES)])
    return styles


def _legend(styles: dict[tuple[str, float | None, int | None], tuple[str, str]]) -> list[Line2D]:
    per_paradigm: dict[str, int] = {}
    for paradigm, _, _ in styles:
        per_paradigm[paradigm] = per_paradigm.get(paradigm, 0) + 1
    handles = []
    for (paradigm, fraction, seed), (color, linestyle) in styles.items():
        # One style per paradigm: its name is enough; several: add the fraction and seed.
        text = paradigm_label(paradigm)
        if per_paradigm[paradigm] > 1:
            text += f" (fraction {fraction:g}, seed {seed})" if fraction is not None else f" (seed {seed})"
        handles.append(Line2D([], [], color=color, linestyle=linestyle, linewidth=1.0, label=text))
    return handles
