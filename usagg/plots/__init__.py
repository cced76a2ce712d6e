"""Publication figures: one module per figure, registered by name for ``usagg plot --figure NAME``.

Figures draw only; the numbers come from :mod:`usagg.analysis`. :mod:`usagg.plots.style` contains the shared
sizes, fonts, colours and the save helper, and :mod:`usagg.plots.layout` checks for clipped or overlapping text.
"""

from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import FIGURES, FigurePlot, RenderedFigure, draw_figure, load_figures, register_figure, render_figure

__all__ = ["FIGURES", "FigureInputs", "FigurePlot", "RenderedFigure", "draw_figure", "load_figures", "register_figure", "render_figure"]
