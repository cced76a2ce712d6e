"""Per-task advice: the predicted change under each aggregated paradigm at the task's data scale, and a choice.

Rule (applied to the 95 % confidence interval of the data-scale model's prediction, HC3 covariance):

1. If some paradigm's interval lies above 0, recommend the one with the highest lower bound (a clear gain).
2. Else if every paradigm's interval lies below 0, recommend task-specific training (a clear loss).
3. Else the data cannot tell: recommend task-specific training unless a paradigm's predicted mean is above 0,
   in which case name that paradigm, and mark the advice uncertain either way.

When the fit is too thin to trust its intervals (:meth:`DataScaleFit.evidence_gaps`: few residual degrees of
freedom, or too few tasks of the type to resample), the choice is made the same way but its confidence is
``insufficient evidence`` instead of ``clear`` or ``uncertain``, and the reason says what is missing.

The model predicts per task type, so a task can lose under a paradigm for which its type is predicted to gain.
When a task's observed change under a paradigm has the opposite sign to the prediction (and its observed 95 %
interval, where there is one, excludes 0), the reason notes this with both numbers. The choice and the
confidence stay as the rule gives them.

The safer paradigm is the one with the highest lower bound: its worst plausible change is the least bad. A
paradigm with a negative predicted change or under which the task's own runs show a loss (observed interval
below 0) is never the safer one, because task-specific training, whose change is 0 by definition, is expected to
do better. When that is true of every aggregated paradigm, the safer choice is task_specific. When the task's own
runs lose under every aggregated paradigm, the advice is task_specific with confidence clear, whatever the
model predicts, and the reason lists the observed losses. Such a paradigm is not
recommended either: rules 1 and 3 choose among the others, and the reason names what was passed over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from usagg.analysis.data_scale import MIN_DISTINCT_RESAMPLES, MIN_RESID_DF, DataScaleFit
from usagg.analysis.inference import t_interval
from usagg.analysis.relative import format_percent
from usagg.errors import AnalysisError

ADVICE_RULE = (
    "gain if the 95 % interval of the predicted relative change lies above 0, loss if below 0, else uncertain; "
    "recommend the paradigm with the highest lower bound among gains, task_specific if every paradigm loses, "
    "else the paradigm with a positive predicted mean (uncertain) or task_specific (uncertain); "
    f"confidence is 'insufficient evidence' when the model has fewer than {MIN_RESID_DF} residual degrees of "
    f"freedom or the task's type gives fewer than {MIN_DISTINCT_RESAMPLES} distinct bootstrap resamples of tasks; "
    "the reason notes every paradigm whose observed change for the task has the opposite sign to its prediction "
    "(when the observed change has a 95 % interval, only if that interval excludes 0); the safer paradigm has the "
    "highest lower bound among those with a predicted change of 0 or more that the task's own runs do not show "
    "losing, else task_specific; task_specific (clear) when the task's own runs lose under every aggregated "
    "paradigm; a paradigm "
    "under which the task's own runs show a loss (observed interval below 0) is never recommended"
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
    "observed_ci_lo": pl.Float64,
    "observed_ci_hi": pl.Float64,
    "observed_ci_method": pl.String,
}

# Observed-interval methods of the transfer analysis (``ci_method`` of negative_transfer.csv) as advice words.
_INTERVAL_WORDS = {"bootstrap_images": "95 % image-bootstrap interval", "t_seeds": "95 % t interval over seeds"}

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


def _observed_loss(row: dict) -> bool:
    """Return whether the task's own runs show a loss under this paradigm: its observed interval lies below 0."""
    hi = row.get("observed_ci_hi")
    return hi is not None and math.isfinite(hi) and hi < 0


def _safer(rows: list[dict]) -> str:
    """Return the paradigm with the highest predicted lower bound among those with a predicted change of 0 or
    more that the task's own runs do not show losing, or task_specific when none is left."""
    candidates = [r for r in rows if not _observed_loss(r) and r["predicted"] >= 0]
    if not candidates:
        return "task_specific"
    return max(candidates, key=lambda r: r["ci_lo"])["paradigm"]


def _recommend(rows: list[dict]) -> tuple[str, str, str, str]:
    safer = _safer(rows)
    # The task's own runs are direct evidence: a paradigm they lose under is not recommended, whatever the model.
    passed_over = [r for r in rows if _observed_loss(r) and (r["verdict"] == "gain" or r["predicted"] > 0)]
    # The observed numbers follow in the contradiction note, since a predicted gain with an observed loss is one.
    note = "".join(f"; {r['paradigm']} is not recommended, because this task's own runs lose under it" for r in passed_over)
    eligible = [r for r in rows if not _observed_loss(r)]
    if not eligible:
        # The task's own runs are direct evidence, and they lose under every aggregated paradigm.
        losses = _observed_losses(rows)
        return "task_specific", "clear", safer, f"this task's own runs lose under every aggregated paradigm: {losses}"
    gains = [r for r in eligible if r["verdict"] == "gain"]
    if gains:
        best = max(gains, key=lambda r: r["ci_lo"])
        reason = f"{best['paradigm']} is predicted to gain {format_percent(best['predicted'])} % (95 % CI {format_percent(best['ci_lo'])} to {format_percent(best['ci_hi'])} %)"
        return best["paradigm"], "clear", safer, reason + note
    if all(r["verdict"] == "loss" for r in rows):
        worst = max(rows, key=lambda r: r["ci_hi"])
        reason = f"every aggregated paradigm is predicted to lose (best upper bound {format_percent(worst['ci_hi'])} % under {worst['paradigm']})"
        return "task_specific", "clear", safer, reason
    positive = [r for r in eligible if r["predicted"] > 0]
    if positive:
        best = max(positive, key=lambda r: r["predicted"])
        reason = (
            f"{best['paradigm']} has a positive predicted change ({format_percent(best['predicted'])} %) but its interval "
            f"includes 0 ({format_percent(best['ci_lo'])} to {format_percent(best['ci_hi'])} %)"
        )
        return best["paradigm"], "uncertain", safer, reason + note
    if passed_over:
        return "task_specific", "uncertain", safer, "no other aggregated paradigm has a positive predicted change" + note
    reason = "no aggregated paradigm has a positive predicted change, and no predicted interval excludes 0"
    losses = [r for r in rows if _observed_loss(r)]
    if losses:
        reason += f"; this task's own runs lose under {_observed_losses(losses)}"
    return "task_specific", "uncertain", safer, reason


def _observed_losses(rows: list[dict]) -> str:
    """Return "grouped -8.0 % (95 % interval -9.1 to -6.9 %); ..." for the observed changes of ``rows``."""
    return "; ".join(
        f"{r['paradigm']} {format_percent(r['observed'])} % (95 % interval {format_percent(r['observed_ci_lo'])} to "
        f"{format_percent(r['observed_ci_hi'])} %)"
        for r in rows
    )


def _contradicts(row: dict) -> bool:
    """Return whether the observed change has the opposite sign to the prediction (beyond its interval, if any)."""
    predicted, observed = row["predicted"], row["observed"]
    if observed is None or not math.isfinite(observed) or not math.isfinite(predicted):
        return False
    if predicted * observed >= 0:
        return False
    lo, hi = row["observed_ci_lo"], row["observed_ci_hi"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return True
    return hi < 0 if predicted > 0 else lo > 0


def _contradiction_note(rows: list[dict], choice: str) -> str:
    """Return a note naming each paradigm whose observed change contradicts its prediction ("" if none)."""
    found = sorted((r for r in rows if _contradicts(r)), key=lambda r: r["paradigm"] != choice)
    parts = []
    for r in found:
        words = _INTERVAL_WORDS.get(r["observed_ci_method"])
        if words is not None:
            interval = f"{words} {format_percent(r['observed_ci_lo'])} to {format_percent(r['observed_ci_hi'])} %"
        else:
            interval = "no interval"
        parts.append(
            f"under {r['paradigm']} this task's own results changed by {format_percent(r['observed'])} % ({interval}) "
            f"where the model predicts {format_percent(r['predicted'])} %"
        )
    if not parts:
        return ""
    return "; observed change contradicts the prediction: " + "; ".join(parts) + (
        "; check this task's results before acting on the prediction"
    )


def _observed(largest: pl.DataFrame, transfer_summary: pl.DataFrame | None) -> pl.DataFrame:
    """Return the observed mean change per task × paradigm at the largest data fraction, with a 95 % interval.

    The interval is taken from ``transfer_summary`` (the negative_transfer table) when exactly one of its rows
    matches the task, paradigm, metric, split and data fraction and that row has an interval. Otherwise it is
    the t interval over the seeds (``t_seeds`` of the transfer analysis), which needs two or more seeds.
    """
    rows = []
    for (task, paradigm), part in largest.group_by("task", "paradigm", maintain_order=True):
        values = part["rel_change"].to_numpy().astype(float)
        lo, hi = t_interval(values)
        rows.append(
            {
                "task": task,
                "paradigm": paradigm,
                "observed": float(np.nanmean(values)),
                "observed_ci_lo": lo,
                "observed_ci_hi": hi,
                "observed_ci_method": "t_seeds" if math.isfinite(lo) else "none",
            }
        )
    observed_columns = {k: dtype for k, dtype in PREDICTION_SCHEMA.items() if k.startswith("observed")}
    schema = {"task": pl.String, "paradigm": pl.String, **observed_columns}
    observed = pl.DataFrame(rows, schema=schema)
    keys = ["task", "paradigm", "metric", "split", "data_fraction"]
    if transfer_summary is None or transfer_summary.height == 0 or not set(keys) <= set(transfer_summary.columns):
        return observed
    compared = largest.select(keys).unique()
    matched = (
        transfer_summary.select(*keys, "ci_lo", "ci_hi", "ci_method")
        .cast({"task": pl.String, "paradigm": pl.String, "metric": pl.String, "split": pl.String, "data_fraction": pl.Float64})
        .join(compared.cast({"data_fraction": pl.Float64}), on=keys, how="semi", nulls_equal=True)
        .filter(pl.col("ci_lo").is_finite() & pl.col("ci_hi").is_finite())
        .filter(pl.len().over("task", "paradigm") == 1)
        .select("task", "paradigm", "ci_lo", "ci_hi", "ci_method")
    )
    return (
        observed.join(matched, on=["task", "paradigm"], how="left")
        .with_columns(
            pl.coalesce("ci_lo", "observed_ci_lo").alias("observed_ci_lo"),
            pl.coalesce("ci_hi", "observed_ci_hi").alias("observed_ci_hi"),
            pl.coalesce("ci_method", "observed_ci_method").alias("observed_ci_method"),
        )
        .drop("ci_lo", "ci_hi", "ci_method")
    )


def advise(
    fit: DataScaleFit, rel: pl.DataFrame, task: str | None = None, transfer_summary: pl.DataFrame | None = None
) -> Advice:
    """Predict each task's change under each paradigm at its largest training size and recommend a paradigm.

    ``rel`` is the relative-change table the fit came from. Each task is placed at its training size at its
    largest data fraction (mean over seeds), and the observed mean change there is shown beside the prediction,
    with a 95 % interval: from ``transfer_summary`` (``TransferAnalysis.summary``, the negative_transfer table)
    when it is given and has one for that comparison, else the t interval over seeds. A recommendation's reason
    notes every paradigm whose observed change contradicts its prediction (see the module docstring).
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
    observed = _observed(largest, transfer_summary)
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
        # Advice from the task's own losses does not rest on the model, so a thin fit does not weaken it.
        if gaps and not all(_observed_loss(r) for r in rows):
            confidence = INSUFFICIENT
            reason += f"; evidence insufficient: {'; '.join(gaps)}"
        reason += _contradiction_note(rows, choice)
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
