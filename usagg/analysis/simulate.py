"""Generated results tables with a known data-scale effect, for tests, benchmarks and examples.

The generating model: a task's metric under an aggregated paradigm differs from its task-specific value by

    rel_change = intercept[paradigm, type] + slope[paradigm, type] · log10(n_train) + task effect + noise,

so a regression fitted on the table should recover the slopes and the zero crossings
``10 ** (-intercept / slope)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import polars as pl

from usagg.results import RESULTS_SCHEMA

TASK_TYPES = ("segmentation", "classification", "detection", "regression")
METRIC_BY_TYPE = {"segmentation": "dice", "classification": "auc", "detection": "iou", "regression": "mre_px"}
CLINICAL_GROUPS = ("obstetrics", "breast", "thyroid", "cardiac", "lung", "liver", "kidney", "musculoskeletal", "vascular")

# Aggregation helps small tasks and hurts large ones: the change falls by `slope` per tenfold more images.
DEFAULT_EFFECTS: dict[tuple[str, str], tuple[float, float]] = {
    ("grouped", "segmentation"): (0.30, -0.10),
    ("grouped", "classification"): (0.20, -0.06),
    ("grouped", "detection"): (0.25, -0.09),
    ("grouped", "regression"): (0.40, -0.15),
    ("unified", "segmentation"): (0.24, -0.08),
    ("unified", "classification"): (0.16, -0.05),
    ("unified", "detection"): (0.18, -0.07),
    ("unified", "regression"): (0.45, -0.18),
}


def simulate_results(
    n_tasks: int = 27,
    paradigms: Sequence[str] = ("task_specific", "grouped", "unified"),
    fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0),
    seeds: Sequence[int] | None = (0, 1, 2),
    effects: dict[tuple[str, str], tuple[float, float]] | None = None,
    noise_sd: float = 0.02,
    task_sd: float = 0.02,
    extra_metrics: bool = False,
    seed: int = 0,
    study: str = "simulated",
) -> pl.DataFrame:
    """Return a results table in the results schema with a known relative-change model.

    ``seeds=None`` writes one row per run with a null seed and source ``reported:simulated``.
    ``extra_metrics`` adds a second metric per task (hd95 for segmentation, accuracy for classification).
    """
    effects = effects or DEFAULT_EFFECTS
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {name: [] for name in RESULTS_SCHEMA}
    seed_list: list[int | None] = list(seeds) if seeds is not None else [None]
    source = "run" if seeds is not None else "reported:simulated"
    for t in range(n_tasks):
        task = f"task{t:02d}"
        task_type = TASK_TYPES[t % len(TASK_TYPES)]
        group = CLINICAL_GROUPS[(t // 3) % len(CLINICAL_GROUPS)]
        full_n = int(rng.integers(80, 8000))
        task_effect = rng.normal(0.0, task_sd)
        metric = METRIC_BY_TYPE[task_type]
        higher = metric != "mre_px"
        # Fractions (Dice, AUC) start low enough that the simulated gains keep them below 1.
        base = 20.0 + 30.0 * rng.random() if not higher else 0.45 + 0.3 * rng.random()
        metric_rows = [(metric, higher, base)]
        if extra_metrics and task_type == "segmentation":
            metric_rows.append(("hd95", False, 10.0 + 20.0 * rng.random()))
        if extra_metrics and task_type == "classification":
            metric_rows.append(("accuracy", True, 0.6 + 0.3 * rng.random()))
        for fraction in fractions:
            n_train = max(1, int(round(full_n * fraction)))
            for run_seed in seed_list:
                changes = {}
                for paradigm in paradigms:
                    if paradigm != "task_specific":
                        intercept, slope = effects[(paradigm, task_type)]
                        noise = rng.normal(0.0, noise_sd)
                        changes[paradigm] = intercept + slope * np.log10(n_train) + task_effect + noise
                for metric_name, metric_higher, metric_base in metric_rows:
                    ts_value = metric_base * (1.0 + rng.normal(0.0, 0.005))
                    sign = 1.0 if metric_higher else -1.0
                    for paradigm in paradigms:
                        if paradigm == "task_specific":
                            run_group, value = task, ts_value
                        else:
                            run_group = group if paradigm == "grouped" else "all"
                            value = ts_value * (1.0 + sign * changes[paradigm])
                        columns["study"].append(study)
                        columns["run_id"].append(f"{paradigm}/{run_group}/frac-{fraction}/seed-{run_seed}")
                        columns["paradigm"].append(paradigm)
                        columns["group"].append(run_group)
                        columns["task"].append(task)
                        columns["task_type"].append(task_type)
                        columns["organ"].append(group)
                        columns["clinical_group"].append(group)
                        columns["n_train"].append(n_train)
                        columns["data_fraction"].append(float(fraction))
                        columns["seed"].append(run_seed)
                        columns["split"].append("test")
                        columns["metric"].append(metric_name)
                        columns["value"].append(float(value))
                        columns["higher_is_better"].append(metric_higher)
                        columns["source"].append(source)
    return pl.DataFrame(columns, schema=RESULTS_SCHEMA)


def simulate_relations(n_tasks: int = 6, n_clusters: int = 2, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Return task names and a symmetric relation matrix in [-1, 1]: tasks of one cluster help each other."""
    rng = np.random.default_rng(seed)
    tasks = [f"task{t:02d}" for t in range(n_tasks)]
    cluster = np.arange(n_tasks) % n_clusters
    base = np.where(cluster[:, None] == cluster[None, :], 0.6, -0.4)
    noise = rng.uniform(-0.3, 0.3, size=(n_tasks, n_tasks))
    relations = np.clip(base + (noise + noise.T) / 2, -1.0, 1.0)
    np.fill_diagonal(relations, 1.0)
    return tasks, relations


def simulate_study_dir(
    root,
    n_tasks: int = 6,
    seeds: Sequence[int] = (0, 1, 2),
    n_images: int = 40,
    n_clusters: int = 2,
    pairs: bool = True,
    num_experts: int = 8,
    moe_layers: Sequence[int] = (3, 4, 5),
    seed: int = 0,
    study: str = "simdir",
):
    """Write a study output directory with run directories in the layout training produces.

    Holds ``results.parquet`` (study level and per run), ``per_image_scores.parquet`` for per-image metrics
    (Dice, IoU, MRE; AUC has none), ``run.json`` with ``train_seconds``, and for unified runs ``affinity.json``
    and ``routing_stats.json`` derived from the known ``relations.csv`` written beside them. Pair runs change a
    task by 10 % of its relation to the partner. Returns the root path.
    """
    import json
    from pathlib import Path

    from usagg.analysis.affinity import write_matrix_csv
    from usagg.results import write_results

    root = Path(root)
    rng = np.random.default_rng(seed)
    tasks, relations = simulate_relations(n_tasks, n_clusters, seed)
    write_matrix_csv(tasks, relations, root / "relations.csv")
    types = [TASK_TYPES[t % len(TASK_TYPES)] for t in range(n_tasks)]
    cluster = np.arange(n_tasks) % n_clusters
    groups = {t: f"group{cluster[k]}" for k, t in enumerate(tasks)}
    n_train = {t: int(rng.integers(60, 3000)) for t in tasks}
    base = {t: (0.5 + 0.4 * rng.random()) if METRIC_BY_TYPE[types[k]] != "mre_px" else 20 + 20 * rng.random() for k, t in enumerate(tasks)}
    # Grouped training changes a task by its mean relation to the group mates; unified by its mean relation to all.
    def planned_change(task_idx: int, mates: list[int]) -> float:
        mates = [m for m in mates if m != task_idx]
        return 0.1 * float(np.mean(relations[mates, task_idx])) if mates else 0.0

    runs: list[tuple[str, str, list[int]]] = [("task_specific", t, [k]) for k, t in enumerate(tasks)]
    for g in sorted(set(groups.values())):
        runs.append(("grouped", g, [k for k, t in enumerate(tasks) if groups[t] == g]))
    runs.append(("unified", "all", list(range(n_tasks))))
    if pairs:
        for a in range(n_tasks):
            for b in range(a + 1, n_tasks):
                runs.append(("pair", f"{tasks[a]}+{tasks[b]}", [a, b]))

    rows = {name: [] for name in RESULTS_SCHEMA}
    for run_seed in seeds:
        for paradigm, group, members in runs:
            run_dir = root / paradigm / group / "frac-1.0" / f"seed-{run_seed}"
            run_id = f"{study}/{paradigm}/{group}/frac-1.0/seed-{run_seed}"
            run_rows = {name: [] for name in RESULTS_SCHEMA}
            image_rows = {"run_id": [], "task": [], "split": [], "image": [], "metric": [], "value": []}
            for k in members:
                task, task_type = tasks[k], types[k]
                metric = METRIC_BY_TYPE[task_type]
                higher = metric != "mre_px"
                change = 0.0 if paradigm == "task_specific" else planned_change(k, members)
                seed_shift = rng.normal(0.0, 0.01)
                mean_value = base[task] * (1.0 + (change if higher else -change) + seed_shift)
                if metric == "auc":
                    value = float(np.clip(mean_value, 0.0, 1.0))
                else:
                    scores = mean_value + rng.normal(0.0, 0.1 * base[task], size=n_images)
                    value = float(scores.mean())
                    image_rows["run_id"] += [run_id] * n_images
                    image_rows["task"] += [task] * n_images
                    image_rows["split"] += ["test"] * n_images
                    image_rows["image"] += [f"{task}_img{i:03d}.png" for i in range(n_images)]
                    image_rows["metric"] += [metric] * n_images
                    image_rows["value"] += scores.tolist()
                for name, val in (
                    ("study", study), ("run_id", run_id), ("paradigm", paradigm), ("group", group), ("task", task),
                    ("task_type", task_type), ("organ", groups[task]), ("clinical_group", groups[task]),
                    ("n_train", n_train[task]), ("data_fraction", 1.0), ("seed", run_seed), ("split", "test"),
                    ("metric", metric), ("value", value), ("higher_is_better", higher), ("source", "run"),
                ):
                    run_rows[name].append(val)
                    rows[name].append(val)
            write_results(pl.DataFrame(run_rows, schema=RESULTS_SCHEMA), run_dir / "results.parquet")
            if image_rows["run_id"]:
                pl.DataFrame(image_rows).write_parquet(run_dir / "per_image_scores.parquet")
            (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "status": "done", "train_seconds": 100.0 + 10 * len(members)}))
            if paradigm == "unified":
                _write_one_run_estimates(run_dir, tasks, relations, cluster, num_experts, moe_layers, rng)
    write_results(pl.DataFrame(rows, schema=RESULTS_SCHEMA), root / "results.parquet")
    return root


def _write_one_run_estimates(run_dir, tasks, relations, cluster, num_experts, moe_layers, rng) -> None:
    import json

    n = len(tasks)
    noisy = relations + rng.normal(0.0, 0.15, size=(n, n))
    lookahead = 0.02 * noisy
    cosine = np.clip(0.5 * (relations + rng.normal(0.0, 0.2, size=(n, n))), -1, 1)
    cosine = (cosine + cosine.T) / 2
    np.fill_diagonal(cosine, 1.0)
    norms = rng.uniform(0.5, 2.0, size=n)
    magnitude = 2 * np.outer(norms, norms) / (norms[:, None] ** 2 + norms[None, :] ** 2)
    affinity = {
        "tasks": tasks,
        "lookahead": {"matrix": lookahead.tolist(), "n_records": 20, "seconds": 12.5},
        "gradient_cosine": {"matrix": cosine.tolist(), "n_records": 20, "seconds": 3.0},
        "gradient_magnitude": {"matrix": magnitude.tolist(), "n_records": 20, "seconds": 3.0},
    }
    # The Fisher estimate has its own generator keyed by the run, so adding it left the other draws unchanged.
    fisher_rng = np.random.default_rng(zlib.crc32("/".join(run_dir.parts[-4:]).encode()))
    fisher = np.clip(0.6 * relations + 0.3 + fisher_rng.normal(0.0, 0.1, size=(n, n)), -1, 1)
    fisher = (fisher + fisher.T) / 2
    np.fill_diagonal(fisher, np.nan)
    affinity["fisher"] = {"matrix": [[None if np.isnan(v) else float(v) for v in row] for row in fisher], "n_records": 1, "seconds": 2.0}
    (run_dir / "affinity.json").write_text(json.dumps(affinity))
    # Each cluster prefers its own block of experts.
    preference = rng.dirichlet(np.ones(num_experts) * 0.5, size=int(cluster.max()) + 1)
    stats = {"num_experts": num_experts, "layers": list(moe_layers), "tasks": {}}
    for k, task in enumerate(tasks):
        per_layer = {}
        for layer in moe_layers:
            mix = 0.8 * preference[cluster[k]] + 0.2 * rng.dirichlet(np.ones(num_experts))
            tokens = rng.multinomial(20000, mix / mix.sum())
            share = np.sort(tokens)[::-1][: max(1, num_experts // 5)].sum() / tokens.sum()
            probs = tokens / tokens.sum()
            entropy = float(-(probs[probs > 0] * np.log(probs[probs > 0])).sum())
            per_layer[str(layer)] = {
                "tokens_per_expert": tokens.tolist(), "entropy": entropy,
                "unused_experts": int((tokens == 0).sum()), "top20_share": float(share),
            }
        stats["tasks"][task] = per_layer
    (run_dir / "routing_stats.json").write_text(json.dumps(stats))
