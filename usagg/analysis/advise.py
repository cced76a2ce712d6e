"""Per-task advice: the predicted change under each aggregated paradigm at the task's data scale, and a choice.

Rule (applied to the 95 % confidence interval of the data-scale model's prediction, HC3 covariance):

1. If some paradigm's interval lies above 0, recommend the one with the highest lower bound (a clear gain).
2. Else if every paradigm's interval lies below 0, recommend task-specific training (a clear loss).
3. Else the data cannot tell: recommend task-specific training unless a paradigm's predicted mean is above 0,
   in which case name that paradigm, and mark the advice uncertain either way.

When the fit is too thin to trust its intervals (:meth:`DataScaleFit.evidence_gaps`: few residual degrees of
freedom, or too few tasks of the type to resample), the choice is made the same way but its confidence is
``insufficient evidence`` instead of ``clear`` or ``uncertain``, and the reason says what is missing.

The safer paradigm is the one with the highest lower bound: its worst plausible change is the least bad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from usagg.analysis.data_scale import MIN_DISTINCT_RESAMPLES, MIN_RESID_DF, DataScaleFit
from usagg.errors import AnalysisError

ADVICE_RULE = (
    "gain if the 95 % interval of the predicted relative change lies above 0, loss if below 0, else uncertain; "
    "recommend the paradigm with the highest lower bound among gains, task_specific if every paradigm loses, "
    "else the paradigm with a positive predicted mean (uncertain) or task_specific (uncertain); "
    f"confidence is 'insufficient evidence' when the model has fewer than {MIN_RESID_DF} residual degrees of "
    f"freedom or the task's type gives fewer than {MIN_DISTINCT_RESAMPLES} distinct bootstrap resamples of tasks"
)

INSUFFICIENT = "insufficient evidence"

PREDICTION_SCHEMA = {
    "task": pl.String,
    "task_type": pl.String,
    "clinical_group": pl.String,
    "n_train": pl.Float64,
    "paradigm": pl.String,
    "predicted": pl.Float64,
    "ci_lo": pl.Float64,
    "ci_hi": pl.Float64,
    "verdict": pl.String,
    "observed": pl.Float64,
}

RECOMMENDATION_SCHEMA = {
    "task": pl.String,
    "task_type": pl.String,
    "n_train": pl.Float64,
    "recommendation": pl.String,
    "confidence": pl.String,
    "safer_paradigm": pl.String,
    "reason": pl.String,
}


@dataclass
class Advice:
    """Predictions per task × paradigm and one recommendation per task, with the rule that produced it."""

    predictions: pl.DataFrame
    recommendations: pl.DataFrame
    rule: str = ADVICE_RULE
    messages: list[str] = field(default_factory=list)


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "gain"
    if hi < 0:
        return "loss"
    return "uncertain"


def _recommend(rows: list[dict]) -> tuple[str, str, str, str]:
    safer = max(rows, key=lambda r: r["ci_lo"])["paradigm"]
    gains = [r for r in rows if r["verdict"] == "gain"]
    if gains:
        best = max(gains, key=lambda r: r["ci_lo"])
        reason = f"{best['paradigm']} is predicted to gain {100 * best['predicted']:+.1f} % (95 % CI {100 * best['ci_lo']:+.1f} to {100 * best['ci_hi']:+.1f} %)"
        return best["paradigm"], "clear", safer, reason
    if all(r["verdict"] == "loss" for r in rows):
        worst = max(rows, key=lambda r: r["ci_hi"])
        reason = f"every aggregated paradigm is predicted to lose (best upper bound {100 * worst['ci_hi']:+.1f} % under {worst['paradigm']})"
        return "task_specific", "clear", safer, reason
    positive = [r for r in rows if r["predicted"] > 0]
    if positive:
        best = max(positive, key=lambda r: r["predicted"])
        reason = (
            f"{best['paradigm']} has a positive predicted change ({100 * best['predicted']:+.1f} %) but its interval "
            f"includes 0 ({100 * best['ci_lo']:+.1f} to {100 * best['ci_hi']:+.1f} %)"
        )
        return best["paradigm"], "uncertain", safer, reason
    reason = "no aggregated paradigm has a positive predicted change, and no interval excludes 0"
    return "task_specific", "uncertain", safer, reason


def advise(fit: DataScaleFit, rel: pl.DataFrame, task: str | None = None) -> Advice:
    """Predict each task's change under each paradigm at its largest training size and recommend a paradigm.

    ``rel`` is the relative-change table the fit came from. Each task is placed at its training size at its
    largest data fraction (mean over seeds), and the observed mean change there is shown beside the prediction.
    """
    data = fit.data
    if task is not None:
        known = sorted(set(data["task"].to_list()) | set(rel["task"].to_list()))
        if task not in known:
            raise AnalysisError(f"task {task!r} is not in the results (tasks: {', '.join(known)})")
        data = data.filter(pl.col("task") == task)
        if data.height == 0:
            raise AnalysisError(
                f"task {task!r} has no aggregated result with a training size and a finite relative change, "
                "so the data-scale model cannot place it"
            )
    largest = data.filter(pl.col("data_fraction") == pl.col("data_fraction").max().over("task"))
    tasks = (
        largest.group_by("task")
        .agg(pl.col("task_type").first(), pl.col("clinical_group").first(), pl.col("n_train").mean())
        .sort("task")
    )
    observed = largest.group_by("task", "paradigm").agg(pl.col("rel_change").mean().alias("observed"))
    paradigms = fit.levels.get("paradigm") or sorted(data["paradigm"].unique().to_list())
    n = len(paradigms)
    frame = tasks.select(
        pl.col("task").repeat_by(n).explode(),
        pl.col("task_type").repeat_by(n).explode(),
        pl.col("clinical_group").repeat_by(n).explode(),
        pl.col("n_train").repeat_by(n).explode(),
    ).with_columns(pl.Series("paradigm", paradigms * tasks.height))
    mean, lo, hi = fit.predict(
        frame["n_train"].to_numpy(), frame["task_type"].to_numpy(), frame["paradigm"].to_numpy()
    )
    predictions = (
        frame.with_columns(
            pl.Series("predicted", np.asarray(mean, dtype=float)),
            pl.Series("ci_lo", np.asarray(lo, dtype=float)),
            pl.Series("ci_hi", np.asarray(hi, dtype=float)),
        )
        .with_columns(
            pl.struct("ci_lo", "ci_hi").map_elements(lambda r: _verdict(r["ci_lo"], r["ci_hi"]), return_dtype=pl.String).alias("verdict")
        )
        .join(observed, on=["task", "paradigm"], how="left")
        .select(list(PREDICTION_SCHEMA))
        .cast(PREDICTION_SCHEMA)
    )
    recs = []
    for (name,), part in predictions.group_by("task", maintain_order=True):
        rows = part.to_dicts()
        if any(not math.isfinite(r["ci_lo"]) for r in rows):
            continue
        choice, confidence, safer, reason = _recommend(rows)
        gaps = fit.evidence_gaps(rows[0]["task_type"])
        if gaps:
            confidence = INSUFFICIENT
            reason += f"; evidence insufficient: {' and '.join(gaps)}; add tasks, data fractions or seeds"
        recs.append(
            {
                "task": name,
                "task_type": rows[0]["task_type"],
                "n_train": rows[0]["n_train"],
                "recommendation": choice,
                "confidence": confidence,
                "safer_paradigm": safer,
                "reason": reason,
            }
        )
    recommendations = pl.DataFrame(recs, schema=RECOMMENDATION_SCHEMA)
    return Advice(predictions=predictions, recommendations=recommendations, messages=list(fit.messages))
