"""Figure registry: every figure is a function registered under the name ``usagg plot --figure`` takes.

A figure function takes a :class:`~usagg.plots.inputs.FigureInputs` plus keyword options and returns a
:class:`FigurePlot`, the drawn figure and the table of the values it shows. :func:`render_figure` draws it in
the publication style and writes the figure files and the CSV beside them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from matplotlib.figure import Figure

from usagg.errors import ConfigError
from usagg.plots.inputs import FigureInputs
from usagg.plots.layout import layout_problems
from usagg.plots.style import DEFAULT_FORMATS, parse_formats, publication_style, save_figure

logger = logging.getLogger(__name__)


@dataclass
class FigurePlot:
    """A drawn figure and the values it shows (written as CSV beside the figure)."""

    figure: Figure
    data: pl.DataFrame
    notes: list[str] = field(default_factory=list)  # caveats worth showing in a report, e.g. dropped rows


@dataclass
class RenderedFigure:
    """The files one figure was written to."""

    name: str
    description: str
    paths: list[Path]
    layout_problems: list[str]
    notes: list[str]

    def path(self, fmt: str) -> Path | None:
        return next((p for p in self.paths if p.suffix == f".{fmt}"), None)


@dataclass(frozen=True)
class FigureSpec:
    name: str
    description: str
    function: Callable[..., FigurePlot]

    def options(self) -> dict[str, inspect.Parameter]:
        """Keyword options of the figure function (everything after the inputs argument)."""
        params = list(inspect.signature(self.function).parameters.values())[1:]
        return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


FIGURES: dict[str, FigureSpec] = {}


def register_figure(name: str, description: str):
    """Register a figure function under ``name`` with a one-line description for ``usagg plot --list``."""

    def decorator(function: Callable[..., FigurePlot]) -> Callable[..., FigurePlot]:
        if name in FIGURES:
            raise ValueError(f"figure {name!r} is registered twice")
        FIGURES[name] = FigureSpec(name, description, function)
        return function

    return decorator


# One module per figure; importing a module registers its figure. The order is the order of `usagg plot --list`.
FIGURE_MODULES = (
    "data_scale",
    "transfer_matrix",
    "group_paradigm",
    "task_type",
    "affinity",
    "expert_usage",
    "grouping",
    "training",
)


def load_figures() -> dict[str, FigureSpec]:
    """Import every figure module so that it registers itself, and return the registry."""
    for module in FIGURE_MODULES:
        importlib.import_module(f"usagg.plots.{module}")
    # A figure module imported earlier (by a caller) registered first; return the documented order.
    rank = {f"usagg.plots.{module}": k for k, module in enumerate(FIGURE_MODULES)}
    return dict(sorted(FIGURES.items(), key=lambda item: rank.get(item[1].function.__module__, len(rank))))


def get_figure(name: str) -> FigureSpec:
    figures = load_figures()
    if name not in figures:
        raise ConfigError(f"unknown figure {name!r}; available figures: {', '.join(figures)} (see `usagg plot --list`)")
    return figures[name]


def parse_options(spec: FigureSpec, items: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings into typed keyword options of ``spec``'s function.

    List options take comma-separated values; booleans take true/false/yes/no/1/0.
    """
    allowed = spec.options()
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--option {item!r} is not of the form KEY=VALUE, e.g. --option fraction=0.5")
        if key not in allowed:
            names = ", ".join(allowed) or "(none)"
            raise ConfigError(f"figure {spec.name!r} has no option {key!r}; its options are: {names}")
        options[key] = _convert(spec, allowed[key], raw.strip())
    return options


def _convert(spec: FigureSpec, param: inspect.Parameter, raw: str) -> Any:
    hints = typing.get_type_hints(spec.function)
    annotation = hints.get(param.name, str)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    target = args[0] if args and typing.get_origin(annotation) is not list else annotation
    try:
        if typing.get_origin(target) in (list, tuple) or target in (list, tuple):
            inner = typing.get_args(target)
            kind = inner[0] if inner else str
            return [kind(v.strip()) for v in raw.split(",") if v.strip()]
        if target is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if target in (int, float):
            return target(raw)
    except ValueError:
        raise ConfigError(
            f"figure {spec.name!r}: option {param.name}={raw!r} is not a valid {getattr(target, '__name__', target)}"
        ) from None
    return raw


def draw_figure(name: str, inputs: Any, **options: Any) -> FigurePlot:
    """Draw figure ``name`` in the publication style without writing files.

    ``inputs`` is a :class:`FigureInputs`, a results DataFrame, or a path or list of paths of results tables
    (.parquet, .csv), run directories and study output folders.
    """
    spec = get_figure(name)
    figure_inputs = FigureInputs.coerce(inputs)
    with publication_style():
        return spec.function(figure_inputs, **options)


def render_figure(
    name: str,
    inputs: Any,
    out_dir: str | os.PathLike,
    formats: str | Sequence[str] = DEFAULT_FORMATS,
    file_stem: str | None = None,
    **options: Any,
) -> RenderedFigure:
    """Draw figure ``name``, write it in every format plus its data as CSV, and check its layout.

    ``inputs`` is what :func:`draw_figure` takes. Layout problems (clipped or overlapping text) are logged as warnings and returned, so that a caller
    such as a test can reject them.
    """
    spec = get_figure(name)
    fmts = parse_formats(formats)
    plot = draw_figure(name, inputs, **options)
    problems = layout_problems(plot.figure)
    for problem in problems:
        logger.warning("figure %s: %s", name, problem)
    paths = save_figure(plot.figure, out_dir, file_stem or name, fmts, plot.data)
    logger.info("figure %s written to %s", name, Path(out_dir))
    return RenderedFigure(name, spec.description, paths, problems, plot.notes)
