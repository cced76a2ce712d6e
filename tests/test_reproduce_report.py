"""The study report: markdown and self-contained HTML, checked in a headless Chromium when one is installed."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import render_figure
from usagg.reproduce.report import ReportContent, ReportTable, format_value, markdown_table, write_report
from usagg.results import read_results

REPORTED = Path(__file__).resolve().parents[1] / "analysis" / "paper_reported.csv"
VERMILLION = (0xD5, 0x5E, 0x00)  # colour of the grouped paradigm; only the figure draws it


@pytest.fixture(scope="module")
def report_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = FigureInputs(results=read_results(REPORTED))
    figures = [render_figure(name, inputs, root / "figures", ("png", "pdf")) for name in ("group-paradigm", "transfer-matrix")]
    content = ReportContent(
        title="usagg study report: reported numbers",
        summary=["grouped training: Δm = -79.7 % over 1 task(s)."],
        figures=figures,
        tables=[ReportTable("Values <with> markup & pipes|", pl.DataFrame({"task": ["breast_lesion"], "value": [0.713], "missing": [float("nan")]}), "caption")],
        messages=["a skipped step"],
        stages=[{"name": "figures", "status": "done", "seconds": 1.0, "detail": ""}],
        meta={"study": "m2dino_reported"},
    )
    md, html_path = write_report(content, root / "out")
    return root, md, html_path


def test_markdown_links_existing_figures(report_files):
    root, md, _ = report_files
    text = md.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["../figures/group-paradigm.png", "../figures/transfer-matrix.png"]
    for link in links:
        assert (md.parent / link).is_file()
    assert "| breast_lesion | 0.713 | – |" in text
    assert "Values <with> markup & pipes|" in text


def test_html_is_self_contained(report_files):
    root, _, html_path = report_files
    page = html_path.read_text(encoding="utf-8")
    images = re.findall(r"<img alt='([^']+)' style='width: \d+px' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    assert [name for name, _ in images] == ["group-paradigm", "transfer-matrix"]
    embedded = base64.b64decode(images[0][1])
    assert embedded == (root / "figures" / "group-paradigm.png").read_bytes()
    assert re.search(r"""(src|href)=['"](https?:|//|file:)""", page) is None
    assert "Values &lt;with&gt; markup &amp; pipes|" in page


def test_table_formatting():
    assert format_value(0.123456) == "0.1235"
    assert format_value(float("nan")) == "–"
    assert format_value(None) == "–"
    table = pl.DataFrame({"a": list(range(45))})
    text = markdown_table(table)
    assert sum(line.startswith("| ") for line in text.splitlines()) == 41  # header + 40 rows
    assert "5 more row(s)" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install -y chromium)")
def test_html_renders_figures_in_headless_chromium(report_files, tmp_path):
    _, _, html_path = report_files
    shot = tmp_path / "screenshot.png"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--window-size=1200,1600", f"--screenshot={shot}", html_path.resolve().as_uri(),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), completed.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=int)
    # The grouped-paradigm marker of the first figure is vermillion; a page without its images has none.
    close = np.abs(pixels - np.array(VERMILLION)).sum(axis=2) < 40
    assert close.sum() > 20


def test_grouping_finding_compares_with_random_partitions():
    from types import SimpleNamespace

    from usagg.reproduce.findings import key_findings

    def finding(score, p95):
        grouping = SimpleNamespace(k=3, method="exhaustive", score=score, taxonomy_score=4.28,
                                   random_score_mean=5.2, random_score_p95=p95)
        report = SimpleNamespace(transfer=None, data_scale=None, sensitivity={}, grouping=grouping)
        return [line for line in key_findings(report) if line.startswith("Recommended partition")][0]

    chance = finding(5.5, 5.5)
    assert "random partitions into groups of the same sizes score 5.20 on average (95th percentile 5.50)" in chance
    assert chance.endswith("so the recommendation is not clearly better than chance and the matrix may carry little structure.")
    assert "not clearly better than chance" not in finding(6.1, 5.5)
