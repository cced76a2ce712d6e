"""Grouping figure: the clinical partition of the tasks beside the partition recommended from task affinity."""

from __future__ import annotations

import polars as pl
from matplotlib.lines import Line2D

from usagg.errors import DataError
from usagg.plots.affinity import METHOD_LABELS, choose_methods, load_method
from usagg.plots.common import score_rows, task_type_handles
from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import FigurePlot, register_figure
from usagg.plots.style import DOUBLE_COLUMN_IN, SMALL_FONT_SIZE, new_figure, task_type_color

ROW_HEIGHT_IN = 0.15
FRAME_HEIGHT_IN = 1.25
BAR_SHADES = ("#4d4d4d", "#a6a6a6")  # alternating group bars


def task_info(inputs: FigureInputs, tasks: list[str]) -> dict[str, tuple[str, str]]:
    """Return task -> (clinical group, task type) from the results table; unknown tasks get ("unknown", "")."""
    info: dict[str, tuple[str, str]] = {}
    if inputs.results is not None:
        rows = score_rows(inputs.results).select("task", "clinical_group", "task_type").unique(subset="task", keep="first")
        info = {r["task"]: (r["clinical_group"], r["task_type"]) for r in rows.iter_rows(named=True)}
    return {t: info.get(t, ("unknown", "")) for t in tasks}


@register_figure(
    "grouping",
    "Clinical partition of the tasks beside the partition recommended from an affinity matrix, tasks linked by lines."
)
def grouping(inputs: FigureInputs, *, method: str | None = None, k: str = "auto") -> FigurePlot:
    """Draw the clinical groups (left) and :func:`usagg.analysis.grouping.recommend_groups` (right).

    ``k`` is the number of recommended groups, or ``auto`` for the number that maximises the score.
    """
    from usagg.analysis.grouping import recommend_groups

    chosen = choose_methods(inputs, [method] if method else None, "grouping")[0]
    tasks, matrix = load_method(inputs, chosen)
    info = task_info(inputs, tasks)
    if all(group == "unknown" for group, _ in info.values()):
        raise DataError(
            "figure 'grouping' needs the clinical group of each task from a results table; pass the study output "
            "folder (with results.parquet) or a results file together with the run directories"
        )
    taxonomy = {t: info[t][0] for t in tasks}
    result = recommend_groups((tasks, matrix), k=k if k == "auto" else int(k), taxonomy=taxonomy)

    clinical = sorted(result.taxonomy_groups.items(), key=lambda item: item[0])
    left = [t for _, members in clinical for t in sorted(members)]
    left_pos = {t: i for i, t in enumerate(left)}
    # Recommended groups in the order of their members' mean position on the left, so that lines cross less.
    by_position = sorted(result.groups, key=lambda members: sum(left_pos[t] for t in members) / len(members))
    # Each group is labelled with its name in the groups: block that usagg transfer-matrix --recommend writes.
    name_of = {frozenset(members): name for name, members in result.as_mapping().items()}
    recommended = [(name_of[frozenset(members)], sorted(members, key=left_pos.get)) for members in by_position]
    right = [t for _, members in recommended for t in members]
    right_pos = {t: i for i, t in enumerate(right)}
    n = len(left)

    fig = new_figure(DOUBLE_COLUMN_IN, FRAME_HEIGHT_IN + ROW_HEIGHT_IN * max(n, 4))
    grid = fig.add_gridspec(1, 3, width_ratios=[0.02, 1.0, 0.02])
    left_ax = fig.add_subplot(grid[0, 0])
    ax = fig.add_subplot(grid[0, 1])
    right_ax = fig.add_subplot(grid[0, 2])
    task_ax = ax.twinx()  # carries the right-hand task names

    for task in left:
        color = task_type_color(info[task][1])
        ax.plot([0.0, 1.0], [left_pos[task], right_pos[task]], color=color, linewidth=0.9, alpha=0.9)
    _draw_bars(ax, left_ax, clinical, left_pos, x=0.0, side="left")
    _draw_bars(ax, right_ax, recommended, right_pos, x=1.0, side="right")

    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels(left, fontsize=SMALL_FONT_SIZE)
    ax.set_xticks([])
    for axis in (task_ax, left_ax, right_ax):
        axis.set_ylim(n - 0.5, -0.5)
    task_ax.set_yticks(range(n))
    task_ax.set_yticklabels(right, fontsize=SMALL_FONT_SIZE)
    for axis in (ax, task_ax):
        axis.tick_params(axis="y", length=0)
        for spine in axis.spines.values():
            spine.set_visible(False)
    ax.set_title("clinical groups", loc="left")
    ax.set_title("recommended groups", loc="right")

    score_text = f"within-group affinity: recommended {result.score:#.3g}"
    if result.taxonomy_score is not None:
        score_text += f", clinical {result.taxonomy_score:#.3g}"
    if result.random_score_mean is not None:
        score_text += f", random partitions {result.random_score_mean:#.3g} (95th percentile {result.random_score_p95:#.3g})"
    fig.suptitle(
        f"Task grouping: {len(clinical)} clinical groups vs {result.k} groups recommended from {METHOD_LABELS[chosen]}\n{score_text}"
    )
    handles = task_type_handles({info[t][1] for t in tasks if info[t][1]}, marker=None)
    handles = [Line2D([], [], color=h.get_facecolor(), linewidth=1.2, label=h.get_label()) for h in handles]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), title="line colour: task type")

    rows = [
        {
            "task": t,
            "task_type": info[t][1],
            "clinical_group": info[t][0],
            "recommended_group": next(name for name, members in recommended if t in members),
            "task_score": result.task_scores.get(t),
            "method": chosen,
            "k": result.k,
            "score": result.score,
            "clinical_score": result.taxonomy_score,
        }
        for t in left
    ]
    notes = [f"grouping search: {result.method}"]
    return FigurePlot(fig, pl.DataFrame(rows), notes)


def _draw_bars(ax, label_ax, groups: list[tuple[str, list[str]]], positions: dict[str, int], x: float, side: str) -> None:
    """Draw one bar per group at ``x`` and name the group on the outer narrow axes."""
    ticks, names = [], []
    for k, (name, members) in enumerate(groups):
        rows = sorted(positions[t] for t in members)
        ax.plot([x, x], [rows[0] - 0.4, rows[-1] + 0.4], color=BAR_SHADES[k % 2], linewidth=4, solid_capstyle="butt")
        ticks.append((rows[0] + rows[-1]) / 2)
        names.append(name)
    label_ax.set_yticks(ticks)
    label_ax.set_yticklabels(names, fontsize=SMALL_FONT_SIZE)
    label_ax.set_xticks([])
    label_ax.tick_params(axis="y", length=0)
    if side == "right":
        label_ax.yaxis.tick_right()
    for spine in label_ax.spines.values():
        spine.set_visible(False)
