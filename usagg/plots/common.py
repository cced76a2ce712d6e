"""Helpers shared by the figure modules: row selection, task order, labels and legend handles."""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import yaml
from matplotlib.colors import Colormap, Normalize, to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from usagg.errors import AnalysisError
from usagg.plots.inputs import FigureInputs
from usagg.plots.style import (
    clinical_group_markers,
    ordered_task_types,
    paradigm_color,
    paradigm_label,
    task_type_color,
)

logger = logging.getLogger(__name__)

# Axis and colour-bar label of every figure of relative change. The sign convention is part of the label, since
# for error metrics (MRE) a fall of the error is a positive change.
RELATIVE_CHANGE_LABEL = "relative change to task-specific (%, + is better)"

# Rows of a results table with this metric carry a count of training images, not a score: value is the
# number of images of an aggregate (a clinical group or a task type) that a publication reports.
TRAIN_IMAGES_METRIC = "train_images"

TYPE_ABBREVIATIONS = {"segmentation": "seg", "classification": "cls", "detection": "det", "regression": "reg"}


def score_rows(results: pl.DataFrame) -> pl.DataFrame:
    """Drop rows that report training-set sizes, leaving the metric rows relative change is computed from."""
    return results.filter(pl.col("metric") != TRAIN_IMAGES_METRIC)


def size_rows(results: pl.DataFrame) -> pl.DataFrame:
    """Return the rows that report training-set sizes of clinical groups or task types."""
    return results.filter(pl.col("metric") == TRAIN_IMAGES_METRIC)


def compute_relative_change(results: pl.DataFrame, metrics: Mapping[str, str] | None = None) -> pl.DataFrame:
    """Compute relative change against task-specific runs with :func:`usagg.analysis.relative_change`."""
    from usagg.analysis.relative import relative_change

    rel = relative_change(score_rows(results), metrics=metrics)
    if rel.height == 0:
        raise AnalysisError(
            "no aggregated run could be matched to a task-specific run with the same data fraction, seed and "
            "split, so there is no relative change to plot; the results table needs task_specific rows as the reference"
        )
    return rel


def relative_change_for(inputs: FigureInputs, figure: str) -> pl.DataFrame:
    """Return the relative change of the inputs' results table, computed once per inputs.

    The figures drawn from one inputs share it, so its warnings are logged once.
    """
    if "relative_change" not in inputs.cache:
        inputs.cache["relative_change"] = compute_relative_change(inputs.require_results(figure))
    return inputs.cache["relative_change"]


def pick_split(frame: pl.DataFrame, split: str | None) -> tuple[pl.DataFrame, str]:
    """Keep one evaluation split: the requested one, else ``test`` when present, else the only one."""
    splits = sorted(frame["split"].unique().to_list())
    if split is None:
        split = "test" if "test" in splits else splits[0]
    if split not in splits:
        raise AnalysisError(f"split {split!r} is not in the table; available splits: {', '.join(splits)}")
    return frame.filter(pl.col("split") == split), split


def pick_fraction(frame: pl.DataFrame, fraction: float | None) -> tuple[pl.DataFrame, float]:
    """Keep one data fraction: the requested one, else the largest in the table."""
    fractions = sorted(float(f) for f in frame["data_fraction"].unique().to_list())
    if fraction is None:
        fraction = fractions[-1]
    match = [f for f in fractions if abs(f - fraction) < 1e-6]
    if not match:
        raise AnalysisError(
            f"data fraction {fraction:g} is not in the table; available fractions: {', '.join(f'{f:g}' for f in fractions)}"
        )
    return frame.filter((pl.col("data_fraction") - match[0]).abs() < 1e-6), match[0]


def task_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Return one row per task (task, task_type, clinical_group), ordered by clinical group, task type and name."""
    tasks = frame.select("task", "task_type", "clinical_group").unique(subset="task", keep="first")
    type_rank = {t: i for i, t in enumerate(ordered_task_types(tasks["task_type"].to_list()))}
    return (
        tasks.with_columns(pl.col("task_type").replace_strict(type_rank, default=len(type_rank)).alias("_type_rank"))
        .sort("clinical_group", "_type_rank", "task")
        .drop("_type_rank")
    )


def type_abbreviation(task_type: str) -> str:
    return TYPE_ABBREVIATIONS.get(task_type, task_type[:3])


def text_color_for(cmap: Colormap, norm: Normalize, value: float) -> str:
    """Return black or white, whichever reads better on the colour ``cmap`` gives ``value``."""
    if not np.isfinite(value):
        return "black"
    red, green, blue = to_rgb(cmap(norm(value)))
    # Relative luminance weights from ITU-R BT.709.
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "black" if luminance > 0.45 else "white"


def task_type_handles(task_types: Iterable[str], marker: str | None = None) -> list:
    """Legend handles, one per task type in canonical order, as coloured patches or markers."""
    handles = []
    for task_type in ordered_task_types(task_types):
        color = task_type_color(task_type)
        if marker is None:
            handles.append(Patch(facecolor=color, edgecolor="none", label=task_type))
        else:
            handles.append(Line2D([], [], linestyle="none", marker=marker, color=color, label=task_type))
    return handles


def clinical_group_handles(groups: Iterable[str]) -> list:
    markers = clinical_group_markers(groups)
    return [
        Line2D([], [], linestyle="none", marker=m, markerfacecolor="#666666", markeredgecolor="none", label=g)
        for g, m in markers.items()
    ]


def paradigm_handles(paradigms: Sequence[str]) -> list:
    return [Patch(facecolor=paradigm_color(p), edgecolor="none", label=paradigm_label(p)) for p in paradigms]


def order_tasks(tasks: list[str], results: pl.DataFrame | None, run_dir: Path) -> tuple[list[str], list[str]]:
    """Order tasks by clinical group and type, from the results table or the run's resolved config.

    Returns the ordered task names and each task's clinical group ("" when unknown).
    """
    info = None
    if results is not None:
        info = results.filter(pl.col("task").is_in(tasks))
    elif (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
            cards = [
                {"task": c["name"], "task_type": c.get("type", ""), "clinical_group": c.get("group") or c.get("organ", "")}
                for c in config.get("tasks", [])
                if c.get("name") in tasks
            ]
            info = pl.DataFrame(cards) if cards else None
        except (yaml.YAMLError, KeyError, TypeError) as exc:
            logger.warning("%s: cannot read task types from config.yaml (%s); tasks are sorted by name", run_dir, exc)
    if info is None or info.height == 0:
        return sorted(tasks), [""] * len(tasks)
    order = task_order(info)
    group_of = dict(zip(order["task"], order["clinical_group"]))
    ordered = [t for t in order["task"].to_list() if t in tasks]
    ordered += sorted(set(tasks) - set(ordered))
    return ordered, [group_of.get(t, "") for t in ordered]
