"""Relative change and Δm: hand-computed values, reported numbers, metric choice and bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from usagg.analysis.inputs import load_inputs
from usagg.analysis.relative import delta_m, parse_metric_overrides, relative_change, relative_change_with_warnings
from usagg.errors import AnalysisError, DataError
from usagg.results import RESULTS_SCHEMA, read_results, write_results

REPO = Path(__file__).resolve().parents[1]


def row(paradigm, task, metric, value, higher, *, group=None, task_type="segmentation", seed=0, fraction=1.0,
        clinical_group="breast", source="run", n_train=100, split="test"):
    if group is None and paradigm == "task_specific":
        group = task
    elif group is None and paradigm == "unified":
        group = "all"
    elif group is None:
        group = clinical_group
    return {
        "study": "s", "run_id": f"{paradigm}/{group}/{fraction}/{seed}", "paradigm": paradigm, "group": group,
        "task": task, "task_type": task_type, "organ": clinical_group, "clinical_group": clinical_group,
        "n_train": n_train, "data_fraction": fraction, "seed": seed, "split": split, "metric": metric,
        "value": value, "higher_is_better": higher, "source": source,
    }


def table(rows):
    return pl.DataFrame(rows, schema=RESULTS_SCHEMA)


@pytest.fixture
def known_table():
    return table([
        row("task_specific", "breast_lesion", "dice", 0.713, True),
        row("grouped", "breast_lesion", "dice", 0.145, True),
        row("unified", "breast_lesion", "dice", 0.692, True),
        row("task_specific", "fetal_head", "mre_px", 30.4, False, task_type="regression", clinical_group="obstetrics"),
        row("unified", "fetal_head", "mre_px", 15.6, False, task_type="regression", clinical_group="obstetrics"),
    ])


def test_relative_change_known_values(known_table):
    rel = relative_change(known_table)
    values = {(r["paradigm"], r["task"]): r["rel_change"] for r in rel.iter_rows(named=True)}
    assert round(100 * values[("grouped", "breast_lesion")], 2) == -79.66
    assert round(100 * values[("unified", "breast_lesion")], 2) == -2.95
    assert round(100 * values[("unified", "fetal_head")], 2) == 48.68


def test_relative_change_keeps_reference_columns(known_table):
    rel = relative_change(known_table)
    unified = rel.filter((pl.col("paradigm") == "unified") & (pl.col("task") == "fetal_head")).row(0, named=True)
    assert unified["value_ts"] == 30.4
    assert unified["value"] == 15.6
    assert unified["higher_is_better"] is False
    assert unified["run_id_ts"] == "task_specific/fetal_head/1.0/0"


def test_delta_m_known_values(known_table):
    rel = relative_change(known_table)
    dm = delta_m(rel, ["paradigm"])
    unified = dm.filter(pl.col("paradigm") == "unified").row(0, named=True)
    assert unified["n_tasks"] == 2
    assert math.isclose(unified["delta_m"], ((0.692 - 0.713) / 0.713 + (30.4 - 15.6) / 30.4) / 2)
    pooled = delta_m(rel, [])
    # Without grouping columns each task counts once, its paradigms averaged first.
    breast = ((0.145 - 0.713) / 0.713 + (0.692 - 0.713) / 0.713) / 2
    assert pooled["n_tasks"][0] == 2
    assert pooled["n_rows"][0] == 3
    assert math.isclose(pooled["delta_m"][0], (breast + (30.4 - 15.6) / 30.4) / 2)


def test_delta_m_counts_each_task_once():
    rows = []
    for seed in (0, 1, 2, 3):
        rows += [row("task_specific", "a", "dice", 0.5, True, seed=seed), row("unified", "a", "dice", 0.55, True, seed=seed)]
    rows += [row("task_specific", "b", "dice", 0.5, True), row("unified", "b", "dice", 0.45, True)]
    dm = delta_m(relative_change(table(rows)), ["paradigm"])
    # Task a has four seeds at +10 %, task b one at -10 %: Δm is their mean, 0, not the row mean.
    assert abs(dm["delta_m"][0]) < 1e-12
    assert dm["n_rows"][0] == 5


def test_reported_rows_with_null_seed_match():
    source = "reported:Example et al. 2025"
    rel = relative_change(table([
        row("task_specific", "t", "dice", 0.8, True, seed=None, source=source),
        row("grouped", "t", "dice", 0.6, True, seed=None, source=source),
    ]))
    assert rel.height == 1
    assert rel["seed"][0] is None
    assert math.isclose(rel["rel_change"][0], -0.25)


def test_paper_reported_table_in_repository():
    inputs = load_inputs(REPO / "analysis" / "paper_reported.csv")
    rel = relative_change(inputs.results)
    values = {r["paradigm"]: r["rel_change"] for r in rel.iter_rows(named=True)}
    assert round(100 * values["grouped"], 2) == -79.66
    assert round(100 * values["unified"], 2) == -2.95
    assert inputs.sizes.height > 0  # training-image rows are kept apart from the scores


def test_metric_override_by_type_and_task():
    rows = [
        row("task_specific", "a", "dice", 0.8, True), row("unified", "a", "dice", 0.7, True),
        row("task_specific", "a", "hd95", 10.0, False), row("unified", "a", "hd95", 8.0, False),
        row("task_specific", "b", "dice", 0.8, True), row("unified", "b", "dice", 0.9, True),
        row("task_specific", "b", "hd95", 10.0, False), row("unified", "b", "hd95", 12.0, False),
    ]
    by_type = relative_change(table(rows), metrics={"segmentation": "hd95"})
    assert set(by_type["metric"]) == {"hd95"}
    assert math.isclose(by_type.filter(pl.col("task") == "a")["rel_change"][0], 0.2)
    by_task = relative_change(table(rows), metrics={"segmentation": "hd95", "b": "dice"})
    assert dict(by_task.select("task", "metric").iter_rows()) == {"a": "hd95", "b": "dice"}
    everything = relative_change(table(rows), all_metrics=True)
    assert everything.height == 4


def test_regression_prefers_mre_mm_then_px():
    rows = [
        row("task_specific", "r", "mre_px", 10.0, False, task_type="regression"),
        row("unified", "r", "mre_px", 9.0, False, task_type="regression"),
        row("task_specific", "r", "mre_mm", 2.0, False, task_type="regression"),
        row("unified", "r", "mre_mm", 1.0, False, task_type="regression"),
    ]
    rel = relative_change(table(rows))
    assert rel["metric"].to_list() == ["mre_mm"]


def test_missing_primary_metric_is_reported():
    rows = [row("task_specific", "c", "accuracy", 0.8, True, task_type="classification"),
            row("unified", "c", "accuracy", 0.9, True, task_type="classification")]
    rel, warnings = relative_change_with_warnings(table(rows))
    assert rel.height == 0
    assert any("'c'" in w and "auc" in w and "--metric c=METRIC" in w for w in warnings)


def test_unmatched_aggregated_run_is_reported():
    rows = [row("task_specific", "a", "dice", 0.8, True, seed=0), row("unified", "a", "dice", 0.7, True, seed=1)]
    rel, warnings = relative_change_with_warnings(table(rows))
    assert rel.height == 0
    assert any("no task-specific result with the same study, metric, data fraction, seed and split" in w for w in warnings)


def test_unmatched_warning_names_the_split():
    # The grouped run was evaluated on test and val, its task-specific reference on test only: the test row is
    # compared and only the val row is left out, so the warning must name the val split, not the whole run.
    rows = [
        row("task_specific", "a", "dice", 0.8, True),
        row("grouped", "a", "dice", 0.6, True),
        row("grouped", "a", "dice", 0.5, True, split="val"),
    ]
    rel, warnings = relative_change_with_warnings(table(rows))
    assert rel["split"].to_list() == ["test"]
    assert rel["rel_change"].to_list() == pytest.approx([-0.25])
    [warning] = [w for w in warnings if "left out" in w]
    assert warning.startswith("1 aggregated result(s) have no task-specific result")
    assert "grouped/a fraction 1.0 seed 0 split val" in warning
    assert "split test" not in warning
    assert "No task-specific result has split val" in warning
    assert "--split val" in warning


def test_zero_reference_gives_nan_with_warning():
    rows = [row("task_specific", "a", "dice", 0.0, True), row("unified", "a", "dice", 0.7, True)]
    rel, warnings = relative_change_with_warnings(table(rows))
    assert rel["rel_change"][0] is None
    assert any("task-specific value is 0" in w for w in warnings)


def test_near_zero_reference_warns():
    rows = [
        row("task_specific", "a", "dice", 0.004, True), row("unified", "a", "dice", 0.3, True),
        row("task_specific", "b", "dice", 0.8, True), row("unified", "b", "dice", 0.7, True),
    ]
    rel, warnings = relative_change_with_warnings(table(rows))

    assert rel.filter(pl.col("task") == "a")["rel_change"].to_list() == pytest.approx([74.0])
    [warning] = [w for w in warnings if "100% or more" in w]
    assert warning.startswith("1 row(s) of 1 task(s) (a)")
    assert "+7400% for task 'a'" in warning
    assert "dice 0.004 task-specific, 0.3 unified, data fraction 1, seed 0, split test)" in warning
    assert "--metric TASK=METRIC" in warning


def test_moderate_change_no_warning():
    rows = [row("task_specific", "a", "mre_px", 10.0, False, task_type="regression"),
            row("unified", "a", "mre_px", 19.0, False, task_type="regression")]
    rel, warnings = relative_change_with_warnings(table(rows))

    assert rel["rel_change"].to_list() == pytest.approx([-0.9])
    assert not any("100% or more" in w for w in warnings)


def test_duplicate_reference_rows_raise():
    again = {**row("task_specific", "a", "dice", 0.7, True), "run_id": "task_specific/a/1.0/0-evaluated-again"}
    rows = [row("task_specific", "a", "dice", 0.8, True), again, row("unified", "a", "dice", 0.7, True)]
    with pytest.raises(AnalysisError, match="2 task-specific rows for study=s, task=a"):
        relative_change(table(rows))


def test_repeated_row_of_one_run_raises(tmp_path):
    """A pasted-twice row would count as an extra seed; reading the table names both rows."""
    rows = [row("task_specific", "a", "dice", 0.8, True), row("unified", "a", "dice", 0.7, True),
            row("unified", "a", "dice", 0.6, True)]
    path = tmp_path / "r.csv"
    table(rows).write_csv(path)
    with pytest.raises(DataError, match=(
        r"r.csv: rows 2 and 3 both give run 'unified/all/1.0/0', task 'a', metric 'dice', split 'test' "
        r"\(values 0.7 and 0.6\); keep one row per run, task, metric and split"
    )):
        read_results(path)


def test_unknown_metric_override_raises():
    rows = [row("task_specific", "a", "dice", 0.8, True), row("unified", "a", "dice", 0.7, True)]
    with pytest.raises(AnalysisError, match="neither a task type"):
        relative_change(table(rows), metrics={"segmentatoin": "dice"})


def test_parse_metric_overrides():
    assert parse_metric_overrides(["segmentation=hd95", "fetal_head = mre_mm"]) == {
        "segmentation": "hd95", "fetal_head": "mre_mm"}
    with pytest.raises(AnalysisError, match="TYPE=METRIC"):
        parse_metric_overrides(["segmentation"])


def test_csv_round_trip_gives_same_changes(tmp_path, known_table):
    path = write_results(known_table, tmp_path / "results.parquet")
    from_csv = relative_change(read_results(path.with_suffix(".csv")))
    from_parquet = relative_change(read_results(path))
    assert from_csv["rel_change"].to_list() == pytest.approx(from_parquet["rel_change"].to_list())


def test_pair_rows_are_not_paradigm_rows():
    rows = [row("task_specific", "a", "dice", 0.8, True), row("pair", "a", "dice", 0.9, True, group="a+b")]
    assert relative_change(table(rows)).height == 0
    assert relative_change(table(rows), paradigms=["pair"]).height == 1


def test_constant_score_warns():
    rows = []
    for seed in (0, 1):
        rows += [
            row("task_specific", "det", "iou", 0.0961, True, task_type="detection", seed=seed),
            row("unified", "det", "iou", 0.0961, True, task_type="detection", seed=seed),
            row("task_specific", "seg", "dice", 0.8, True, seed=seed),
            row("unified", "seg", "dice", 0.7 + 0.01 * seed, True, seed=seed),
        ]
    _, warnings = relative_change_with_warnings(table(rows))

    [warning] = [w for w in warnings if "in every one of" in w]
    assert warning.startswith("task 'det': iou is 0.0961 in every one of its 4 runs (2 paradigms)")
    assert "says nothing about transfer" in warning


def test_reported_numbers_not_constant_checked():
    rows = [row("task_specific", "a", "dice", 0.5, True, seed=None), row("unified", "a", "dice", 0.5, True, seed=None),
            row("grouped", "a", "dice", 0.5, True, seed=None)]
    _, warnings = relative_change_with_warnings(table(rows))

    assert not any("in every one of" in w for w in warnings)


def test_perfect_score_named_as_ceiling():
    rows = [row(paradigm, "qc", "auc", 1.0, True, task_type="classification", seed=seed)
            for seed in (0, 1) for paradigm in ("task_specific", "unified")]
    _, warnings = relative_change_with_warnings(table(rows))

    [warning] = [w for w in warnings if "in every one of" in w]
    assert warning.startswith("task 'qc': auc is 1 in every one of its 4 runs (2 paradigms), its best possible value")
    assert "probably gives the same prediction" not in warning


def test_empty_value_is_reported_like_nan(known_table):
    blank = known_table.with_columns(
        pl.when(pl.col("paradigm") == "grouped").then(None).otherwise(pl.col("value")).alias("value")
    )
    _, warnings = relative_change_with_warnings(blank)
    assert any(w.startswith("1 row(s) have no finite relative change") and "NaN or empty" in w for w in warnings)


@pytest.mark.parametrize(
    ("keep", "seeds", "expected"),
    [
        (("task_specific",), {}, "only task-specific rows, so there is nothing to compare; add grouped or unified results"),
        (("grouped", "unified"), {}, "no task_specific rows, which are the reference of every relative change"),
        (("task_specific", "unified"), {"task_specific": None},
         "(task-specific seeds: empty; other seeds: 0); make these columns match"),
    ],
)
def test_no_comparison_names_what_is_missing(tmp_path, known_table, keep, seeds, expected):
    from typer.testing import CliRunner

    from usagg.cli import app

    part = known_table.filter(pl.col("paradigm").is_in(list(keep)))
    for paradigm, seed in seeds.items():
        part = part.with_columns(pl.when(pl.col("paradigm") == paradigm).then(seed).otherwise(pl.col("seed")).alias("seed"))
    path = write_results(part, tmp_path / "results.parquet")
    result = CliRunner().invoke(app, ["transfer-matrix", str(path)])
    assert result.exit_code != 0
    text = " ".join(str(result.exception or "").split() + result.output.split())
    assert str(path) in text
    assert expected in text


def test_unknown_metric_direction_is_flagged_as_unchecked(known_table):
    custom = known_table.with_columns(pl.lit("ef_error").alias("metric"), pl.lit(False).alias("higher_is_better"))
    _, warnings = relative_change_with_warnings(custom, metrics={"segmentation": "ef_error", "regression": "ef_error"})
    assert any(w.startswith("metric(s) ef_error are not ones usagg knows") for w in warnings)


def test_misspelt_metric_gets_a_suggestion(known_table):
    typo = known_table.with_columns(
        pl.when(pl.col("task") == "fetal_head").then(pl.lit("mre")).otherwise(pl.col("metric")).alias("metric")
    )
    _, warnings = relative_change_with_warnings(typo)
    left_out = next(w for w in warnings if w.startswith("task 'fetal_head'"))
    assert left_out.endswith("Choose one with --metric fetal_head=METRIC. If mre for mre_px is a misspelling, rename it in the table.")


def test_empty_reference_seed_names_the_fix(known_table):
    seed_type = known_table.schema["seed"]
    table_ = pl.concat([
        known_table.filter(pl.col("paradigm") != "task_specific").with_columns(
            pl.lit(s, dtype=seed_type).alias("seed"), pl.col("run_id") + f"-seed{s}"
        )
        for s in (0, 1)
    ] + [
        known_table.filter(pl.col("paradigm") == "task_specific").with_columns(
            pl.lit(None, dtype=seed_type).alias("seed"), pl.col("run_id") + f"-copy{k}"
        )
        for k in (0, 1)
    ])
    with pytest.raises(AnalysisError, match="the other paradigms have seeds, so give each task-specific row the seed"):
        relative_change(table_)


def test_data_scale_reported_group_view():
    """Numbers from a publication have no per-task training sizes: no regression, but the group view and a note."""
    from typer.testing import CliRunner

    from usagg.cli import app

    result = CliRunner().invoke(app, ["data-scale", str(REPO / "analysis" / "paper_reported.csv")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Clinical groups: Δm (%) against total training images" in text
    assert "note: regression not fitted: data-scale analysis: no aggregated result with a positive n_train" in text
    assert "Coefficients" not in text


def test_reported_group_size_serves_all_paradigms():
    from usagg.analysis.data_scale import group_view
    from usagg.analysis.inputs import load_inputs

    inputs = load_inputs(REPO / "analysis" / "paper_reported.csv")
    view = group_view(relative_change(inputs.results), sizes=inputs.sizes).filter(pl.col("clinical_group") == "breast")
    assert view.select("paradigm", "total_n_train", "size_source").rows() == [
        ("grouped", 2920.0, "reported"), ("unified", 2920.0, "reported under another paradigm"),
    ]


def test_one_task_group_named(known_table):
    from usagg.analysis.transfer import analyse_transfer

    same = known_table.vstack(table([
        row("grouped", "fetal_head", "mre_px", 30.4, False, task_type="regression", clinical_group="obstetrics"),
    ]))
    notes = [w for w in analyse_transfer(same, n_boot=0).warnings if "holds one task" in w]
    assert notes == [
        "s: group 'obstetrics' holds one task (fetal_head) that scores the same as its task-specific run, so its "
        "change of 0 enters grouped Δm; merge it into another group, or read grouped Δm as including it"
    ]
    # breast_lesion is also alone in its group here, but its grouped score differs (a publication's one listed task).
    assert not any("breast" in w for w in notes)


def test_metric_misspelt_everywhere_named(tmp_path, known_table):
    from typer.testing import CliRunner

    from usagg.cli import app

    capitalised = known_table.with_columns(pl.col("metric").str.to_uppercase())
    path = tmp_path / "results.csv"
    capitalised.write_csv(path)
    result = CliRunner().invoke(app, ["transfer-matrix", str(path)])
    assert result.exit_code != 0
    text = " ".join(str(result.exception or "").split() + result.output.split())
    assert "no task has the metric it is compared by, so every task is left out" in text
    assert "If DICE for dice is a misspelling, rename it in the table." in text
    assert "same study, metric, data fraction" not in text


def test_metric_misspelt_in_some_rows(known_table):
    second_seed = known_table.with_columns(pl.lit(1, dtype=known_table.schema["seed"]).alias("seed"), pl.col("run_id") + "-1")
    typo = second_seed.with_columns(
        pl.when((pl.col("task") == "breast_lesion") & (pl.col("paradigm") == "grouped")).then(pl.lit("dcie"))
        .otherwise(pl.col("metric")).alias("metric")
    )
    rel, warnings = relative_change_with_warnings(pl.concat([known_table, typo]))
    assert rel.filter((pl.col("task") == "breast_lesion") & (pl.col("paradigm") == "grouped"))["seed"].to_list() == [0]
    assert (
        "task 'breast_lesion': 1 row(s) have metric 'dcie', which looks like a misspelling of 'dice', the metric the "
        "task is compared by; they are left out (run(s) grouped/breast/1.0/0-1), so rename the metric in those rows"
    ) in warnings


def test_absent_metric_override_raises(known_table):
    with pytest.raises(AnalysisError, match=(
        r"--metric segmentation=dcie: no row of segmentation has metric 'dcie' \(did you mean 'dice'\?\); "
        r"its rows have dice"
    )):
        relative_change_with_warnings(known_table, {"segmentation": "dcie"})


def test_differing_task_sizes_warned(known_table):
    sizes = known_table.with_columns(
        pl.when(pl.col("paradigm") == "grouped").then(1000).otherwise(pl.col("n_train")).alias("n_train")
    )
    _, warnings = relative_change_with_warnings(sizes)
    assert warnings == [
        "task 'breast_lesion' at data fraction 1 has different n_train in different rows (100 (2 run(s)); 1000 "
        "(1 run(s), e.g. grouped/breast/1.0/0)); every run of a task at one fraction trains on the same images, so "
        "correct the count"
    ]
