"""Key findings and key tables of an analysis, as sentences and tables for the study report."""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from usagg.reproduce.report import ReportTable

# Significance level at which a key finding calls a test result significant.
ALPHA = 0.05


def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value * 100:+.1f} %"


def _largest_fraction(table: pl.DataFrame) -> pl.DataFrame:
    if "data_fraction" not in table.columns or table.height == 0:
        return table
    return table.filter(pl.col("data_fraction") == pl.col("data_fraction").max())


def key_findings(report: Any) -> list[str]:
    """Return one sentence per headline number of an :class:`usagg.analysis.report.AnalysisReport`."""
    lines: list[str] = []
    transfer = getattr(report, "transfer", None)
    if transfer is not None and transfer.delta_m.height:
        study = _largest_fraction(transfer.delta_m.filter(pl.col("level") == "study"))
        for row in study.sort("paradigm", "split").iter_rows(named=True):
            interval = ""
            if row["ci_seeds_lo"] is not None and math.isfinite(row["ci_seeds_lo"]):
                interval = f" (95 % CI over seeds {_pct(row['ci_seeds_lo'])} to {_pct(row['ci_seeds_hi'])})"
            elif row["ci_tasks_lo"] is not None and math.isfinite(row["ci_tasks_lo"]):
                interval = f" (95 % CI over tasks {_pct(row['ci_tasks_lo'])} to {_pct(row['ci_tasks_hi'])})"
            lines.append(
                f"{row['paradigm']} training: Δm = {_pct(row['delta_m'])}{interval} over {row['n_tasks']} task(s) "
                f"at data fraction {row['data_fraction']:g} ({row['split']} split)."
            )
        flagged = transfer.flagged()
        # Only comparisons with an interval can be flagged, so they are the denominator.
        summary = transfer.summary
        with_interval = summary.filter(pl.col("negative_transfer").is_not_null()).height
        # A comparison has no interval either for lack of data (one seed, no per-image scores) or because its
        # relative change is not finite (a task-specific score of 0).
        no_change = summary.filter(pl.col("negative_transfer").is_null() & ~pl.col("mean_rel_change").is_finite()).height
        no_data = summary.height - with_interval - no_change
        text = (
            f"Negative transfer (95 % interval below 0): {flagged.height} of the {with_interval} "
            "task × paradigm × fraction comparisons with an interval"
        )
        if no_data:
            text += f"; {no_data} more have no interval (one seed without per-image scores) and cannot be flagged"
        if no_change:
            verb = "has" if no_change == 1 else "have"
            text += f"; {no_change} more {verb} no finite relative change (a task-specific score of 0) and cannot be flagged"
        lines.append(text + ".")
    for paradigm, test in sorted(getattr(report, "sensitivity", {}).items()):
        if math.isfinite(test.statistic):
            verdict = "differs significantly" if test.p_value < ALPHA else "does not differ significantly"
            lines.append(
                f"{paradigm}: relative change {verdict} across task types at α = {ALPHA} "
                f"(Kruskal–Wallis H = {test.statistic:.2f}, p = {test.p_value:.3g}, ε² = {test.epsilon2:.2f}, "
                f"n = {test.n} tasks)."
            )
    fit = getattr(report, "data_scale", None)
    if fit is not None and fit.crossings.height:
        inside = fit.crossings.filter(pl.col("within_data_range") & pl.col("n_train_cross").is_finite())
        if "task_type" not in fit.uses:
            # Without a task-type term every type crosses at the same size: one sentence per paradigm.
            inside = inside.unique(subset="paradigm", keep="first", maintain_order=True).with_columns(
                pl.lit("all task types").alias("task_type")
            )
        for row in inside.iter_rows(named=True):
            if row["bounded"] and math.isfinite(row["ci_lo"]):
                qualifier = f" (95 % CI {row['ci_lo']:,.0f}–{row['ci_hi']:,.0f})."
            else:
                reason = row["note"] or "the bootstrap does not bound it"
                qualifier = f", but this crossing is not reliable: {reason}."
            lines.append(
                f"{row['paradigm']} / {row['task_type']}: the fitted relative change crosses 0 at about "
                f"{row['n_train_cross']:,.0f} training images{qualifier}"
            )
    grouping = getattr(report, "grouping", None)
    if grouping is not None:
        text = f"Recommended partition: {grouping.k} group(s) ({grouping.method}), within-group affinity {grouping.score:#.3g}"
        if grouping.taxonomy_score is not None:
            text += f" vs {grouping.taxonomy_score:#.3g} for the clinical groups"
        if grouping.random_score_p95 is not None:
            text += (
                f"; random partitions into groups of the same sizes score {grouping.random_score_mean:#.3g} on average "
                f"(95th percentile {grouping.random_score_p95:#.3g})"
            )
            if grouping.score <= grouping.random_score_p95:
                text += ", so the recommendation is not clearly better than chance and the matrix may carry little structure"
        lines.append(text + ".")
    return lines


def key_tables(report: Any) -> list[ReportTable]:
    """Return the tables worth reading in the report; the full set is in the analysis folder as CSV."""
    tables: list[ReportTable] = []
    transfer = getattr(report, "transfer", None)
    if transfer is not None and transfer.delta_m.height:
        dm = transfer.delta_m.filter(pl.col("level").is_in(["study", "task_type"])).select(
            "paradigm", "data_fraction", "split", "level", "level_value", "delta_m", "ci_seeds_lo", "ci_seeds_hi", "ci_tasks_lo", "ci_tasks_hi", "n_tasks", "n_seeds"
        )
        tables.append(ReportTable("Δm by paradigm and task type", dm, "Δm is the mean relative change over tasks (fraction; −0.05 = 5 % worse than task-specific)."))
        flagged = transfer.flagged()
        if flagged.height:
            columns = [c for c in ("paradigm", "task", "task_type", "clinical_group", "metric", "data_fraction", "mean_rel_change", "ci_lo", "ci_hi", "ci_method") if c in flagged.columns]
            tables.append(ReportTable("Comparisons flagged as negative transfer", flagged.select(columns), "The 95 % interval of the relative change lies below 0."))
    named = getattr(report, "tables", {})
    captions = {
        "task_type_tests": ("Kruskal–Wallis tests across task types", "One observation per task (mean over seeds), per paradigm."),
        "data_scale_crossings": ("Data-scale zero crossings", "Training images at which the fitted relative change crosses 0, per paradigm and task type."),
        "data_scale_coefficients": ("Data-scale model coefficients", "OLS with HC3 errors (and the mixed model when fitted)."),
        "affinity_agreement": ("Agreement between affinity estimators", "Spearman correlation of off-diagonal entries with a permutation p-value."),
        "affinity_scores": ("Affinity estimators against known relations", ""),
        "advice": ("Aggregation advice per task", ""),
    }
    for name, (title, caption) in captions.items():
        table = named.get(name)
        if table is not None and table.height:
            tables.append(ReportTable(title, table, caption))
    grouping = getattr(report, "grouping", None)
    if grouping is not None:
        rows = [{"group": name, "tasks": ", ".join(members)} for name, members in grouping.as_mapping().items()]
        tables.append(ReportTable("Recommended task groups", pl.DataFrame(rows), f"{grouping.method}; use the groups.yaml in the analysis folder as a study's groups block."))
    return tables
