"""Checks that a drawn figure has no clipped or overlapping text.

The check works on the rendered bounding boxes of every visible text artist: tick labels, axis labels,
titles, legend entries, annotations and figure-level texts. It reports

- text that reaches outside the figure (clipped in the saved file),
- two texts whose boxes intersect (overlapping labels),
- tick and axis labels that intrude into another axes (for example a neighbouring heatmap).

NOTE: boxes are axis-aligned, so labels rotated by angles other than 0 or 90 degrees can be reported as
overlapping when only their boxes touch. usagg figures therefore rotate labels by 0 or 90 degrees only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from usagg.plots.style import PNG_DPI, publication_style

logger = logging.getLogger(__name__)

# Intersections smaller than this many pixels (0.005 inch at the saved resolution) in either direction are
# ignored, so that boxes that merely touch are not reported.
TOLERANCE_PX = 0.005 * PNG_DPI


@dataclass(frozen=True)
class _PlacedText:
    kind: str  # "tick", "axis label", "title", "legend", "annotation", "figure text"
    text: str
    bbox: Bbox
    axes: Axes | None

    def describe(self) -> str:
        where = f" in axes {_axes_name(self.axes)!r}" if self.axes is not None else ""
        return f"{self.kind} {self.text!r}{where}"


def layout_problems(fig: Figure) -> list[str]:
    """Draw ``fig`` and return one message per clipped or overlapping text; empty when the layout is clean."""
    # Drawn and measured in the style and at the resolution the figure is saved with, so that the layout checked
    # is the layout written. Tick labels are computed again when they are measured, so outside the style (other
    # font sizes) they could be other ticks than those saved.
    screen_dpi = fig.dpi
    fig.set_dpi(PNG_DPI)
    try:
        with publication_style():
            fig.draw_without_rendering()
            renderer = fig.canvas.get_renderer()
            placed = _collect_texts(fig, renderer)
            problems: list[str] = []
            problems += _outside_figure(fig, placed)
            problems += _overlapping(placed)
            problems += _intruding(fig, placed)
    finally:
        fig.set_dpi(screen_dpi)
    return problems


def assert_clean_layout(fig: Figure, name: str = "figure") -> None:
    """Raise ``AssertionError`` listing every layout problem of ``fig``."""
    problems = layout_problems(fig)
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise AssertionError(f"{name}: {len(problems)} layout problem(s):\n  {listed}{more}")


def _axes_name(ax: Axes | None) -> str:
    if ax is None:
        return ""
    return ax.get_title() or ax.get_title("left") or ax.get_label() or ax.get_ylabel() or ax.get_xlabel() or "unnamed"


def _collect_texts(fig: Figure, renderer) -> list[_PlacedText]:
    placed: list[_PlacedText] = []
    seen: set[int] = set()

    def add(kind: str, artist: Text, ax: Axes | None) -> None:
        # A suptitle is also listed in Figure.texts; count each artist once.
        if id(artist) in seen or not artist.get_visible() or not artist.get_text().strip():
            return
        seen.add(id(artist))
        bbox = artist.get_window_extent(renderer)
        if bbox.width <= 0 or bbox.height <= 0:
            return
        placed.append(_PlacedText(kind, artist.get_text(), bbox, ax))

    def visit(container: Figure | SubFigure) -> None:
        for text in container.texts:
            add("figure text", text, None)
        for attr in ("_suptitle", "_supxlabel", "_supylabel"):
            text = getattr(container, attr, None)
            if text is not None:
                add("figure text", text, None)
        for legend in container.legends:
            _add_legend(add, legend, None)
        for sub in container.subfigs:
            visit(sub)

    visit(fig)
    for ax in fig.get_axes():
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            # ax.axis("off") hides ticks and axis labels without changing the axis objects' visibility.
            if not ax.axison or not axis.get_visible():
                continue
            for tick in _drawn_ticks(axis):
                for label in (tick.label1, tick.label2):
                    add("tick", label, ax)
            add("tick", axis.offsetText, ax)  # the "1e3" or "+1e-8" label of scaled tick values
            add("axis label", axis.label, ax)
        for title in (ax.title, ax._left_title, ax._right_title):
            add("title", title, ax)
        for text in ax.texts:
            add("annotation", text, ax)
        legend = ax.get_legend()
        if legend is not None:
            _add_legend(add, legend, ax)
    return placed


def _add_legend(add, legend: Legend, ax: Axes | None) -> None:
    if not legend.get_visible():
        return
    add("legend", legend.get_title(), ax)
    for text in legend.get_texts():
        add("legend", text, ax)


def _drawn_ticks(axis):
    # Axis._update_ticks returns exactly the ticks matplotlib draws (inside the view limits); it is
    # private but has been stable since matplotlib 3.1. The fallback keeps every major tick.
    try:
        return axis._update_ticks()
    except AttributeError:  # pragma: no cover - older or newer matplotlib without the method
        return axis.get_major_ticks()


def _outside_figure(fig: Figure, placed: list[_PlacedText]) -> list[str]:
    frame = fig.bbox
    problems = []
    for item in placed:
        box = item.bbox
        if (
            box.x0 < frame.x0 - TOLERANCE_PX
            or box.y0 < frame.y0 - TOLERANCE_PX
            or box.x1 > frame.x1 + TOLERANCE_PX
            or box.y1 > frame.y1 + TOLERANCE_PX
        ):
            problems.append(f"{item.describe()} is clipped by the figure edge")
    return problems


def _overlapping(placed: list[_PlacedText]) -> list[str]:
    if len(placed) < 2:
        return []
    boxes = np.array([[p.bbox.x0, p.bbox.y0, p.bbox.x1, p.bbox.y1] for p in placed])
    # Pairwise intersection widths and heights, vectorised because heatmaps hold hundreds of labels.
    width = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    height = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    hits = np.argwhere(np.triu((width > TOLERANCE_PX) & (height > TOLERANCE_PX), k=1))
    return [f"{placed[i].describe()} overlaps {placed[j].describe()}" for i, j in hits]


def _intruding(fig: Figure, placed: list[_PlacedText]) -> list[str]:
    problems = []
    axes = [ax for ax in fig.get_axes() if ax.get_visible() and ax.axison]
    for item in placed:
        if item.kind not in ("tick", "axis label") or item.axes is None:
            continue
        for other in axes:
            if other is item.axes:
                continue
            area = other.get_window_extent()
            width = min(item.bbox.x1, area.x1) - max(item.bbox.x0, area.x0)
            height = min(item.bbox.y1, area.y1) - max(item.bbox.y0, area.y0)
            if width > TOLERANCE_PX and height > TOLERANCE_PX:
                problems.append(f"{item.describe()} reaches into axes {_axes_name(other)!r}")
    return problems
