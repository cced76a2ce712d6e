"""Affinity matrices: pair runs, affinity.json, routing statistics, agreement, scoring and file errors."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import polars as pl
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from usagg.analysis.affinity import (
    agreement,
    expert_affinity_matrix,
    expert_affinity_per_layer,
    fisher_affinity_matrix,
    gradient_affinity_matrix,
    lookahead_affinity_matrix,
    measured_affinity,
    read_matrix_csv,
    read_relations,
    score_against_relations,
    write_matrix_csv,
)
from usagg.analysis.affinity_analysis import analyse_affinity, available_methods
from usagg.analysis.inputs import load_inputs
from usagg.analysis.simulate import simulate_study_dir
from usagg.errors import AnalysisError, DataError
from usagg.results import RESULTS_SCHEMA


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    return simulate_study_dir(tmp_path_factory.mktemp("affinity") / "study", n_tasks=6, seeds=(0, 1), n_images=10)


def result_row(paradigm, group, task, value, seed=0):
    return {
        "study": "s", "run_id": f"{paradigm}/{group}/{seed}", "paradigm": paradigm, "group": group, "task": task,
        "task_type": "segmentation", "organ": "o", "clinical_group": "g", "n_train": 10, "data_fraction": 1.0,
        "seed": seed, "split": "test", "metric": "dice", "value": value, "higher_is_better": True, "source": "run",
    }


def test_measured_affinity_known_values():
    rows = [
        result_row("task_specific", "a", "a", 0.50), result_row("task_specific", "b", "b", 0.80),
        result_row("task_specific", "c", "c", 0.60),
        result_row("pair", "a+b", "a", 0.55), result_row("pair", "a+b", "b", 0.72),
        result_row("pair", "b+c", "b", 0.88), result_row("pair", "b+c", "c", 0.60),
    ]
    tasks, matrix = measured_affinity(pl.DataFrame(rows, schema=RESULTS_SCHEMA))
    assert tasks == ["a", "b", "c"]
    assert matrix[1, 0] == pytest.approx(0.10)  # a gains 10 % next to b
    assert matrix[0, 1] == pytest.approx(-0.10)  # b loses 10 % next to a
    assert matrix[2, 1] == pytest.approx(0.10)
    assert matrix[1, 2] == pytest.approx(0.0)
    assert math.isnan(matrix[0, 2])
    assert math.isnan(matrix[2, 0])  # the pair a+c was not trained
    assert np.isnan(np.diag(matrix)).all()


def test_measured_affinity_needs_pair_runs():
    rows = [result_row("task_specific", "a", "a", 0.5), result_row("unified", "all", "a", 0.6)]
    with pytest.raises(AnalysisError, match="--pairs"):
        measured_affinity(pl.DataFrame(rows, schema=RESULTS_SCHEMA))


def test_malformed_pair_group_raises():
    rows = [result_row("task_specific", "a", "a", 0.5), result_row("pair", "a-b", "a", 0.6)]
    with pytest.raises(DataError, match="taskA\\+taskB"):
        measured_affinity(pl.DataFrame(rows, schema=RESULTS_SCHEMA))


def test_one_run_matrices_average_the_seeds(study_dir):
    files = sorted(study_dir.rglob("affinity.json"))
    assert len(files) == 2
    stored = [np.array(json.loads(f.read_text())["lookahead"]["matrix"]) for f in files]
    tasks, matrix = lookahead_affinity_matrix(study_dir)
    assert tasks == [f"task{k:02d}" for k in range(6)]
    assert matrix == pytest.approx((stored[0] + stored[1]) / 2)
    single = lookahead_affinity_matrix(files[0].parent)[1]
    assert single == pytest.approx(stored[0])
    cosine = gradient_affinity_matrix(files[0], "cosine")[1]
    assert cosine == pytest.approx(np.array(json.loads(files[0].read_text())["gradient_cosine"]["matrix"]))


def test_expert_similarity_known_values(tmp_path):
    routing = {
        "num_experts": 4,
        "layers": [6, 7],
        "tasks": {
            "a": {"6": {"tokens_per_expert": [10, 0, 0, 0]}, "7": {"tokens_per_expert": [5, 5, 0, 0]}},
            "b": {"6": {"tokens_per_expert": [0, 10, 0, 0]}, "7": {"tokens_per_expert": [5, 5, 0, 0]}},
            "c": {"6": {"tokens_per_expert": [5, 5, 0, 0]}, "7": {"tokens_per_expert": [1, 1, 1, 1]}},
        },
    }
    path = tmp_path / "routing_stats.json"
    path.write_text(json.dumps(routing))
    tasks, per_layer = expert_affinity_per_layer(path)
    assert tasks == ["a", "b", "c"]
    assert per_layer["6"][0, 1] == pytest.approx(0.0)  # disjoint experts: JSD = 1 bit
    assert per_layer["7"][0, 1] == pytest.approx(1.0)  # identical usage
    expected = 1 - jensenshannon([1, 0, 0, 0], [0.5, 0.5, 0, 0], base=2) ** 2
    assert per_layer["6"][0, 2] == pytest.approx(expected)
    averaged = expert_affinity_matrix(path)[1]
    assert averaged[0, 1] == pytest.approx(0.5)
    assert averaged == pytest.approx(averaged.T, nan_ok=True)


def test_routing_stats_with_wrong_length_raise(tmp_path):
    path = tmp_path / "routing_stats.json"
    path.write_text(json.dumps({"num_experts": 4, "tasks": {"a": {"6": {"tokens_per_expert": [1, 2]}}}}))
    with pytest.raises(DataError, match="tokens_per_expert has 2 entries; expected 4"):
        expert_affinity_matrix(path)


def test_affinity_json_without_matrix_raises(tmp_path):
    path = tmp_path / "affinity.json"
    path.write_text(json.dumps({"tasks": ["a", "b"], "gradient_cosine": {"matrix": [[1, 0], [0, 1]]}}))
    with pytest.raises(DataError, match="no 'lookahead' matrix"):
        lookahead_affinity_matrix(path)
    path.write_text(json.dumps({"tasks": ["a", "b"], "lookahead": {"matrix": [[1, 0]]}}))
    with pytest.raises(DataError, match="expected 2 × 2"):
        lookahead_affinity_matrix(path)


def test_affinity_json_bad_entries_raise(tmp_path):
    path = tmp_path / "affinity.json"
    path.write_text(json.dumps({"tasks": ["a", "b"], "lookahead": {"matrix": [[1, 0], [0, 1]]}}))
    with pytest.raises(DataError, match="usagg evaluate RUN_DIR --fisher-images"):
        fisher_affinity_matrix(path)
    path.write_text(json.dumps({"tasks": ["a", "b"], "fisher": [1, 2]}))
    with pytest.raises(DataError, match="'fisher' must be an object with a 'matrix'"):
        fisher_affinity_matrix(path)
    path.write_text(json.dumps({"tasks": ["a", "b"], "fisher": {"matrix": [[None, "x"], [0.5, None]]}}))
    with pytest.raises(DataError, match="fisher.matrix must be rows of numbers"):
        fisher_affinity_matrix(path)
    path.write_text(json.dumps({"tasks": ["a", "b"], "fisher": {"matrix": [[None, None], [None, None]]}}))
    with pytest.raises(DataError, match="every value off the diagonal is empty"):
        fisher_affinity_matrix(path)


def test_runs_with_other_tasks_named(tmp_path):
    for name, tasks in (("one", ["a", "b"]), ("two", ["b", "c"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "affinity.json").write_text(json.dumps({"tasks": tasks, "fisher": {"matrix": [[None, 0.5], [0.5, None]]}}))
    with pytest.raises(DataError, match="one/affinity.json lists the tasks a, b but .*two/affinity.json lists b, c"):
        fisher_affinity_matrix(tmp_path)


def test_agreement_of_identical_matrices_is_exact():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(5, 5))
    result = agreement((list("abcde"), matrix), (list("abcde"), matrix), n_permutations=999)
    assert result["rho"] == pytest.approx(1.0)
    assert result["exact"] is True
    assert result["permutations"] == 120
    # Only the identity (and permutations that leave the off-diagonal ranks unchanged) reach rho = 1.
    assert result["p_value"] == pytest.approx(1 / 120)


def test_agreement_p_value_by_enumeration():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4))
    b = a + rng.normal(scale=1.0, size=(4, 4))
    result = agreement((list("abcd"), a), (list("abcd"), b))
    off = ~np.eye(4, dtype=bool)
    rho = stats.spearmanr(a[off], b[off]).statistic
    null = []
    for perm in itertools.permutations(range(4)):
        p = np.array(perm)
        null.append(stats.spearmanr(a[off], b[np.ix_(p, p)][off]).statistic)
    assert result["rho"] == pytest.approx(rho)
    assert result["p_value"] == pytest.approx(np.mean(np.abs(null) >= abs(rho) - 1e-12))


def test_agreement_aligns_tasks_by_name():
    a = np.array([[0, 1, 2], [3, 0, 4], [5, 6, 0]], dtype=float)
    order = [2, 0, 1]
    b = a[np.ix_(order, order)]
    result = agreement((["x", "y", "z"], a), (["z", "x", "y"], b))
    assert result["rho"] == pytest.approx(1.0)


def test_score_against_relations(study_dir):
    relations = read_relations(study_dir / "relations.csv")
    inputs = load_inputs(study_dir)
    result = analyse_affinity(inputs, relations=relations, n_permutations=99)
    assert set(result.matrices) == {"measured", "lookahead", "gradient", "experts", "fisher"}
    scores = dict(result.scores.select("method", "spearman_rho").iter_rows())
    assert scores["lookahead"] > 0.6
    assert scores["measured"] > 0.6
    assert scores["fisher"] > 0.6
    assert result.best_method() in scores
    costs = {r["method"]: r for r in result.costs.iter_rows(named=True)}
    assert costs["measured"]["training_runs"] == 15 * 2  # every pair of 6 tasks, 2 seeds
    assert costs["lookahead"]["extra_training_runs"] == 0
    assert costs["lookahead"]["pair_runs_for_all_pairs"] == 15
    # With pairs of only some tasks measured, the cost of all pairs still counts every task of the study.
    few = inputs.results.filter((pl.col("paradigm") != "pair") | (pl.col("group") == "task00+task02"))
    partial = analyse_affinity(type(inputs)(**{**vars(inputs), "results": few}), methods=["measured"])
    assert partial.costs.row(0, named=True)["pair_runs_for_all_pairs"] == 15
    assert costs["lookahead"]["estimator_seconds"] == pytest.approx(25.0)
    assert costs["fisher"]["estimator_seconds"] == pytest.approx(4.0)
    assert "final weights" in costs["fisher"]["note"]


def test_fisher_matrix_averages_and_optional(study_dir, tmp_path):
    files = sorted(study_dir.rglob("affinity.json"))
    stored = [np.array(json.loads(f.read_text())["fisher"]["matrix"], dtype=float) for f in files]
    tasks, matrix = fisher_affinity_matrix(study_dir)
    assert matrix == pytest.approx((stored[0] + stored[1]) / 2, nan_ok=True)
    assert np.isnan(np.diag(matrix)).all()
    assert "fisher" in available_methods(load_inputs(study_dir))

    older = tmp_path / "older"
    shutil.copytree(study_dir, older)
    for file in older.rglob("affinity.json"):  # runs trained before the Fisher affinity existed
        data = json.loads(file.read_text())
        del data["fisher"]
        file.write_text(json.dumps(data))
    inputs = load_inputs(older)
    assert "fisher" not in available_methods(inputs)
    result = analyse_affinity(inputs, n_permutations=9)
    assert "fisher" not in result.matrices
    assert any(m.startswith("affinity method fisher skipped") and "--fisher-images" in m for m in result.messages)
    with pytest.raises(DataError, match="no 'fisher' matrix"):
        analyse_affinity(inputs, methods=["fisher"])


def test_explicit_method_without_input_raises(tmp_path):
    rows = [result_row("task_specific", "a", "a", 0.5), result_row("unified", "all", "a", 0.6)]
    path = tmp_path / "results.csv"
    pl.DataFrame(rows, schema=RESULTS_SCHEMA).write_csv(path)
    with pytest.raises(AnalysisError, match="study output directory"):
        analyse_affinity(load_inputs(path), methods=["lookahead"])


def test_matrix_csv_round_trip(tmp_path):
    matrix = np.array([[np.nan, 0.25, -1.0], [0.5, np.nan, 0.125], [1.0, -0.5, np.nan]])
    path = write_matrix_csv(["a", "b", "c"], matrix, tmp_path / "m.csv")
    tasks, back = read_matrix_csv(path)
    assert tasks == ["a", "b", "c"]
    assert back == pytest.approx(matrix, nan_ok=True)


def test_relations_csv_errors(tmp_path):
    path = tmp_path / "relations.csv"
    path.write_text("task,a,b\nb,1,0\na,0,1\n")
    with pytest.raises(DataError, match="same order"):
        read_relations(path)
    path.write_text("task,a,b\na,1,x\nb,0,1\n")
    with pytest.raises(DataError, match="row 1, column 'b': 'x' is not a number"):
        read_relations(path)
    path.write_text("task,a,b\na,1,3\nb,0,1\n")
    with pytest.raises(DataError, match="\\[-1, 1\\]"):
        read_relations(path)
    with pytest.raises(DataError, match="not found"):
        read_relations(tmp_path / "missing.csv")


def test_scores_list_missing_tasks():
    rel = (["a", "b", "c", "d"], np.eye(4))
    est = (["a", "b", "c"], np.ones((3, 3)))
    table = score_against_relations({"x": est}, rel)
    assert table["tasks_missing"][0] == "d"


def test_grouping_notes_missing_affinity(tmp_path):
    """A groups: block meant for a study lists the tasks it leaves out and the unmeasured pairs."""
    from typer.testing import CliRunner

    from usagg.cli import app
    from usagg.results import write_results

    rows = [result_row("task_specific", t, t, v) for t, v in (("a", 0.5), ("b", 0.8), ("c", 0.6), ("d", 0.7))]
    rows += [result_row("pair", "a+b", "a", 0.55), result_row("pair", "a+b", "b", 0.82)]
    rows += [result_row("pair", "b+c", "b", 0.78), result_row("pair", "b+c", "c", 0.63)]
    path = write_results(pl.DataFrame(rows, schema=RESULTS_SCHEMA), tmp_path / "results.parquet")
    result = CliRunner().invoke(app, ["transfer-matrix", str(path), "--recommend", "auto", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "analysis_report.json").read_text())
    messages = " ".join(report["messages"])
    assert "grouping: d have no entry in the measured affinity" in messages
    assert "grouping: 1 of 3 task pairs have no measured affinity; they are left out of the means" in messages
    block = (tmp_path / "out" / "groups.yaml").read_text()
    assert "# not grouped (no affinity entry): d; add them to a group by hand" in block
    assert CliRunner().invoke(app, ["transfer-matrix", str(path), "--recommend", "0"]).exit_code != 0


def test_grouping_passes_over_a_sparse_measured_matrix():
    from usagg.analysis.affinity_analysis import AffinityAnalysis

    tasks = ["a", "b", "c", "d"]
    sparse = np.full((4, 4), np.nan)
    sparse[0, 1] = sparse[1, 0] = 0.3  # 2 of 12 ordered pairs measured
    dense = np.ones((4, 4))
    assert AffinityAnalysis(matrices={"measured": (tasks, sparse), "lookahead": (tasks, dense)}).best_method() == "lookahead"
    assert AffinityAnalysis(matrices={"measured": (tasks, sparse)}).best_method() == "measured"
    assert AffinityAnalysis(matrices={"measured": (tasks, dense), "lookahead": (tasks, dense)}).best_method() == "measured"
