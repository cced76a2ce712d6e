"""Every figure drawn from the 27-task fixture: files, axes, labels and a clean layout."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from matplotlib.patches import Rectangle
from test_plots_fixtures import TASKS_27, make_results, study_dir_27  # noqa: F401  (pytest fixture)

from usagg.errors import ConfigError, DataError
from usagg.results import RESULTS_SCHEMA
from usagg.plots.inputs import FigureInputs
from usagg.plots.layout import layout_problems
from usagg.plots.registry import FIGURE_MODULES, draw_figure, get_figure, load_figures, parse_options
from usagg.plots.style import save_figure
from usagg.plots.transfer_matrix import cell_text, colour_limit

FIGURE_NAMES = ["data-scale", "transfer-matrix", "group-paradigm", "task-type", "affinity", "expert-usage", "grouping", "training"]
GROUPS_27 = sorted({t[2] for t in TASKS_27})


@pytest.fixture(scope="module")
def drawn(study_dir_27, tmp_path_factory):
    """Draw every figure once from the fixture study folder; return name -> (plot, layout problems, paths)."""
    inputs = FigureInputs.from_paths([study_dir_27])
    out = tmp_path_factory.mktemp("figures")
    rendered = {}
    for name in FIGURE_NAMES:
        plot = draw_figure(name, inputs)
        rendered[name] = (plot, layout_problems(plot.figure), save_figure(plot.figure, out, name, ("pdf", "png"), plot.data))
    return rendered


def _titled_axes(fig):
    return [ax for ax in fig.axes if ax.get_title()]


def test_registry_lists_every_figure():
    assert list(load_figures()) == FIGURE_NAMES
    assert len(FIGURE_MODULES) == len(FIGURE_NAMES)


@pytest.mark.parametrize("name", FIGURE_NAMES)
def test_figure_files_and_clean_layout(drawn, name):
    plot, problems, paths = drawn[name]
    assert [p.suffix for p in paths] == [".pdf", ".png", ".csv"]
    for path in paths:
        assert path.stat().st_size > 0
    assert problems == []
    assert plot.data.height > 0


def test_data_scale_panels_and_marks(drawn):
    plot, _, _ = drawn["data-scale"]
    panels = _titled_axes(plot.figure)
    assert [ax.get_title() for ax in panels] == ["grouped", "unified"]
    for ax in panels:
        assert ax.get_xscale() == "log"
        assert ax.get_xlabel() == "training images (log scale)"
        zero_lines = [line for line in ax.get_lines() if np.allclose(line.get_ydata(), 0.0) and line.get_linestyle() == "--"]
        assert zero_lines, "the zero line is missing"
        assert len(ax.collections) >= 9  # scatter per clinical group plus confidence bands
    crossings = plot.data.filter(pl.col("layer") == "crossing")
    drawn_crossings = crossings.filter(pl.col("drawn"))["n_train"].to_list()
    markers = [line for ax in panels for line in ax.get_lines() if line.get_marker() == "D"]
    assert len(markers) == len(drawn_crossings) > 0
    assert plot.figure.axes[0].get_ylabel() == "relative change to task-specific (%, + is better)"


def test_data_scale_fit_stays_in_observed_sizes(drawn):
    plot, _, _ = drawn["data-scale"]
    points = plot.data.filter(pl.col("layer") == "point")
    fits = plot.data.filter(pl.col("layer") == "fit")
    assert fits.height > 0
    for (paradigm, task_type), fit in fits.group_by("paradigm", "task_type"):
        observed = points.filter((pl.col("paradigm") == paradigm) & (pl.col("task_type") == task_type))["n_train"]
        assert fit["n_train"].min() == pytest.approx(observed.min()), (paradigm, task_type)
        assert fit["n_train"].max() == pytest.approx(observed.max()), (paradigm, task_type)
    for row in plot.data.filter((pl.col("layer") == "crossing") & pl.col("drawn")).iter_rows(named=True):
        observed = points.filter((pl.col("paradigm") == row["paradigm"]) & (pl.col("task_type") == row["task_type"]))
        assert observed["n_train"].min() <= row["n_train"] <= observed["n_train"].max()


def test_transfer_matrix_rows_columns_and_marks(drawn):
    plot, _, _ = drawn["transfer-matrix"]
    strip, heat = plot.figure.axes[0], plot.figure.axes[1]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["grouped", "unified"]
    labels = [t.get_text() for t in strip.get_yticklabels()]
    assert len(labels) == 27
    assert labels[0].endswith("[seg]") or labels[0].endswith("[cls]")
    groups = [next(t[2] for t in TASKS_27 if label.startswith(t[0] + " ")) for label in labels]
    assert groups == sorted(groups), "rows must be ordered by clinical group"
    outlined = [p for p in heat.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(outlined) == plot.data["marked"].sum()
    assert plot.data.height == 27 * 2


def test_transfer_matrix_value_matches_hand_computation(drawn):
    plot, _, _ = drawn["transfer-matrix"]
    results = make_results()
    rows = results.filter((pl.col("task") == "breast_lesion") & (pl.col("data_fraction") == 1.0))
    ts = rows.filter(pl.col("paradigm") == "task_specific").sort("seed")["value"].to_numpy()
    uni = rows.filter(pl.col("paradigm") == "unified").sort("seed")["value"].to_numpy()
    expected = float(np.mean((uni - ts) / np.abs(ts))) * 100
    cell = plot.data.filter((pl.col("task") == "breast_lesion") & (pl.col("paradigm") == "unified"))
    assert math.isclose(cell["rel_change_percent"][0], expected, rel_tol=1e-9)
    texts = [t.get_text() for t in plot.figure.axes[1].texts]
    assert cell_text(expected) in texts


def test_group_paradigm_groups_and_sizes(drawn):
    plot, _, _ = drawn["group-paradigm"]
    (ax,) = plot.figure.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == len(GROUPS_27)
    obstetrics_images = sum(t[4] for t in TASKS_27 if t[2] == "obstetrics")
    assert labels[0] == f"obstetrics\n{obstetrics_images:,} images, 7 tasks"  # largest group on top
    assert "Δm" in ax.get_xlabel()
    assert set(plot.data["paradigm"]) == {"grouped", "unified"}


def test_task_type_panels_and_test(drawn):
    plot, _, _ = drawn["task-type"]
    panels = _titled_axes(plot.figure)
    assert len(panels) == 2
    for ax in panels:
        assert "Kruskal–Wallis H =" in ax.get_title()
        ticks = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
        assert ticks == ["segmentation", "classification", "detection", "regression"]
    tests = plot.data.filter(pl.col("layer") == "kruskal_wallis")
    assert tests.height == 2


def test_affinity_one_and_two_methods(drawn, study_dir_27):
    plot, _, _ = drawn["affinity"]
    heat = [ax for ax in plot.figure.axes if ax.get_title() == "lookahead (TAG)"]
    assert len(heat) == 1
    assert len(heat[0].get_yticklabels()) == 27
    inputs = FigureInputs.from_paths([study_dir_27])
    spec = get_figure("affinity")
    two = draw_figure("affinity", inputs, **parse_options(spec, ["methods=lookahead,experts"]))
    titles = [ax.get_title() for ax in two.figure.axes if ax.get_title()]
    assert titles == ["lookahead (TAG)", "expert-usage similarity (1 − JSD)"]
    assert layout_problems(two.figure) == []
    assert set(two.data["method"]) == {"lookahead", "experts"}


def test_affinity_diagonal_outside_colour_scale(drawn):
    plot, _, _ = drawn["affinity"]
    heat = next(ax for ax in plot.figure.axes if ax.get_title() == "lookahead (TAG)")
    image = heat.get_images()[0]
    data = plot.data.filter(pl.col("method") == "lookahead")
    off_diagonal = data.filter(pl.col("source") != pl.col("target"))["affinity"].to_numpy()
    # The fixture's lookahead has both signs, so the scale is diverging and symmetric around 0.
    limit = np.nanmax(np.abs(off_diagonal))
    assert image.norm.vmin == pytest.approx(-limit)
    assert image.norm.vmax == pytest.approx(limit)
    drawn_values = image.get_array()
    assert drawn_values.mask.diagonal().all()  # self-affinity is drawn separately, in white
    assert not data.filter(pl.col("source") == pl.col("target"))["affinity"].is_nan().all()  # but kept in the data


def test_expert_usage_one_panel_per_layer(drawn):
    plot, _, _ = drawn["expert-usage"]
    panels = [ax for ax in plot.figure.axes if ax.get_title().startswith("block")]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["block 3", "block 4", "block 5"]
    assert all(ax.get_title().split("\n")[1].endswith(" nats") for ax in panels)
    assert len(panels[0].get_yticklabels()) == 27
    shares = plot.data.group_by("task", "block").agg(pl.col("share").sum())["share"].to_numpy()
    assert np.allclose(shares, 1.0)
    # The run is named by its coordinates, not its absolute path, so the figure data carries no machine path.
    assert plot.data["run"].unique().to_list() == ["unified / all / frac 1 / seed 0"]


def test_grouping_partitions_side_by_side(drawn):
    plot, _, _ = drawn["grouping"]
    middle = next(ax for ax in plot.figure.axes if ax.get_title(loc="left"))
    assert middle.get_title(loc="left") == "clinical groups"
    assert middle.get_title(loc="right").startswith("recommended groups")
    assert len(middle.get_yticklabels()) == 27
    assert set(plot.data["clinical_group"]) == set(GROUPS_27)
    # Groups carry the names of the groups: block that transfer-matrix --recommend writes.
    names = sorted(set(plot.data["recommended_group"]), key=lambda name: int(name.split("_")[1]))
    assert names == [f"affinity_{i + 1}" for i in range(len(names))]


def test_training_two_axes_per_task(drawn):
    plot, _, _ = drawn["training"]
    titled = [ax for ax in plot.figure.axes if ax.get_title()]
    assert len(titled) == 27
    assert len(plot.figure.axes) == 2 * 27
    legend = plot.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["task-specific", "grouped", "unified"]
    fraction = plot.data["data_fraction"].max()
    seed = plot.data["seed"].min()
    assert plot.figure.get_suptitle().endswith(f"(data fraction {fraction:g}, seed {seed})")


def test_option_parsing_rejects_unknown_key():
    spec = get_figure("transfer-matrix")
    assert parse_options(spec, ["fraction=0.5"]) == {"fraction": 0.5}
    with pytest.raises(ConfigError, match="no option 'colour'"):
        parse_options(spec, ["colour=red"])
    with pytest.raises(ConfigError, match="not a valid float"):
        parse_options(spec, ["fraction=half"])


def test_missing_inputs_name_what_is_needed(tmp_path):
    results_only = FigureInputs(results=make_results(fractions=(1.0,), seeds=(0,)))
    with pytest.raises(ConfigError, match="routing_stats.json"):
        draw_figure("expert-usage", results_only)
    with pytest.raises(DataError, match="affinity source"):
        draw_figure("affinity", results_only)
    with pytest.raises(DataError, match="not found"):
        FigureInputs.from_paths([tmp_path / "missing.csv"])


def test_cell_text_rounds_noise_to_zero():
    assert cell_text(-79.66) == "-79.7"
    assert cell_text(0.0) == "0.0"
    assert cell_text(-0.0009) == "0.0"
    assert cell_text(-0.06) == "-0.1"
    assert cell_text(2.0) == "+2.0"


# --- a hand-made table with large effects (6 tasks, 3 seeds), as in a user trial --------------------------

# name, type, clinical group, metric, training images at fraction 1, grouped and unified relative change
HAND_TASKS = [
    ("breast_lesion", "segmentation", "breast", "dice", 650, -0.78, -0.04),
    ("thyroid_nodule", "segmentation", "thyroid", "dice", 1100, -0.35, 0.02),
    ("fetal_plane", "classification", "obstetrics", "auc", 4200, 0.01, -0.02),
    ("breast_birads", "classification", "breast", "auc", 780, 0.04, 0.06),
    ("thyroid_nodule_det", "detection", "thyroid", "iou", 480, -0.12, 0.03),
    ("fetal_head_points", "regression", "obstetrics", "mre_px", 300, 0.45, 0.30),
]


def _hand_results(seeds=(0, 1, 2), fractions=(0.25, 0.5, 1.0), reference=None, rng_seed=3) -> pl.DataFrame:
    """Results whose relative changes are those of HAND_TASKS plus noise; ``reference`` overrides task-specific values."""
    from usagg.results import RESULTS_SCHEMA, validate_results

    rng = np.random.default_rng(rng_seed)
    rows = []
    for fraction in fractions:
        for seed in seeds:
            for name, task_type, group, metric, n_full, grouped, unified in HAND_TASKS:
                higher = metric != "mre_px"
                value_ts = (reference or {}).get((name, fraction, seed), 0.8 if higher else 20.0)
                for paradigm, change in (("task_specific", 0.0), ("grouped", grouped), ("unified", unified)):
                    if paradigm != "task_specific":
                        change += rng.normal(0, 0.02)
                    sign = 1 if higher else -1
                    value = (0.8 if higher else 20.0) * (1 + sign * change)
                    rows.append({
                        "study": "hand", "run_id": f"{paradigm}-{name}-f{fraction:g}-s{seed}", "paradigm": paradigm,
                        "group": {"task_specific": name, "grouped": group, "unified": "all"}[paradigm], "task": name,
                        "task_type": task_type, "organ": group, "clinical_group": group,
                        "n_train": round(n_full * fraction), "data_fraction": fraction, "seed": seed, "split": "test",
                        "metric": metric, "value": value_ts if paradigm == "task_specific" else value,
                        "higher_is_better": higher, "source": "run",
                    })
    return validate_results(pl.DataFrame(rows, schema=RESULTS_SCHEMA))


def _panel_points(plot, paradigm):
    return plot.data.filter((pl.col("layer") == "point") & (pl.col("paradigm") == paradigm))["rel_change_percent"].to_numpy()


def _arrows(ax):
    return [line for line in ax.get_lines() if line.get_marker() in ("$\\uparrow$", "$\\downarrow$")]


def _legend_rows(fig):
    """Legend labels grouped by the row they are drawn on, top row first."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    rows: dict[float, list[tuple[float, str]]] = {}
    for text in fig.legends[0].get_texts():
        box = text.get_window_extent(renderer)
        if text.get_text().strip():  # padding entries end a legend section
            rows.setdefault(round(box.y0, 1), []).append((box.x0, text.get_text()))
    return [[label for _, label in sorted(rows[y])] for y in sorted(rows, reverse=True)]


def test_data_scale_range_covers_points():
    plot = draw_figure("data-scale", FigureInputs(results=_hand_results()))
    panels = _titled_axes(plot.figure)
    low, high = panels[0].get_ylim()
    for ax in panels:
        values = _panel_points(plot, ax.get_title())
        assert low < values.min()
        assert values.max() < high
        assert _arrows(ax) == []
    # The margin is small: the range is not stretched by the confidence bands.
    every = plot.data.filter(pl.col("layer") == "point")["rel_change_percent"]
    assert high - low < 1.2 * (every.max() - every.min())
    # Only bands may be cut at the axis, and each cut is noted.
    assert all("band" in note for note in plot.notes if "y range" in note)
    assert layout_problems(plot.figure) == []


def test_data_scale_clips_true_outlier():
    # One failed task-specific run (Dice 0.004) turns a -78 % change into thousands of percent.
    results = _hand_results(reference={("breast_lesion", 0.25, 1): 0.004})
    plot = draw_figure("data-scale", FigureInputs(results=results))
    grouped = _titled_axes(plot.figure)[0]
    low, high = grouped.get_ylim()
    values = _panel_points(plot, "grouped")
    assert values.max() > 1000
    assert high < 100
    assert ((values < low) | (values > high)).sum() == 1
    assert values[values < 1000].min() > low  # the -80 % points stay inside
    assert len(_arrows(grouped)) == 1
    [note] = [n for n in plot.notes if n.startswith("grouped: 1 point(s) above the range")]
    assert "beyond ±100 %" in note
    assert "ylim" in note
    assert layout_problems(plot.figure) == []


def test_data_scale_ylim_option():
    spec = get_figure("data-scale")
    assert parse_options(spec, ["ylim=-40,40"]) == {"ylim": [-40.0, 40.0]}
    plot = draw_figure("data-scale", FigureInputs(results=_hand_results()), ylim=[-40.0, 40.0])
    grouped = _titled_axes(plot.figure)[0]
    assert grouped.get_ylim() == pytest.approx((-40.0, 40.0))
    values = _panel_points(plot, "grouped")
    assert sum(len(line.get_xdata()) for line in _arrows(grouped)) == ((values < -40) | (values > 40)).sum() > 0
    assert any("set with the ylim option" in note for note in plot.notes)
    assert layout_problems(plot.figure) == []
    for bad in ([40.0, -40.0], [10.0]):
        with pytest.raises(ConfigError, match="ylim needs two numbers"):
            draw_figure("data-scale", FigureInputs(results=_hand_results()), ylim=bad)


def test_data_scale_cli_ylim(tmp_path):
    from typer.testing import CliRunner

    from usagg.cli import app

    table = tmp_path / "results.csv"
    _hand_results().write_csv(table)
    out = tmp_path / "figures"
    result = CliRunner().invoke(app, ["plot", "--figure", "data-scale", str(table), "--out", str(out), "-O", "ylim=-40,40"])
    assert result.exit_code == 0, result.output
    assert (out / "data-scale.png").is_file()
    assert "set with the ylim option" in result.output


def test_data_scale_legend_rows(drawn):
    plot = draw_figure("data-scale", FigureInputs(results=_hand_results()))
    crossings = plot.data.filter(pl.col("layer") == "crossing")
    assert crossings.filter(pl.col("drawn")).height > 0
    assert not crossings["ci_drawn"].any()  # one or two tasks per type: no interval
    rows = _legend_rows(plot.figure)
    # Rows read left to right: task-type colours, then line and crossing styles, then clinical-group markers.
    assert rows == [
        ["segmentation", "classification", "detection", "regression"],
        ["uncertain zero crossing"],
        ["breast", "obstetrics", "thyroid"],
    ]
    # Those crossings have no bounded interval, so their markers are faded.
    faded = [line for ax in _titled_axes(plot.figure) for line in ax.get_lines() if line.get_marker() == "D"]
    assert faded
    assert all(line.get_alpha() < 1 for line in faded)
    # No crossing drawn (only the grouped panel, whose lines stay on one side of 0): no legend entry.
    grouped_only = _hand_results().filter(pl.col("paradigm") != "unified")
    plot = draw_figure("data-scale", FigureInputs(results=grouped_only))
    assert not plot.data.filter(pl.col("layer") == "crossing")["drawn"].any()
    labels = [t.get_text() for t in plot.figure.legends[0].get_texts()]
    assert not any("zero crossing" in label for label in labels)
    # The 27-task fixture has crossings with intervals, and the entry names the bar.
    fixture, _, _ = drawn["data-scale"]
    labels = [t.get_text() for t in fixture.figure.legends[0].get_texts()]
    assert "zero crossing (95 % CI)" in labels
    assert any(note.startswith("an arrowhead ends") for note in fixture.notes)
    fixture_rows = _legend_rows(fixture.figure)
    groups = set(fixture.data.filter(pl.col("layer") == "point")["clinical_group"].drop_nulls())
    first_group_row = next(k for k, row in enumerate(fixture_rows) if set(row) & groups)
    assert all(set(row) <= groups for row in fixture_rows[first_group_row:])
    assert not any(set(row) & groups for row in fixture_rows[:first_group_row])


def test_transfer_matrix_follows_table_flag():
    from usagg.analysis.transfer import analyse_transfer

    results = _hand_results()
    plot = draw_figure("transfer-matrix", FigureInputs(results=results))
    table = analyse_transfer(results).summary.filter(pl.col("data_fraction") == 1.0)
    flags = dict(zip(zip(table["task"], table["paradigm"]), table["negative_transfer"].fill_null(False)))
    marked = dict(zip(zip(plot.data["task"], plot.data["paradigm"]), plot.data["marked"]))
    assert marked == flags
    assert any(marked.values())
    heat = plot.figure.axes[1]
    assert len([p for p in heat.patches if isinstance(p, Rectangle) and not p.get_fill()]) == sum(marked.values())


def test_transfer_matrix_reported_not_outlined():
    from usagg.results import RESULTS_SCHEMA, validate_results

    # One reported study: Dice 0.713 task-specific, 0.701 unified (-1.7 %), no seed and no interval.
    rows = [
        {"study": "publication", "run_id": f"publication-{paradigm}", "paradigm": paradigm, "group": group, "task": "breast_lesion",
         "task_type": "segmentation", "organ": "breast", "clinical_group": "breast", "n_train": None,
         "data_fraction": 1.0, "seed": None, "split": "test", "metric": "dice", "value": value,
         "higher_is_better": True, "source": "reported:hand-made"}
        for paradigm, group, value in (("task_specific", "breast_lesion", 0.713), ("unified", "all", 0.701))
    ]
    plot = draw_figure("transfer-matrix", FigureInputs(results=validate_results(pl.DataFrame(rows, schema=RESULTS_SCHEMA))))
    [cell] = plot.data.iter_rows(named=True)
    assert cell["rel_change_percent"] == pytest.approx(-1.68, abs=0.01)
    assert cell["negative_transfer"] is None
    assert cell["marked"] is False
    assert cell["flag_rule"] == "a single reported or single-seed value has no interval; not flagged"
    assert not [p for p in plot.figure.axes[1].patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert "not outlined" in plot.figure.legends[0].get_title().get_text()
    assert any("1 of 1 cell(s) have no 95 % interval" in note for note in plot.notes)
    assert layout_problems(plot.figure) == []


def test_transfer_matrix_per_image_flags(tmp_path):
    from usagg.analysis.inputs import load_inputs
    from usagg.analysis.transfer import analyse_transfer
    from usagg.results import write_results

    # One seed: without per-image scores nothing would have an interval.
    results = _hand_results(seeds=(0,), fractions=(1.0,))
    study = tmp_path / "hand"
    write_results(results, study / "results.parquet")
    rng = np.random.default_rng(0)
    images = [f"img{i}" for i in range(30)]
    frames = []
    for row in results.iter_rows(named=True):
        # Each run's per-image scores average to its table value.
        noise = rng.normal(0, 0.02 * abs(row["value"]), len(images))
        frames.append(pl.DataFrame({
            "run_id": row["run_id"], "task": row["task"], "split": "test", "image": images, "metric": row["metric"],
            "value": row["value"] + noise - noise.mean(),
        }))
    pl.concat(frames).write_parquet(study / "per_image_scores.parquet")

    plot = draw_figure("transfer-matrix", FigureInputs.from_paths([study]))
    inputs = load_inputs(study)
    table = analyse_transfer(inputs.results, inputs.per_image, n_boot=2000, seed=0).summary
    assert set(table["ci_method"]) == {"bootstrap_images"}
    flags = dict(zip(zip(table["task"], table["paradigm"]), table["negative_transfer"]))
    marked = dict(zip(zip(plot.data["task"], plot.data["paradigm"]), plot.data["marked"]))
    assert marked == flags
    assert any(marked.values())
    assert set(plot.data["ci_method"]) == {"bootstrap_images"}


def test_training_rejects_same_run_id_twice(study_dir_27, tmp_path):
    import shutil

    unified = next(p for p in (study_dir_27 / "unified").rglob("train_log.jsonl")).parent
    copy = tmp_path / "other_output" / "study" / unified.relative_to(study_dir_27)
    shutil.copytree(unified, copy)
    inputs = FigureInputs.from_paths([unified, copy])

    with pytest.raises(DataError, match="have the same run id .* draw each folder in its own figure"):
        draw_figure("training", inputs)


def test_transfer_matrix_colour_limit_ignores_one_outlier():
    """One +494 % cell does not set the scale for cells between -80 and +30 %; a plain spread keeps its maximum."""
    values = np.array([[-80.0, 12.0], [30.0, -5.0], [494.0, np.nan], [3.0, -20.0], [8.0, 1.0], [-2.0, 25.0]])
    limit, clipped = colour_limit(values)
    assert clipped
    assert 30.0 <= limit < 120.0
    assert colour_limit(np.array([-27.5, 15.0, 3.0, -1.0])) == (27.5, False)
    assert colour_limit(np.array([np.nan, 0.2])) == (1.0, False)
    assert colour_limit(np.full(3, np.nan)) == (1.0, False)


def test_expert_usage_run_option_and_one_layer_title(tmp_path):
    """--option run= picks, among matching runs, the largest fraction; a one-layer figure keeps its title inside."""
    from test_plots_fixtures import write_run_dir

    tasks = ["breast_lesion", "breast_2cls", "breast_lesion_det"]
    for fraction in (0.5, 1.0):
        write_run_dir(tmp_path, "grouped", "breast", tasks, fraction=fraction, moe_blocks=(3,), num_experts=4)
    plot = draw_figure("expert-usage", FigureInputs.from_paths([tmp_path]), run="grouped/breast")
    assert plot.data["run"].unique().to_list() == ["grouped / breast / frac 1 / seed 0"]
    assert plot.figure._suptitle.get_text() == "Expert usage per MoE layer\ngrouped / breast / frac 1 / seed 0; 4 experts"
    assert layout_problems(plot.figure) == []


def test_data_scale_outlines_bands_wider_than_panel():
    """A band that covers most of its panel is drawn as two dotted edges; a narrow one stays filled."""
    import matplotlib.pyplot as plt

    from usagg.plots.data_scale import _log_axis, _outline_wide_bands

    fig, ax = plt.subplots()
    grid = np.linspace(10, 40, 20)
    ax.set_title("grouped")
    wide = ax.fill_between(grid, -500, 500)
    narrow = ax.fill_between(grid, -5, 5)
    ax.set_ylim(-50, 50)
    notes = _outline_wide_bands([(ax, grid, np.full(20, -500.0), np.full(20, 500.0), "C0", wide),
                                 (ax, grid, np.full(20, -5.0), np.full(20, 5.0), "C1", narrow)])
    assert wide not in ax.collections
    assert narrow in ax.collections
    assert [line.get_linestyle() for line in ax.lines] == [":", ":"]
    assert notes == ["grouped: 95 % bands that cover more than 60% of the y range are drawn as dotted edges instead of filled"]
    _log_axis(ax, 16.0, 45.0)
    low, high = ax.get_xlim()
    assert low < 16.0  # no point sits on the frame
    assert high > 45.0
    plt.close(fig)


def test_affinity_default_skips_unrecorded_estimators(tmp_path):
    """An affinity.json with only the Fisher entry does not make lookahead the default: expert usage comes first."""
    import json

    from test_plots_fixtures import write_run_dir

    from usagg.plots.affinity import available_methods

    tasks = ["breast_lesion", "breast_2cls", "breast_lesion_det"]
    run = write_run_dir(tmp_path, "unified", "all", tasks, num_experts=4)
    fisher = np.full((3, 3), 0.5)
    np.fill_diagonal(fisher, np.nan)
    (run / "affinity.json").write_text(json.dumps({"tasks": tasks, "fisher": {"matrix": [[None if np.isnan(v) else v for v in row] for row in fisher]}}))
    inputs = FigureInputs.from_paths([tmp_path])
    assert available_methods(inputs) == ["experts", "fisher"]
    plot = draw_figure("affinity", inputs)
    assert set(plot.data["method"]) == {"experts"}


def test_training_two_columns_fit_their_titles(study_dir_27):
    """Two columns of long task names take the double-column width; short names keep one column and wrap the title."""
    plot = draw_figure("training", FigureInputs.from_paths([study_dir_27]), max_columns=2)
    assert layout_problems(plot.figure) == []
    short = draw_figure("training", FigureInputs.from_paths([study_dir_27]), max_columns=2, runs=["grouped/breast"])
    assert "\nand validation metric" in short.figure._suptitle.get_text()
    assert layout_problems(short.figure) == []


def _result_row(paradigm, group, task, value):
    """One Dice row of a tiny study with pair runs (affinity figure tests)."""
    return {
        "study": "s", "run_id": f"{paradigm}/{group}/0", "paradigm": paradigm, "group": group, "task": task,
        "task_type": "segmentation", "organ": "o", "clinical_group": "g", "n_train": 10, "data_fraction": 1.0,
        "seed": 0, "split": "test", "metric": "dice", "value": value, "higher_is_better": True, "source": "run",
    }


def test_affinity_small_values_scaled():
    """Pair-run changes of a few percent would print as 0.041 and -0.0067, wider than a cell."""
    rows = [_result_row("task_specific", t, t, 0.5) for t in "abc"]
    pairs = [("a+b", "a", 0.5205), ("a+b", "b", 0.524), ("b+c", "b", 0.4967), ("b+c", "c", 0.51), ("a+c", "a", 0.511),
             ("a+c", "c", 0.4985)]
    rows += [_result_row("pair", group, task, value) for group, task, value in pairs]
    plot = draw_figure("affinity", FigureInputs(results=pl.DataFrame(rows, schema=RESULTS_SCHEMA)), methods=["measured"])
    labels = [text.get_text() for ax in plot.figure.axes for text in ax.texts]
    assert "4.1" in labels
    assert "-0.66" in labels
    assert any("cell labels × 10^2" in ax.get_xlabel() for ax in plot.figure.axes)
    assert layout_problems(plot.figure) == []
    assert plot.notes == []  # every pair of the three tasks was measured


def test_affinity_sparse_matrix_noted():
    rows = [_result_row("task_specific", t, t, 0.5) for t in "abcd"]
    rows += [_result_row("pair", "a+b", "a", 0.55), _result_row("pair", "a+b", "b", 0.52)]
    rows += [_result_row("pair", "c+d", "c", 0.45), _result_row("pair", "c+d", "d", 0.51)]
    plot = draw_figure("affinity", FigureInputs(results=pl.DataFrame(rows, schema=RESULTS_SCHEMA)), methods=["measured"])
    assert plot.notes == [
        "measured: only 33 % of the task pairs have a value, so the clustering and its order rest on few entries; "
        "empty cells are unmeasured pairs"
    ]


@pytest.mark.parametrize("length", [34, 130])
def test_transfer_matrix_fits_long_task_names(length):
    """Long names widen the figure up to double-column width; beyond it they are shortened in the middle."""
    from usagg.plots.style import DOUBLE_COLUMN_IN, SINGLE_COLUMN_IN

    results = _hand_results(seeds=(0,), fractions=(1.0,))
    longest = results["task"].unique().sort()[0]
    renamed = results.with_columns(
        pl.when(pl.col("task") == longest).then(pl.lit((longest + "_") * 12).str.slice(0, length)).otherwise(pl.col("task")).alias("task"),
        pl.col("clinical_group").str.replace("obstetrics", "obstetrics_and_gynaecology"),
    )
    plot = draw_figure("transfer-matrix", FigureInputs(results=renamed))
    assert layout_problems(plot.figure) == []
    width = plot.figure.get_figwidth()
    assert SINGLE_COLUMN_IN <= width <= DOUBLE_COLUMN_IN
    labels = [t.get_text() for t in plot.figure.axes[0].get_yticklabels()]
    shortened = [note for note in plot.notes if "shortened in the middle" in note]
    if length == 34:
        assert width > SINGLE_COLUMN_IN
        assert any(len(label) > length for label in labels)
        assert not shortened
    else:
        assert any("…" in label for label in labels)
        assert shortened == ["1 task name(s) are shortened in the middle (…) to fit a double-column width; the data CSV has them whole"]
        assert length in set(plot.data["task"].str.len_chars())


def test_group_interval_fallback_noted():
    """-O interval=tasks needs 4 tasks per group; the hand-made groups have two, so their interval is over seeds."""
    plot = draw_figure("group-paradigm", FigureInputs(results=_hand_results()), interval="tasks")
    assert set(plot.data["ci_over"]) == {"seeds"}
    (note,) = [n for n in plot.notes if n.startswith("interval over seeds instead of tasks (fewer than 4 tasks) for ")]
    assert "grouped/breast" in note
    assert "unified/thyroid" in note
    assert not any("instead of" in n for n in draw_figure("group-paradigm", FigureInputs(results=_hand_results())).notes)


def test_draw_figure_takes_paths_and_tables(tmp_path):
    from usagg.plots.registry import render_figure

    table = _hand_results()
    path = tmp_path / "results.csv"
    table.write_csv(path)
    for inputs in (str(path), path, [path], table):
        plot = draw_figure("group-paradigm", inputs)
        assert set(plot.data["paradigm"]) == {"grouped", "unified"}
    rendered = render_figure("group-paradigm", path, tmp_path / "figures", formats="png")
    assert [p.name for p in rendered.paths] == ["group-paradigm.png", "group-paradigm.csv"]
    with pytest.raises(ConfigError, match="figure inputs of type int: pass FigureInputs, a results DataFrame"):
        draw_figure("group-paradigm", 5)


def test_figures_share_one_relative_change(monkeypatch):
    """Figures drawn from one inputs compute the relative change once, so its warnings are logged once."""
    import usagg.analysis.relative as relative

    calls = []
    original = relative.relative_change
    monkeypatch.setattr(relative, "relative_change", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    inputs = FigureInputs(results=_hand_results())
    for name in ("transfer-matrix", "group-paradigm", "task-type"):
        draw_figure(name, inputs)
    assert len(calls) == 1
