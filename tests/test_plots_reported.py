"""analysis/paper_reported.csv: the numbers reported for M2DINO, and the figures and commands that read it."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from usagg.cli import app
from usagg.plots.common import TRAIN_IMAGES_METRIC, compute_relative_change
from usagg.plots.inputs import FigureInputs
from usagg.plots.layout import layout_problems
from usagg.plots.registry import draw_figure
from usagg.results import read_results

REPORTED = Path(__file__).resolve().parents[1] / "analysis" / "paper_reported.csv"
SOURCE = "reported:Wang et al. 2026 arXiv:2603.18123 (secondary summary)"


@pytest.fixture(scope="module")
def reported() -> pl.DataFrame:
    return read_results(REPORTED)


def test_reported_rows_carry_source(reported):
    assert set(reported["source"]) == {SOURCE}
    assert reported["seed"].null_count() == reported.height


def test_reported_breast_dice_values(reported):
    dice = reported.filter(pl.col("metric") == "dice")
    values = dict(zip(dice["paradigm"], dice["value"]))
    assert values == {"task_specific": 0.713, "grouped": 0.145, "unified": 0.692}
    # The per-task training size of breast_lesion is not reported, so it stays empty.
    assert dice["n_train"].null_count() == 3


def test_reported_training_sizes(reported):
    sizes = reported.filter(pl.col("metric") == TRAIN_IMAGES_METRIC)
    groups = {r["clinical_group"]: r["value"] for r in sizes.filter(pl.col("task_type") == "all").iter_rows(named=True)}
    assert groups == {"obstetrics": 11910, "breast": 2920}
    types = {r["task_type"]: r["value"] for r in sizes.filter(pl.col("clinical_group") == "all").iter_rows(named=True)}
    assert types == {"segmentation": 16615, "classification": 16361, "detection": 4333, "regression": 3078}


def test_reported_relative_change(reported):
    rel = compute_relative_change(reported)
    change = dict(zip(rel["paradigm"], rel["rel_change"]))
    assert math.isclose(change["grouped"], (0.145 - 0.713) / 0.713)
    assert math.isclose(change["unified"], (0.692 - 0.713) / 0.713)


def test_group_paradigm_on_reported(reported):
    plot = draw_figure("group-paradigm", FigureInputs(results=reported))
    (ax,) = plot.figure.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["breast\n2,920 images, 1 task"]
    assert set(plot.data["train_images_source"]) == {"reported"}
    assert layout_problems(plot.figure) == []


def test_transfer_matrix_on_reported(reported):
    plot = draw_figure("transfer-matrix", FigureInputs(results=reported))
    texts = sorted(t.get_text() for t in plot.figure.axes[1].texts)
    assert texts == ["-2.9", "-79.7", "breast"]  # two cells and the clinical group label
    # Reported values have no interval, so the table flags neither cell and the figure outlines neither.
    assert plot.data["marked"].to_list() == [False, False]
    assert layout_problems(plot.figure) == []


def test_cli_plot_list_one_line_each():
    result = CliRunner().invoke(app, ["plot", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == [
        "data-scale", "transfer-matrix", "group-paradigm", "task-type", "affinity", "expert-usage", "grouping", "training",
    ]


def test_cli_plot_group_paradigm(tmp_path):
    result = CliRunner().invoke(
        app, ["plot", "--figure", "group-paradigm", str(REPORTED), "--out", str(tmp_path), "--format", "png,svg"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group-paradigm.csv", "group-paradigm.png", "group-paradigm.svg"]


def test_cli_transfer_matrix_on_reported():
    result = CliRunner().invoke(app, ["transfer-matrix", str(REPORTED)])
    assert result.exit_code == 0, result.output
    assert "-79.7" in result.output
