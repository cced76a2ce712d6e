"""Every figure drawn from real training runs: the real-data demo study after one epoch."""

from __future__ import annotations

from pathlib import Path

import pytest

from usagg.plots.inputs import FigureInputs
from usagg.plots.layout import layout_problems
from usagg.plots.registry import draw_figure, load_figures

DEMO = Path(__file__).resolve().parent / "test_plots_data" / "real_demo"


@pytest.fixture(scope="module")
def inputs() -> FigureInputs:
    return FigureInputs.from_paths([DEMO])


def test_demo_inputs_found(inputs):
    assert inputs.results is not None
    assert inputs.results["task"].n_unique() == 6
    assert len(inputs.runs) == 10  # 6 task-specific, 3 grouped, 1 unified


@pytest.mark.parametrize("name", list(load_figures()))
def test_demo_figure_renders_cleanly(inputs, name):
    plot = draw_figure(name, inputs)
    assert layout_problems(plot.figure) == []
    assert plot.data.height > 0


def test_demo_group_sizes_count_every_task(inputs):
    plot = draw_figure("group-paradigm", inputs)
    labels = [t.get_text() for t in plot.figure.axes[0].get_yticklabels()]
    # breast_lesion has no finite relative change (task-specific Dice 0) but still counts towards the group.
    assert labels[0] == "breast\n112 images, 3 tasks"


def test_demo_training_uses_primary_metric(inputs):
    plot = draw_figure("training", inputs)
    evals = plot.data.filter(plot.data["kind"] == "eval")
    metrics = dict(zip(evals["task"], evals["metric"]))
    assert metrics["breast_lesion"] == "dice"
    assert metrics["breast_2cls"] == "auc"
    assert metrics["fetal_head_axis"] == "mre_mm"
    assert len(plot.figure.axes) == 2 * 6


def test_demo_results_read_from_runs_without_study_table(tmp_path):
    """Before `usagg results collect`, the figures read the runs' own results tables."""
    import shutil

    import polars as pl

    from usagg.results import read_results, write_results

    study = tmp_path / "real_demo"
    shutil.copytree(DEMO, study)
    table = read_results(study / "results.parquet")
    (study / "results.parquet").unlink()
    for (run_id,), part in table.group_by(["run_id"]):
        write_results(part, study / run_id / "results.parquet")
    runs_only = FigureInputs.from_paths([study])
    assert runs_only.results.sort(pl.all()).equals(table.sort(pl.all()))
    assert len(runs_only.runs) == 10


def test_demo_group_note_names_dropped_tasks(inputs):
    plot = draw_figure("group-paradigm", inputs)
    (note,) = [n for n in plot.notes if n.startswith("Δm averages fewer tasks than the label counts")]
    assert "breast 2 of 3" in note
