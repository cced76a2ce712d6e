"""Relative change of each task under aggregated training, and Δm over sets of tasks.

Relative change of task t under an aggregated paradigm (grouped, unified, pair):

    r_t = s_t · (M_agg − M_ts) / |M_ts|,   s_t = +1 if higher is better, −1 otherwise,

against the task-specific run with the same study, data fraction, seed and split, so r_t > 0 means
aggregation helped and r_t < 0 is negative transfer. Δm (Maninis et al., CVPR 2019, "Attentive
single-tasking of multiple tasks"; Vandenhende et al., TPAMI 2021) is the mean of r_t over a set of tasks.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence

import polars as pl

from usagg.errors import AnalysisError
from usagg.results import validate_results
from usagg.tasks import HIGHER_IS_BETTER

logger = logging.getLogger(__name__)

TASK_SPECIFIC = "task_specific"
PAIR = "pair"

# Primary metric per task type, in order of preference; regression covers keypoints (MRE) and scalars (MAE).
DEFAULT_PRIMARY_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("dice",),
    "classification": ("auc",),
    "detection": ("iou",),
    "regression": ("mre_mm", "mre_px", "mae"),
}

# Rows with equal values in these columns are compared with each other; seed may be null (reported numbers).
MATCH_KEYS = ["study", "task", "metric", "split", "data_fraction", "seed"]
NULL_SEED_KEY = -(2**62)
# A relative change of at least this magnitude (a fraction, 1.0 = 100 %) is reported with a warning.
LARGE_REL_CHANGE = 1.0
# A task and metric with the same score in at least this many trained runs is reported as constant.
MIN_RUNS_FOR_CONSTANT = 3

REL_COLUMNS = [
    "study",
    "paradigm",
    "group",
    "task",
    "task_type",
    "organ",
    "clinical_group",
    "n_train",
    "data_fraction",
    "seed",
    "split",
    "metric",
    "higher_is_better",
    "value_ts",
    "value",
    "rel_change",
    "run_id",
    "run_id_ts",
    "source",
]


def format_percent(fraction: float | None, digits: int = 1, signed: bool = True) -> str:
    """Format a fraction as percent, signed for changes; "–" when missing. A value that rounds to 0 shows no minus."""
    if fraction is None or not math.isfinite(fraction):
        return "–"
    value = round(100 * fraction, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{value:{'+' if signed else ''}.{digits}f}"


def parse_metric_overrides(items: Sequence[str]) -> dict[str, str]:
    """Parse ``KEY=METRIC`` options, where KEY is a task type or a task name, into a dict."""
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, metric = item.partition("=")
        if not sep or not key.strip() or not metric.strip():
            raise AnalysisError(
                f"--metric {item!r} is not of the form TYPE=METRIC or TASK=METRIC, e.g. --metric segmentation=hd95"
            )
        overrides[key.strip()] = metric.strip()
    return overrides


def choose_metrics(
    results: pl.DataFrame, metrics: Mapping[str, str] | None = None, all_metrics: bool = False
) -> tuple[pl.DataFrame, list[str]]:
    """Return the (task, metric) pairs to analyse and warnings about tasks without their primary metric.

    ``metrics`` maps a task type or a task name to a metric; a task name takes precedence over its type.
    """
    overrides = dict(metrics or {})
    available = results.select("task", "task_type", "metric").unique()
    known_keys = set(available["task"]) | set(available["task_type"]) | set(DEFAULT_PRIMARY_METRICS)
    unknown = sorted(k for k in overrides if k not in known_keys)
    if unknown:
        raise AnalysisError(
            f"--metric names {', '.join(unknown)}, which is neither a task type "
            f"({', '.join(DEFAULT_PRIMARY_METRICS)}) nor a task in the results table"
        )
    for key, metric in sorted(overrides.items()):
        rows_of_key = available.filter((pl.col("task") == key) | (pl.col("task_type") == key))
        if metric not in set(rows_of_key["metric"]):
            present = sorted(set(rows_of_key["metric"]))
            guess = difflib.get_close_matches(metric, present, n=1, cutoff=0.5)
            raise AnalysisError(
                f"--metric {key}={metric}: no row of {key} has metric {metric!r}"
                + (f" (did you mean {guess[0]!r}?)" if guess else "")
                + f"; its rows have {', '.join(present) or 'no metric'}"
            )
    if all_metrics:
        return available.select("task", "metric").sort("task", "metric"), []

    warnings: list[str] = []
    rows: list[dict[str, str]] = []
    by_task = available.group_by("task", maintain_order=True).agg(pl.col("task_type").first(), pl.col("metric"))
    for task, task_type, task_metrics in by_task.sort("task").iter_rows():
        present = set(task_metrics)
        if task in overrides or task_type in overrides:
            preferred = (overrides.get(task) or overrides[task_type],)
        else:
            preferred = DEFAULT_PRIMARY_METRICS.get(task_type, ())
        chosen = next((m for m in preferred if m in present), None)
        if chosen is None:
            typos = []
            for metric in sorted(present):
                guess = difflib.get_close_matches(metric.lower(), preferred, n=1, cutoff=0.5)
                if guess:
                    typos.append(f"{metric} for {guess[0]}")
            hint = f" If {', '.join(typos)} is a misspelling, rename it in the table." if typos else ""
            warnings.append(
                f"task {task!r} ({task_type}): primary metric {' or '.join(preferred) or '(none for this type)'} "
                f"not in the results table (it has {', '.join(sorted(present))}); the task is left out. "
                f"Choose one with --metric {task}=METRIC.{hint}"
            )
            continue
        rows.append({"task": task, "metric": chosen})
        warnings.extend(_misspelt_metric_warnings(results, task, chosen, present))
    schema = {"task": pl.String, "metric": pl.String}
    return pl.DataFrame(rows, schema=schema), warnings


def _misspelt_metric_warnings(results: pl.DataFrame, task: str, chosen: str, present: set[str]) -> list[str]:
    """Warn of a task's rows whose metric, unknown to usagg, looks like a misspelling of the one it is compared by.

    Those rows are left out without a word otherwise: a 'dcie' or 'Dice' row among a task's 'dice' rows drops a
    seed from its statistics.
    """
    warnings = []
    for metric in sorted(present - {chosen} - set(HIGHER_IS_BETTER)):
        if metric.lower() != chosen and not difflib.get_close_matches(metric.lower(), [chosen], n=1, cutoff=0.75):
            continue
        rows = results.filter((pl.col("task") == task) & (pl.col("metric") == metric))
        runs = sorted(set(rows["run_id"].to_list()))
        warnings.append(
            f"task {task!r}: {rows.height} row(s) have metric {metric!r}, which looks like a misspelling of "
            f"{chosen!r}, the metric the task is compared by; they are left out (run(s) {', '.join(runs[:5])}"
            f"{' …' if len(runs) > 5 else ''}), so rename the metric in those rows"
        )
    return warnings


def relative_change_with_warnings(
    results: pl.DataFrame,
    metrics: Mapping[str, str] | None = None,
    all_metrics: bool = False,
    paradigms: Sequence[str] | None = None,
) -> tuple[pl.DataFrame, list[str]]:
    """Compute the relative-change table (see :func:`relative_change`) and return the warnings as data."""
    # Rows with metric train_images count training images of a group; they are sizes, not scores.
    table = validate_results(results).filter(pl.col("metric") != "train_images")
    chosen, warnings = choose_metrics(table, metrics, all_metrics)
    table = table.join(chosen, on=["task", "metric"], how="semi")
    unknown = sorted(set(table["metric"].to_list()) - set(HIGHER_IS_BETTER))
    if unknown:
        close = []
        for metric in unknown:
            guess = difflib.get_close_matches(metric.lower(), list(HIGHER_IS_BETTER), n=1)
            close.append(f"{metric} (did you mean {guess[0]}?)" if guess else metric)
        warnings.append(
            f"metric(s) {', '.join(close)} are not ones usagg knows, so their higher_is_better is taken from the "
            "table unchecked; a wrong direction flips the sign of every relative change of that metric"
        )
    # Data fractions written by different tools may differ in the last bits; compare them rounded.
    table = table.with_columns(pl.col("data_fraction").round(6))

    reference = table.filter(pl.col("paradigm") == TASK_SPECIFIC)
    if paradigms is None:
        aggregated = table.filter(~pl.col("paradigm").is_in([TASK_SPECIFIC, PAIR]))
    else:
        aggregated = table.filter(pl.col("paradigm").is_in(list(paradigms)))

    duplicates = reference.group_by(MATCH_KEYS).len().filter(pl.col("len") > 1)
    if duplicates.height:
        first = duplicates.row(0, named=True)
        key = ", ".join(f"{k}={'empty' if first[k] is None else first[k]}" for k in MATCH_KEYS)
        if first["seed"] is None and aggregated["seed"].drop_nulls().len():
            fix = (
                "the other paradigms have seeds, so give each task-specific row the seed of the runs it is compared "
                "with (or leave the seed empty in every paradigm for numbers reported once)"
            )
        else:
            fix = "keep one row per study, task, metric, split, data fraction and seed (e.g. drop repeated evaluations)"
        raise AnalysisError(f"results table has {first['len']} task-specific rows for {key}; {fix}")

    # Reported numbers have a null seed; a sentinel key lets them match each other in the join.
    seed_key = pl.col("seed").fill_null(NULL_SEED_KEY).alias("_seed_key")
    join_keys = [k for k in MATCH_KEYS if k != "seed"] + ["_seed_key"]
    ref = reference.select(
        *[k for k in MATCH_KEYS if k != "seed"], seed_key,
        pl.col("value").alias("value_ts"), pl.col("run_id").alias("run_id_ts"),
    )
    rel = aggregated.with_columns(seed_key).join(ref, on=join_keys, how="left").drop("_seed_key")

    unmatched = rel.filter(pl.col("run_id_ts").is_null())
    if unmatched.height:
        examples = unmatched.select("paradigm", "task", "data_fraction", "seed", "split").unique().sort(pl.all())
        listed = "; ".join(
            f"{p}/{t} fraction {f} seed {s} split {sp}" for p, t, f, s, sp in examples.head(5).iter_rows()
        )
        more = f" and {examples.height - 5} more" if examples.height > 5 else ""
        message = (
            f"{examples.height} aggregated result(s) have no task-specific result with the same study, metric, "
            f"data fraction, seed and split and are left out: {listed}{more}"
        )
        # Name the splits that the task-specific runs were never evaluated on, the usual cause.
        missing_splits = sorted(set(unmatched["split"].to_list()) - set(reference["split"].to_list()))
        if missing_splits:
            message += (
                f". No task-specific result has split {', '.join(missing_splits)}; to compare it, evaluate the "
                f"task-specific runs on it too (`usagg evaluate RUN_DIR --split {missing_splits[0]}`)"
            )
        warnings.append(message)
        rel = rel.filter(pl.col("run_id_ts").is_not_null())

    sign = pl.when(pl.col("higher_is_better")).then(1.0).otherwise(-1.0)
    rel = rel.with_columns(
        (sign * (pl.col("value") - pl.col("value_ts")) / pl.col("value_ts").abs()).alias("rel_change")
    )
    # A reference value of 0 (or a NaN value) gives NaN or inf, which is reported as NaN with a warning.
    bad = rel.filter(pl.col("rel_change").is_null() | ~pl.col("rel_change").is_finite())
    if bad.height:
        warnings.append(
            f"{bad.height} row(s) have no finite relative change because the task-specific value is 0 or a value "
            f"is NaN or empty (e.g. task {bad['task'][0]!r}, metric {bad['metric'][0]!r}); they are kept as NaN"
        )
        rel = rel.with_columns(
            pl.when(pl.col("rel_change").is_finite()).then(pl.col("rel_change")).otherwise(None).alias("rel_change")
        )
    warnings.extend(_large_change_warning(rel))
    warnings.extend(_constant_score_warnings(table))
    warnings.extend(_training_size_warnings(table))
    rel = rel.select(REL_COLUMNS).sort("paradigm", "task", "metric", "split", "data_fraction", "seed")
    if rel.height == 0 and aggregated.height:
        warnings.append("no aggregated run could be matched to a task-specific run; the relative-change table is empty")
    return rel, warnings


def _large_change_warning(rel: pl.DataFrame) -> list[str]:
    """Return a one-item list warning of relative changes of ±100 % or more, usually from a value near 0."""
    large = rel.filter(pl.col("rel_change").abs() >= LARGE_REL_CHANGE)
    if large.height == 0:
        return []
    worst = large.sort(pl.col("rel_change").abs(), descending=True).row(0, named=True)
    tasks = sorted(set(large["task"].to_list()))
    return [
        f"{large.height} row(s) of {len(tasks)} task(s) ({', '.join(tasks[:5])}{' …' if len(tasks) > 5 else ''}) "
        f"change by {LARGE_REL_CHANGE:.0%} or more against the task-specific run, the largest "
        f"{worst['rel_change']:+.0%} for task {worst['task']!r} ({worst['metric']} {worst['value_ts']:.4g} task-specific, "
        f"{worst['value']:.4g} {worst['paradigm']}{_where(worst)}). A value near 0 on either side (a run that did not learn the task) "
        f"makes such changes, and one such task can dominate Δm; check those runs, or compare the task with another "
        f"metric (--metric TASK=METRIC)"
    ]


def _where(row: dict) -> str:
    """Return ", data fraction F, seed S, split X" for the parts of a comparison's key the row has."""
    parts = [
        f"{label} {row[key]:g}" if isinstance(row.get(key), float) else f"{label} {row[key]}"
        for key, label in (("data_fraction", "data fraction"), ("seed", "seed"), ("split", "split"))
        if row.get(key) is not None
    ]
    return ", " + ", ".join(parts) if parts else ""


def _training_size_warnings(table: pl.DataFrame) -> list[str]:
    """Warn of a task whose rows at one data fraction give different training-set sizes (n_train).

    Every run of a task at one fraction trains on the same images, so differing counts are usually a typo, and the
    data-scale analysis would place that task's points at several sizes.
    """
    keys = ["study", "task", "data_fraction"]
    per_count = (
        table.filter(pl.col("n_train").is_not_null())
        .group_by(*keys, "n_train")
        .agg(pl.col("run_id").unique().sort().alias("runs"))
        .filter(pl.len().over(keys) > 1)
        .sort(*keys, "n_train")
    )
    warnings = []
    for (_, task, fraction), part in per_count.group_by(keys, maintain_order=True):
        by_count = dict(zip(part["n_train"].to_list(), part["runs"].to_list()))
        warnings.append(
            f"task {task!r} at data fraction {fraction:g} has different n_train in different rows "
            f"({describe_runs_by_value(by_count)}); every run of a task at one fraction trains on the same images, "
            "so correct the count"
        )
    return warnings


def describe_runs_by_value(by_value: Mapping[object, Sequence[str]]) -> str:
    """Return "A (5 run(s)); B (1 run(s), e.g. r7)": each value with its run count, most common first.

    A value held by fewer than half of the runs is the likely odd one out, so one of its runs is named.
    """
    total = sum(len(runs) for runs in by_value.values())
    return "; ".join(
        f"{value} ({len(runs)} run(s){', e.g. ' + sorted(runs)[0] if len(runs) < total / 2 else ''})"
        for value, runs in sorted(by_value.items(), key=lambda item: -len(item[1]))
    )


def _constant_score_warnings(table: pl.DataFrame) -> list[str]:
    """Return a warning per task and metric that scores the same in every run of several paradigms.

    A model that predicts one output for every image (an empty mask, one box, one class) scores the same
    whatever it was trained with, so its relative change of 0 shows nothing about transfer.
    """
    scores = table.filter(pl.col("seed").is_not_null() & pl.col("value").is_not_null())
    constant = (
        scores.group_by("study", "task", "metric")
        .agg(
            pl.col("higher_is_better").first(),
            pl.col("value").min().alias("low"),
            pl.col("value").max().alias("high"),
            pl.len().alias("runs"),
            pl.col("paradigm").n_unique().alias("paradigms"),
        )
        .filter((pl.col("runs") >= MIN_RUNS_FOR_CONSTANT) & (pl.col("paradigms") >= 2))
        .filter((pl.col("high") - pl.col("low")).abs() <= 1e-9 * pl.max_horizontal(pl.col("high").abs(), pl.lit(1.0)))
        .sort("study", "task", "metric")
    )
    warnings = []
    for row in constant.iter_rows(named=True):
        same = (
            f"task {row['task']!r}: {row['metric']} is {row['low']:.4g} in every one of its {row['runs']} runs "
            f"({row['paradigms']} paradigms)"
        )
        # A perfect score (Dice or AUC of 1, an error of 0) is a ceiling, not a stuck model.
        perfect = row["low"] >= 1 - 1e-9 if row["higher_is_better"] else row["high"] <= 1e-12
        if perfect:
            warnings.append(
                f"{same}, its best possible value, so every run solves the task and its relative change of 0 "
                "cannot show transfer; a harder split or less training data would"
            )
        else:
            warnings.append(
                f"{same}, so the model probably gives the same prediction whatever it was trained with (an empty "
                "mask, one box or one class); its relative change of 0 says nothing about transfer. Check the "
                "task's labels and training budget, for example with `usagg plot --figure training`"
            )
    return warnings


def relative_change(
    results: pl.DataFrame,
    metrics: Mapping[str, str] | None = None,
    all_metrics: bool = False,
    paradigms: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Return one row per aggregated run × task × metric with ``rel_change`` against the task-specific run.

    ``rel_change`` is a fraction (+0.10 = 10 % better), signed by the metric's direction. By default only the
    primary metric of each task type is kept (``metrics`` overrides it per task type or task name; ``all_metrics``
    keeps every metric). ``paradigms`` defaults to every paradigm except task_specific and pair. Rows that
    cannot be matched are left out with a logged warning.
    """
    rel, warnings = relative_change_with_warnings(results, metrics, all_metrics, paradigms)
    for message in warnings:
        logger.warning(message)
    return rel


def delta_m(rel: pl.DataFrame, by: Sequence[str] = ("paradigm",)) -> pl.DataFrame:
    """Return Δm, the mean relative change over tasks, for each group of rows defined by ``by``.

    Each task counts once: its rows (several metrics, seeds or fractions within a group) are averaged first,
    then the task means are averaged. Columns: ``by``, ``delta_m``, ``sd_tasks`` (spread over tasks),
    ``n_tasks``, ``n_rows``. NaN relative changes are left out.
    """
    by = list(by)
    missing = [c for c in [*by, "task", "rel_change"] if c not in rel.columns]
    if missing:
        raise AnalysisError(f"delta_m: the relative-change table has no column(s) {', '.join(missing)}")
    valid = rel.filter(pl.col("rel_change").is_not_null() & pl.col("rel_change").is_not_nan())
    task_keys = by if "task" in by else [*by, "task"]
    per_task = valid.group_by(task_keys).agg(pl.col("rel_change").mean().alias("task_mean"), pl.len().alias("n_rows"))
    if not by:
        return per_task.select(
            pl.col("task_mean").mean().alias("delta_m"),
            pl.col("task_mean").std().alias("sd_tasks"),
            pl.len().cast(pl.Int64).alias("n_tasks"),
            pl.col("n_rows").sum().cast(pl.Int64).alias("n_rows"),
        )
    return (
        per_task.group_by(by)
        .agg(
            pl.col("task_mean").mean().alias("delta_m"),
            pl.col("task_mean").std().alias("sd_tasks"),
            pl.len().cast(pl.Int64).alias("n_tasks"),
            pl.col("n_rows").sum().cast(pl.Int64).alias("n_rows"),
        )
        .sort(by)
    )
