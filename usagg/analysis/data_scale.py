"""Is negative transfer a matter of data scale or of task type? Regressions of relative change on training size.

The main model is ordinary least squares with HC3 heteroscedasticity-consistent errors (MacKinnon and White,
1985) on ``log10_n = log10(n_train)``::

    rel_change ~ log10_n * C(task_type) * C(paradigm)

so every paradigm × task type cell has its own intercept and slope. When a table is too small for it, simpler
models are tried in order (see ``FORMULA_LADDER``), and the reason is stored in the fit's messages. With
repeated measures of a task (several seeds or data fractions) a linear mixed model with a random intercept per
task (statsmodels ``mixedlm``) is fitted with the same fixed effects. The training size at which the predicted
change crosses zero gets a bootstrap interval from resampling tasks within task types (a cluster bootstrap, so
the seeds and fractions of a task stay together).

A fit with few residual degrees of freedom (``MIN_RESID_DF``) or too few tasks to resample
(``MIN_DISTINCT_RESAMPLES``) is flagged: its crossing intervals are not reported as bounded, and
:func:`usagg.analysis.advise.advise` labels its recommendations as resting on insufficient evidence.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import patsy
import polars as pl
from scipy import stats
from statsmodels.regression.linear_model import OLS
from statsmodels.regression.mixed_linear_model import MixedLM

from usagg.errors import AnalysisError

RESPONSE = "rel_change"

# Fixed-effect models from the richest to the simplest; the first one the data can estimate is used.
FORMULA_LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("log10_n * C(task_type) * C(paradigm)", ("log10_n", "task_type", "paradigm")),
    ("log10_n * (C(task_type) + C(paradigm))", ("log10_n", "task_type", "paradigm")),
    ("log10_n * C(task_type)", ("log10_n", "task_type")),
    ("log10_n * C(paradigm)", ("log10_n", "paradigm")),
    ("log10_n + C(task_type) + C(paradigm)", ("log10_n", "task_type", "paradigm")),
    ("log10_n + C(task_type)", ("log10_n", "task_type")),
    ("log10_n + C(paradigm)", ("log10_n", "paradigm")),
    ("log10_n", ("log10_n",)),
    ("C(task_type) + C(paradigm)", ("task_type", "paradigm")),
    ("C(paradigm)", ("paradigm",)),
    ("C(task_type)", ("task_type",)),
    ("1", ()),
)

# With few residual degrees of freedom the HC3 variance rests on a few residuals with large leverage corrections,
# so p-values and intervals are unreliable. Below this rule-of-thumb bound the fit gets a small-sample warning,
# and no recommendation from it is labelled clear.
MIN_RESID_DF = 10

# Crossings beyond this many training images are reported as inf: no study is that large, and such a value only
# shows that the fitted line is nearly flat.
MAX_CROSSING_IMAGES = 1e12
# A bounded crossing interval reaching this many times below the smallest or above the largest training size of
# its line is noted as poorly determined: the data constrain the crossing only near the sizes observed.
WIDE_CROSSING_FACTOR = 10.0

# Resampling the n tasks of a task type with replacement gives C(2n − 1, n) distinct sets: 1, 3 and 10 for
# n = 1, 2 and 3. With fewer than 10 the percentile interval is a few repeated values (zero width for one task
# per type), so it is not reported as bounded.
MIN_DISTINCT_RESAMPLES = 10

COEF_COLUMNS = {
    "model": pl.String,
    "term": pl.String,
    "coef": pl.Float64,
    "se": pl.Float64,
    "ci_lo": pl.Float64,
    "ci_hi": pl.Float64,
    "p_value": pl.Float64,
}

CROSSING_COLUMNS = {
    "paradigm": pl.String,
    "task_type": pl.String,
    "intercept": pl.Float64,
    "slope_per_log10": pl.Float64,
    "n_train_cross": pl.Float64,
    "ci_lo": pl.Float64,
    "ci_hi": pl.Float64,
    "share_defined": pl.Float64,
    "bounded": pl.Boolean,
    "n_train_min": pl.Float64,
    "n_train_max": pl.Float64,
    "within_data_range": pl.Boolean,
    "note": pl.String,
}


@dataclass
class DataScaleFit:
    """A fitted data-scale model with its coefficient table, zero crossings and collected warnings."""

    formula: str
    design_info: Any  # patsy DesignInfo that builds design rows for new data
    ols: Any  # statsmodels RegressionResultsWrapper (HC3 covariance)
    mixed: Any | None  # statsmodels MixedLMResults, or None when not fitted
    table: pl.DataFrame  # one row per model × term (COEF_COLUMNS)
    crossings: pl.DataFrame  # one row per paradigm × task type (CROSSING_COLUMNS)
    data: pl.DataFrame  # the observations used: task, task_type, paradigm, n_train, log10_n, rel_change, ...
    r2: float
    r2_adj: float
    n: int
    n_tasks: int
    warnings: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    levels: dict[str, list[str]] = field(default_factory=dict)
    n_bootstrap: int = 0
    tasks_per_type: dict[str, int] = field(default_factory=dict)

    @property
    def uses(self) -> tuple[str, ...]:
        """Regressors in the fitted formula: a subset of log10_n, task_type, paradigm."""
        return formula_uses(self.formula)

    def distinct_resamples(self, task_type: str) -> int:
        """Return how many distinct sets of tasks the cluster bootstrap can draw for ``task_type``'s predictions."""
        return distinct_resamples(self.tasks_per_type, self.formula, task_type)

    def evidence_gaps(self, task_type: str) -> list[str]:
        """Return the reasons the fit is too thin for a clear statement about ``task_type`` (empty if none).

        Each reason ends with its own remedy: more rows of any kind raise the residual degrees of freedom, but
        only more tasks raise the number of distinct bootstrap resamples.
        """
        gaps = []
        df_resid = int(self.ols.df_resid)
        if df_resid < MIN_RESID_DF:
            gaps.append(
                f"the model has {df_resid} residual degree(s) of freedom (fewer than {MIN_RESID_DF}); "
                "add tasks or data fractions (seeds are averaged, so more seeds do not add any)"
            )
        shortfall = resample_shortfall(self.tasks_per_type, self.formula, task_type)
        if shortfall is not None:
            gaps.append(shortfall)
        return gaps

    def _frame(self, n_train: Any, task_type: Any, paradigm: Any) -> pd.DataFrame:
        n = np.atleast_1d(np.asarray(n_train, dtype=float))
        if np.any(~np.isfinite(n)) or np.any(n <= 0):
            raise AnalysisError(f"predict: training sizes must be positive numbers, got {n_train!r}")
        types = np.broadcast_to(np.asarray(task_type, dtype=object), n.shape)
        pars = np.broadcast_to(np.asarray(paradigm, dtype=object), n.shape)
        for name, values in (("task_type", types), ("paradigm", pars)):
            if name in self.uses:
                unseen = sorted(set(values) - set(self.levels[name]))
                if unseen:
                    raise AnalysisError(
                        f"predict: {name} {', '.join(map(str, unseen))} was not in the fitted data "
                        f"(known: {', '.join(self.levels[name])}); the model cannot extrapolate to it"
                    )
        return pd.DataFrame({"log10_n": np.log10(n), "task_type": types, "paradigm": pars})

    def predict(self, n_train: Any, task_type: Any, paradigm: Any, alpha: float = 0.05) -> tuple[Any, Any, Any]:
        """Return the predicted relative change and its (1 − alpha) confidence interval (HC3 covariance).

        Scalars in give floats out; array-likes give numpy arrays.
        """
        frame = self._frame(n_train, task_type, paradigm)
        frame[RESPONSE] = 0.0
        (exog,) = patsy.build_design_matrices([self.design_info], frame, return_type="dataframe")
        x = np.asarray(exog, dtype=float)
        mean = x @ np.asarray(self.ols.params, dtype=float)
        # x' V x of a cell the model fits exactly can come out a rounding error below 0; it is 0.
        variance = np.maximum(np.einsum("ij,jk,ik->i", x, np.asarray(self.ols.cov_params(), dtype=float), x), 0.0)
        quantile = stats.t.ppf(1 - alpha / 2, self.ols.df_resid) if self.ols.use_t else stats.norm.ppf(1 - alpha / 2)
        lo = mean - quantile * np.sqrt(variance)
        hi = mean + quantile * np.sqrt(variance)
        if np.ndim(n_train) == 0:
            return float(mean[0]), float(lo[0]), float(hi[0])
        return mean, lo, hi

    def summary(self) -> dict[str, Any]:
        """Key numbers as plain Python values (for JSON)."""
        return {
            "formula": f"{RESPONSE} ~ {self.formula}",
            "covariance": "HC3",
            "r2": self.r2,
            "r2_adj": self.r2_adj,
            "n": self.n,
            "n_tasks": self.n_tasks,
            "mixed_model": self.mixed is not None,
            "n_bootstrap": self.n_bootstrap,
            "tasks_per_type": dict(self.tasks_per_type),
            "messages": list(self.messages),
            "warnings": list(self.warnings),
        }


def formula_uses(formula: str) -> tuple[str, ...]:
    """Return the regressors of a formula of ``FORMULA_LADDER``: a subset of log10_n, task_type, paradigm."""
    return next((used for candidate, used in FORMULA_LADDER if candidate == formula), ())


def _resamples_of(n_tasks: int) -> int:
    """Return C(2n − 1, n), the number of distinct multisets from resampling n tasks with replacement."""
    return math.comb(2 * n_tasks - 1, n_tasks) if n_tasks > 0 else 1


def _tasks_needed() -> int:
    """Return the smallest number of tasks of a type whose resamples reach ``MIN_DISTINCT_RESAMPLES``."""
    n = 1
    while _resamples_of(n) < MIN_DISTINCT_RESAMPLES:
        n += 1
    return n


def _resampled_types(tasks_per_type: dict[str, int], formula: str, task_type: str) -> list[str]:
    """Return the task types whose resampled tasks set ``task_type``'s own coefficients.

    With a task-type term in the formula, a type's offset (and, with an interaction, its slope) is estimated
    from that type's tasks alone, so only their resamples vary it. Without one, every type shares one line,
    fitted to the tasks of all types.
    """
    return [task_type] if "task_type" in formula_uses(formula) else sorted(tasks_per_type)


def distinct_resamples(tasks_per_type: dict[str, int], formula: str, task_type: str) -> int:
    """Return the number of distinct task sets that resampling within task types can give ``task_type``'s fit.

    Resampling n tasks with replacement gives C(2n − 1, n) distinct multisets. With a task-type term in the
    formula this is the count of ``task_type``'s own tasks. Without one, the types are resampled independently
    for one shared line, so the counts of all types multiply.
    """
    count = 1
    for name in _resampled_types(tasks_per_type, formula, task_type):
        count *= _resamples_of(tasks_per_type.get(name, 0))
    return count


def resample_shortfall(tasks_per_type: dict[str, int], formula: str, task_type: str) -> str | None:
    """Return a sentence naming the task type(s) with too few tasks for ``task_type``'s bootstrap, or None."""
    count = distinct_resamples(tasks_per_type, formula, task_type)
    if count >= MIN_DISTINCT_RESAMPLES:
        return None
    needed = f"{MIN_DISTINCT_RESAMPLES} needed, which takes {_tasks_needed()} tasks of a type"
    if "task_type" in formula_uses(formula):
        n = tasks_per_type.get(task_type, 0)
        return (
            f"task type {task_type} has {n} task(s), which the bootstrap can resample into only {count} distinct "
            f"set(s) ({needed}); add tasks of type {task_type}"
        )
    types = sorted(tasks_per_type)
    per_type = ", ".join(
        f"{t} {tasks_per_type[t]} task(s), {_resamples_of(tasks_per_type[t])} set(s)" for t in types
    )
    return (
        "the model has no task-type term, so every type's prediction rests on the tasks of all types, which the "
        f"bootstrap resamples within each type into only {count} distinct set(s) in all ({per_type}; {needed}); "
        f"add tasks of type {' or '.join(types)}"
    )


def prepare_observations(rel: pl.DataFrame, split: str | None = None) -> tuple[pl.DataFrame, list[str]]:
    """Select the rows a data-scale model can use and return them with messages about what was dropped."""
    messages: list[str] = []
    needed = ["task", "task_type", "paradigm", "n_train", "rel_change", "metric", "split"]
    missing = [c for c in needed if c not in rel.columns]
    if missing:
        raise AnalysisError(f"data-scale analysis: the relative-change table has no column(s) {', '.join(missing)}")
    data = rel
    splits = sorted(set(data["split"].drop_nulls()))
    if split is None and len(splits) > 1:
        split = "test" if "test" in splits else splits[0]
        messages.append(f"the table has splits {', '.join(splits)}; the {split} split is used")
    if split is not None:
        data = data.filter(pl.col("split") == split)

    per_task = data.group_by("task").agg(pl.col("metric").n_unique().alias("n"))
    if per_task.height and per_task["n"].max() > 1:
        several = per_task.filter(pl.col("n") > 1)["task"].to_list()
        raise AnalysisError(
            f"data-scale analysis needs one metric per task, but {', '.join(sorted(several)[:5])} have several; "
            "compute the relative change without --all-metrics"
        )

    bad_n = data.filter(pl.col("n_train").is_null() | (pl.col("n_train") <= 0))
    if bad_n.height:
        messages.append(
            f"{bad_n.height} row(s) have no positive n_train (e.g. task {bad_n['task'][0]!r}) and are left out"
        )
    nan_rel = data.filter(pl.col("rel_change").is_null() | pl.col("rel_change").is_nan())
    if nan_rel.height:
        messages.append(f"{nan_rel.height} row(s) have a NaN relative change and are left out")
    data = data.filter(
        pl.col("n_train").is_not_null()
        & (pl.col("n_train") > 0)
        & pl.col("rel_change").is_not_null()
        & pl.col("rel_change").is_not_nan()
    ).with_columns(pl.col("n_train").cast(pl.Float64).log10().alias("log10_n"))
    return data, messages


def _design(formula: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Build the design matrix of ``formula`` with patsy (the formula language of statsmodels' formula API).

    Building it here rather than through ``statsmodels.formula.api`` keeps the column names and the
    ``design_info`` used for new rows the same whichever formula engine statsmodels is configured with.
    """
    _, design = patsy.dmatrices(f"{RESPONSE} ~ {formula}", frame, return_type="dataframe")
    return design


def _estimability(formula: str, frame: pd.DataFrame) -> tuple[str | None, Any]:
    """Return (None, design) if ``formula`` can be fitted with HC3 errors, else (reason, None)."""
    design = _design(formula, frame)
    n, p = design.shape
    if n - p < 1:
        return f"{n} observations for {p} coefficients leave no residual degrees of freedom", None
    rank = np.linalg.matrix_rank(np.asarray(design))
    if rank < p:
        return f"collinear terms (design rank {rank} < {p} coefficients, e.g. a cell with one training size)", None
    # HC3 divides each squared residual by (1 - h_ii)^2, which needs every leverage below 1.
    q, _ = np.linalg.qr(np.asarray(design))
    leverage = np.sum(q * q, axis=1)
    if np.max(leverage) > 1 - 1e-8:
        return "an observation has leverage 1 (a cell with a single observation), so HC3 errors are undefined", None
    return None, design


def _choose_formula(frame: pd.DataFrame, messages: list[str]) -> tuple[str, Any]:
    constant = []
    if frame["log10_n"].nunique() < 2:
        constant.append("log10_n (every row has the same training size)")
    if frame["task_type"].nunique() < 2:
        constant.append(f"task_type (only {frame['task_type'].iloc[0]!r})")
    if frame["paradigm"].nunique() < 2:
        constant.append(f"paradigm (only {frame['paradigm'].iloc[0]!r})")
    if constant:
        messages.append("constant regressor(s) left out: " + "; ".join(constant))
    usable = {name for name in ("log10_n", "task_type", "paradigm") if not any(c.startswith(name) for c in constant)}
    full = FORMULA_LADDER[0][0]
    for formula, used in FORMULA_LADDER:
        if not set(used) <= usable:
            continue
        reason, design = _estimability(formula, frame)
        if reason is None:
            if formula != full:
                messages.append(f"fitted the simpler model {RESPONSE} ~ {formula}")
            return formula, design
        messages.append(f"model {RESPONSE} ~ {formula} not fitted: {reason}")
    raise AnalysisError(
        f"data-scale analysis: {len(frame)} observation(s) are too few for any model, even a mean; "
        "at least two aggregated results with a finite relative change are needed"
    )


def _coef_table(result: Any, model: str, names: list[str] | None = None) -> pl.DataFrame:
    params = np.asarray(result.params, dtype=float)
    names = names or list(result.params.index)
    k = len(names)
    ci = np.asarray(result.conf_int(), dtype=float)[:k]
    return pl.DataFrame(
        {
            "model": [model] * k,
            "term": names,
            "coef": params[:k],
            "se": np.asarray(result.bse, dtype=float)[:k],
            "ci_lo": ci[:, 0],
            "ci_hi": ci[:, 1],
            "p_value": np.asarray(result.pvalues, dtype=float)[:k],
        },
        schema=COEF_COLUMNS,
    )


def _cell_rows(design_info: Any, paradigms: list[str], task_types: list[str], x: float) -> np.ndarray:
    grid = pd.DataFrame(
        [{"log10_n": x, "task_type": t, "paradigm": p, RESPONSE: 0.0} for p in paradigms for t in task_types]
    )
    (matrix,) = patsy.build_design_matrices([design_info], grid, return_type="matrix")
    return np.asarray(matrix)


def _cluster_bootstrap(
    frame: pd.DataFrame, design: np.ndarray, y: np.ndarray, n_boot: int, seed: int
) -> tuple[np.ndarray, int]:
    """Refit least squares on tasks resampled with replacement within task types; return the coefficient draws.

    A replicate's normal equations are a weighted sum of per-task Gram matrices (weight = times the task was
    drawn), so every replicate is solved at once from the (tasks × p × p) stack instead of refitting on rows.
    Replicates whose design is (near) singular, e.g. a cell whose tasks all share one training size, are skipped.
    """
    rng = np.random.default_rng(seed)
    p = design.shape[1]
    task_ids = frame["task"].to_numpy()
    tasks = sorted(set(task_ids))
    gram = np.stack([design[task_ids == t].T @ design[task_ids == t] for t in tasks])  # (T, p, p)
    cross = np.stack([design[task_ids == t].T @ y[task_ids == t] for t in tasks])  # (T, p)
    type_of = frame.groupby("task", sort=True)["task_type"].first()
    counts = np.zeros((n_boot, len(tasks)))
    for task_type in sorted(set(type_of)):
        members = np.array([k for k, t in enumerate(tasks) if type_of[t] == task_type])
        draws = rng.integers(0, members.size, size=(n_boot, members.size))
        counts[:, members] += (draws[:, :, None] == np.arange(members.size)).sum(axis=1)
    xtx = np.einsum("bt,tij->bij", counts, gram)
    xty = counts @ cross
    eig = np.linalg.eigvalsh(xtx)
    # Singular values of X are the square roots of these eigenvalues; a ratio below 1e-6 marks collinearity.
    ok = eig[:, 0] > 1e-12 * np.maximum(eig[:, -1], 1e-300)
    draws_beta = []
    for k in np.flatnonzero(ok):
        try:
            draws_beta.append(np.linalg.solve(xtx[k], xty[k]))
        except np.linalg.LinAlgError:
            ok[k] = False
    return (np.array(draws_beta) if draws_beta else np.empty((0, p))), int((~ok).sum())


def _crossings(
    fit_formula: str,
    ols: Any,
    frame: pd.DataFrame,
    design: pd.DataFrame,
    n_boot: int,
    seed: int,
    messages: list[str],
) -> tuple[pl.DataFrame, int]:
    if "log10_n" not in fit_formula:
        messages.append("no zero crossing: the fitted model has no training-size term")
        return pl.DataFrame(schema=CROSSING_COLUMNS), 0
    paradigms = sorted(frame["paradigm"].unique())
    task_types = sorted(frame["task_type"].unique())
    design_info = design.design_info
    x0 = _cell_rows(design_info, paradigms, task_types, 0.0)
    x1 = _cell_rows(design_info, paradigms, task_types, 1.0)
    beta = np.asarray(ols.params, dtype=float)
    intercept = x0 @ beta
    slope = (x1 - x0) @ beta
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = -intercept / slope

    y = frame[RESPONSE].to_numpy(dtype=float)
    if n_boot > 0:
        draws, rejected = _cluster_bootstrap(frame, design.to_numpy(dtype=float), y, n_boot, seed)
    else:
        draws, rejected = np.empty((0, len(beta))), 0
    if rejected:
        messages.append(f"{rejected} of {n_boot} bootstrap replicates had collinear terms and were skipped")
    tasks_per_type = _tasks_per_type(frame)
    # A crossing is within the data when it lies inside the training sizes its line was fitted to in this
    # paradigm: the paradigm × task type cell, or the whole paradigm when the formula gives all types one line.
    # The data-scale figure draws each line over the same sizes.
    per_type = "task_type" in formula_uses(fit_formula)
    cell_keys = ["paradigm", "task_type"] if per_type else ["paradigm"]
    size_range = frame.groupby(cell_keys)["n_train"].agg(["min", "max"])
    observed = set(zip(frame["paradigm"], frame["task_type"]))
    rows = []
    for k, (par, ttype) in enumerate((p, t) for p in paradigms for t in task_types):
        if (par, ttype) not in observed:
            continue
        note = ""
        ci_lo = ci_hi = math.nan
        share = math.nan
        bounded = False
        if len(draws):
            b_int = draws @ x0[k]
            b_slope = draws @ (x1[k] - x0[k])
            same_sign = np.sign(b_slope) == np.sign(slope[k])
            share = float(np.mean(same_sign))
            if same_sign.sum() >= 2:
                b_cross = -b_int[same_sign] / b_slope[same_sign]
                # A nearly flat replicate puts its crossing at an absurd size; beyond MAX_CROSSING_IMAGES it is inf.
                with np.errstate(over="ignore"):
                    ci_lo, ci_hi = (10.0 ** np.percentile(b_cross, [2.5, 97.5])).tolist()
                ci_lo, ci_hi = (v if v <= MAX_CROSSING_IMAGES else math.inf for v in (ci_lo, ci_hi))
            # A slope whose sign flips in more than 5 % of replicates has no bounded crossing interval.
            bounded = share >= 0.95
            if not bounded:
                note = "slope sign uncertain: the interval is not bounded"
            if rejected > n_boot / 2:
                # The replicates kept are those whose resampled tasks span every cell: not a random subset.
                bounded = False
                note = f"{rejected} of {n_boot} replicates had collinear terms, so the kept ones are not a random sample; the interval is not bounded"
            shortfall = resample_shortfall(tasks_per_type, fit_formula, ttype)
            if shortfall is not None:
                ci_lo = ci_hi = math.nan
                bounded = False
                note = f"too few tasks to resample: {shortfall}; no interval"
        elif n_boot < 1:
            note = "no bootstrap interval (0 bootstrap replicates)"
        else:
            note = "no bootstrap interval: every replicate had collinear terms"
        if not np.isfinite(cross[k]) or slope[k] == 0:
            n_cross = math.nan
            note = "flat prediction: no crossing"
        else:
            n_cross = float(10 ** cross[k]) if cross[k] < math.log10(MAX_CROSSING_IMAGES) else math.inf
        n_min, n_max = (float(v) for v in size_range.loc[(par, ttype) if per_type else par])
        within = bool(np.isfinite(cross[k]) and np.log10(n_min) <= cross[k] <= np.log10(n_max))
        if bounded and (ci_lo < n_min / WIDE_CROSSING_FACTOR or ci_hi > n_max * WIDE_CROSSING_FACTOR):
            note = (
                f"the interval reaches more than {WIDE_CROSSING_FACTOR:g} times beyond the training sizes of its line "
                f"({n_min:.0f} to {n_max:.0f} images), so the crossing is poorly determined"
            )
        rows.append(
            {
                "paradigm": par,
                "task_type": ttype,
                "intercept": float(intercept[k]),
                "slope_per_log10": float(slope[k]),
                "n_train_cross": n_cross,
                "ci_lo": ci_lo,
                "ci_hi": ci_hi,
                "share_defined": share,
                "bounded": bounded,
                "n_train_min": n_min,
                "n_train_max": n_max,
                "within_data_range": within,
                "note": note,
            }
        )
    return pl.DataFrame(rows, schema=CROSSING_COLUMNS), len(draws)


def _tasks_per_type(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame.groupby("task_type")["task"].nunique().items()}


def _seed_means(rows: pd.DataFrame, messages: list[str]) -> pd.DataFrame:
    """Average the relative change over seeds within task × paradigm × training size.

    Seeds of one task at one training size are replicates of one design point, not independent tasks: counted
    one by one, they would narrow the HC3 intervals and add residual degrees of freedom without adding a task.
    """
    keys = ["task", "task_type", "paradigm", "n_train", "log10_n"]
    frame = rows.groupby(keys, as_index=False, sort=False)[RESPONSE].mean()
    if len(frame) < len(rows):
        messages.append(
            f"relative changes averaged over seeds: {len(rows)} rows give {len(frame)} observations "
            "(one per task, paradigm and training size)"
        )
    return frame


def _has_repeated_measures(frame: pd.DataFrame) -> bool:
    return bool(frame.groupby(["paradigm", "task"]).size().max() > 1)


def fit_data_scale(
    rel: pl.DataFrame,
    split: str | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    mixed: bool | None = None,
) -> DataScaleFit:
    """Fit relative change against log10(training images) with task type and paradigm (see module docstring).

    ``rel`` is the output of :func:`usagg.analysis.relative.relative_change` with one metric per task.
    ``mixed`` None fits the mixed model when a task has repeated measures within a paradigm. Warnings raised by
    statsmodels or numpy while fitting are collected in ``DataScaleFit.warnings``, not printed.
    """
    data, messages = prepare_observations(rel, split)
    if data.height == 0:
        raise AnalysisError(
            "data-scale analysis: no aggregated result with a positive n_train and a finite relative change; "
            "the model needs each task's training-image count in the n_train column (numbers typed in from a "
            "publication often lack it)"
        )
    rows = data.select("task", "task_type", "paradigm", "n_train", "log10_n", RESPONSE).to_pandas()
    frame = _seed_means(rows, messages)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        formula, design = _choose_formula(frame, messages)
        y = frame[RESPONSE].astype(float)
        ols = OLS(y, design).fit(cov_type="HC3")
        table = _coef_table(ols, "ols_hc3")
        crossings, n_draws = _crossings(formula, ols, frame, design, n_bootstrap, seed, messages)

        mixed_result = None
        want_mixed = _has_repeated_measures(rows) if mixed is None else mixed
        if want_mixed and rows["task"].nunique() >= 3:
            try:
                # The mixed model is fitted on every seed's row, because its random intercept absorbs what the rows
                # of one task share.
                (row_design,) = patsy.build_design_matrices([design.design_info], rows, return_type="dataframe")
                model = MixedLM(rows[RESPONSE].astype(float), row_design, groups=rows["task"].to_numpy())
                mixed_result = model.fit(reml=True)
                names = list(mixed_result.fe_params.index)
                table = pl.concat([table, _coef_table(mixed_result, "mixedlm_task_intercept", names)])
                var_row = pl.DataFrame(
                    {
                        "model": ["mixedlm_task_intercept"],
                        "term": ["task random-intercept variance"],
                        "coef": [float(np.asarray(mixed_result.cov_re)[0, 0])],
                        "se": [math.nan],
                        "ci_lo": [math.nan],
                        "ci_hi": [math.nan],
                        "p_value": [math.nan],
                    },
                    schema=COEF_COLUMNS,
                )
                table = pl.concat([table, var_row])
            except (np.linalg.LinAlgError, ValueError) as exc:
                messages.append(f"mixed model with a random intercept per task not fitted: {exc}")
        elif want_mixed:
            messages.append("mixed model not fitted: fewer than 3 tasks")
    for record in records:
        text = f"{record.category.__name__}: {record.message}"
        if text not in caught:
            caught.append(text)
    if ols.df_resid < MIN_RESID_DF:
        caught.append(
            f"small sample: the model rel_change ~ {formula} has {int(ols.df_resid)} residual degree(s) of freedom "
            f"(fewer than {MIN_RESID_DF}), so its R², p-values and intervals are unreliable and no recommendation "
            "from it is labelled clear; add tasks or data fractions (seeds are averaged first)"
        )
    if frame.groupby("task")["n_train"].nunique().max() <= 1:
        caught.append(
            "every task has a single training size (one data fraction), so the size effect is estimated only "
            "between tasks and is confounded with everything else that differs between them (anatomy, labels, "
            "difficulty); its coefficients, p-values and crossings do not show what more data would do for one "
            "task. Train several data fractions (the study's fractions:) to measure it within tasks"
        )
    tasks_per_type = _tasks_per_type(frame)
    shortfalls = {t: resample_shortfall(tasks_per_type, formula, t) for t in sorted(tasks_per_type)}
    few = [t for t, text in shortfalls.items() if text is not None]
    if few:
        # Without a task-type term every type has the same shortfall, so it is stated once.
        details = list(dict.fromkeys(shortfalls[t] for t in few))
        caught.append(
            f"too few tasks to resample for task type(s) {', '.join(few)}: {'; '.join(details)}. Their zero "
            "crossings get no interval, and no recommendation for them is labelled clear"
        )

    levels = {"task_type": sorted(frame["task_type"].unique()), "paradigm": sorted(frame["paradigm"].unique())}
    fit = DataScaleFit(
        formula=formula,
        design_info=design.design_info,
        ols=ols,
        mixed=mixed_result,
        table=table,
        crossings=crossings,
        data=data,
        r2=float(ols.rsquared) if ols.df_model > 0 else 0.0,
        r2_adj=float(ols.rsquared_adj) if ols.df_model > 0 else 0.0,
        n=int(ols.nobs),
        n_tasks=int(frame["task"].nunique()),
        warnings=caught,
        messages=messages,
        levels=levels,
        n_bootstrap=n_draws,
        tasks_per_type=tasks_per_type,
    )
    return fit


def group_view(rel: pl.DataFrame, split: str | None = None, sizes: pl.DataFrame | None = None) -> pl.DataFrame:
    """Return each clinical group's Δm against its total training images, per paradigm and data fraction.

    Each task counts once (mean over seeds first); ``total_n_train`` sums the tasks' mean training sizes, so an
    image that two tasks label counts twice (it is the number of labelled training examples). A task without a
    finite relative change still counts in the total, but not in ``delta_m`` and ``n_tasks``. When a task's size
    is unknown (numbers typed in from a publication), a matching row of ``sizes`` (metric ``train_images``, same
    paradigm, clinical group and data fraction) supplies the group total instead; failing that, a size reported
    for the group under another paradigm, when the paradigms that report one agree. ``size_source`` names the
    source used.
    """
    data = rel
    splits = sorted(set(data["split"].drop_nulls().to_list()))
    if split is None and len(splits) > 1:
        split = "test" if "test" in splits else splits[0]
    if split is not None:
        data = data.filter(pl.col("split") == split)
    finite = pl.col("rel_change").is_not_null() & pl.col("rel_change").is_not_nan()
    per_task = data.group_by("paradigm", "clinical_group", "data_fraction", "task").agg(
        pl.col("rel_change").filter(finite).mean().alias("task_mean"), pl.col("n_train").cast(pl.Float64).mean().alias("n_train")
    )
    view = (
        per_task.group_by("paradigm", "clinical_group", "data_fraction")
        .agg(
            # A group whose tasks do not all have a size has no known total.
            pl.when(pl.col("n_train").null_count() == 0).then(pl.col("n_train").sum()).otherwise(None).alias("total_n_train"),
            pl.col("task_mean").mean().alias("delta_m"),
            pl.col("task_mean").std().alias("sd_tasks"),
            pl.col("task_mean").is_not_null().sum().cast(pl.Int64).alias("n_tasks"),
        )
        .filter(pl.col("n_tasks") > 0)
        .with_columns(pl.when(pl.col("total_n_train").is_not_null()).then(pl.lit("tasks")).otherwise(None).alias("size_source"))
    )
    if sizes is not None and sizes.height:
        reported = (
            sizes.filter(pl.col("n_train").is_not_null() | pl.col("value").is_not_null())
            .with_columns(
                pl.col("data_fraction").round(6),
                pl.coalesce(pl.col("n_train").cast(pl.Float64), pl.col("value")).alias("reported_n_train"),
            )
        )
        own = reported.group_by("paradigm", "clinical_group", "data_fraction").agg(pl.col("reported_n_train").first())
        # A group trains on the same images under every paradigm, so a size reported under one paradigm (often only
        # the grouped rows) serves the others, when the paradigms that report it agree.
        shared = (
            reported.group_by("clinical_group", "data_fraction")
            .agg(pl.col("reported_n_train").unique().alias("values"))
            .filter(pl.col("values").list.len() == 1)
            .select("clinical_group", "data_fraction", pl.col("values").list.first().alias("shared_n_train"))
        )
        view = (
            view.with_columns(pl.col("data_fraction").round(6))
            .join(own, on=["paradigm", "clinical_group", "data_fraction"], how="left")
            .join(shared, on=["clinical_group", "data_fraction"], how="left")
            .with_columns(
                pl.when(pl.col("total_n_train").is_not_null())
                .then(pl.col("size_source"))
                .when(pl.col("reported_n_train").is_not_null())
                .then(pl.lit("reported"))
                .when(pl.col("shared_n_train").is_not_null())
                .then(pl.lit("reported under another paradigm"))
                .otherwise(None)
                .alias("size_source"),
                pl.coalesce("total_n_train", "reported_n_train", "shared_n_train").alias("total_n_train"),
            )
            .drop("reported_n_train", "shared_n_train")
        )
    return view.with_columns(pl.col("total_n_train").log10().alias("log10_total_n_train")).sort(
        "paradigm", "clinical_group", "data_fraction"
    )
