"""CLI commands of the analysis stage: ``transfer-matrix``, ``data-scale`` and ``advise``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import polars as pl
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usagg.cli.tables import output_console, print_matrix, print_rows
from usagg.errors import AnalysisError

console = Console()


def _console() -> Console:
    return output_console(console)


RESULTS_HELP = (
    "Results table (CSV or parquet) or a study output directory holding run directories; docs/analysis.md lists the "
    "columns of a table written by hand."
)
SCALE_BOOTSTRAP_HELP = "Bootstrap replicates for the per-image intervals (as transfer-matrix) and the zero-crossing intervals."
METRIC_HELP = (
    "Metric per task type or task, as TYPE=METRIC or TASK=METRIC (repeatable); defaults: segmentation=dice, "
    "classification=auc, detection=iou, regression=mre_mm, else mre_px, else mae."
)


def _pct(value: float | None, digits: int = 1, signed: bool = True) -> str:
    """Format a fraction as percent, with a sign for changes (``signed``) and without one for spreads."""
    from usagg.analysis.relative import format_percent

    return format_percent(value, digits, signed)


def _interval(lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _num(value: float | None, fmt: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, fmt)


def _print_notes(report) -> None:
    for message in report.messages:
        _console().print(f"[dim]note:[/] {escape(str(message))}", highlight=False)
    if report.warnings:
        _console().print(f"[yellow]{len(report.warnings)} statistical warning(s)[/] (all in analysis_report.json with --out):")
        for warning in report.warnings[:5]:
            _console().print(f"  [dim]- {escape(str(warning))}[/]", highlight=False)
        if len(report.warnings) > 5:
            _console().print(f"  [dim]… and {len(report.warnings) - 5} more[/]")


def _pick_fraction(table: pl.DataFrame, fraction: float | None) -> tuple[pl.DataFrame, float]:
    fractions = sorted(set(table["data_fraction"].drop_nulls().to_list()))
    if not fractions:
        raise AnalysisError("the table has no data fraction to show")
    if fraction is None:
        fraction = fractions[-1]
    elif not any(abs(fraction - f) < 1e-9 for f in fractions):
        raise AnalysisError(f"--fraction {fraction} is not in the results (fractions: {', '.join(map(str, fractions))})")
    return table.filter((pl.col("data_fraction") - fraction).abs() < 1e-9), fraction


def _print_transfer(report, fraction: float | None) -> None:
    transfer = report.transfer
    summary, shown_fraction = _pick_fraction(transfer.summary, fraction)
    splits = sorted(set(summary["split"].to_list()))
    split = "test" if "test" in splits else splits[0]
    summary = summary.filter(pl.col("split") == split)
    paradigms = sorted(set(summary["paradigm"].to_list()))
    table = Table(title=escape(f"Relative change vs task-specific, % (data fraction {shown_fraction}, {split} split; ✗ = negative transfer)"))
    # The study column appears only when the table contains several, e.g. numbers typed in from a publication.
    row_keys = ["task", "task_type", "metric"]
    if summary["study"].n_unique() > 1:
        row_keys = ["study", *row_keys]
    for name in row_keys:
        table.add_column("type" if name == "task_type" else name)
    for paradigm in paradigms:
        table.add_column(escape(f"{paradigm} mean"), justify="right")
        table.add_column("95 % interval", justify="right")
    for key, part in summary.sort(*row_keys).group_by(row_keys, maintain_order=True):
        cells = [escape(str(value)) for value in key]
        for paradigm in paradigms:
            row = part.filter(pl.col("paradigm") == paradigm)
            if row.height == 0:
                cells += ["", ""]
                continue
            r = row.row(0, named=True)
            flag = " ✗" if r["negative_transfer"] else ""
            cells += [f"{_pct(r['mean_rel_change'])}{flag}", _interval(r["ci_lo"], r["ci_hi"])]
        table.add_row(*cells)
    _console().print(table)
    methods = dict(summary.group_by("ci_method").len().iter_rows())
    _console().print(
        "intervals: " + escape(", ".join(f"{k} ({v})" for k, v in sorted(methods.items())))
        + "; – = no interval; flag rule: interval entirely below 0",
        highlight=False,
    )

    dm = transfer.delta_m.filter(
        ((pl.col("data_fraction") - shown_fraction).abs() < 1e-9) & (pl.col("split") == split) & (pl.col("level") != "group")
    )
    table = Table(title=f"Δm (mean relative change over tasks), % (data fraction {shown_fraction})")
    several_studies = dm["study"].n_unique() > 1
    names = ["paradigm", "level", "value", "Δm", "95 % CI seeds", "95 % CI tasks", "tasks", "seeds"]
    if several_studies:
        names.insert(0, "study")
    for name in names:
        table.add_column(name, justify="right" if name not in ("study", "paradigm", "level", "value") else "left")
    for r in dm.iter_rows(named=True):
        cells = [
            escape(str(r["paradigm"])), escape(str(r["level"])), escape(str(r["level_value"])), _pct(r["delta_m"]),
            _interval(r["ci_seeds_lo"], r["ci_seeds_hi"]), _interval(r["ci_tasks_lo"], r["ci_tasks_hi"]),
            str(r["n_tasks"]), str(r["n_seeds"]),
        ]
        if several_studies:
            cells.insert(0, escape(str(r["study"])))
        table.add_row(*cells)
    _console().print(table)


def _print_matrices(matrices: dict[str, tuple[list[str], np.ndarray]], study_order: list[str]) -> None:
    """Print each affinity matrix with its tasks in the study's order, so a number names one task in every matrix."""
    rank = {task: k for k, task in enumerate(study_order)}
    for name, (tasks, matrix) in matrices.items():
        index = sorted(range(len(tasks)), key=lambda i: (rank.get(tasks[i], len(rank)), tasks[i]))
        ordered = [tasks[i] for i in index]
        print_matrix(_console(), f"{name} affinity (row = source task, column = target task)", ordered, matrix[np.ix_(index, index)])


def _print_frame(title: str, frame: pl.DataFrame, percent: tuple[str, ...] = ()) -> None:
    rows = []
    for row in frame.iter_rows(named=True):
        cells = []
        for column, value in row.items():
            if column in percent:
                cells.append(_pct(value, signed=not column.startswith("sd_")))
            elif isinstance(value, float):
                cells.append(_num(value, ".4g"))
            else:
                cells.append("–" if value is None else str(value))
        rows.append(cells)
    right = [frame.schema[column].is_numeric() for column in frame.columns]
    print_rows(_console(), title, frame.columns, rows, right)


def _print_grouping(grouping) -> None:
    table = Table(title=escape(f"Recommended groups (K = {grouping.k}, {grouping.method})"))
    table.add_column("group")
    table.add_column("tasks")
    table.add_column("mean affinity received", justify="right")
    for name, members in grouping.as_mapping().items():
        mean = float(np.mean([grouping.task_scores[t] for t in members]))
        table.add_row(escape(name), escape(", ".join(members)), _num(mean, ".3g"))  # lookahead values are of order 1e-4
    _console().print(table)
    line = f"total within-group affinity {grouping.score:.4g}"
    if grouping.taxonomy_score is not None:
        line += f"; clinical taxonomy {grouping.taxonomy_score:.4g} ({len(grouping.taxonomy_groups or {})} groups)"
    if grouping.random_score_mean is not None:
        line += f"; random partitions of the same sizes {grouping.random_score_mean:.4g} (95th percentile {grouping.random_score_p95:.4g})"
    _console().print(line, highlight=False)
    _console().print(grouping.to_yaml(), highlight=False, markup=False)


def _parse_k(value: str | None) -> int | str | None:
    if value is None:
        return None
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise AnalysisError(f"--recommend {value!r} is invalid; give a number of groups (e.g. 4) or 'auto'") from None
    if k < 1:
        raise AnalysisError(f"--recommend {k} is invalid; give a number of groups of 1 or more, or 'auto'")
    return k


def transfer_matrix(
    results: Annotated[Path, typer.Argument(help=RESULTS_HELP, metavar="RESULTS")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write the tables (CSV, parquet, JSON) into.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", metavar="TYPE=METRIC", help=METRIC_HELP)] = None,
    all_metrics: Annotated[bool, typer.Option("--all-metrics", help="Analyse every metric in the table, not only the primary one.")] = False,
    method: Annotated[
        Optional[list[str]],
        typer.Option("--method", metavar="METHOD", help="Task-affinity estimator: measured, lookahead, gradient, experts, fisher or all (repeatable)."),
    ] = None,
    relations: Annotated[
        Optional[Path], typer.Option("--relations", help="Known task × task relation matrix (CSV) to score each estimator against.")
    ] = None,
    recommend: Annotated[
        Optional[str], typer.Option("--recommend", help="Partition the tasks into K groups by affinity, or 'auto' to choose K.")
    ] = None,
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="Data fraction to print (default: the largest); the written files contain every fraction.")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap replicates for the intervals.")] = 2000,
    permutations: Annotated[int, typer.Option("--permutations", min=0, help="Permutations for the agreement p-values.")] = 999,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the bootstrap and permutations.")] = 0,
) -> None:
    """Negative transfer per task and paradigm with intervals and flags, or task affinity with --method."""
    from usagg.analysis.affinity import METHODS, read_relations
    from usagg.analysis.full import add_affinity, add_grouping, add_transfer
    from usagg.analysis.inputs import load_inputs
    from usagg.analysis.relative import parse_metric_overrides
    from usagg.analysis.report import AnalysisReport

    metrics = parse_metric_overrides(metric or [])
    k = _parse_k(recommend)
    inputs = load_inputs(results)
    report = AnalysisReport(origin=str(inputs.origin))
    report.messages.extend(inputs.notes)
    if not method and k is None and relations is None:
        add_transfer(report, inputs, metrics, all_metrics, n_boot=bootstrap, seed=seed)
        _print_transfer(report, fraction)
    else:
        methods = None
        if method and "all" not in method:
            methods = list(dict.fromkeys(method))
            unknown = [m for m in methods if m not in METHODS]
            if unknown:
                raise AnalysisError(f"--method {', '.join(unknown)} is invalid; choose from {', '.join(METHODS)} or all")
        relation_matrix = read_relations(relations) if relations is not None else None
        affinity = add_affinity(report, inputs, methods, relation_matrix, metrics, permutations, seed)
        if not affinity.matrices:
            raise AnalysisError(" ".join(affinity.messages) or "no affinity matrix could be computed")
        # Group before printing, so an invalid K is reported before pages of matrices.
        if k is not None:
            add_grouping(report, inputs, affinity, k, method=methods[0] if methods else None)
        _print_matrices(affinity.matrices, inputs.results["task"].unique(maintain_order=True).to_list())
        if affinity.agreement is not None:
            _print_frame("Agreement between estimators (Spearman ρ of off-diagonal entries, permutation p)", affinity.agreement)
        if affinity.scores is not None:
            _print_frame("Estimators scored against the known relations", affinity.scores)
        if affinity.costs is not None:
            _print_frame("Cost of each estimator", affinity.costs.drop("note"))
        if k is not None:
            _print_grouping(report.grouping)
    _print_notes(report)
    if out is not None:
        report.write(out)
        _console().print(f"tables written to {escape(str(out))}", highlight=False)


def _data_scale_report(
    results: Path, metric: Optional[list[str]], bootstrap: int, seed: int, task: Optional[str] = None, need_fit: bool = True
):
    """Load ``results``, compute relative changes and fit the data-scale model (shared by data-scale and advise).

    Without ``need_fit``, a table the regression cannot use (no per-task training sizes, as in numbers typed in
    from a publication) still gives the clinical-group view and the task-type tests, with the reason noted.
    """
    from usagg.analysis.full import add_data_scale, add_transfer
    from usagg.analysis.inputs import load_inputs
    from usagg.analysis.relative import parse_metric_overrides
    from usagg.analysis.report import AnalysisReport

    inputs = load_inputs(results)
    report = AnalysisReport(origin=str(inputs.origin))
    add_transfer(report, inputs, parse_metric_overrides(metric or []), n_boot=bootstrap, seed=seed)
    try:
        add_data_scale(report, report.transfer.rel, inputs.sizes, bootstrap, seed, task=task)
    except AnalysisError as exc:
        if need_fit or "data_scale_groups" not in report.tables:
            raise
        report.messages.append(f"regression not fitted: {exc}")
    return report


def data_scale(
    results: Annotated[Path, typer.Argument(help=RESULTS_HELP, metavar="RESULTS")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write the tables (CSV, JSON) into.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", metavar="TYPE=METRIC", help=METRIC_HELP)] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help=SCALE_BOOTSTRAP_HELP)] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the bootstrap.")] = 0,
) -> None:
    """Regress relative change on log10(training images) with task type and paradigm; crossings and tests."""
    report = _data_scale_report(results, metric, bootstrap, seed, need_fit=False)
    fit = report.data_scale
    if fit is not None:
        _console().print(
            f"model: rel_change ~ {escape(fit.formula)} (OLS, HC3 errors); n = {fit.n} observations of {fit.n_tasks} "
            f"tasks; R² = {fit.r2:.3f} (adjusted {fit.r2_adj:.3f})",
            highlight=False,
        )
        _print_frame("Coefficients (relative change as a fraction: 0.01 = 1 %)", fit.table)
    if fit is not None and fit.crossings.height:
        crossings = fit.crossings.select(
            "paradigm", "task_type", "slope_per_log10", "n_train_cross", "ci_lo", "ci_hi", "bounded", "within_data_range"
        )
        _print_frame("Training images at which the predicted change crosses 0 (95 % cluster-bootstrap interval)", crossings)
    _print_frame("Clinical groups: Δm (%) against total training images", report.tables["data_scale_groups"], percent=("delta_m", "sd_tasks"))
    _print_frame("Task-type sensitivity (Kruskal–Wallis, one observation per task)", report.tables["task_type_tests"])
    if "task_type_pairwise" in report.tables:
        _print_frame("Pairwise Mann–Whitney U with Holm correction", report.tables["task_type_pairwise"])
    _print_notes(report)
    if out is not None:
        report.write(out)
        _console().print(f"tables written to {escape(str(out))}", highlight=False)


def advise_command(
    results: Annotated[Path, typer.Argument(help=RESULTS_HELP, metavar="RESULTS")],
    task: Annotated[Optional[str], typer.Option("--task", help="Advise on this task only.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write the advice tables (CSV) into.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", metavar="TYPE=METRIC", help=METRIC_HELP)] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help=SCALE_BOOTSTRAP_HELP)] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the bootstrap.")] = 0,
) -> None:
    """Predict each task's change under grouped and unified training at its data scale, and recommend one."""
    from usagg.analysis.advise import ADVICE_RULE

    report = _data_scale_report(results, metric, bootstrap, seed, task=task)
    advice = report.advice
    predictions = advice.predictions.select("task", "paradigm", "n_train", "predicted", "ci_lo", "ci_hi", "verdict", "observed")
    _print_frame(
        escape(f"Predicted relative change, % (model rel_change ~ {report.data_scale.formula}, 95 % CI)"),
        predictions,
        percent=("predicted", "ci_lo", "ci_hi", "observed"),
    )
    _print_frame("Recommendation per task", advice.recommendations.drop("task_type"))
    _console().print(f"rule: {escape(ADVICE_RULE)}", highlight=False)
    _print_notes(report)
    if out is not None:
        report.write(out)
        _console().print(f"tables written to {escape(str(out))}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    app.command("transfer-matrix")(transfer_matrix)
    app.command("data-scale")(data_scale)
    app.command("advise")(advise_command)
