"""Run every analysis the inputs allow and write all outputs: the entry point of ``usagg reproduce``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from usagg.analysis.advise import advise
from usagg.analysis.affinity import Matrix, read_relations
from usagg.analysis.affinity_analysis import AffinityAnalysis, analyse_affinity
from usagg.analysis.data_scale import fit_data_scale, group_view
from usagg.analysis.grouping import recommend_groups
from usagg.analysis.inference import task_type_sensitivity
from usagg.analysis.inputs import AnalysisInputs, load_inputs
from usagg.analysis.relative import choose_metrics
from usagg.analysis.report import AnalysisReport
from usagg.analysis.transfer import analyse_transfer
from usagg.errors import AnalysisError, DataError

logger = logging.getLogger(__name__)


def _timed(report: AnalysisReport, name: str, step: Callable[[], Any]) -> Any:
    """Run one analysis step; an AnalysisError or DataError skips the step with a message in the report."""
    started = time.perf_counter()
    try:
        return step()
    except (AnalysisError, DataError) as exc:
        report.messages.append(f"{name} skipped: {exc}")
        logger.warning("%s skipped: %s", name, exc)
        return None
    finally:
        report.timings[name] = round(time.perf_counter() - started, 4)


def add_transfer(
    report: AnalysisReport,
    inputs: AnalysisInputs,
    metrics: Mapping[str, str] | None = None,
    all_metrics: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
) -> None:
    """Negative transfer: relative change, per-comparison statistics and flags, Δm tables."""
    transfer = analyse_transfer(inputs.results, inputs.per_image, metrics, all_metrics, n_boot=n_boot, seed=seed)
    report.transfer = transfer
    report.warnings.extend(transfer.warnings)
    report.messages.extend(transfer.messages)
    report.tables["relative_change"] = transfer.rel
    report.tables["negative_transfer"] = transfer.summary
    report.tables["delta_m"] = transfer.delta_m
    if transfer.rel.height == 0:
        raise AnalysisError(_no_comparison_reason(inputs, metrics, all_metrics))


def _no_comparison_reason(inputs: AnalysisInputs, metrics: Mapping[str, str] | None, all_metrics: bool) -> str:
    """Return why no aggregated result could be compared: the rows or metrics the table lacks, or unmatched keys."""
    origin = inputs.origin
    scores = inputs.results.filter(pl.col("metric") != "train_images")
    chosen, metric_warnings = choose_metrics(scores, metrics, all_metrics)
    if chosen.height == 0 and metric_warnings:
        listed = " ".join(metric_warnings[:3]) + (f" (and {len(metric_warnings) - 3} more tasks)" if len(metric_warnings) > 3 else "")
        return f"{origin}: no task has the metric it is compared by, so every task is left out. {listed}"
    paradigms = set(scores["paradigm"].to_list())
    if "task_specific" not in paradigms:
        return (
            f"{origin}: no task_specific rows, which are the reference of every relative change; add the "
            "task-specific results (paradigm task_specific)"
        )
    if not paradigms - {"task_specific", "pair"}:
        return (
            f"{origin}: only task-specific{' and pair' if 'pair' in paradigms else ''} rows, so there is nothing to "
            "compare; add grouped or unified results"
        )
    is_reference = pl.col("paradigm") == "task_specific"
    seeds, other = (_seed_names(scores.filter(chosen)["seed"]) for chosen in (is_reference, ~is_reference))
    return (
        f"{origin}: no grouped or unified result has a task_specific result with the same study, metric, data "
        f"fraction, seed and split (task-specific seeds: {', '.join(seeds)}; other seeds: {', '.join(other)}); "
        "make these columns match, e.g. give reported numbers an empty seed in every paradigm"
    )


def _seed_names(seeds: pl.Series) -> list[str]:
    """Return the distinct seeds of a column as sorted text, an empty seed as "empty"."""
    return sorted({"empty" if s is None else str(s) for s in seeds.to_list()})


def add_data_scale(
    report: AnalysisReport,
    rel: pl.DataFrame,
    sizes: pl.DataFrame | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    task: str | None = None,
) -> None:
    """Data scale: regression and mixed model, crossings, group view, task-type tests and per-task advice."""
    report.tables["data_scale_groups"] = group_view(rel, sizes=sizes)
    tests = task_type_sensitivity(rel)
    report.sensitivity = tests
    for paradigm, test in tests.items():
        report.warnings.extend(f"{paradigm}: {w}" for w in test.warnings)
    report.tables["task_type_tests"] = pl.DataFrame(
        [{"paradigm": p, **t.as_row()} for p, t in tests.items()],
        schema={"paradigm": pl.String, "by": pl.String, "h": pl.Float64, "df": pl.Int64, "p_value": pl.Float64, "epsilon2": pl.Float64, "n": pl.Int64},
    )
    pairwise = [t.pairwise.with_columns(pl.lit(p).alias("paradigm")) for p, t in tests.items() if t.pairwise.height]
    if pairwise:
        report.tables["task_type_pairwise"] = pl.concat(pairwise).select("paradigm", pl.exclude("paradigm"))

    fit = fit_data_scale(rel, n_bootstrap=n_bootstrap, seed=seed)
    report.data_scale = fit
    report.warnings.extend(fit.warnings)
    report.messages.extend(f"data scale: {m}" for m in fit.messages)
    report.tables["data_scale_coefficients"] = fit.table
    report.tables["data_scale_crossings"] = fit.crossings
    summary = report.transfer.summary if report.transfer is not None else None
    advice = advise(fit, rel, task=task, transfer_summary=summary)
    report.advice = advice
    report.tables["advice"] = advice.recommendations
    report.tables["advice_predictions"] = advice.predictions


def add_affinity(
    report: AnalysisReport,
    inputs: AnalysisInputs,
    methods: Sequence[str] | None = None,
    relations: Matrix | None = None,
    metrics: Mapping[str, str] | None = None,
    n_permutations: int = 999,
    seed: int = 0,
) -> AffinityAnalysis:
    """Task affinity: every requested (or available) estimator, agreement, scores against relations, costs."""
    affinity = analyse_affinity(inputs, methods, relations, dict(metrics or {}), n_permutations, seed)
    report.affinity = affinity
    report.messages.extend(affinity.messages)
    report.matrices.update(affinity.matrices)
    report.matrices.update(affinity.extra)
    if affinity.agreement is not None:
        report.tables["affinity_agreement"] = affinity.agreement
    if affinity.scores is not None:
        report.tables["affinity_scores"] = affinity.scores
    if affinity.costs is not None:
        report.tables["affinity_costs"] = affinity.costs
    return affinity


def add_grouping(
    report: AnalysisReport, inputs: AnalysisInputs, affinity: AffinityAnalysis, k: int | str = "auto", method: str | None = None
) -> None:
    """Grouping: partition the tasks of one affinity matrix and compare with the clinical taxonomy."""
    chosen = method or affinity.best_method()
    if chosen not in affinity.matrices:
        raise AnalysisError(f"no {chosen} affinity matrix to group by (computed: {', '.join(affinity.matrices) or 'none'})")
    taxonomy = dict(inputs.results.select("task", "clinical_group").unique(subset="task").iter_rows())
    tasks, matrix = affinity.matrices[chosen]
    grouping = recommend_groups((tasks, matrix), k, taxonomy=taxonomy)
    grouping.method = f"{grouping.method} on the {chosen} affinity"
    grouping.affinity_method = chosen
    grouping.left_out = sorted(set(taxonomy) - set(tasks))
    if grouping.left_out:
        report.messages.append(
            f"grouping: {', '.join(grouping.left_out)} have no entry in the {chosen} affinity (no measured pair "
            "includes them) and are not in the recommended groups; a study using that groups: block gives them no "
            "grouped run, so add pair runs with them or put them in a group by hand"
        )
    values = np.asarray(matrix, dtype=float)
    measured = np.isfinite(values) | np.isfinite(values.T)
    n = len(tasks)
    grouping.unmeasured_pairs = int((~measured[np.triu_indices(n, 1)]).sum())
    if grouping.unmeasured_pairs:
        report.messages.append(
            f"grouping: {grouping.unmeasured_pairs} of {n * (n - 1) // 2} task pairs have no {chosen} affinity; they "
            "are left out of the means, and where scores tie the search keeps such tasks apart, but a group that "
            "still joins tasks with no measured pair between them rests on no evidence"
        )
    report.grouping = grouping


def run_full_analysis(
    results_path_or_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    relations: str | os.PathLike | None = None,
    metrics: Mapping[str, str] | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> AnalysisReport:
    """Run every analysis the inputs allow and write all outputs to ``out_dir``.

    Negative transfer always runs. The data-scale analysis needs training sizes, the affinity estimators need
    pair runs or files of a unified run (a study output directory), and grouping needs an affinity matrix.
    ``relations`` (a task × task CSV) scores the estimators against a known relation matrix. ``n_bootstrap`` is
    the number of replicates of every bootstrap, as ``--bootstrap`` of the commands. Steps that cannot
    run are listed in ``report.messages``; the report is also written as ``analysis_report.json``.
    """
    started = time.perf_counter()
    inputs = load_inputs(results_path_or_dir)
    report = AnalysisReport(origin=str(inputs.origin))
    report.messages.extend(inputs.notes)
    relation_matrix = read_relations(relations) if relations is not None else None

    _timed(report, "negative transfer", lambda: add_transfer(report, inputs, metrics, n_boot=n_bootstrap, seed=seed))
    rel = report.transfer.rel if report.transfer is not None else None
    if rel is not None and rel.height:
        _timed(report, "data scale", lambda: add_data_scale(report, rel, inputs.sizes, n_bootstrap, seed))
    affinity = _timed(report, "task affinity", lambda: add_affinity(report, inputs, None, relation_matrix, metrics, seed=seed))
    if affinity is not None and affinity.matrices:
        _timed(report, "grouping", lambda: add_grouping(report, inputs, affinity))
    report.timings["total"] = round(time.perf_counter() - started, 4)
    report.write(out_dir)
    logger.info("analysis of %s written to %s", inputs.origin, Path(out_dir))
    return report
