"""How sure are we? Seed statistics, paired tests, bootstrap intervals, negative-transfer flags, group tests.

Per task, aggregated paradigm, metric and data fraction:

- over seeds: mean and sd of the relative change, the paired Wilcoxon signed-rank test and the paired t-test
  of aggregated against task-specific values (``scipy.stats.wilcoxon``, ``scipy.stats.ttest_rel``);
- a 95 % interval of the relative change, from the first source available:
  1. ``bootstrap_images``: a paired bootstrap over test images from per-image scores (seeds resampled too when
     there are several, so the interval covers both sources of variation). AUC is not a mean over images, so
     each replicate recomputes it from the stored per-image labels and class probabilities (``label``,
     ``prob_<c>``), as the Mann–Whitney statistic: binary AUC of class 1 for two classes, else the macro
     one-vs-rest mean over the classes present in the replicate, as ``usagg evaluate`` scores AUC;
  2. ``t_seeds``: a Student t interval of the mean over seeds (two or more seeds);
  3. none: a single seed without per-image scores has no interval, and the task is not flagged;
  0 bootstrap replicates skip the image bootstrap: the t interval is used where there are two or more seeds,
  and a comparison with per-image scores but one seed has no interval (``no_bootstrap``);
- the flag: negative transfer when the whole interval lies below 0 (``ci_hi < 0``), stored with its rule.

Task-type sensitivity: Kruskal–Wallis H across task types with the effect size
ε² = H / ((n² − 1) / (n + 1)) (Tomczak and Tomczak, 2014), and pairwise two-sided Mann–Whitney U tests with
Holm's correction (``statsmodels.stats.multitest.multipletests``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy import stats
from statsmodels.stats.multitest import multipletests

from usagg.errors import AnalysisError

FLAG_RULES = {
    "bootstrap_images": "negative transfer if the upper bound of the 95 % paired bootstrap interval over test images is below 0",
    "t_seeds": "negative transfer if the upper bound of the 95 % t interval of the mean over seeds is below 0",
    "reported": "a single reported or single-seed value has no interval; not flagged",
    "none": "no interval (one seed and no per-image scores); not flagged",
    "no_bootstrap": "no interval (0 bootstrap replicates and one seed); not flagged",
}

# Rows with equal values here are the seeds of one comparison.
# Results of different studies are never pooled: a number typed in from a publication is its own comparison.
COMPARISON_KEYS = ["study", "paradigm", "group", "task", "task_type", "clinical_group", "metric", "split", "data_fraction"]

SUMMARY_SCHEMA = {
    "n_seeds": pl.Int64,
    "mean_rel_change": pl.Float64,
    "sd_rel_change": pl.Float64,
    "wilcoxon_p": pl.Float64,
    "ttest_p": pl.Float64,
    "wilcoxon_q_bh": pl.Float64,
    "ttest_q_bh": pl.Float64,
    "ci_lo": pl.Float64,
    "ci_hi": pl.Float64,
    "ci_method": pl.String,
    "negative_transfer": pl.Boolean,
    "flag_rule": pl.String,
}


def paired_tests(value: np.ndarray, value_ts: np.ndarray) -> tuple[float, float, list[str]]:
    """Return the paired Wilcoxon and t-test p-values of ``value`` against ``value_ts`` over seeds.

    NaN when there are fewer than two pairs or every difference is 0; scipy warnings are returned, not printed.
    """
    notes: list[str] = []
    ok = np.isfinite(value) & np.isfinite(value_ts)
    value, value_ts = value[ok], value_ts[ok]
    if value.size < 2:
        return math.nan, math.nan, notes
    diff = value - value_ts
    if np.allclose(diff, 0.0) or identical(diff):
        return math.nan, math.nan, notes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wilcoxon_p = float(stats.wilcoxon(value, value_ts).pvalue)
        except ValueError as exc:
            wilcoxon_p = math.nan
            notes.append(f"Wilcoxon test not computed: {exc}")
        t_p = float(stats.ttest_rel(value, value_ts).pvalue)
    notes.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    return wilcoxon_p, t_p, notes


def identical(values: np.ndarray) -> bool:
    """Return whether two or more finite values are all equal up to rounding (e.g. one number typed in per seed)."""
    values = values[np.isfinite(values)]
    return values.size >= 2 and float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.abs(values).max()))


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Return the Student t interval of the mean of ``values``.

    NaN bounds for fewer than two values, and for identical values, whose zero-width interval would state a
    certainty that repeated copies of one number do not give.
    """
    values = values[np.isfinite(values)]
    if values.size < 2 or identical(values):
        return math.nan, math.nan
    mean = float(values.mean())
    half = float(stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return mean - half, mean + half


def paired_bootstrap_interval(
    scores_agg: np.ndarray,
    scores_ts: np.ndarray,
    higher_is_better: bool,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Return a percentile interval of the relative change from per-image scores.

    ``scores_agg`` and ``scores_ts`` have shape (seeds, images), with image k the same test image in both.
    Each replicate resamples seeds and images with replacement (the same images for both runs, so the
    comparison stays paired), then takes s · (mean_agg − mean_ts) / |mean_ts| averaged over the drawn seeds.
    NaN bounds when ``n_boot`` is 0, when there are fewer than two images, or when fewer than half the
    replicates have a finite value.
    """
    agg = np.atleast_2d(np.asarray(scores_agg, dtype=float))
    ts = np.atleast_2d(np.asarray(scores_ts, dtype=float))
    if agg.shape != ts.shape:
        raise AnalysisError(f"paired bootstrap: score arrays differ in shape {agg.shape} vs {ts.shape}")
    n_seeds, n_images = agg.shape
    if n_images < 2 or n_boot < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    sign = 1.0 if higher_is_better else -1.0
    images = rng.integers(0, n_images, size=(n_boot, n_images))
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    rel = np.zeros(n_boot)
    # A replicate that draws only NaN images has no mean; it is dropped below instead of warning.
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in range(n_seeds):
            # Column k of `seeds` is the k-th seed drawn in each replicate.
            rows = seeds[:, k]
            mean_agg = np.nanmean(np.take_along_axis(agg[rows], images, axis=1), axis=1)
            mean_ts = np.nanmean(np.take_along_axis(ts[rows], images, axis=1), axis=1)
            rel += sign * (mean_agg - mean_ts) / np.abs(mean_ts)
    return _percentile_interval(rel / n_seeds, n_boot, level)


def _percentile_interval(replicates: np.ndarray, n_boot: int, level: float) -> tuple[float, float]:
    """Return the percentile interval of the finite replicates; NaN bounds when fewer than half are finite."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0 or finite.size < n_boot // 2:
        return math.nan, math.nan
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_bootstrap_auc_interval(
    labels: np.ndarray,
    probs_agg: np.ndarray,
    probs_ts: np.ndarray,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Return a percentile interval of the relative change of AUC, resampling seeds and test images.

    ``labels`` has shape (seeds, images) and the probabilities (seeds, images, classes), image k the same test
    image in both runs. Each replicate draws images (the same for both runs) and seeds with replacement,
    recomputes both AUCs and takes (AUC_agg − AUC_ts) / AUC_ts averaged over the drawn seeds. NaN bounds as in
    :func:`paired_bootstrap_interval`; a replicate with a single class has no AUC and is dropped.
    """
    labels = np.atleast_2d(np.asarray(labels, dtype=np.int64))
    agg = np.asarray(probs_agg, dtype=float)
    ts = np.asarray(probs_ts, dtype=float)
    if agg.shape != ts.shape or agg.shape[:2] != labels.shape:
        raise AnalysisError(f"paired AUC bootstrap: shapes differ: labels {labels.shape}, {agg.shape} vs {ts.shape}")
    n_seeds, n_images = labels.shape
    if n_images < 2 or n_boot < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    images = rng.integers(0, n_images, size=(n_boot, n_images))
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    rel = np.zeros(n_boot)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(n_seeds):
            rows = seeds[:, k]
            drawn_labels = np.take_along_axis(labels[rows], images, axis=1)
            auc_agg = _auc_per_row(drawn_labels, np.take_along_axis(agg[rows], images[..., None], axis=1))
            auc_ts = _auc_per_row(drawn_labels, np.take_along_axis(ts[rows], images[..., None], axis=1))
            rel += (auc_agg - auc_ts) / np.abs(auc_ts)
    return _percentile_interval(rel / n_seeds, n_boot, level)


def _auc_per_row(labels_BN: np.ndarray, probs_BNC: np.ndarray) -> np.ndarray:
    """Return the ROC AUC of each row: binary AUC of class 1 for two classes, else the one-vs-rest macro mean.

    Hand-written because the bootstrap needs thousands of AUCs at once. Each is the Mann–Whitney statistic
    (U of the positives' mid-ranks, divided by n_pos · n_neg), which equals the area under the ROC curve with
    ties counted half. Classes absent from a row are left out of its mean; a row with one class gives NaN.
    """
    n_classes = probs_BNC.shape[2]
    classes = [1] if n_classes == 2 else range(n_classes)
    per_class = []
    for c in classes:
        positive = labels_BN == c
        n_pos = positive.sum(axis=1)
        n_neg = labels_BN.shape[1] - n_pos
        ranks = stats.rankdata(probs_BNC[..., c], axis=1)
        u = np.where(positive, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2
        per_class.append(np.where((n_pos > 0) & (n_neg > 0), u / np.maximum(n_pos * n_neg, 1), np.nan))
    stacked = np.vstack(per_class)
    if n_classes == 2:
        return stacked[0]
    # Rows whose labels hold one class give NaN for every class: the mean of an all-NaN column stays NaN.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stacked, axis=0)


@dataclass
class GroupTest:
    """A Kruskal–Wallis test across groups with its effect size and Holm-corrected pairwise Mann–Whitney tests."""

    by: str
    statistic: float
    p_value: float
    df: int
    epsilon2: float
    n: int
    groups: pl.DataFrame  # level, n, median, mean
    pairwise: pl.DataFrame  # a, b, n_a, n_b, u, p_value, p_holm, reject_holm
    warnings: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, float | int | str]:
        return {
            "by": self.by,
            "h": self.statistic,
            "df": self.df,
            "p_value": self.p_value,
            "epsilon2": self.epsilon2,
            "n": self.n,
        }


PAIRWISE_SCHEMA = {
    "a": pl.String,
    "b": pl.String,
    "n_a": pl.Int64,
    "n_b": pl.Int64,
    "u": pl.Float64,
    "p_value": pl.Float64,
    "p_holm": pl.Float64,
    "reject_holm": pl.Boolean,
}


def kruskal_by(data: pl.DataFrame, value: str = "rel_change", by: str = "task_type", alpha: float = 0.05) -> GroupTest:
    """Test whether ``value`` differs across the levels of ``by`` (one observation per row; NaNs are dropped).

    Returns NaN statistics and a warning, instead of raising, when there are fewer than two groups with data
    or every value is identical.
    """
    for column in (value, by):
        if column not in data.columns:
            raise AnalysisError(f"Kruskal–Wallis test: the table has no column {column!r}")
    clean = data.filter(pl.col(value).is_not_null() & pl.col(value).is_not_nan() & pl.col(by).is_not_null())
    samples = {
        level: clean.filter(pl.col(by) == level)[value].to_numpy()
        for level in sorted(clean[by].unique().to_list())
    }
    groups = pl.DataFrame(
        {
            "level": list(samples),
            "n": [int(v.size) for v in samples.values()],
            "median": [float(np.median(v)) for v in samples.values()],
            "mean": [float(np.mean(v)) for v in samples.values()],
        },
        schema={"level": pl.String, "n": pl.Int64, "median": pl.Float64, "mean": pl.Float64},
    )
    n = int(sum(v.size for v in samples.values()))
    notes: list[str] = []
    small = [level for level, v in samples.items() if v.size < 5]
    if small and len(samples) >= 2:
        notes.append(
            f"Kruskal–Wallis across {by}: group(s) {', '.join(small)} have fewer than 5 observations, so the "
            "chi-squared approximation of the p-value is rough"
        )
    h = p = eps = math.nan
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if len(samples) < 2:
            notes.append(f"Kruskal–Wallis across {by}: fewer than two {by} levels with data; not tested")
        else:
            try:
                result = stats.kruskal(*samples.values())
                h, p = float(result.statistic), float(result.pvalue)
                eps = h / ((n * n - 1) / (n + 1)) if n > 1 else math.nan
            except ValueError as exc:
                notes.append(f"Kruskal–Wallis across {by} not computed: {exc}")
        for (a, xa), (b, xb) in itertools.combinations(samples.items(), 2):
            try:
                mw = stats.mannwhitneyu(xa, xb, alternative="two-sided")
                u, p_ab = float(mw.statistic), float(mw.pvalue)
            except ValueError:
                u, p_ab = math.nan, math.nan
            rows.append({"a": a, "b": b, "n_a": int(xa.size), "n_b": int(xb.size), "u": u, "p_value": p_ab})
    notes.extend(f"{by} tests: {w.category.__name__}: {w.message}" for w in caught)
    pairwise = pl.DataFrame(rows, schema={k: PAIRWISE_SCHEMA[k] for k in ("a", "b", "n_a", "n_b", "u", "p_value")})
    p_holm = np.full(len(rows), math.nan)
    reject = np.zeros(len(rows), dtype=bool)
    finite = np.isfinite(pairwise["p_value"].to_numpy()) if rows else np.zeros(0, dtype=bool)
    if finite.any():
        rej, adj, _, _ = multipletests(pairwise["p_value"].to_numpy()[finite], alpha=alpha, method="holm")
        p_holm[finite] = adj
        reject[finite] = rej
    pairwise = pairwise.with_columns(pl.Series("p_holm", p_holm), pl.Series("reject_holm", reject))
    return GroupTest(
        by=by, statistic=h, p_value=p, df=max(len(samples) - 1, 0), epsilon2=eps, n=n,
        groups=groups, pairwise=pairwise, warnings=notes,
    )


def per_task_means(rel: pl.DataFrame, data_fraction: float | None = None) -> pl.DataFrame:
    """Return one row per study × paradigm × task: the mean relative change over seeds at one data fraction.

    ``data_fraction`` None takes each task's largest fraction (its full training set).
    """
    data = rel.filter(pl.col("rel_change").is_not_null() & pl.col("rel_change").is_not_nan())
    studies = ["study"] if "study" in data.columns else []
    if data_fraction is None:
        data = data.filter(pl.col("data_fraction") == pl.col("data_fraction").max().over(*studies, "paradigm", "task"))
    else:
        data = data.filter((pl.col("data_fraction") - data_fraction).abs() < 1e-9)
    return (
        data.group_by(*studies, "paradigm", "task", "task_type", "clinical_group", "metric")
        .agg(pl.col("rel_change").mean(), pl.col("n_train").mean(), pl.col("data_fraction").first(), pl.len().alias("n_seeds"))
        .sort("paradigm", "task", *studies)
    )


def task_type_sensitivity(rel: pl.DataFrame, data_fraction: float | None = None) -> dict[str, GroupTest]:
    """Run :func:`kruskal_by` across task types for each paradigm, one observation per task."""
    means = per_task_means(rel, data_fraction)
    return {
        paradigm: kruskal_by(means.filter(pl.col("paradigm") == paradigm), "rel_change", "task_type")
        for paradigm in sorted(means["paradigm"].unique().to_list())
    }


def seed_summary(
    rel: pl.DataFrame,
    per_image: pl.DataFrame | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[pl.DataFrame, list[str]]:
    """Summarise each comparison over seeds, attach its interval and the negative-transfer flag.

    ``per_image`` contains per-image scores (columns run_id, task, split, image, metric, value). A comparison
    whose runs all have per-image scores for its metric gets the image bootstrap. The others fall back as the
    module docstring describes. ``n_boot`` 0 skips the image bootstrap. Returns the table and the notes
    collected from the statistical tests.
    """
    notes: list[str] = []
    scores = _index_scores(per_image) if per_image is not None and per_image.height else {}
    rows = []
    keys = [k for k in COMPARISON_KEYS if k in rel.columns]
    for key, part in rel.sort("seed", nulls_last=True).group_by(keys, maintain_order=True):
        info = dict(zip(keys, key))
        value = part["value"].to_numpy().astype(float)
        value_ts = part["value_ts"].to_numpy().astype(float)
        change = part["rel_change"].to_numpy().astype(float)
        change = np.where(np.isfinite(change), change, np.nan)
        finite = change[np.isfinite(change)]
        wilcoxon_p, t_p, test_notes = paired_tests(value, value_ts)
        for note in test_notes:
            notes.append(f"{info['paradigm']}/{info['task']}/{info['metric']}: {note}")

        higher = bool(part["higher_is_better"][0])
        ci_lo = ci_hi = math.nan
        method = "none"
        # AUC is resampled from per-image labels and probabilities. A table that gives per-image values under
        # the metric's own name, as for Dice, is bootstrapped like any other mean.
        matrices = _auc_inputs(scores, part, info) if scores and info["metric"] == "auc" else None
        from_probabilities = matrices is not None
        if matrices is None and scores:
            matrices = _score_matrices(scores, part, info)
        if matrices is not None and n_boot < 1:
            method = "no_bootstrap"
        elif matrices is not None:
            if from_probabilities:
                ci_lo, ci_hi = paired_bootstrap_auc_interval(*matrices, n_boot=n_boot, level=level, seed=seed)
            else:
                ci_lo, ci_hi = paired_bootstrap_interval(matrices[0], matrices[1], higher, n_boot, level, seed)
            method = "bootstrap_images" if math.isfinite(ci_lo) else "none"
        if method in ("none", "no_bootstrap") and finite.size >= 2:
            if identical(finite):
                notes.append(
                    f"{info['paradigm']}/{info['task']}/{info['metric']}: its {finite.size} seeds have the same "
                    f"relative change ({100 * finite[0]:+.2f} %), so they give no t interval and no flag; if one "
                    "number was copied to every seed, give it once with an empty seed"
                )
            else:
                ci_lo, ci_hi = t_interval(finite, level)
                method = "t_seeds"
        if method == "none" and "source" in part.columns and str(part["source"][0]).startswith("reported:"):
            method = "reported"
        flagged = bool(ci_hi < 0) if math.isfinite(ci_hi) else None
        rows.append(
            {
                **info,
                "n_train": float(part["n_train"].mean()) if part["n_train"].null_count() < part.height else None,
                "n_seeds": int(finite.size),
                "mean_rel_change": float(finite.mean()) if finite.size else math.nan,
                "sd_rel_change": float(finite.std(ddof=1)) if finite.size >= 2 else math.nan,
                "wilcoxon_p": wilcoxon_p,
                "ttest_p": t_p,
                "wilcoxon_q_bh": math.nan,
                "ttest_q_bh": math.nan,
                "ci_lo": ci_lo,
                "ci_hi": ci_hi,
                "ci_method": method,
                "negative_transfer": flagged,
                "flag_rule": FLAG_RULES[method],
            }
        )
    schema = {k: rel.schema[k] for k in keys}
    schema["n_train"] = pl.Float64
    schema.update(SUMMARY_SCHEMA)
    return _adjust_for_many(pl.DataFrame(rows, schema=schema)), notes


def _adjust_for_many(summary: pl.DataFrame) -> pl.DataFrame:
    """Fill the Benjamini–Hochberg adjusted p-values of the seed tests, over all comparisons of a study and split.

    Benjamini and Hochberg (JRSS B 1995) control the false discovery rate among the comparisons called
    significant; ``statsmodels.stats.multitest.multipletests`` with ``fdr_bh``. Comparisons without a p-value
    stay NaN and do not count in the family.
    """
    if summary.is_empty():
        return summary
    family_keys = [k for k in ("study", "split") if k in summary.columns] or [pl.lit(0)]
    parts = []
    for _, part in summary.with_row_index("_row").group_by(family_keys, maintain_order=True):
        adjusted = {}
        for column, target in (("wilcoxon_p", "wilcoxon_q_bh"), ("ttest_p", "ttest_q_bh")):
            values = part[column].to_numpy().astype(float)
            q = np.full(values.shape, np.nan)
            finite = np.isfinite(values)
            if finite.any():
                q[finite] = multipletests(values[finite], method="fdr_bh")[1]
            adjusted[target] = q
        parts.append(part.with_columns(*(pl.Series(name, values) for name, values in adjusted.items())))
    return pl.concat(parts).sort("_row").drop("_row")


def _index_scores(per_image: pl.DataFrame) -> dict[tuple[str, str, str, str], pl.DataFrame]:
    needed = {"run_id", "task", "split", "image", "metric", "value"}
    missing = needed - set(per_image.columns)
    if missing:
        raise AnalysisError(f"per-image scores: missing column(s) {', '.join(sorted(missing))}")
    index = {}
    for key, part in per_image.group_by("run_id", "task", "split", "metric"):
        index[tuple(str(k) for k in key)] = part.select(pl.col("image").cast(pl.String), pl.col("value").cast(pl.Float64))
    return index


def _score_matrices(
    scores: dict[tuple[str, str, str, str], pl.DataFrame], part: pl.DataFrame, info: dict
) -> tuple[np.ndarray, np.ndarray] | None:
    """Align per-image scores of the aggregated and task-specific runs of each seed on common images."""
    agg_rows, ts_rows = [], []
    common: set[str] | None = None
    pairs = []
    for run_id, run_id_ts in part.select("run_id", "run_id_ts").iter_rows():
        a = scores.get((str(run_id), info["task"], info["split"], info["metric"]))
        b = scores.get((str(run_id_ts), info["task"], info["split"], info["metric"]))
        if a is None or b is None:
            return None
        pairs.append((a, b))
        images = set(a["image"].to_list()) & set(b["image"].to_list())
        common = images if common is None else common & images
    if not common or len(common) < 2:
        return None
    order = sorted(common)
    for a, b in pairs:
        agg_rows.append(_aligned(a, order))
        ts_rows.append(_aligned(b, order))
    return np.vstack(agg_rows), np.vstack(ts_rows)


def _auc_inputs(
    scores: dict[tuple[str, str, str, str], pl.DataFrame], part: pl.DataFrame, info: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Return labels (seeds, images) and class probabilities (seeds, images, classes) of both runs for an AUC
    comparison, on the images every run scored; None when a run lacks its per-image labels or probabilities."""
    first_run = str(part["run_id_ts"][0])
    prob_metrics = []
    while (first_run, info["task"], info["split"], f"prob_{len(prob_metrics)}") in scores:
        prob_metrics.append(f"prob_{len(prob_metrics)}")
    if len(prob_metrics) < 2:
        return None

    runs = []
    common: set[str] | None = None
    for run_id, run_id_ts in part.select("run_id", "run_id_ts").iter_rows():
        frames = {}
        for role, run in (("agg", run_id), ("ts", run_id_ts)):
            for metric in ["label", *prob_metrics]:
                frame = scores.get((str(run), info["task"], info["split"], metric))
                if frame is None:
                    return None
                frames[role, metric] = frame
                images = set(frame["image"].to_list())
                common = images if common is None else common & images
        runs.append(frames)
    if not common or len(common) < 2:
        return None

    order = sorted(common)
    labels, probs_agg, probs_ts = [], [], []
    for frames in runs:
        labels.append(_aligned(frames["ts", "label"], order))
        probs_agg.append(np.stack([_aligned(frames["agg", m], order) for m in prob_metrics], axis=-1))
        probs_ts.append(np.stack([_aligned(frames["ts", m], order) for m in prob_metrics], axis=-1))
    return np.vstack(labels).astype(np.int64), np.stack(probs_agg), np.stack(probs_ts)


def _aligned(frame: pl.DataFrame, order: Sequence[str]) -> np.ndarray:
    lookup = dict(zip(frame["image"].to_list(), frame["value"].to_list()))
    return np.array([lookup[image] for image in order], dtype=float)
