"""Publication style shared by every figure: sizes, fonts, colours, markers and the save helper.

Colours come from the Okabe–Ito palette (Okabe & Ito 2008, "Color Universal Design"), which stays distinct
under the common forms of colour-vision deficiency. Each task type and each paradigm keeps the same colour
in every figure, and each clinical group keeps the same marker.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import matplotlib as mpl
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from usagg.errors import ConfigError
from usagg.io import atomic_path

logger = logging.getLogger(__name__)
# Embedding fonts in a PDF logs every subset step of fontTools at INFO, over a hundred lines per figure for a
# caller whose logging shows INFO; its warnings still show.
logging.getLogger("fontTools").setLevel(logging.WARNING)

# Figure widths of a two-column journal page, in inches.
SINGLE_COLUMN_IN = 3.5
DOUBLE_COLUMN_IN = 7.2
PNG_DPI = 300
FORMATS = ("pdf", "png", "svg")
DEFAULT_FORMATS = ("pdf", "png")

# Font sizes in points; 7 pt keeps 27 task names legible at single-column width.
FONT_SIZE = 7.0
SMALL_FONT_SIZE = 6.0
TITLE_FONT_SIZE = 8.0

OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "grey": "#999999",
}

TASK_TYPES = ("segmentation", "classification", "detection", "regression")
TASK_TYPE_COLORS = {
    "segmentation": OKABE_ITO["blue"],
    "classification": OKABE_ITO["orange"],
    "detection": OKABE_ITO["bluish_green"],
    "regression": OKABE_ITO["reddish_purple"],
}

PARADIGM_ORDER = ("task_specific", "grouped", "unified", "pair")
PARADIGM_COLORS = {
    "task_specific": "#555555",
    "grouped": OKABE_ITO["vermillion"],
    "unified": OKABE_ITO["sky_blue"],
    "pair": OKABE_ITO["yellow"],
}
PARADIGM_LABELS = {
    "task_specific": "task-specific",
    "grouped": "grouped",
    "unified": "unified",
    "pair": "pair",
}

# Markers for clinical groups. Groups named here keep their marker across studies; other groups take the
# remaining markers in sorted order.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "8", "d", "H")
CLINICAL_GROUP_MARKERS = {
    "obstetrics": "o",
    "breast": "s",
    "thyroid": "^",
    "cardiac": "D",
    "cardiovascular": "d",
    "abdomen": "v",
    "lung": "P",
    "vascular": "X",
    "musculoskeletal": "<",
    "regional_anaesthesia": ">",
    "gynaecology": "p",
    "spine": "h",
}
UNKNOWN_COLOR = OKABE_ITO["grey"]

# Diverging colour map for signed relative changes; ColorBrewer's PuOr is colour-blind safe.
DIVERGING_CMAP = "PuOr"
# Sequential colour map for shares and affinities without a sign.
SEQUENTIAL_CMAP = "cividis"


def rc_params() -> dict[str, object]:
    """Return the matplotlib settings every usagg figure is drawn with."""
    return {
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
        "font.size": FONT_SIZE,
        "axes.titlesize": TITLE_FONT_SIZE,
        "axes.labelsize": FONT_SIZE,
        "xtick.labelsize": SMALL_FONT_SIZE,
        "ytick.labelsize": SMALL_FONT_SIZE,
        "legend.fontsize": SMALL_FONT_SIZE,
        "legend.title_fontsize": FONT_SIZE,
        "figure.titlesize": TITLE_FONT_SIZE,
        "axes.linewidth": 0.6,
        "lines.linewidth": 1.0,
        "lines.markersize": 3.5,
        "xtick.major.width": 0.6,
        "ytick.major.width": 0.6,
        "xtick.major.size": 2.5,
        "ytick.major.size": 2.5,
        "axes.spines.top": False,
        # No "1e-8 + 0.9999999" offset labels: tick labels show the values themselves.
        "axes.formatter.useoffset": False,
        "axes.spines.right": False,
        "legend.frameon": False,
        # TrueType (Type 42) fonts in PDF and PostScript: journals reject Type 3 bitmap fonts.
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "svg.fonttype": "path",
        "savefig.dpi": PNG_DPI,
        "figure.dpi": 100,
        "figure.constrained_layout.use": True,
        "figure.constrained_layout.h_pad": 0.03,
        "figure.constrained_layout.w_pad": 0.03,
    }


@contextlib.contextmanager
def publication_style() -> Iterator[None]:
    """Apply the usagg figure style inside the block and restore the caller's settings afterwards."""
    with mpl.rc_context(rc_params()):
        yield


def new_figure(width_in: float, height_in: float) -> Figure:
    """Create a figure of the given size in inches, outside pyplot's figure manager so that nothing leaks.

    Call it inside :func:`publication_style`, because artists read the font sizes when they are created.
    """
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def text_width_in(texts: Iterable[str], fontsize: float) -> float:
    """Return the width in inches of the widest of ``texts`` set at ``fontsize`` points in the current font."""
    renderer = RendererAgg(1, 1, 72)  # at 72 dpi one pixel is one point
    prop = FontProperties(size=fontsize)
    widths = [renderer.get_text_width_height_descent(text, prop, ismath=False)[0] for text in texts]
    return max(widths, default=0.0) / 72


def shorten_middle(text: str, max_chars: int) -> str:
    """Return ``text`` cut to ``max_chars`` characters by an ellipsis in the middle, keeping its start and end."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail > 0 else "")


def task_type_color(task_type: str) -> str:
    return TASK_TYPE_COLORS.get(task_type, UNKNOWN_COLOR)


def paradigm_color(paradigm: str) -> str:
    return PARADIGM_COLORS.get(paradigm, UNKNOWN_COLOR)


def paradigm_label(paradigm: str) -> str:
    return PARADIGM_LABELS.get(paradigm, paradigm)


def ordered_paradigms(paradigms: Iterable[str]) -> list[str]:
    """Sort paradigm names in the canonical order, unknown names last in alphabetical order."""
    names = set(paradigms)
    known = [p for p in PARADIGM_ORDER if p in names]
    return known + sorted(names - set(PARADIGM_ORDER))


def ordered_task_types(task_types: Iterable[str]) -> list[str]:
    names = set(task_types)
    known = [t for t in TASK_TYPES if t in names]
    return known + sorted(names - set(TASK_TYPES))


def clinical_group_markers(groups: Iterable[str]) -> dict[str, str]:
    """Map each clinical group to a marker: fixed ones for known groups, the unused ones for the rest."""
    names = sorted(set(groups))
    markers = {g: CLINICAL_GROUP_MARKERS[g] for g in names if g in CLINICAL_GROUP_MARKERS}
    free = [m for m in MARKERS if m not in markers.values()]
    for i, group in enumerate(g for g in names if g not in markers):
        markers[group] = free[i % len(free)]
    return markers


def parse_formats(formats: str | Sequence[str] | None) -> tuple[str, ...]:
    """Parse ``"pdf,png"`` or a list of names into a tuple of supported output formats."""
    if formats is None:
        return DEFAULT_FORMATS
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ConfigError(
            f"unsupported figure format(s) {', '.join(unknown) or repr(formats)}; "
            f"choose one or more of {', '.join(FORMATS)} separated by commas"
        )
    return names


def save_figure(
    fig: Figure,
    out_dir: str | os.PathLike,
    name: str,
    formats: Sequence[str] = DEFAULT_FORMATS,
    data: pl.DataFrame | None = None,
) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<format>`` for each format, plus the plotted data as ``name.csv``.

    PNG files are written at 300 dpi. Every write is atomic. Returns the written paths, figure files first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with publication_style():
        for fmt in parse_formats(formats):
            target = out / f"{name}.{fmt}"
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=fmt, dpi=PNG_DPI, metadata=_metadata(fmt))
            written.append(target)
    if data is not None:
        target = out / f"{name}.csv"
        with atomic_path(target) as tmp:
            _csv_ready(data).write_csv(tmp)
        written.append(target)
    logger.debug("wrote %s", ", ".join(str(p) for p in written))
    return written


def _metadata(fmt: str) -> dict[str, object]:
    # No creation date, so that re-rendering unchanged data gives unchanged PDF files in the repository.
    if fmt == "pdf":
        return {"Creator": "usagg", "Producer": None, "CreationDate": None}
    if fmt == "svg":
        return {"Creator": "usagg", "Date": None}
    return {"Software": "usagg"}


def _csv_ready(data: pl.DataFrame) -> pl.DataFrame:
    """Turn nested columns (lists, structs) into JSON-like text, because CSV holds only flat values."""
    nested = [c for c, t in data.schema.items() if isinstance(t, (pl.List, pl.Array, pl.Struct, pl.Object))]
    if not nested:
        return data
    return data.with_columns(
        pl.col(c).map_elements(lambda v: str(v.to_list() if hasattr(v, "to_list") else v), return_dtype=pl.String)
        for c in nested
    )
