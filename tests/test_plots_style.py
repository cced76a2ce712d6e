"""Publication style, the save helper and the layout checker."""

from __future__ import annotations

import re

import polars as pl
import pytest
from PIL import Image

from usagg.errors import ConfigError
from usagg.plots.layout import layout_problems
from usagg.plots.style import (
    CLINICAL_GROUP_MARKERS,
    PARADIGM_COLORS,
    TASK_TYPE_COLORS,
    clinical_group_markers,
    new_figure,
    parse_formats,
    publication_style,
    save_figure,
)


def test_colours_distinct_across_types_and_paradigms():
    colours = list(TASK_TYPE_COLORS.values()) + [PARADIGM_COLORS[p] for p in ("task_specific", "grouped", "unified")]
    assert len(set(c.lower() for c in colours)) == len(colours)


def test_group_markers_fixed_and_unique():
    markers = clinical_group_markers(["breast", "obstetrics", "zebra_group", "another_group"])
    assert markers["breast"] == CLINICAL_GROUP_MARKERS["breast"]
    assert markers["obstetrics"] == CLINICAL_GROUP_MARKERS["obstetrics"]
    assert len(set(markers.values())) == 4


def test_parse_formats_accepts_lists_and_rejects_unknown():
    assert parse_formats("pdf, PNG,svg") == ("pdf", "png", "svg")
    assert parse_formats(["png"]) == ("png",)
    with pytest.raises(ConfigError, match="tiff"):
        parse_formats("png,tiff")


def _simple_figure():
    with publication_style():
        fig = new_figure(3.5, 2.0)
        ax = fig.add_subplot()
        ax.plot([1, 2, 3], [1, 4, 9])
        ax.set_title("squares")
        ax.set_xlabel("x")
    return fig


def test_save_writes_formats_csv_and_300_dpi(tmp_path):
    fig = _simple_figure()
    data = pl.DataFrame({"x": [1, 2, 3], "y": [1, 4, 9]})
    paths = save_figure(fig, tmp_path, "squares", ("pdf", "png", "svg"), data)
    assert [p.name for p in paths] == ["squares.pdf", "squares.png", "squares.svg", "squares.csv"]
    with Image.open(tmp_path / "squares.png") as image:
        dpi = image.info["dpi"]
        size = image.size
    assert round(dpi[0]) == 300
    assert size == (1050, 600)  # 3.5 in x 2.0 in at 300 dpi, no cropping
    assert pl.read_csv(tmp_path / "squares.csv").equals(data)


def test_pdf_embeds_truetype_fonts(tmp_path):
    save_figure(_simple_figure(), tmp_path, "fonts", ("pdf",))
    pdf = (tmp_path / "fonts.pdf").read_bytes()
    assert b"/FontFile2" in pdf  # an embedded TrueType font program
    assert re.search(rb"/Subtype\s*/Type3", pdf) is None


def test_csv_flattens_list_columns(tmp_path):
    data = pl.DataFrame({"name": ["a"], "values": [[1, 2]]})
    save_figure(_simple_figure(), tmp_path, "nested", ("png",), data)
    assert pl.read_csv(tmp_path / "nested.csv")["values"][0] == "[1, 2]"


def test_layout_clean_figure_passes():
    assert layout_problems(_simple_figure()) == []


def test_layout_reports_overlapping_tick_labels():
    with publication_style():
        fig = new_figure(2.0, 2.0)
        ax = fig.add_subplot()
        ax.set_xticks(range(12))
        ax.set_xticklabels([f"a_long_task_name_{i}" for i in range(12)])
    problems = layout_problems(fig)
    assert any("overlaps" in p for p in problems)


def test_layout_reports_clipped_text():
    with publication_style():
        fig = new_figure(2.0, 2.0)
        fig.text(0.9, 0.5, "this text runs past the right edge")
    problems = layout_problems(fig)
    assert problems == ["figure text 'this text runs past the right edge' is clipped by the figure edge"]


def test_layout_measures_saved_ticks(monkeypatch):
    """Tick labels are recomputed when measured; the check measures them in the saved style and resolution."""
    from usagg.plots import layout

    with publication_style():
        fig = new_figure(3.5, 2.0)  # at this height the default style's fonts give other y ticks
        ax = fig.add_subplot()
        ax.plot([0, 1], [-6.68, 8.25])
        ax.set_ylim(-6.68, 8.25)
        ax.set_ylabel("relative change (%)")
    measured: list[str] = []
    collect = layout._collect_texts

    def spy(figure, renderer):
        placed = collect(figure, renderer)
        measured.extend(p.text for p in placed if p.kind == "tick" and p.axes is ax)
        return placed

    monkeypatch.setattr(layout, "_collect_texts", spy)
    layout_problems(fig)
    with publication_style():
        fig.set_dpi(300)
        fig.draw_without_rendering()
        saved = [t.label1.get_text() for axis in (ax.xaxis, ax.yaxis) for t in layout._drawn_ticks(axis)]
    assert measured
    assert sorted(measured) == sorted(saved)
