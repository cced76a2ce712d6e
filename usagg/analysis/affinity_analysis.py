"""Run every affinity estimator the inputs allow, compare them, score them and record what each one cost."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from usagg.analysis.affinity import (
    METHODS,
    MIN_COVERAGE,
    Matrix,
    affinity_json_has,
    agreement_table,
    average_layers,
    coverage,
    expert_affinity_per_layer,
    find_run_files,
    fisher_affinity_matrix,
    gradient_affinity_matrix,
    lookahead_affinity_matrix,
    measured_affinity,
    read_affinity_json,
    score_against_relations,
)
from usagg.analysis.inputs import AnalysisInputs, run_seconds
from usagg.errors import AnalysisError, DataError

logger = logging.getLogger(__name__)

# Preference when one matrix must be chosen (grouping) and no relation matrix ranks them.
PREFERENCE = ("measured", "lookahead", "gradient", "experts", "fisher")

COST_SCHEMA = {
    "method": pl.String,
    "training_runs": pl.Int64,
    "extra_training_runs": pl.Int64,
    "pair_runs_for_all_pairs": pl.Int64,
    "pairs_measured": pl.Int64,
    "training_seconds": pl.Float64,
    "estimator_seconds": pl.Float64,
    "analysis_seconds": pl.Float64,
    "note": pl.String,
}


@dataclass
class AffinityAnalysis:
    """Affinity matrices by method, extra matrices, agreement, scores against known relations and costs."""

    matrices: dict[str, Matrix]
    extra: dict[str, Matrix] = field(default_factory=dict)  # gradient_magnitude, experts_layer<k>
    agreement: pl.DataFrame | None = None
    scores: pl.DataFrame | None = None
    costs: pl.DataFrame | None = None
    messages: list[str] = field(default_factory=list)

    def best_method(self) -> str:
        """Return the matrix to group by: the best-scoring estimator against known relations, else by ``PREFERENCE``.

        Without relations, a matrix with values for fewer than ``MIN_COVERAGE`` of the task pairs (pair runs of
        a few pairs) is passed over when another one exists, as the default affinity figure does.
        """
        if self.scores is not None and self.scores.height:
            finite = self.scores.filter(pl.col("spearman_rho").is_not_nan() & pl.col("spearman_rho").is_not_null())
            if finite.height:
                return str(finite.sort("spearman_rho", descending=True)["method"][0])
        available = [method for method in PREFERENCE if method in self.matrices]
        if not available:
            raise AnalysisError("no affinity matrix was computed")
        dense = [method for method in available if coverage(self.matrices[method][1]) >= MIN_COVERAGE]
        return (dense or available)[0]


def available_methods(inputs: AnalysisInputs) -> list[str]:
    """Return the estimators whose inputs exist: pair runs, affinity.json, routing_stats.json.

    The Fisher affinity is listed only when an affinity.json contains it, because older runs do not record it.
    """
    methods = []
    if inputs.has_pairs:
        methods.append("measured")
    if inputs.root is not None and inputs.run_files("affinity.json"):
        methods.extend(["lookahead", "gradient"])
    if inputs.root is not None and inputs.run_files("routing_stats.json"):
        methods.append("experts")
    if inputs.root is not None and affinity_json_has(inputs.root, "fisher"):
        methods.append("fisher")
    return methods


def analyse_affinity(
    inputs: AnalysisInputs,
    methods: Sequence[str] | None = None,
    relations: Matrix | None = None,
    metrics: dict[str, str] | None = None,
    n_permutations: int = 999,
    seed: int = 0,
) -> AffinityAnalysis:
    """Compute the requested affinity matrices (default: every available one) with agreement, scores and costs.

    A requested method whose input is missing raises; with ``methods`` None it is skipped with a message.
    """
    requested = list(methods) if methods else available_methods(inputs)
    if not methods and "lookahead" in requested and "fisher" not in requested:
        requested.append("fisher")  # not recorded by these runs: skipped below with the reason and the fix
    unknown = [m for m in requested if m not in METHODS]
    if unknown:
        raise AnalysisError(f"affinity method(s) {', '.join(unknown)} invalid; choose from {', '.join(METHODS)}")
    explicit = methods is not None and len(methods) > 0
    result = AffinityAnalysis(matrices={})
    costs = []
    for method in requested:
        started = time.perf_counter()
        try:
            matrix, cost = _estimate(inputs, method, metrics, result)
        except (AnalysisError, DataError) as exc:
            if explicit:
                raise
            result.messages.append(f"affinity method {method} skipped: {exc}")
            continue
        result.matrices[method] = matrix
        cost["analysis_seconds"] = time.perf_counter() - started
        costs.append(cost)
    if not result.matrices:
        if explicit:
            raise AnalysisError("no affinity matrix could be computed")
        result.messages.append(
            f"{inputs.origin}: no affinity estimator has inputs; give pair rows (paradigm pair, from usagg train "
            "--pairs or typed in) for measured transfer, or a study output directory whose unified run has "
            "affinity.json (lookahead, gradient, fisher) or routing_stats.json (experts)"
        )
        return result
    result.costs = pl.DataFrame(costs, schema=COST_SCHEMA)
    if len(result.matrices) >= 2:
        result.agreement = agreement_table(result.matrices, n_permutations, seed)
    if relations is not None:
        scored = {**result.matrices, **_scored_extras(result)}
        result.scores = score_against_relations(scored, relations, n_permutations, seed)
        for name, (tasks, _) in scored.items():
            shared = sorted(set(tasks) & set(relations[0]))
            if len(shared) < 2:
                result.messages.append(
                    f"the relation matrix shares {len(shared)} task(s) with the {name} matrix, so {name} is not "
                    f"scored against it (relation tasks: {', '.join(relations[0][:6])}{' …' if len(relations[0]) > 6 else ''}; "
                    f"{name} tasks: {', '.join(tasks[:6])}{' …' if len(tasks) > 6 else ''}); check that the relations "
                    "file belongs to this study and names its tasks as the results do"
                )
    return result


def _scored_extras(result: AffinityAnalysis) -> dict[str, Matrix]:
    return {name: m for name, m in result.extra.items() if name == "gradient_magnitude"}


def _estimate(
    inputs: AnalysisInputs, method: str, metrics: dict[str, str] | None, result: AffinityAnalysis
) -> tuple[Matrix, dict]:
    cost = {key: None for key in COST_SCHEMA}
    cost["method"] = method
    if method == "measured":
        matrix = measured_affinity(inputs.results, metrics, notes=result.messages)
        # Every pair of the study's tasks, not only of those in a measured pair: the cost the estimator saves.
        n_tasks = inputs.results["task"].n_unique()
        pair_rows = inputs.results.filter(pl.col("paradigm") == "pair")
        cost["training_runs"] = pair_rows["run_id"].n_unique()
        cost["extra_training_runs"] = cost["training_runs"]
        cost["pairs_measured"] = pair_rows["group"].n_unique()
        cost["pair_runs_for_all_pairs"] = n_tasks * (n_tasks - 1) // 2
        cost["training_seconds"] = _pair_seconds(inputs)
        cost["note"] = "one training run per task pair (and seed), on top of the task-specific runs"
        return matrix, cost

    if inputs.root is None:
        raise AnalysisError(
            f"--method {method} reads files of a unified run; give a study output directory or run directory, "
            "not a results table"
        )
    if method in ("lookahead", "gradient", "fisher"):
        files = find_run_files(inputs.root, "affinity.json")
        if method == "lookahead":
            matrix = lookahead_affinity_matrix(inputs.root)
            key = "lookahead"
        elif method == "fisher":
            matrix = fisher_affinity_matrix(inputs.root)
            key = "fisher"
        else:
            matrix = gradient_affinity_matrix(inputs.root, "cosine")
            key = "gradient_cosine"
            try:
                result.extra["gradient_magnitude"] = gradient_affinity_matrix(inputs.root, "magnitude")
            except DataError as exc:
                result.messages.append(f"gradient magnitude similarity not read: {exc}")
        seconds = 0.0
        records = 0
        for file in files:
            meta = read_affinity_json(file, key)[2]
            seconds += float(meta.get("seconds", math.nan))
            records += int(meta.get("n_records", 0))
        n_tasks = len(matrix[0])
        cost["training_runs"] = len(files)
        cost["extra_training_runs"] = 0
        cost["pair_runs_for_all_pairs"] = n_tasks * (n_tasks - 1) // 2
        cost["estimator_seconds"] = seconds
        cost["training_seconds"] = _sum_or_none([run_seconds(f.parent) for f in files])
        when = "on the final weights of" if method == "fisher" else "during"
        cost["note"] = f"recorded {records} time(s) {when} the unified run(s) it comes from; no extra training run"
        return matrix, cost

    tasks, per_layer = expert_affinity_per_layer(inputs.root)
    for layer, m in per_layer.items():
        result.extra[f"experts_layer{layer}"] = (tasks, m)
    averaged = average_layers(per_layer)
    files = find_run_files(inputs.root, "routing_stats.json")
    n_tasks = len(tasks)
    cost["training_runs"] = len(files)
    cost["extra_training_runs"] = 0
    cost["pair_runs_for_all_pairs"] = n_tasks * (n_tasks - 1) // 2
    cost["estimator_seconds"] = 0.0
    cost["training_seconds"] = _sum_or_none([run_seconds(f.parent) for f in files])
    cost["note"] = f"routing counters of the unified run(s), {len(per_layer)} MoE layer(s); no extra training run"
    return (tasks, averaged), cost


def _sum_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known and len(known) == len(values) else None


def _pair_seconds(inputs: AnalysisInputs) -> float | None:
    if inputs.root is None:
        return None
    run_files = sorted((inputs.root / "pair").glob("*/*/*/run.json")) if (inputs.root / "pair").is_dir() else []
    if not run_files:
        return None
    # NOTE: a run.json without a wall-time key makes the total unknown rather than an undercount.
    return _sum_or_none([run_seconds(f.parent) for f in run_files])
