"""Task-affinity matrices from four estimators, their agreement, and their score against known relations.

Every matrix has rows i = source task and columns j = target task, so entry (i, j) measures how much task i
helps task j. The diagonal is NaN or ignored. Estimators:

- ``measured`` (Standley et al., ICML 2020, "Which tasks should be learned together"): the relative change of
  task j's metric when trained in a pair run with i ("pair" paradigm, group "i+j") rather than alone.
- ``lookahead`` (Fifty et al., NeurIPS 2021, "Efficiently identifying task groupings", TAG):
  Z(i→j) = 1 − L_j(θ_s after a step on task i) / L_j(θ_s), averaged over training; read from affinity.json.
- ``gradient``: cosine similarity of the task gradients on the shared parameters, and the gradient-magnitude
  similarity 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) of Yu et al., NeurIPS 2020 (PCGrad). Both are read from affinity.json.
- ``experts``: 1 − JSD₂(p_i, p_j) between the expert-usage distributions of two tasks in an MoE layer
  (Jensen–Shannon divergence in bits, so the similarity lies in [0, 1]), per layer and averaged over layers;
  read from routing_stats.json.
- ``fisher`` (Achille et al., ICCV 2019, "Task2Vec"): correlation of the log diagonal Fisher information of
  the two tasks' losses over the shared parameters' units, computed on the final weights of the unified run;
  read from affinity.json. Symmetric.

Agreement between two matrices is the Spearman correlation of their off-diagonal entries, with a permutation
p-value that relabels the tasks of one matrix (a Mantel test).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import stats
from scipy.spatial.distance import jensenshannon

from usagg.errors import AnalysisError, DataError
from usagg.io import read_json_file, write_text_atomic

logger = logging.getLogger(__name__)

METHODS = ("measured", "lookahead", "gradient", "experts", "fisher")
# affinity.json keys for the one-run estimators; "gradient" has two matrices.
JSON_KEYS = {
    "lookahead": "lookahead",
    "gradient": "gradient_cosine",
    "gradient_magnitude": "gradient_magnitude",
    "fisher": "fisher",
}

Matrix = tuple[list[str], np.ndarray]

_FRACTION_RE = re.compile(r"^frac-([0-9.]+)$")


# --- matrix files ------------------------------------------------------------------------------------


def matrix_to_csv_text(tasks: Sequence[str], matrix: np.ndarray, corner: str = "source\\target") -> str:
    """Format a task × task matrix as CSV: a header of task names and the task name first on every row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([corner, *tasks])
    for task, row in zip(tasks, np.asarray(matrix, dtype=float)):
        writer.writerow([task, *("" if not np.isfinite(v) else f"{v:.6g}" for v in row)])
    return buffer.getvalue()


def write_matrix_csv(tasks: Sequence[str], matrix: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a task × task matrix as CSV atomically; empty cells are NaN."""
    target = Path(path)
    write_text_atomic(target, matrix_to_csv_text(tasks, matrix))
    return target


def read_matrix_csv(path: str | os.PathLike) -> Matrix:
    """Read a task × task matrix CSV (header and first column are task names, in the same order)."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{file}: matrix file not found")
    with open(file, newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh) if row]
    if len(rows) < 2:
        raise DataError(f"{file}: a matrix CSV needs a header of task names and one row per task")
    header = [name.strip() for name in rows[0][1:]]
    row_names = [row[0].strip() for row in rows[1:]]
    if header != row_names:
        raise DataError(
            f"{file}: the header tasks ({', '.join(header)}) must equal the first-column tasks "
            f"({', '.join(row_names)}) in the same order"
        )
    matrix = np.full((len(header), len(header)), np.nan)
    for i, row in enumerate(rows[1:]):
        if len(row) - 1 != len(header):
            raise DataError(f"{file}: row {i + 1} ({row[0]!r}) has {len(row) - 1} values; expected {len(header)}")
        for j, cell in enumerate(row[1:]):
            cell = cell.strip()
            if cell in ("", "nan", "NaN", "NA"):
                continue
            try:
                matrix[i, j] = float(cell)
            except ValueError:
                raise DataError(f"{file}: row {i + 1}, column {header[j]!r}: {cell!r} is not a number") from None
    return header, matrix


def coverage(matrix: np.ndarray) -> float:
    """Return the share of the off-diagonal entries that have a value (0 for fewer than two tasks)."""
    n = matrix.shape[0]
    if n < 2:
        return 0.0
    off_diagonal = ~np.eye(n, dtype=bool)
    return float(np.isfinite(matrix[off_diagonal]).mean())


# A matrix with values for fewer than this share of task pairs (pair runs of a few pairs) is passed over when a
# denser one exists, for grouping and for the default affinity figure.
MIN_COVERAGE = 0.5


def read_relations(path: str | os.PathLike) -> Matrix:
    """Read a known task-relation matrix (values in [-1, 1]) written by the synthetic benchmark."""
    tasks, matrix = read_matrix_csv(path)
    finite = matrix[np.isfinite(matrix)]
    if finite.size and (finite.min() < -1 - 1e-9 or finite.max() > 1 + 1e-9):
        raise DataError(f"{path}: relation values must lie in [-1, 1]; found {finite.min():.3g} to {finite.max():.3g}")
    return tasks, matrix


# --- measured (pair runs) ----------------------------------------------------------------------------


def measured_affinity(
    results: pl.DataFrame,
    metrics: Mapping[str, str] | None = None,
    split: str | None = None,
    notes: list[str] | None = None,
) -> Matrix:
    """Return the pairwise-transfer matrix from pair runs: entry (i, j) is task j's relative change with i.

    Each entry averages the seeds at the largest data fraction measured for that pair. Unmeasured pairs are NaN.
    Warnings about unmatched rows go to ``notes`` when given, else to the log.
    """
    from usagg.analysis.relative import PAIR, relative_change_with_warnings

    pairs = results.filter(pl.col("paradigm") == PAIR)
    if pairs.height == 0:
        raise AnalysisError(
            "measured affinity needs pair runs (paradigm 'pair', group 'taskA+taskB'); plan them with "
            "`usagg train STUDY --pairs`, or give a study output directory with a unified run and choose "
            "--method lookahead, gradient, experts or fisher"
        )
    rel, found = relative_change_with_warnings(results, metrics, paradigms=[PAIR])
    for note in found:
        if notes is not None:
            notes.append(f"measured affinity: {note}")
        else:
            logger.warning("measured affinity: %s", note)
    rel = _one_split(rel, split)
    rel = rel.filter(pl.col("rel_change").is_not_null())
    bad = rel.filter(pl.col("group").str.split("+").list.len() != 2)
    if bad.height:
        raise DataError(
            f"pair run {bad['run_id'][0]!r}: group {bad['group'][0]!r} is not of the form taskA+taskB"
        )
    rel = rel.with_columns(
        pl.col("group").str.split("+").list.get(0).alias("_a"), pl.col("group").str.split("+").list.get(1).alias("_b")
    ).with_columns(pl.when(pl.col("task") == pl.col("_a")).then(pl.col("_b")).otherwise(pl.col("_a")).alias("source"))
    rel = rel.filter(pl.col("data_fraction") == pl.col("data_fraction").max().over("group"))
    means = rel.group_by("source", "task").agg(pl.col("rel_change").mean())
    tasks = sorted(set(means["source"].to_list()) | set(means["task"].to_list()))
    index = {t: k for k, t in enumerate(tasks)}
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    for source, target, value in means.iter_rows():
        if source != target:
            matrix[index[source], index[target]] = value
    return tasks, matrix


def _one_split(rel: pl.DataFrame, split: str | None) -> pl.DataFrame:
    splits = sorted(set(rel["split"].drop_nulls().to_list()))
    if split is None:
        if len(splits) <= 1:
            return rel
        split = "test" if "test" in splits else splits[0]
    return rel.filter(pl.col("split") == split)


# --- one-run estimators (affinity.json, routing_stats.json) -------------------------------------------


def _fraction_of(path: Path) -> float:
    for part in path.parts:
        match = _FRACTION_RE.match(part)
        if match:
            try:
                return float(match.group(1))
            except ValueError:
                pass
    return math.nan


def find_run_files(source: str | os.PathLike, name: str) -> list[Path]:
    """Return the files called ``name`` for a file, a run directory or a study directory.

    In a study directory the unified runs at the largest data fraction are used when there are any.
    """
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: not found; give a run directory, a study output directory or the {name} file")
    direct = path / name
    if direct.is_file():
        return [direct]
    found = sorted(path.rglob(name))
    if not found:
        raise DataError(
            f"{path}: no {name} found under this folder; it is written by unified training runs "
            "(see the training options that record affinity and routing statistics)"
        )
    unified = [f for f in found if "unified" in f.relative_to(path).parts]
    if unified:
        found = unified
    fractions = [_fraction_of(f) for f in found]
    if any(math.isfinite(f) for f in fractions):
        largest = max(f for f in fractions if math.isfinite(f))
        found = [f for f, fr in zip(found, fractions) if fr == largest or not math.isfinite(fr)]
    return found


def read_affinity_json(file: str | os.PathLike, key: str) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Read one matrix (a value of ``JSON_KEYS``) from an affinity.json."""
    path = Path(file)
    data = read_json_file(path)
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise DataError(f"{path}: key 'tasks' must be a non-empty list of task names")
    entry = data.get(key)
    if key in data and not (isinstance(entry, dict) and "matrix" in entry):
        raise DataError(f"{path}: {key!r} must be an object with a 'matrix' (a list of rows, one per task)")
    if entry is None:
        present = ", ".join(k for k in data if k != "tasks")
        raise DataError(f"{path}: no {key!r} matrix (keys present: {present or 'none'}); {_RECORD_HINTS.get(key, _RECORD_HINT)}")
    try:
        matrix = np.asarray([[math.nan if v is None else float(v) for v in row] for row in entry["matrix"]], dtype=float)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {key}.matrix must be rows of numbers (null for no value): {exc}") from None
    if matrix.shape != (len(tasks), len(tasks)):
        raise DataError(f"{path}: {key}.matrix has shape {matrix.shape}; expected {len(tasks)} × {len(tasks)} (one per task)")
    meta = {k: v for k, v in entry.items() if k != "matrix"}
    return [str(t) for t in tasks], matrix, meta


_RECORD_HINT = "record it during training (see the train.*_every options)"
_RECORD_HINTS = {
    "fisher": "add it to a trained run with `usagg evaluate RUN_DIR --fisher-images 32`, or set train.fisher_images",
}


def _average(matrices: list[Matrix], label: str, files: Sequence[Path]) -> Matrix:
    """Return the NaN-aware mean of the runs' matrices, which must list the same tasks and contain a value."""
    tasks = matrices[0][0]
    for (other, _), file in zip(matrices[1:], files[1:]):
        if other != tasks:
            raise DataError(
                f"{label}: {files[0]} lists the tasks {', '.join(tasks)} but {file} lists {', '.join(other)}; "
                "give one run directory, or a study folder whose unified runs train the same tasks"
            )
    stack = np.stack([m for _, m in matrices])
    off_diagonal = ~np.eye(len(tasks), dtype=bool)
    if not np.isfinite(stack[:, off_diagonal]).any():
        raise DataError(f"{label}: every value off the diagonal is empty in {', '.join(str(f) for f in files)}")
    with _quiet_nanmean():
        return list(tasks), np.nanmean(stack, axis=0)


@contextlib.contextmanager
def _quiet_nanmean() -> Iterator[None]:
    """Silence numpy's 'Mean of empty slice' warning, since all-NaN entries are expected to stay NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def lookahead_affinity_matrix(source: str | os.PathLike) -> Matrix:
    """Return the lookahead affinity Z(i→j) from affinity.json, averaged over the unified runs found."""
    files = find_run_files(source, "affinity.json")
    return _average([read_affinity_json(f, "lookahead")[:2] for f in files], "lookahead affinity", files)


def fisher_affinity_matrix(source: str | os.PathLike) -> Matrix:
    """Return the Fisher (Task2Vec) affinity from affinity.json, averaged over the unified runs found."""
    files = find_run_files(source, "affinity.json")
    return _average([read_affinity_json(f, "fisher")[:2] for f in files], "Fisher affinity", files)


def affinity_json_has(source: str | os.PathLike, key: str) -> bool:
    """Return whether an affinity.json found for ``source`` contains the matrix ``key``; unreadable files count as no."""
    try:
        files = find_run_files(source, "affinity.json")
    except DataError:
        return False
    for file in files:
        try:
            data = read_json_file(file)
        except DataError:
            continue
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            return True
    return False


def gradient_affinity_matrix(source: str | os.PathLike, kind: str = "cosine") -> Matrix:
    """Return the gradient cosine (``kind="cosine"``) or magnitude-similarity matrix from affinity.json."""
    if kind not in ("cosine", "magnitude"):
        raise AnalysisError(f"gradient affinity kind {kind!r} is invalid; use 'cosine' or 'magnitude'")
    files = find_run_files(source, "affinity.json")
    key = f"gradient_{kind}"
    return _average([read_affinity_json(f, key)[:2] for f in files], f"gradient {kind} affinity", files)


def _usage_distributions(routing: Mapping[str, Any], file: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Return tasks, layers and usage[task, layer, expert] normalised to distributions (NaN rows if unused)."""
    task_stats = routing.get("tasks") if isinstance(routing, Mapping) else None
    if not isinstance(task_stats, Mapping) or not task_stats:
        raise DataError(f"{file}: key 'tasks' must map each task to its per-layer routing statistics")
    tasks = sorted(task_stats)
    layers = sorted({str(layer) for stats_ in task_stats.values() for layer in stats_}, key=_layer_key)
    num_experts = routing.get("num_experts")
    if num_experts is None:
        num_experts = max(len(s["tokens_per_expert"]) for st in task_stats.values() for s in st.values())
    usage = np.full((len(tasks), len(layers), int(num_experts)), np.nan)
    for i, task in enumerate(tasks):
        for k, layer in enumerate(layers):
            entry = task_stats[task].get(layer)
            if entry is None:
                continue
            counts = np.asarray(entry.get("tokens_per_expert", []), dtype=float)
            if counts.shape != (int(num_experts),):
                raise DataError(
                    f"{file}: tasks.{task}.{layer}.tokens_per_expert has {counts.size} entries; expected {num_experts}"
                )
            if counts.sum() > 0:
                usage[i, k] = counts / counts.sum()
    return tasks, layers, usage


def _layer_key(layer: str) -> tuple[int, str]:
    return (int(layer), layer) if layer.isdigit() else (10**9, layer)


def expert_affinity_per_layer(source: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """Return 1 − JSD₂ between expert-usage distributions, one task × task matrix per MoE layer.

    With several runs the token counts are summed before normalising.
    """
    files = find_run_files(source, "routing_stats.json")
    usage_sum = None
    tasks: list[str] = []
    layers: list[str] = []
    for file in files:
        t, l, usage = _usage_distributions(read_json_file(file), file)
        if usage_sum is None:
            tasks, layers, usage_sum = t, l, np.nan_to_num(usage)
        elif (t, l) != (tasks, layers):
            raise DataError(f"{file}: routing statistics list other tasks or layers than {files[0]}")
        else:
            usage_sum = usage_sum + np.nan_to_num(usage)
    assert usage_sum is not None
    per_layer: dict[str, np.ndarray] = {}
    for k, layer in enumerate(layers):
        matrix = np.full((len(tasks), len(tasks)), np.nan)
        for i, j in itertools.combinations(range(len(tasks)), 2):
            p, q = usage_sum[i, k], usage_sum[j, k]
            if p.sum() <= 0 or q.sum() <= 0:
                continue
            # scipy returns the Jensen-Shannon distance, the square root of the divergence.
            divergence = float(jensenshannon(p, q, base=2.0)) ** 2
            matrix[i, j] = matrix[j, i] = 1.0 - divergence
        per_layer[layer] = matrix
    return tasks, per_layer


def expert_affinity_matrix(source: str | os.PathLike, layer: str | None = None) -> Matrix:
    """Return the expert-usage similarity averaged over MoE layers, or of one ``layer``."""
    tasks, per_layer = expert_affinity_per_layer(source)
    if layer is not None:
        if str(layer) not in per_layer:
            raise AnalysisError(f"MoE layer {layer!r} is not in the routing statistics (layers: {', '.join(per_layer)})")
        return tasks, per_layer[str(layer)]
    return tasks, average_layers(per_layer)


def average_layers(per_layer: Mapping[str, np.ndarray]) -> np.ndarray:
    """Return the mean over MoE layers of per-layer matrices; an entry NaN in every layer stays NaN."""
    stack = np.stack(list(per_layer.values()))
    with _quiet_nanmean():
        return np.nanmean(stack, axis=0)


def load_affinity(source: Any, method: str, **options: Any) -> Matrix:
    """Return (task names, matrix) for ``method``: measured (a results table), lookahead, gradient, experts, fisher.

    ``source`` is a results DataFrame for ``measured`` and a path (affinity.json, routing_stats.json, run or
    study directory) for the others. ``gradient`` returns the cosine matrix; use
    :func:`gradient_affinity_matrix` with ``kind="magnitude"`` for the magnitude similarity.
    """
    if method == "measured":
        if not isinstance(source, pl.DataFrame):
            from usagg.results import read_results

            source = read_results(source)
        return measured_affinity(source, **options)
    if method == "lookahead":
        return lookahead_affinity_matrix(source)
    if method == "gradient":
        return gradient_affinity_matrix(source, **options)
    if method == "experts":
        return expert_affinity_matrix(source, **options)
    if method == "fisher":
        return fisher_affinity_matrix(source)
    raise AnalysisError(f"affinity method {method!r} is invalid; choose one of {', '.join(METHODS)}")


# --- agreement and scoring ----------------------------------------------------------------------------


def align(a: Matrix, b: Matrix) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Restrict two matrices to their common tasks, in the order of ``a``."""
    common = [t for t in a[0] if t in set(b[0])]
    ia = [a[0].index(t) for t in common]
    ib = [b[0].index(t) for t in common]
    return common, a[1][np.ix_(ia, ia)], b[1][np.ix_(ib, ib)]


def agreement(a: Matrix, b: Matrix, n_permutations: int = 999, seed: int = 0) -> dict[str, Any]:
    """Return the Spearman correlation of the off-diagonal entries of two matrices and its permutation p-value.

    The null distribution relabels the tasks of ``b`` (rows and columns together). With few tasks, every
    permutation is enumerated and the p-value is exact. NaN entries (in either matrix) are left out.
    """
    tasks, ma, mb = align(a, b)
    n_tasks = len(tasks)
    result: dict[str, Any] = {"rho": math.nan, "p_value": math.nan, "n_tasks": n_tasks, "n_pairs": 0, "permutations": 0}
    if n_tasks < 3:
        return result
    rows, cols = np.where(~np.eye(n_tasks, dtype=bool))
    va = ma[rows, cols]
    vb = mb[rows, cols]
    ok = np.isfinite(va) & np.isfinite(vb)
    result["n_pairs"] = int(ok.sum())
    if ok.sum() < 3 or np.ptp(va[ok]) == 0 or np.ptp(vb[ok]) == 0:
        return result
    rho = float(stats.spearmanr(va[ok], vb[ok]).statistic)
    result["rho"] = rho

    if math.factorial(n_tasks) <= n_permutations + 1:
        perms = np.array(list(itertools.permutations(range(n_tasks))))
    else:
        rng = np.random.default_rng(seed)
        perms = np.array([rng.permutation(n_tasks) for _ in range(n_permutations)])
    permuted = mb[perms[:, rows], perms[:, cols]]  # (n_perm, n_offdiag)
    valid = np.isfinite(permuted) & np.isfinite(va)[None, :]
    if valid.all():
        ra = stats.rankdata(va)
        rb = stats.rankdata(permuted, axis=1)
        rho_null = _row_pearson(ra, rb)
    else:
        # A relabelling whose entries are constant where both matrices have values has no defined correlation.
        # It is left out of the null distribution, and ``permutations`` counts the relabellings kept.
        rho_null = np.array([
            stats.spearmanr(va[m], row[m]).statistic if m.sum() >= 3 and np.ptp(row[m]) > 0 and np.ptp(va[m]) > 0 else np.nan
            for row, m in zip(permuted, valid)
        ])
    rho_null = rho_null[np.isfinite(rho_null)]
    exact = math.factorial(n_tasks) <= n_permutations + 1
    extreme = int(np.sum(np.abs(rho_null) >= abs(rho) - 1e-12))
    # Enumerated permutations include the identity; sampled ones get the observed value added (Phipson & Smyth 2010).
    result["p_value"] = extreme / rho_null.size if exact else (extreme + 1) / (rho_null.size + 1)
    result["permutations"] = int(rho_null.size)
    result["exact"] = exact
    return result


def _row_pearson(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    xc = x - x.mean()
    yc = ys - ys.mean(axis=1, keepdims=True)
    denom = np.sqrt((xc**2).sum()) * np.sqrt((yc**2).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (yc @ xc) / denom


def agreement_table(matrices: Mapping[str, Matrix], n_permutations: int = 999, seed: int = 0) -> pl.DataFrame:
    """Return the pairwise agreement of every two estimators (Spearman ρ, permutation p, tasks, pairs)."""
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(matrices.items(), 2):
        result = agreement(a, b, n_permutations, seed)
        rows.append({"method_a": name_a, "method_b": name_b, **_agreement_row(result)})
    return pl.DataFrame(rows, schema=_AGREEMENT_SCHEMA | {"method_a": pl.String, "method_b": pl.String}).select(
        "method_a", "method_b", *_AGREEMENT_SCHEMA
    )


_AGREEMENT_SCHEMA = {
    "spearman_rho": pl.Float64,
    "p_value": pl.Float64,
    "n_tasks": pl.Int64,
    "n_pairs": pl.Int64,
    "permutations": pl.Int64,
}


def _agreement_row(result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "spearman_rho": result["rho"],
        "p_value": result["p_value"],
        "n_tasks": result["n_tasks"],
        "n_pairs": result["n_pairs"],
        "permutations": result["permutations"],
    }


def score_against_relations(
    matrices: Mapping[str, Matrix], relations: Matrix, n_permutations: int = 999, seed: int = 0
) -> pl.DataFrame:
    """Score each estimator against the known relation matrix (Spearman ρ of off-diagonal entries)."""
    rows = []
    for name, matrix in matrices.items():
        missing = sorted(set(relations[0]) - set(matrix[0]))
        result = agreement(matrix, relations, n_permutations, seed)
        rows.append({"method": name, **_agreement_row(result), "tasks_missing": ", ".join(missing)})
    schema = {"method": pl.String, **_AGREEMENT_SCHEMA, "tasks_missing": pl.String}
    return pl.DataFrame(rows, schema=schema).sort("spearman_rho", descending=True, nulls_last=True)
