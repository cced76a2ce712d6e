"""Seed statistics, bootstrap intervals, negative-transfer flags and the Kruskal–Wallis helper."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from usagg.analysis.inference import (
    FLAG_RULES,
    GroupTest,
    kruskal_by,
    paired_bootstrap_interval,
    paired_tests,
    per_task_means,
    seed_summary,
    t_interval,
    task_type_sensitivity,
)
from usagg.analysis.relative import relative_change
from usagg.results import RESULTS_SCHEMA


def rows_for(task, ts_values, agg_values, metric="dice", higher=True, paradigm="unified", task_type="segmentation"):
    rows = []
    for seed, (ts, agg) in enumerate(zip(ts_values, agg_values)):
        for par, value in (("task_specific", ts), (paradigm, agg)):
            group = task if par == "task_specific" else "all"
            rows.append({
                "study": "s", "run_id": f"{par}-{task}-{seed}", "paradigm": par, "group": group, "task": task,
                "task_type": task_type, "organ": "o", "clinical_group": "g", "n_train": 50, "data_fraction": 1.0,
                "seed": seed, "split": "test", "metric": metric, "value": value, "higher_is_better": higher,
                "source": "run",
            })
    return rows


def test_paired_tests_match_scipy():
    agg = np.array([0.61, 0.64, 0.58, 0.66, 0.60])
    ts = np.array([0.70, 0.69, 0.71, 0.72, 0.68])
    wilcoxon_p, t_p, notes = paired_tests(agg, ts)
    assert wilcoxon_p == pytest.approx(stats.wilcoxon(agg, ts).pvalue)
    assert t_p == pytest.approx(stats.ttest_rel(agg, ts).pvalue)
    assert notes == []


def test_paired_tests_single_seed_is_nan():
    wilcoxon_p, t_p, _ = paired_tests(np.array([0.5]), np.array([0.6]))
    assert math.isnan(wilcoxon_p)
    assert math.isnan(t_p)


def test_t_interval_known_value():
    values = np.array([1.0, 2.0, 3.0])
    lo, hi = t_interval(values)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert lo == pytest.approx(2 - half)
    assert hi == pytest.approx(2 + half)


def test_bootstrap_of_identical_runs_is_zero():
    scores = np.random.default_rng(0).random((1, 50))
    lo, hi = paired_bootstrap_interval(scores, scores, True, n_boot=500)
    assert lo == 0.0
    assert hi == 0.0


def test_bootstrap_of_constant_shift_is_exact():
    ts = np.full((2, 30), 0.8)
    agg = np.full((2, 30), 0.6)
    lo, hi = paired_bootstrap_interval(agg, ts, True, n_boot=200)
    assert lo == pytest.approx(-0.25)
    assert hi == pytest.approx(-0.25)
    lo, hi = paired_bootstrap_interval(agg, ts, False, n_boot=200)  # lower is better: 0.6 beats 0.8
    assert lo == pytest.approx(0.25)


def test_bootstrap_interval_covers_the_estimate():
    rng = np.random.default_rng(1)
    ts = rng.normal(0.8, 0.1, (1, 200))
    agg = ts - 0.05 + rng.normal(0, 0.02, (1, 200))
    lo, hi = paired_bootstrap_interval(agg, ts, True, n_boot=1000)
    point = (agg.mean() - ts.mean()) / ts.mean()
    assert lo < point < hi
    assert hi < 0


def test_seed_summary_flags_with_t_interval():
    rows = rows_for("a", [0.80, 0.81, 0.79], [0.60, 0.62, 0.61])  # clearly worse
    rows += rows_for("b", [0.80, 0.81, 0.79], [0.79, 0.83, 0.80])  # no clear change
    summary, _ = seed_summary(relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA)))
    a = summary.filter(pl.col("task") == "a").row(0, named=True)
    b = summary.filter(pl.col("task") == "b").row(0, named=True)
    assert a["ci_method"] == "t_seeds"
    assert a["negative_transfer"] is True
    assert a["flag_rule"] == FLAG_RULES["t_seeds"]
    assert a["n_seeds"] == 3
    assert b["negative_transfer"] is False


def test_single_seed_has_no_interval_and_no_flag():
    rows = rows_for("a", [0.8], [0.5])
    summary, _ = seed_summary(relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA)))
    row = summary.row(0, named=True)
    assert row["ci_method"] == "none"
    assert row["negative_transfer"] is None
    assert "not flagged" in row["flag_rule"]
    assert row["mean_rel_change"] == pytest.approx(-0.375)


def test_seed_summary_uses_per_image_scores():
    rows = rows_for("a", [0.8], [0.6])
    rel = relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA))
    images = [f"img{i}" for i in range(20)]
    per_image = pl.DataFrame({
        "run_id": ["task_specific-a-0"] * 20 + ["unified-a-0"] * 20,
        "task": ["a"] * 40, "split": ["test"] * 40, "image": images * 2, "metric": ["dice"] * 40,
        "value": [0.8] * 20 + [0.6] * 20,
    })
    summary, _ = seed_summary(rel, per_image, n_boot=200)
    row = summary.row(0, named=True)
    assert row["ci_method"] == "bootstrap_images"
    assert row["ci_hi"] == pytest.approx(-0.25)
    assert row["negative_transfer"] is True


def test_kruskal_epsilon_squared_known_value():
    data = pl.DataFrame({
        "task_type": ["seg"] * 4 + ["cls"] * 4 + ["det"] * 4,
        "rel_change": [0.1, 0.2, 0.15, 0.12, -0.1, -0.2, -0.05, -0.12, 0.0, 0.01, -0.02, 0.03],
    })
    test = kruskal_by(data)
    h = stats.kruskal([0.1, 0.2, 0.15, 0.12], [-0.1, -0.2, -0.05, -0.12], [0.0, 0.01, -0.02, 0.03]).statistic
    assert test.statistic == pytest.approx(h)
    assert test.epsilon2 == pytest.approx(h / ((12**2 - 1) / (12 + 1)))
    assert test.df == 2
    assert test.n == 12
    raw = test.pairwise["p_value"].to_numpy()
    assert test.pairwise["p_holm"].to_numpy() == pytest.approx(multipletests(raw, method="holm")[1])
    assert any("fewer than 5" in w for w in test.warnings)


def test_kruskal_with_one_group_does_not_raise():
    test = kruskal_by(pl.DataFrame({"task_type": ["seg", "seg"], "rel_change": [0.1, 0.2]}))
    assert math.isnan(test.statistic)
    assert any("fewer than two" in w for w in test.warnings)


def test_task_type_sensitivity_uses_one_value_per_task():
    rows = []
    for k, task_type in enumerate(["segmentation", "classification"] * 3):
        metric = "dice" if task_type == "segmentation" else "auc"
        rows += rows_for(f"t{k}", [0.8, 0.8], [0.8 + 0.01 * k, 0.8 + 0.01 * k], metric=metric, task_type=task_type)
    rel = relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA))
    assert per_task_means(rel).height == 6
    tests = task_type_sensitivity(rel)
    assert tests["unified"].n == 6


def _per_image(runs: dict[str, float], task: str = "a", n_images: int = 20) -> pl.DataFrame:
    """Constant per-image Dice for each run id."""
    return pl.DataFrame({
        "run_id": [run for run in runs for _ in range(n_images)],
        "task": [task] * (len(runs) * n_images), "split": ["test"] * (len(runs) * n_images),
        "image": [f"img{i}" for i in range(n_images)] * len(runs), "metric": ["dice"] * (len(runs) * n_images),
        "value": [value for value in runs.values() for _ in range(n_images)],
    })


def test_bootstrap_with_zero_replicates_is_nan():
    ts = np.full((1, 30), 0.8)
    lo, hi = paired_bootstrap_interval(ts - 0.2, ts, True, n_boot=0)
    assert math.isnan(lo)
    assert math.isnan(hi)


def test_seed_summary_zero_replicates():
    # Task a: one seed with per-image scores, so no interval at all. Task b: two seeds, so the t interval.
    rows = rows_for("a", [0.8], [0.6]) + rows_for("b", [0.8, 0.8], [0.6, 0.7])
    rel = relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA))
    per_image = pl.concat([
        _per_image({"task_specific-a-0": 0.8, "unified-a-0": 0.6}, task="a"),
        _per_image({"task_specific-b-0": 0.8, "unified-b-0": 0.6, "task_specific-b-1": 0.8, "unified-b-1": 0.7}, task="b"),
    ])
    summary, _ = seed_summary(rel, per_image, n_boot=0)
    a = summary.filter(pl.col("task") == "a").row(0, named=True)
    assert a["ci_method"] == "no_bootstrap"
    assert math.isnan(a["ci_lo"])
    assert math.isnan(a["ci_hi"])
    assert a["negative_transfer"] is None
    assert a["flag_rule"] == FLAG_RULES["no_bootstrap"]
    b = summary.filter(pl.col("task") == "b").row(0, named=True)
    assert b["ci_method"] == "t_seeds"
    assert (b["ci_lo"], b["ci_hi"]) == pytest.approx(t_interval(np.array([-0.25, -0.125])))


def test_delta_m_zero_replicates():
    from usagg.analysis.transfer import analyse_transfer

    rows = rows_for("a", [0.8, 0.8], [0.6, 0.7]) + rows_for("b", [0.5, 0.5], [0.6, 0.55])
    per_image = _per_image({"task_specific-a-0": 0.8, "unified-a-0": 0.6, "task_specific-a-1": 0.8, "unified-a-1": 0.7})
    transfer = analyse_transfer(pl.DataFrame(rows, schema=RESULTS_SCHEMA), per_image, n_boot=0)
    study = transfer.delta_m.filter(pl.col("level") == "study").row(0, named=True)
    assert study["delta_m"] == pytest.approx((-0.1875 + 0.15) / 2)
    assert math.isnan(study["ci_tasks_lo"])
    assert math.isnan(study["ci_tasks_hi"])
    assert math.isfinite(study["ci_seeds_lo"])  # the interval over seeds needs no bootstrap
    [message] = transfer.messages
    assert message.startswith("negative transfer computed with 0 bootstrap replicates")
    assert "ci_tasks is empty" in message
    assert "ci_method no_bootstrap" in message
    with_boot = analyse_transfer(pl.DataFrame(rows, schema=RESULTS_SCHEMA), per_image, n_boot=200)
    # Two tasks are too few for an interval over tasks (its bounds would be the two tasks themselves); four are not.
    assert math.isnan(with_boot.delta_m.filter(pl.col("level") == "study")["ci_tasks_lo"][0])
    assert with_boot.messages == []
    rows += rows_for("c", [0.5, 0.5], [0.52, 0.55]) + rows_for("d", [0.7, 0.7], [0.6, 0.72])
    four = analyse_transfer(pl.DataFrame(rows, schema=RESULTS_SCHEMA), per_image, n_boot=200)
    study = four.delta_m.filter(pl.col("level") == "study").row(0, named=True)
    assert study["n_tasks"] == 4
    assert study["ci_tasks_lo"] < study["delta_m"] < study["ci_tasks_hi"]


def _group_test(p_value: float) -> GroupTest:
    empty = pl.DataFrame()
    return GroupTest(by="task_type", statistic=1.0, p_value=p_value, df=1, epsilon2=1.0, n=2, groups=empty, pairwise=empty)


def test_key_findings_kruskal_wording():
    from types import SimpleNamespace

    from usagg.reproduce.findings import key_findings

    report = SimpleNamespace(sensitivity={"grouped": _group_test(0.3173), "unified": _group_test(0.004)})
    lines = key_findings(report)
    assert lines == [
        "grouped: relative change does not differ significantly across task types at α = 0.05 "
        "(Kruskal–Wallis H = 1.00, p = 0.317, ε² = 1.00, n = 2 tasks).",
        "unified: relative change differs significantly across task types at α = 0.05 "
        "(Kruskal–Wallis H = 1.00, p = 0.004, ε² = 1.00, n = 2 tasks).",
    ]


def test_delta_m_intervals_ignore_row_order():
    """The same table in another row order gives the same bootstrap intervals."""
    from usagg.analysis.transfer import delta_m_table

    rows = []
    for task, ts, agg in (("a", 0.8, 0.6), ("b", 0.5, 0.6), ("c", 0.7, 0.72), ("d", 0.4, 0.3), ("e", 0.9, 0.85)):
        rows += rows_for(task, [ts, ts], [agg, agg + 0.05])
    rel = relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA))
    first = delta_m_table(rel, n_boot=200, seed=0)
    for shuffle_seed in (1, 2, 3):
        again = delta_m_table(rel.sample(fraction=1.0, shuffle=True, seed=shuffle_seed), n_boot=200, seed=0)
        assert again["ci_tasks_lo"].to_list() == first["ci_tasks_lo"].to_list()
        assert again["ci_tasks_hi"].to_list() == first["ci_tasks_hi"].to_list()


def _reported_rows(task, ts_value, agg_value, study="doe2025"):
    rows = []
    for paradigm, value in (("task_specific", ts_value), ("unified", agg_value)):
        rows.append({
            "study": study, "run_id": f"reported-{paradigm}-{task}", "paradigm": paradigm,
            "group": task if paradigm == "task_specific" else "all", "task": task, "task_type": "segmentation",
            "organ": "o", "clinical_group": "g", "n_train": None, "data_fraction": 1.0, "seed": None,
            "split": "test", "metric": "dice", "value": value, "higher_is_better": True,
            "source": "reported:Doe et al. 2025",
        })
    return rows


def test_studies_are_not_pooled():
    from usagg.analysis.transfer import delta_m_table

    rows = rows_for("a", [0.80, 0.82, 0.81], [0.16, 0.18, 0.17]) + _reported_rows("a", 0.760, 0.740)
    rel = relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA))

    summary, _ = seed_summary(rel)
    assert summary.height == 2
    own = summary.filter(pl.col("study") == "s").row(0, named=True)
    reported = summary.filter(pl.col("study") == "doe2025").row(0, named=True)
    assert own["n_seeds"] == 3
    assert own["ci_method"] == "t_seeds"
    assert own["negative_transfer"] is True
    assert reported["n_seeds"] == 1
    assert reported["mean_rel_change"] == pytest.approx(-0.02 / 0.76)
    assert reported["ci_method"] == "reported"

    study_level = delta_m_table(rel, n_boot=0).filter(pl.col("level") == "study")
    assert study_level["study"].to_list() == ["doe2025", "s"]
    assert study_level["n_seeds"].to_list() == [1, 3]
    assert study_level["delta_m"][0] == pytest.approx(-0.02 / 0.76)

    means = per_task_means(rel)
    assert means.height == 2
    assert sorted(means["n_seeds"].to_list()) == [1, 3]


def test_key_findings_count_and_crossing_caveat():
    from types import SimpleNamespace

    from usagg.analysis.transfer import DELTA_M_SCHEMA, TransferAnalysis
    from usagg.reproduce.findings import key_findings

    summary = pl.DataFrame(
        {"negative_transfer": [True, False, None, None, None], "mean_rel_change": [-0.2, 0.1, 0.05, -0.1, float("nan")]},
        schema={"negative_transfer": pl.Boolean, "mean_rel_change": pl.Float64},
    )
    task_type_row = {name: None for name in DELTA_M_SCHEMA} | {"level": "task_type"}  # no study-level Δm line
    delta_m = pl.DataFrame([task_type_row], schema=DELTA_M_SCHEMA)
    transfer = TransferAnalysis(rel=pl.DataFrame(), summary=summary, delta_m=delta_m)
    crossings = pl.DataFrame({
        "paradigm": ["grouped", "unified"], "task_type": ["segmentation", "segmentation"],
        "n_train_cross": [169.0, 80.0], "within_data_range": [True, True], "bounded": [False, True],
        "ci_lo": [float("nan"), 60.0], "ci_hi": [float("nan"), 120.0],
        "note": ["slope sign uncertain: the interval is not bounded", ""],
    })
    fit = SimpleNamespace(crossings=crossings, uses={"log10_n", "task_type", "paradigm"})

    lines = key_findings(SimpleNamespace(transfer=transfer, data_scale=fit))

    assert lines[0] == (
        "Negative transfer (95 % interval below 0): 1 of the 2 task × paradigm × fraction comparisons with an "
        "interval; 2 more have no interval (one seed without per-image scores) and cannot be flagged; 1 more has "
        "no finite relative change (a task-specific score of 0) and cannot be flagged."
    )
    assert lines[1] == (
        "grouped / segmentation: the fitted relative change crosses 0 at about 169 training images, but this "
        "crossing is not reliable: slope sign uncertain: the interval is not bounded."
    )
    assert lines[2] == "unified / segmentation: the fitted relative change crosses 0 at about 80 training images (95 % CI 60–120)."


@pytest.mark.parametrize("n_classes", [2, 3])
def test_auc_per_row_matches_evaluate(n_classes):
    """The bootstrap's rank AUC equals the AUC that usagg evaluate computes with torchmetrics, ties included."""
    from usagg.analysis.inference import _auc_per_row
    from usagg.evaluate.metrics import classification_metrics

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, size=(5, 40))
    probs = rng.dirichlet(np.ones(n_classes), size=(5, 40)).round(1)  # rounding makes ties
    ours = _auc_per_row(labels, probs)
    for row in range(5):
        expected = classification_metrics(probs[row], labels[row]).values["auc"]
        assert ours[row] == pytest.approx(expected, abs=1e-6)  # torchmetrics returns float32
    assert math.isnan(_auc_per_row(np.zeros((1, 10), dtype=int), probs[:1, :10])[0])


def _classification_per_image(runs: dict[str, float], n_images: int = 60, seed: int = 0) -> pl.DataFrame:
    """Per-image labels and two-class probabilities; ``runs`` maps run ids to how well the run separates classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n_images)
    noise = rng.normal(size=n_images)
    rows = []
    for run, separation in runs.items():
        p1 = 1 / (1 + np.exp(-(separation * (2 * labels - 1) + noise)))
        for i in range(n_images):
            for metric, value in (("label", labels[i]), ("prob_0", 1 - p1[i]), ("prob_1", p1[i])):
                rows.append({"run_id": run, "task": "c", "split": "test", "image": f"img{i}", "metric": metric, "value": float(value)})
    return pl.DataFrame(rows)


def test_seed_summary_bootstraps_auc_from_probabilities():
    """One seed of AUC gets an image-bootstrap interval from the stored labels and probabilities."""
    from usagg.evaluate.metrics import classification_metrics

    per_image = _classification_per_image({"task_specific-c-0": 3.0, "unified-c-0": 0.3})
    auc = {}
    for run in ("task_specific-c-0", "unified-c-0"):
        part = per_image.filter(pl.col("run_id") == run).pivot("metric", index="image", values="value").sort("image")
        auc[run] = classification_metrics(part.select("prob_0", "prob_1").to_numpy(), part["label"].to_numpy().astype(int)).values["auc"]
    rel = relative_change(pl.DataFrame(
        rows_for("c", [auc["task_specific-c-0"]], [auc["unified-c-0"]], metric="auc", task_type="classification"),
        schema=RESULTS_SCHEMA,
    ))
    summary, _ = seed_summary(rel, per_image, n_boot=500)
    row = summary.row(0, named=True)
    assert row["ci_method"] == "bootstrap_images"
    assert row["ci_lo"] < row["mean_rel_change"] < row["ci_hi"] < 0
    assert row["negative_transfer"] is True
    # Without the probabilities there is nothing to resample: one seed has no interval.
    summary, _ = seed_summary(rel, per_image.filter(pl.col("metric") != "prob_1"), n_boot=500)
    assert summary["ci_method"][0] == "none"


def test_identical_seeds_give_no_interval():
    """One number copied to every seed is not three agreeing measurements: no zero-width interval, no flag."""
    from usagg.analysis.inference import seed_summary
    from usagg.analysis.relative import relative_change

    rows = rows_for("a", [0.8, 0.8, 0.8], [0.72, 0.72, 0.72])
    summary, notes = seed_summary(relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA)))
    row = summary.row(0, named=True)
    assert row["mean_rel_change"] == pytest.approx(-0.1)
    assert math.isnan(row["ci_lo"])
    assert math.isnan(row["ci_hi"])
    assert (row["ci_method"], row["negative_transfer"]) == ("none", None)
    assert math.isnan(row["ttest_p"])
    assert math.isnan(row["wilcoxon_p"])
    assert notes == [
        "unified/a/dice: its 3 seeds have the same relative change (-10.00 %), so they give no t interval and no "
        "flag; if one number was copied to every seed, give it once with an empty seed"
    ]


def test_seed_tests_adjusted_over_comparisons():
    """Benjamini–Hochberg over the comparisons of one study and split: q = min over k >= rank of p_(k) m / k."""
    from statsmodels.stats.multitest import multipletests

    from usagg.analysis.relative import relative_change
    from usagg.results import RESULTS_SCHEMA

    rows = []
    for task, shift in (("a", 0.02), ("b", 0.05), ("c", 0.0)):
        for seed in range(4):
            base = 0.7 + 0.01 * seed
            noise = 0.003 * ((seed * 7 + ord(task)) % 5 - 2)
            for paradigm, value in (("task_specific", base), ("unified", base - shift + noise)):
                rows.append({"study": "s", "run_id": f"{paradigm}-{seed}", "paradigm": paradigm, "group": "all" if paradigm == "unified" else task,
                             "task": task, "task_type": "segmentation", "organ": "x", "clinical_group": "x", "n_train": 100,
                             "data_fraction": 1.0, "seed": seed, "split": "test", "metric": "dice", "value": value,
                             "higher_is_better": True, "source": "run"})
    summary, _ = seed_summary(relative_change(pl.DataFrame(rows, schema=RESULTS_SCHEMA)), n_boot=0)
    p_values = summary["ttest_p"].to_numpy()
    assert np.isfinite(p_values).all()
    assert summary["ttest_q_bh"].to_numpy() == pytest.approx(multipletests(p_values, method="fdr_bh")[1])
    assert (summary["ttest_q_bh"].to_numpy() >= p_values).all()
