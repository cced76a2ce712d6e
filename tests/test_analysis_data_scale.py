"""Data-scale regression: recovery of a known model, HC3 predictions, guards on small tables, group view, advice."""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest
from scipy import stats

from usagg.analysis.advise import advise
from usagg.analysis.data_scale import distinct_resamples, fit_data_scale, group_view
from usagg.analysis.relative import relative_change
from usagg.analysis.simulate import DEFAULT_EFFECTS, simulate_results
from usagg.analysis.transfer import analyse_transfer
from usagg.errors import AnalysisError
from usagg.results import RESULTS_SCHEMA


@pytest.fixture(scope="module")
def exact_rel():
    """Relative changes that follow the generating model exactly (no noise, no task effect)."""
    table = simulate_results(n_tasks=16, fractions=(0.1, 0.3, 1.0), seeds=(0, 1), noise_sd=0.0, task_sd=0.0, seed=3)
    return relative_change(table)


@pytest.fixture(scope="module")
def noisy_rel():
    return relative_change(simulate_results(n_tasks=27, fractions=(0.1, 0.25, 0.5, 1.0), seeds=(0, 1, 2), seed=5))


def test_exact_model_recovers_crossings(exact_rel):
    fit = fit_data_scale(exact_rel, n_bootstrap=200)
    assert fit.formula == "log10_n * C(task_type) * C(paradigm)"
    assert fit.r2 == pytest.approx(1.0)
    for row in fit.crossings.iter_rows(named=True):
        intercept, slope = DEFAULT_EFFECTS[(row["paradigm"], row["task_type"])]
        assert row["slope_per_log10"] == pytest.approx(slope, abs=1e-9)
        assert row["n_train_cross"] == pytest.approx(10 ** (-intercept / slope), rel=1e-6)
        assert row["ci_lo"] == pytest.approx(row["n_train_cross"], rel=1e-6)
        assert row["bounded"] is True


def test_predict_matches_generating_model(exact_rel):
    fit = fit_data_scale(exact_rel, n_bootstrap=0)
    intercept, slope = DEFAULT_EFFECTS[("unified", "detection")]
    mean, lo, hi = fit.predict(500, "detection", "unified")
    assert mean == pytest.approx(intercept + slope * math.log10(500), abs=1e-9)
    means, _, _ = fit.predict([100, 1000], ["segmentation", "regression"], "grouped")
    expected = [DEFAULT_EFFECTS[("grouped", "segmentation")][0] + 2 * DEFAULT_EFFECTS[("grouped", "segmentation")][1],
                DEFAULT_EFFECTS[("grouped", "regression")][0] + 3 * DEFAULT_EFFECTS[("grouped", "regression")][1]]
    assert means == pytest.approx(expected, abs=1e-9)


def test_prediction_interval_uses_hc3_covariance(noisy_rel):
    fit = fit_data_scale(noisy_rel, n_bootstrap=0)
    ols = fit.ols
    x = ols.model.exog
    resid = ols.resid.to_numpy()
    bread = np.linalg.inv(x.T @ x)
    leverage = np.einsum("ij,jk,ik->i", x, bread, x)
    meat = x.T @ (x * (resid**2 / (1 - leverage) ** 2)[:, None])
    hc3 = bread @ meat @ bread
    assert np.asarray(ols.cov_params()) == pytest.approx(hc3, rel=1e-8)

    mean, lo, hi = fit.predict(800, "segmentation", "unified")
    row = _design_row(fit, 800, "segmentation", "unified")
    se = math.sqrt(row @ hc3 @ row)
    quantile = stats.t.ppf(0.975, ols.df_resid) if ols.use_t else stats.norm.ppf(0.975)
    assert mean == pytest.approx(float(row @ ols.params.to_numpy()))
    assert hi - lo == pytest.approx(2 * quantile * se, rel=1e-8)


def _design_row(fit, n, task_type, paradigm):
    import pandas as pd
    import patsy

    frame = pd.DataFrame({"log10_n": [math.log10(n)], "task_type": [task_type], "paradigm": [paradigm], "rel_change": [0.0]})
    (matrix,) = patsy.build_design_matrices([fit.design_info], frame, return_type="matrix")
    return np.asarray(matrix)[0]


def test_mixed_model_with_repeated_measures(noisy_rel):
    fit = fit_data_scale(noisy_rel, n_bootstrap=50)
    assert fit.mixed is not None
    models = set(fit.table["model"].to_list())
    assert models == {"ols_hc3", "mixedlm_task_intercept"}
    assert "task random-intercept variance" in fit.table["term"].to_list()


def test_fit_does_not_spill_warnings(noisy_rel):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_data_scale(noisy_rel.head(40), n_bootstrap=20)
    assert [str(w.message) for w in caught] == []
    assert isinstance(fit.warnings, list)


def test_small_table_falls_back_with_message():
    rel = relative_change(simulate_results(n_tasks=6, fractions=(1.0,), seeds=(0,)))
    fit = fit_data_scale(rel, n_bootstrap=50)
    assert fit.formula != "log10_n * C(task_type) * C(paradigm)"
    assert any("no residual degrees of freedom" in m for m in fit.messages)
    assert any("fitted the simpler model" in m for m in fit.messages)
    assert any("small sample" in w for w in fit.warnings)
    assert fit.mixed is None


def test_constant_training_size_drops_the_size_term():
    table = simulate_results(n_tasks=8, fractions=(1.0,), seeds=(0, 1))
    table = table.with_columns(pl.lit(500, dtype=pl.Int64).alias("n_train"))
    fit = fit_data_scale(relative_change(table), n_bootstrap=0)
    assert "log10_n" not in fit.formula
    assert any("log10_n (every row has the same training size)" in m for m in fit.messages)
    assert fit.crossings.height == 0


def test_nan_rows_are_dropped_with_message(noisy_rel):
    broken = noisy_rel.with_columns(
        pl.when(pl.col("task") == "task00").then(None).otherwise(pl.col("rel_change")).alias("rel_change")
    )
    fit = fit_data_scale(broken, n_bootstrap=0)
    assert fit.data.height == noisy_rel.height - noisy_rel.filter(pl.col("task") == "task00").height
    kept = noisy_rel.filter(pl.col("task") != "task00")
    assert fit.n == kept.select("task", "paradigm", "n_train").n_unique()  # one observation per seed mean
    assert any("NaN relative change" in m for m in fit.messages)


def test_seeds_are_averaged_not_counted(noisy_rel):
    """Copying every row as more seeds adds no information, so the fit and its intervals stay the same."""
    one_seed = noisy_rel.filter(pl.col("seed") == pl.col("seed").min())
    copies = pl.concat([one_seed.with_columns(pl.lit(s).alias("seed")) for s in (0, 1, 2)])
    single, tripled = fit_data_scale(one_seed, n_bootstrap=0), fit_data_scale(copies, n_bootstrap=0)
    assert (single.formula, single.n) == (tripled.formula, tripled.n)
    assert int(single.ols.df_resid) == int(tripled.ols.df_resid)
    np.testing.assert_allclose(single.predict(300.0, "segmentation", "unified"), tripled.predict(300.0, "segmentation", "unified"))
    assert f"{tripled.data.height} rows give {single.n} observations" in " ".join(tripled.messages)


def test_too_few_observations_raise():
    rel = relative_change(simulate_results(n_tasks=1, fractions=(1.0,), seeds=(0,), paradigms=("task_specific", "unified")))
    with pytest.raises(AnalysisError, match="too few for any model"):
        fit_data_scale(rel)


def test_missing_training_sizes_raise_with_fix():
    rel = relative_change(simulate_results(n_tasks=4, fractions=(1.0,), seeds=(0,)))
    rel = rel.with_columns(pl.lit(None, dtype=pl.Int64).alias("n_train"))
    with pytest.raises(AnalysisError, match="n_train column"):
        fit_data_scale(rel)


def test_predict_rejects_unseen_task_type(noisy_rel):
    fit = fit_data_scale(noisy_rel, n_bootstrap=0)
    with pytest.raises(AnalysisError, match="keypoints"):
        fit.predict(100, "keypoints", "unified")
    with pytest.raises(AnalysisError, match="positive"):
        fit.predict(0, "segmentation", "unified")


def test_group_view_sums_task_sizes():
    rel = relative_change(simulate_results(n_tasks=6, fractions=(1.0,), seeds=(0, 1)))
    view = group_view(rel)
    one = view.filter((pl.col("paradigm") == "grouped") & (pl.col("clinical_group") == "obstetrics")).row(0, named=True)
    tasks = rel.filter((pl.col("paradigm") == "grouped") & (pl.col("clinical_group") == "obstetrics"))
    assert one["n_tasks"] == tasks["task"].n_unique()
    assert one["total_n_train"] == pytest.approx(tasks.group_by("task").agg(pl.col("n_train").mean())["n_train"].sum())
    assert one["size_source"] == "tasks"
    # A task without a finite change still has its training images counted; it leaves the mean and n_tasks.
    dropped = tasks["task"].unique().sort()[0]
    nan_rel = rel.with_columns(
        pl.when((pl.col("task") == dropped) & (pl.col("paradigm") == "grouped")).then(float("nan")).otherwise(pl.col("rel_change")).alias("rel_change")
    )
    two = group_view(nan_rel).filter((pl.col("paradigm") == "grouped") & (pl.col("clinical_group") == "obstetrics")).row(0, named=True)
    assert two["total_n_train"] == pytest.approx(one["total_n_train"])
    assert two["n_tasks"] == one["n_tasks"] - 1


def test_advice_follows_the_rule(exact_rel):
    fit = fit_data_scale(exact_rel, n_bootstrap=0)
    advice = advise(fit, exact_rel)
    assert advice.recommendations.height == exact_rel["task"].n_unique()
    for rec in advice.recommendations.iter_rows(named=True):
        preds = advice.predictions.filter(pl.col("task") == rec["task"])
        gains = preds.filter(pl.col("ci_lo") > 0)
        if gains.height:
            assert rec["recommendation"] == gains.sort("ci_lo")["paradigm"][-1]
            assert rec["confidence"] == "clear"
        elif (preds["ci_hi"] < 0).all():
            assert rec["recommendation"] == "task_specific"
    only = advise(fit, exact_rel, task="task03")
    assert only.recommendations["task"].to_list() == ["task03"]
    with pytest.raises(AnalysisError, match="not in the results"):
        advise(fit, exact_rel, task="nope")


def test_reported_values_with_singular_replicates():
    # One value per task with null seeds: many bootstrap replicates lose a cell and must be skipped, not raise.
    rel = relative_change(simulate_results(n_tasks=8, fractions=(1.0,), seeds=None))
    fit = fit_data_scale(rel, n_bootstrap=100)
    assert fit.n == 16
    assert fit.crossings.height > 0
    assert any("bootstrap replicates had collinear terms" in m for m in fit.messages)


def _tiny_rel():
    """Two tasks (one per task type) × one seed × one fraction: 4 observations, as in a first small trial."""
    changes = {  # (task, task type, training images) -> relative change under grouped, unified
        ("lesion_seg", "segmentation", 240): (0.50, 0.53),
        ("malignancy_cls", "classification", 32): (-0.01, 0.01),
    }
    rows = []
    for (task, task_type, n_train), (grouped, unified) in changes.items():
        for paradigm, group, value in (("task_specific", task, 0.5), ("grouped", "breast", 0.5 * (1 + grouped)),
                                       ("unified", "all", 0.5 * (1 + unified))):
            rows.append({
                "study": "s", "run_id": f"{paradigm}/{group}", "paradigm": paradigm, "group": group, "task": task,
                "task_type": task_type, "organ": "breast", "clinical_group": "breast", "n_train": n_train,
                "data_fraction": 1.0, "seed": 0, "split": "test", "metric": "dice" if task_type == "segmentation" else "auc",
                "value": value, "higher_is_better": True, "source": "run",
            })
    return relative_change(pl.DataFrame(rows))


def test_tiny_study_warns_with_a_remedy():
    fit = fit_data_scale(_tiny_rel(), n_bootstrap=200)
    assert fit.formula == "log10_n + C(paradigm)"
    assert int(fit.ols.df_resid) == 1
    assert fit.tasks_per_type == {"classification": 1, "segmentation": 1}
    [small] = [w for w in fit.warnings if w.startswith("small sample")]
    assert "1 residual degree(s) of freedom (fewer than 10)" in small
    assert small.endswith("add tasks or data fractions (seeds are averaged first)")
    assert any(w.startswith("too few tasks to resample") for w in fit.warnings)


def test_one_task_per_type_crossing():
    # Resampling one task per type draws the same tasks in every replicate: a zero-width "interval".
    fit = fit_data_scale(_tiny_rel(), n_bootstrap=200)
    assert fit.crossings.height == 4
    for row in fit.crossings.iter_rows(named=True):
        assert math.isfinite(row["n_train_cross"])
        assert row["bounded"] is False
        assert math.isnan(row["ci_lo"])
        assert math.isnan(row["ci_hi"])
        assert row["note"].startswith(
            "too few tasks to resample: the model has no task-type term, so every type's prediction rests on the "
            "tasks of all types, which the bootstrap resamples within each type into only 1 distinct set(s) in all"
        )


def test_advice_from_a_thin_fit_is_not_clear():
    rel = _tiny_rel()
    fit = fit_data_scale(rel, n_bootstrap=0)
    advice = advise(fit, rel)
    # The interval alone would call lesion_seg a clear gain under unified.
    lesion = advice.predictions.filter((pl.col("task") == "lesion_seg") & (pl.col("paradigm") == "unified")).row(0, named=True)
    assert lesion["ci_lo"] > 0
    assert advice.recommendations["confidence"].to_list() == ["insufficient evidence", "insufficient evidence"]
    reason = advice.recommendations.filter(pl.col("task") == "lesion_seg")["reason"][0]
    assert "the model has 1 residual degree(s) of freedom (fewer than 10)" in reason
    assert "the model has 1 residual degree(s) of freedom (fewer than 10); add tasks or data fractions (seeds are averaged, so more seeds do not add any)" in reason
    assert (
        "only 1 distinct set(s) in all (classification 1 task(s), 1 set(s), segmentation 1 task(s), 1 set(s); "
        "10 needed, which takes 3 tasks of a type); add tasks of type classification or segmentation"
    ) in reason


def test_distinct_resamples_known_values():
    # C(2n - 1, n) multisets per type. With a task-type term a type's own tasks set its coefficients, so only
    # its own count matters. Without one, types are resampled independently for one shared line, so counts multiply.
    assert [distinct_resamples({"a": n}, "log10_n", "a") for n in (1, 2, 3, 4)] == [1, 3, 10, 35]
    assert distinct_resamples({"a": 2, "b": 3}, "log10_n + C(task_type)", "a") == 3
    assert distinct_resamples({"a": 2, "b": 3}, "log10_n * C(task_type)", "a") == 3
    assert distinct_resamples({"a": 2, "b": 3}, "log10_n * C(paradigm)", "a") == 30


def test_zero_bootstrap_crossing_note(noisy_rel):
    fit = fit_data_scale(noisy_rel, n_bootstrap=0)
    assert fit.crossings["ci_lo"].is_nan().all()
    assert set(fit.crossings["note"]) <= {"no bootstrap interval (0 bootstrap replicates)", "flat prediction: no crossing"}


def test_fit_messages_not_logged(caplog):
    # The CLI prints fit.messages as notes, so logging them too would print each one twice.
    with caplog.at_level("DEBUG", logger="usagg.analysis.data_scale"):
        fit = fit_data_scale(_tiny_rel(), n_bootstrap=0)
    assert any("not fitted" in m for m in fit.messages)
    assert caplog.records == []


METRIC_BY_TYPE = {"segmentation": "dice", "classification": "auc", "detection": "iou", "regression": "mae"}


def _study(tasks, change, fractions=(0.4, 0.7, 1.0), seeds=(0, 1, 2)):
    """A results table: ``tasks`` maps task -> (task type, full training size); ``change`` gives each relative change.

    ``change(paradigm, task, task_type, n_train, seed)`` is the relative change of an aggregated run against
    its task-specific run, whose value is 0.5.
    """
    rows = []
    for task, (task_type, full_n) in tasks.items():
        for fraction in fractions:
            n_train = round(full_n * fraction)
            for seed in seeds:
                for paradigm, group in (("task_specific", task), ("grouped", task_type), ("unified", "all")):
                    rel = 0.0 if paradigm == "task_specific" else change(paradigm, task, task_type, n_train, seed)
                    rows.append({
                        "study": "s", "run_id": f"{paradigm}/{group}/{fraction}/{seed}", "paradigm": paradigm,
                        "group": group, "task": task, "task_type": task_type, "organ": "breast",
                        "clinical_group": "breast", "n_train": n_train, "data_fraction": fraction, "seed": seed,
                        "split": "test", "metric": METRIC_BY_TYPE[task_type],
                        # A regression error falls when the task gains, so its relative change is -(v - 0.5) / 0.5.
                        "value": 0.5 * (1 - rel if task_type == "regression" else 1 + rel),
                        "higher_is_better": task_type != "regression", "source": "run",
                    })
    return pl.DataFrame(rows, schema=RESULTS_SCHEMA)


# Classification is observed only at 120-330 images, segmentation only at 800-8000.
SPLIT_SIZES = {
    "cls_a": ("classification", 300), "cls_b": ("classification", 310),
    "cls_c": ("classification", 320), "cls_d": ("classification", 330),
    "seg_a": ("segmentation", 2000), "seg_b": ("segmentation", 4000),
    "seg_c": ("segmentation", 6000), "seg_d": ("segmentation", 8000),
}
CROSSES_AT = {
    ("grouped", "classification"): 583.0,  # inside the study's sizes, above classification's
    ("unified", "classification"): 200.0,  # inside classification's sizes
    ("grouped", "segmentation"): 3000.0,  # inside segmentation's sizes
    ("unified", "segmentation"): 250.0,  # inside the study's sizes, below segmentation's
}


def _split_sizes_table():
    def change(paradigm, task, task_type, n_train, seed):
        jitter = 0.002 * ((seed + len(task) + ord(task[-1])) % 3 - 1)
        return 0.1 * (math.log10(CROSSES_AT[(paradigm, task_type)]) - math.log10(n_train)) + jitter

    return _study(SPLIT_SIZES, change)


def test_within_data_range_uses_the_cell_sizes():
    rel = relative_change(_split_sizes_table())
    fit = fit_data_scale(rel, n_bootstrap=100, mixed=False)
    assert fit.formula == "log10_n * C(task_type) * C(paradigm)"
    rows = {(r["paradigm"], r["task_type"]): r for r in fit.crossings.iter_rows(named=True)}
    for (paradigm, task_type), expected in CROSSES_AT.items():
        row = rows[(paradigm, task_type)]
        sizes = fit.data.filter((pl.col("paradigm") == paradigm) & (pl.col("task_type") == task_type))["n_train"]
        assert row["n_train_cross"] == pytest.approx(expected, rel=1e-3)
        assert (row["n_train_min"], row["n_train_max"]) == (sizes.min(), sizes.max())
        assert row["within_data_range"] is (sizes.min() <= expected <= sizes.max())
    assert rows[("grouped", "classification")]["within_data_range"] is False
    assert rows[("unified", "segmentation")]["within_data_range"] is False
    assert rows[("unified", "classification")]["within_data_range"] is True
    assert rows[("grouped", "segmentation")]["within_data_range"] is True


def test_crossing_table_agrees_with_the_figure():
    from matplotlib import pyplot as plt

    from usagg.plots.inputs import FigureInputs
    from usagg.plots.registry import draw_figure

    table = _split_sizes_table()
    fit = fit_data_scale(relative_change(table), n_bootstrap=50)
    plot = draw_figure("data-scale", FigureInputs(results=table), n_bootstrap=50)
    plt.close(plot.figure)
    drawn = {
        (r["paradigm"], r["task_type"]): r["drawn"]
        for r in plot.data.filter(pl.col("layer") == "crossing").iter_rows(named=True)
    }
    within = {(r["paradigm"], r["task_type"]): r["within_data_range"] for r in fit.crossings.iter_rows(named=True)}
    assert drawn == within


def test_within_range_without_type_term():
    # One line per paradigm is fitted to both task types, so its range is the paradigm's (32 to 240 images).
    fit = fit_data_scale(_tiny_rel(), n_bootstrap=0)
    assert "task_type" not in fit.uses
    assert set(fit.crossings["n_train_min"]) == {32.0}
    assert set(fit.crossings["n_train_max"]) == {240.0}
    for row in fit.crossings.iter_rows(named=True):
        assert row["within_data_range"] is (32.0 <= row["n_train_cross"] <= 240.0)


def test_resample_gap_names_the_type():
    # Two tasks per type, each type with its own line: 3 distinct resamples per type, not 3 × 3 = 9.
    tasks = {name: SPLIT_SIZES[name] for name in ("cls_a", "cls_b", "seg_a", "seg_b")}

    def change(paradigm, task, task_type, n_train, seed):
        return 0.1 * (math.log10(CROSSES_AT[(paradigm, task_type)]) - math.log10(n_train)) + 0.002 * (seed - 1)

    rel = relative_change(_study(tasks, change))
    fit = fit_data_scale(rel, n_bootstrap=50, mixed=False)
    assert fit.formula == "log10_n * C(task_type) * C(paradigm)"
    assert fit.ols.df_resid >= 10
    expected = (
        "task type classification has 2 task(s), which the bootstrap can resample into only 3 distinct set(s) "
        "(10 needed, which takes 3 tasks of a type); add tasks of type classification"
    )
    assert fit.evidence_gaps("classification") == [expected]
    reason = advise(fit, rel, task="cls_a").recommendations["reason"][0]
    assert reason.endswith(f"; evidence insufficient: {expected}")
    assert "residual degree" not in reason
    note = fit.crossings.filter((pl.col("paradigm") == "grouped") & (pl.col("task_type") == "classification"))["note"][0]
    assert note == f"too few tasks to resample: {expected}; no interval"
    [warning] = [w for w in fit.warnings if w.startswith("too few tasks to resample")]
    assert "for task type(s) classification, segmentation:" in warning
    assert "task type segmentation has 2 task(s)" in warning


def _contradicting_table(seeds=(0, 1, 2), loss_spread=0.01):
    """Grouped training helps every classification task but cls_d, which loses about 4.8 %."""

    def change(paradigm, task, task_type, n_train, seed):
        if task == "cls_d" and paradigm == "grouped":
            return -0.048 + loss_spread * (seed - 1)
        gain = {"classification": 0.12, "segmentation": 0.05}[task_type] if paradigm == "grouped" else 0.01
        # Seed noise that cancels over the three seeds, plus a task and size effect that does not.
        return gain + 0.01 * ((seed + len(task) + ord(task[-1])) % 3 - 1) + 0.005 * math.sin(n_train + ord(task[-1]))

    return _study(SPLIT_SIZES, change, seeds=seeds)


def test_advice_notes_contradicting_observation():
    rel = relative_change(_contradicting_table())
    fit = fit_data_scale(rel, n_bootstrap=0, mixed=False)
    advice = advise(fit, rel)
    pred = advice.predictions.filter((pl.col("task") == "cls_d") & (pl.col("paradigm") == "grouped")).row(0, named=True)
    assert pred["predicted"] > 0
    assert pred["observed"] == pytest.approx(-0.048)
    assert pred["observed_ci_method"] == "t_seeds"
    lo, hi = stats.t.interval(0.95, 2, loc=-0.048, scale=0.01 / math.sqrt(3))
    assert (pred["observed_ci_lo"], pred["observed_ci_hi"]) == pytest.approx((lo, hi))
    rec = advice.recommendations.filter(pl.col("task") == "cls_d").row(0, named=True)
    # The task's own grouped runs lose, so the predicted gain under grouped is passed over.
    assert rec["recommendation"] == "unified"
    assert "; grouped is not recommended, because this task's own runs lose under it" in rec["reason"]
    assert rec["reason"].endswith(
        "; observed change contradicts the prediction: under grouped this task's own results changed by -4.8 % "
        f"(95 % t interval over seeds {100 * lo:+.1f} to {100 * hi:+.1f} %) where the model predicts "
        f"{100 * pred['predicted']:+.1f} %; check this task's results before acting on the prediction"
    )
    for other in advice.recommendations.filter(pl.col("task") != "cls_d").iter_rows(named=True):
        assert "contradicts" not in other["reason"]


def test_advice_uses_the_transfer_interval_when_given():
    table = _contradicting_table()
    transfer = analyse_transfer(table, n_boot=0)
    summary = transfer.summary.with_columns(
        pl.when((pl.col("task") == "cls_d") & (pl.col("paradigm") == "grouped") & (pl.col("data_fraction") == 1.0))
        .then(pl.lit("bootstrap_images"))
        .otherwise(pl.col("ci_method"))
        .alias("ci_method")
    )
    fit = fit_data_scale(transfer.rel, n_bootstrap=0, mixed=False)
    advice = advise(fit, transfer.rel, transfer_summary=summary)
    pred = advice.predictions.filter((pl.col("task") == "cls_d") & (pl.col("paradigm") == "grouped")).row(0, named=True)
    assert pred["observed_ci_method"] == "bootstrap_images"
    reason = advice.recommendations.filter(pl.col("task") == "cls_d")["reason"][0]
    assert "(95 % image-bootstrap interval -7.3 to -2.3 %)" in reason


def test_advice_no_note_when_interval_includes_zero():
    rel = relative_change(_contradicting_table(loss_spread=0.08))
    fit = fit_data_scale(rel, n_bootstrap=0, mixed=False)
    advice = advise(fit, rel)
    pred = advice.predictions.filter((pl.col("task") == "cls_d") & (pl.col("paradigm") == "grouped")).row(0, named=True)
    assert pred["observed"] < 0
    assert pred["observed_ci_hi"] > 0
    assert not any("contradicts" in r for r in advice.recommendations["reason"])


def test_advice_contradiction_with_one_seed_has_no_interval():
    rel = relative_change(_contradicting_table(seeds=(1,)))
    fit = fit_data_scale(rel, n_bootstrap=0, mixed=False)
    reason = advise(fit, rel, task="cls_d").recommendations["reason"][0]
    assert "under grouped this task's own results changed by -4.8 % (no interval) where the model predicts +" in reason


def test_safer_paradigm_skips_observed_loss():
    rel = relative_change(_contradicting_table())
    fit = fit_data_scale(rel, n_bootstrap=0, mixed=False)
    advice = advise(fit, rel)
    rows = advice.predictions.filter(pl.col("task") == "cls_d").to_dicts()
    grouped = next(r for r in rows if r["paradigm"] == "grouped")
    assert grouped["observed_ci_hi"] < 0  # the task's own grouped runs lose

    rec = advice.recommendations.filter(pl.col("task") == "cls_d").row(0, named=True)

    kept = [r for r in rows if not (r["observed_ci_hi"] is not None and r["observed_ci_hi"] < 0) and r["predicted"] >= 0]
    expected = max(kept, key=lambda r: r["ci_lo"])["paradigm"] if kept else "task_specific"
    assert rec["safer_paradigm"] == expected
    assert rec["safer_paradigm"] != "grouped"
    # The recommendation passes over grouped too, and gives the reason before the observed numbers.
    assert grouped["predicted"] > 0
    assert rec["recommendation"] != "grouped"
    assert "grouped is not recommended, because this task's own runs lose under it" in rec["reason"]
    assert "under grouped this task's own results changed by" in rec["reason"]


def test_safer_is_task_specific_when_all_lose():
    """A paradigm whose whole predicted interval lies below 0 is worse than task-specific training (0)."""

    def change(paradigm, task, task_type, n_train, seed):
        loss = -0.2 if paradigm == "grouped" else -0.05
        return loss + 0.01 * ((seed + ord(task[-1])) % 3 - 1) + 0.004 * math.sin(n_train + ord(task[-1]))

    rel = relative_change(_study(SPLIT_SIZES, change))
    advice = advise(fit_data_scale(rel, n_bootstrap=0, mixed=False), rel)
    assert set(advice.predictions["verdict"]) == {"loss"}
    assert set(advice.recommendations["recommendation"]) == {"task_specific"}
    assert set(advice.recommendations["safer_paradigm"]) == {"task_specific"}


def test_own_losses_give_clear_task_specific():
    """Direct evidence wins over the model: cls_d's own runs lose under grouped and under unified."""

    def change(paradigm, task, task_type, n_train, seed):
        if task == "cls_d":
            return -0.06 + 0.005 * (seed - 1)
        gain = {"classification": 0.12, "segmentation": 0.05}[task_type] if paradigm == "grouped" else 0.03
        return gain + 0.01 * ((seed + ord(task[-1])) % 3 - 1) + 0.005 * math.sin(n_train + ord(task[-1]))

    rel = relative_change(_study(SPLIT_SIZES, change))
    rec = advise(fit_data_scale(rel, n_bootstrap=0, mixed=False), rel, task="cls_d").recommendations.row(0, named=True)
    assert (rec["recommendation"], rec["confidence"], rec["safer_paradigm"]) == ("task_specific", "clear", "task_specific")
    assert rec["reason"].startswith("this task's own runs lose under every aggregated paradigm: grouped -6.0 % (95 % interval")


def test_crossing_unbounded_when_replicates_collinear():
    """Most replicates draw one of a type's two single-size tasks twice and cannot fit that type's slope.

    The replicates kept are then not a random sample, so no crossing interval is called bounded.
    """
    tasks = {
        "cls_a": ("classification", 120), "cls_b": ("classification", 400), "cls_c": ("classification", 1500),
        "cls_d": ("classification", 4000), "seg_a": ("segmentation", 300), "seg_b": ("segmentation", 3000),
        "seg_c": ("detection", 200), "seg_d": ("detection", 2500),
    }

    def change(paradigm, task, task_type, n_train, seed):
        return 0.1 - 0.04 * math.log10(n_train) + 0.01 * math.sin(ord(task[-1]) + (paradigm == "grouped"))

    rel = relative_change(_study(tasks, change, fractions=(1.0,), seeds=(0,)))
    fit = fit_data_scale(rel, n_bootstrap=400)
    assert any("of 400 bootstrap replicates had collinear terms and were skipped" in m for m in fit.messages)
    classification = fit.crossings.filter(pl.col("task_type") == "classification")
    assert not classification["bounded"].any()
    assert classification["note"].str.contains("replicates had collinear terms, so the kept ones are not a random sample").all()


def test_own_losses_beat_thin_fit():
    """A lone regression task losing under both paradigms: its own runs decide, not the thin, all-loss model."""
    tasks = {**SPLIT_SIZES, "reg_a": ("regression", 500)}

    def change(paradigm, task, task_type, n_train, seed):
        if task == "reg_a":
            return (-0.03 if paradigm == "grouped" else -0.06) + 0.004 * (seed - 1)
        return -0.04 + 0.01 * ((seed + ord(task[-1])) % 3 - 1) + 0.004 * math.sin(n_train + ord(task[-1]))

    rel = relative_change(_study(tasks, change))
    fit = fit_data_scale(rel, n_bootstrap=0, mixed=False)
    assert fit.evidence_gaps("regression")
    advice = advise(fit, rel, task="reg_a")
    assert set(advice.predictions["verdict"]) == {"loss"}
    rec = advice.recommendations.row(0, named=True)
    assert (rec["recommendation"], rec["confidence"]) == ("task_specific", "clear")
    assert rec["reason"].startswith("this task's own runs lose under every aggregated paradigm: grouped -3.0 %")
    assert "evidence insufficient" not in rec["reason"]


def test_wide_crossing_interval_noted():
    """A bounded interval reaching beyond 10x the line's training sizes is kept but noted as poorly determined."""

    def change(paradigm, task, task_type, n_train, seed):
        return 0.05 * (math.log10(2000) - math.log10(n_train)) + spread * (ord(task[-1]) - 98.5)

    notes = {}
    for spread in (0.002, 0.01):
        fit = fit_data_scale(relative_change(_study(SPLIT_SIZES, change)), n_bootstrap=300, mixed=False)
        row = fit.crossings.filter((pl.col("paradigm") == "grouped") & (pl.col("task_type") == "classification")).row(0, named=True)
        assert row["bounded"]
        notes[spread] = (row["ci_hi"] > 10 * row["n_train_max"], row["note"])
    assert notes[0.002] == (False, "")
    assert notes[0.01] == (
        True,
        "the interval reaches more than 10 times beyond the training sizes of its line (120 to 330 images), so the "
        "crossing is poorly determined",
    )


def test_uncertain_advice_names_observed_losses():
    """Predicted changes below 0 with intervals across 0, but the task's own grouped runs lose: the reason names the loss."""

    def change(paradigm, task, task_type, n_train, seed):
        if task == "cls_d" and paradigm == "grouped":
            return -0.08 + 0.004 * (seed - 1)
        return -0.01 + 0.05 * ((seed + ord(task[-1])) % 3 - 1)

    rel = relative_change(_study(SPLIT_SIZES, change))
    rec = advise(fit_data_scale(rel, n_bootstrap=0, mixed=False), rel, task="cls_d").recommendations.row(0, named=True)
    assert rec["reason"].startswith("no aggregated paradigm has a positive predicted change, and no predicted interval excludes 0")
    assert "; this task's own runs lose under grouped -8.0 % (95 % interval" in rec["reason"]


def test_single_fraction_size_effect_is_called_confounded():
    def change(paradigm, task, task_type, n_train, seed):
        return 0.05 * (math.log10(2000) - math.log10(n_train)) + 0.002 * (seed - 1)

    single_fraction = fit_data_scale(relative_change(_study(SPLIT_SIZES, change, fractions=(1.0,))), n_bootstrap=0, mixed=False)
    assert any(w.startswith("every task has a single training size (one data fraction)") for w in single_fraction.warnings)
    several = fit_data_scale(relative_change(_study(SPLIT_SIZES, change)), n_bootstrap=0, mixed=False)
    assert not any("single training size" in w for w in several.warnings)
