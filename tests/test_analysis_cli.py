"""The analysis commands and run_full_analysis on hand-made tables and a generated study directory."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from usagg.analysis.full import run_full_analysis
from usagg.analysis.inference import t_interval
from usagg.analysis.simulate import simulate_results, simulate_study_dir
from usagg.cli import app
from usagg.errors import AnalysisError, DataError
from usagg.results import write_results

runner = CliRunner()


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    return simulate_study_dir(tmp_path_factory.mktemp("cli") / "study", n_tasks=6, seeds=(0, 1), n_images=12)


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    """The smallest study the commands must handle: 6 tasks, 1 seed, 1 fraction, as CSV."""
    path = tmp_path_factory.mktemp("small") / "results.parquet"
    return write_results(simulate_results(n_tasks=6, fractions=(1.0,), seeds=(0,)), path).with_suffix(".csv")


@pytest.fixture(scope="module")
def known_table(tmp_path_factory):
    rows = []
    for paradigm, group, value in (("task_specific", "breast_lesion", 0.713), ("grouped", "breast", 0.145), ("unified", "all", 0.692)):
        rows.append({"paradigm": paradigm, "group": group, "task": "breast_lesion", "task_type": "segmentation",
                     "clinical_group": "breast", "metric": "dice", "value": value, "higher_is_better": True})
    for paradigm, group, value in (("task_specific", "fetal_head", 30.4), ("unified", "all", 15.6)):
        rows.append({"paradigm": paradigm, "group": group, "task": "fetal_head", "task_type": "regression",
                     "clinical_group": "obstetrics", "metric": "mre_px", "value": value, "higher_is_better": False})
    frame = pl.DataFrame(rows).with_columns(
        pl.lit("hand").alias("study"), (pl.col("paradigm") + "/" + pl.col("group")).alias("run_id"),
        pl.col("clinical_group").alias("organ"), pl.lit(None).alias("n_train"), pl.lit(1.0).alias("data_fraction"),
        pl.lit(None).alias("seed"), pl.lit("test").alias("split"), pl.lit("reported:hand-made").alias("source"),
    )
    path = tmp_path_factory.mktemp("known") / "known.csv"
    frame.select("study", "run_id", "paradigm", "group", "task", "task_type", "organ", "clinical_group", "n_train",
                 "data_fraction", "seed", "split", "metric", "value", "higher_is_better", "source").write_csv(path)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_transfer_matrix_known_values(known_table, tmp_path):
    result = invoke("transfer-matrix", known_table, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "-79.7" in result.output
    assert "-2.9" in result.output
    assert "+48.7" in result.output
    rel = pl.read_parquet(tmp_path / "relative_change.parquet")
    values = {(r["paradigm"], r["task"]): round(100 * r["rel_change"], 2) for r in rel.iter_rows(named=True)}
    assert values == {("grouped", "breast_lesion"): -79.66, ("unified", "breast_lesion"): -2.95, ("unified", "fetal_head"): 48.68}
    flags = pl.read_csv(tmp_path / "negative_transfer.csv")
    assert set(flags["ci_method"]) == {"reported"}
    assert flags["negative_transfer"].null_count() == flags.height  # no interval, so no flag
    assert (tmp_path / "delta_m.csv").exists()
    report = json.loads((tmp_path / "analysis_report.json").read_text())
    assert report["delta_m"]


def test_transfer_matrix_two_studies(known_table, small_table, tmp_path):
    combined = pl.concat([pl.read_csv(small_table), pl.read_csv(known_table)], how="vertical_relaxed")
    path = tmp_path / "combined.csv"
    combined.write_csv(path)

    result = invoke("transfer-matrix", path, "--out", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "study" in result.output
    assert "-79.7" in result.output
    delta = pl.read_csv(tmp_path / "out" / "delta_m.csv").filter(pl.col("level") == "study")
    assert set(delta["study"]) == set(combined["study"])
    flags = pl.read_csv(tmp_path / "out" / "negative_transfer.csv").filter(pl.col("study") == "hand")
    assert set(flags["ci_method"]) == {"reported"}
    assert flags["n_seeds"].to_list() == [1, 1, 1]


def test_transfer_matrix_on_small_table(small_table, tmp_path):
    result = invoke("transfer-matrix", small_table, "--out", tmp_path, "--metric", "segmentation=dice")
    assert result.exit_code == 0, result.output
    assert pl.read_csv(tmp_path / "negative_transfer.csv").height == 12


def test_transfer_matrix_bootstrap_from_study_dir(study_dir, tmp_path):
    result = invoke("transfer-matrix", study_dir, "--out", tmp_path, "--bootstrap", "200")
    assert result.exit_code == 0, result.output
    methods = set(pl.read_csv(tmp_path / "negative_transfer.csv")["ci_method"])
    assert methods == {"bootstrap_images", "t_seeds"}  # AUC has no per-image scores: seeds instead


def test_zero_bootstrap_on_study_dir(study_dir, tmp_path):
    # A study folder has per-image scores, so 0 replicates reached the image bootstrap (a results CSV does not).
    result = invoke("transfer-matrix", study_dir, "--out", tmp_path, "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    flags = pl.read_csv(tmp_path / "negative_transfer.csv")
    assert set(flags["ci_method"]) == {"t_seeds"}  # two seeds: the t interval, which needs no bootstrap
    rel = pl.read_csv(tmp_path / "relative_change.csv")
    first = flags.row(0, named=True)
    seeds = rel.filter(
        (pl.col("paradigm") == first["paradigm"]) & (pl.col("task") == first["task"])
        & ((pl.col("data_fraction") - first["data_fraction"]).abs() < 1e-9)
    )["rel_change"].to_numpy()
    assert (first["ci_lo"], first["ci_hi"]) == pytest.approx(t_interval(seeds))
    delta_m = pl.read_csv(tmp_path / "delta_m.csv")
    assert delta_m["ci_tasks_lo"].is_nan().all()
    assert delta_m["ci_tasks_hi"].is_nan().all()
    assert "0 bootstrap replicates" in result.output
    for command in ("data-scale", "advise"):
        result = invoke(command, study_dir)
        assert result.exit_code == 0, f"{command}: {result.output}"


def test_affinity_methods_relations_and_grouping(study_dir, tmp_path):
    result = invoke(
        "transfer-matrix", study_dir, "--method", "all", "--relations", study_dir / "relations.csv",
        "--recommend", "auto", "--permutations", "99", "--out", tmp_path,
    )
    assert result.exit_code == 0, result.output
    for name in ("measured", "lookahead", "gradient", "experts", "gradient_magnitude"):
        assert (tmp_path / f"affinity_{name}.csv").exists(), name
    scores = pl.read_csv(tmp_path / "affinity_scores.csv")
    assert scores.filter(pl.col("method") == "lookahead")["spearman_rho"][0] >= 0.6
    assert (tmp_path / "affinity_agreement.csv").exists()
    costs = pl.read_csv(tmp_path / "affinity_costs.csv")
    assert set(costs["method"]) == {"measured", "lookahead", "gradient", "experts", "fisher"}
    groups = yaml.safe_load((tmp_path / "groups.yaml").read_text())["groups"]
    assert sorted(sorted(m) for m in groups.values()) == [
        ["task00", "task02", "task04"], ["task01", "task03", "task05"]]
    assert "clinical taxonomy" in result.output


def test_single_method_with_fixed_k(study_dir):
    result = invoke("transfer-matrix", study_dir, "--method", "measured", "--recommend", "3")
    assert result.exit_code == 0, result.output
    assert "K = 3" in result.output
    assert "on the measured affinity" in result.output


def test_data_scale_and_advise_commands(small_table, tmp_path):
    result = invoke("data-scale", small_table, "--out", tmp_path, "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    assert "fitted the simpler model" in result.output
    for name in ("data_scale_coefficients", "data_scale_crossings", "data_scale_groups", "task_type_tests"):
        assert (tmp_path / f"{name}.csv").exists(), name
    result = invoke("advise", small_table, "--task", "task03", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert "task03" in result.output
    assert "Recommendation" in result.output


def test_bad_inputs_name_the_problem(small_table, known_table, tmp_path):
    result = invoke("transfer-matrix", tmp_path / "missing.csv")
    assert isinstance(result.exception, DataError)
    assert "not found" in str(result.exception)
    result = invoke("transfer-matrix", small_table, "--metric", "segmentation")
    assert isinstance(result.exception, AnalysisError)
    assert "TYPE=METRIC" in str(result.exception)
    result = invoke("transfer-matrix", small_table, "--method", "lookahead")
    assert isinstance(result.exception, AnalysisError)
    assert "study output directory" in str(result.exception)
    result = invoke("transfer-matrix", small_table, "--method", "magic")
    assert isinstance(result.exception, AnalysisError)
    assert "magic" in str(result.exception)
    result = invoke("advise", small_table, "--task", "nope")
    assert isinstance(result.exception, AnalysisError)
    assert "'nope'" in str(result.exception)
    # Without training sizes data-scale still prints the group view, with the reason; advise needs the model.
    result = invoke("data-scale", known_table)
    assert result.exit_code == 0, result.output
    assert "regression not fitted" in result.output
    assert "n_train" in result.output
    result = invoke("advise", known_table)
    assert isinstance(result.exception, AnalysisError)
    assert "n_train" in str(result.exception)
    bad = tmp_path / "bad.csv"
    bad.write_text("study,task\ns,a\n")
    result = invoke("transfer-matrix", bad)
    assert isinstance(result.exception, DataError)
    assert "missing required column" in str(result.exception)


def test_run_full_analysis_on_study_dir(study_dir, tmp_path):
    report = run_full_analysis(study_dir, tmp_path, relations=study_dir / "relations.csv", n_bootstrap=100)
    assert report.transfer is not None
    assert report.data_scale is not None
    assert report.grouping is not None
    assert {"measured", "lookahead", "gradient", "experts", "fisher"} <= set(report.matrices)
    assert report.tables["affinity_scores"].height == 6  # five methods and gradient magnitude
    methods = set(report.tables["advice_predictions"]["observed_ci_method"])
    assert "bootstrap_images" in methods  # the advice takes the image-bootstrap intervals of the transfer table
    summary = json.loads((tmp_path / "analysis_report.json").read_text())
    assert summary["grouping"]["k"] == report.grouping.k
    for name, path in summary["outputs"].items():
        assert (tmp_path / path.split("/")[-1]).exists(), name


def test_run_full_analysis_skips_what_inputs_lack(known_table, tmp_path):
    report = run_full_analysis(known_table, tmp_path)
    assert report.transfer is not None
    assert report.data_scale is None
    assert any(m.startswith("data scale skipped") for m in report.messages)
    assert any("no affinity estimator has inputs" in m for m in report.messages)
    assert (tmp_path / "relative_change.csv").exists()


def test_analysis_of_other_data_removes_earlier_files(study_dir, known_table, tmp_path):
    run_full_analysis(study_dir, tmp_path, n_bootstrap=0)
    assert (tmp_path / "groups.yaml").is_file()
    assert (tmp_path / "data_scale_coefficients.csv").is_file()
    report = run_full_analysis(known_table, tmp_path, n_bootstrap=0)
    assert not (tmp_path / "groups.yaml").exists()
    assert not (tmp_path / "data_scale_coefficients.csv").exists()
    listed = json.loads((tmp_path / "analysis_report.json").read_text())["outputs"]
    assert sorted(Path(p).name for p in listed.values()) == sorted(p.name for p in report.outputs.values())


def test_commands_on_one_input_share_a_folder(small_table, tmp_path):
    assert runner.invoke(app, ["data-scale", str(small_table), "--out", str(tmp_path), "--bootstrap", "0"]).exit_code == 0
    assert runner.invoke(app, ["transfer-matrix", str(small_table), "--out", str(tmp_path), "--bootstrap", "0"]).exit_code == 0
    assert (tmp_path / "data_scale_coefficients.csv").is_file()
    listed = json.loads((tmp_path / "analysis_report.json").read_text())["outputs"]
    assert "data_scale_coefficients" in listed


def test_relations_of_other_tasks_are_named(study_dir, tmp_path):
    other = tmp_path / "relations.csv"
    other.write_text("task,x,y\nx,1,0.5\ny,0.5,1\n")
    report = run_full_analysis(study_dir, tmp_path / "out", relations=other, n_bootstrap=0)
    named = [m for m in report.messages if m.startswith("the relation matrix shares 0 task(s) with the")]
    assert len(named) == report.tables["affinity_scores"].height
    assert "check that the relations file belongs to this study" in named[0]
