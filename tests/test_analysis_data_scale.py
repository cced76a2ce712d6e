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
from usagg.errors import AnalysisError


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
    assert fit.n == noisy_rel.height - noisy_rel.filter(pl.col("task") == "task00").height
    assert any("NaN relative change" in m for m in fit.messages)


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
    assert small.endswith("add tasks, data fractions or seeds")
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
        assert row["note"].startswith("too few tasks to resample: the bootstrap can draw only 1 distinct set")


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
    assert "only 1 distinct set(s) of tasks (tasks per type: classification 1, segmentation 1; 10 needed)" in reason


def test_distinct_resamples_known_values():
    # C(2n - 1, n) multisets per type. Types are resampled independently, so their counts multiply.
    assert [distinct_resamples({"a": n}, "log10_n", "a") for n in (1, 2, 3, 4)] == [1, 3, 10, 35]
    assert distinct_resamples({"a": 2, "b": 3}, "log10_n + C(task_type)", "a") == 30
    assert distinct_resamples({"a": 2, "b": 3}, "log10_n * C(task_type)", "a") == 3


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
