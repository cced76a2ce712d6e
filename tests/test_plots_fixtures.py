"""Fixture inputs for the figure and reproduce tests: a 27-task results table and run directories.

The values are generated, not measured: relative changes follow a known trend (small tasks gain from
aggregation, large ones lose) so that the figures have something to show. File formats follow the
results schema and the run-directory layout (train_log.jsonl, routing_stats.json, affinity.json, run.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from usagg.results import RESULTS_SCHEMA, validate_results, write_results

STUDY = "fixture27"

# (name, type, clinical group, primary metric, training images at fraction 1). Twelve segmentation, nine
# classification, three detection and three regression tasks, as in the 27-task FMC_UIA study; long names
# test that labels fit.
TASKS_27 = [
    ("fetal_head_circumference_seg", "segmentation", "obstetrics", "dice", 1400),
    ("fetal_abdomen_seg", "segmentation", "obstetrics", "dice", 900),
    ("fetal_femur_seg", "segmentation", "obstetrics", "dice", 600),
    ("fetal_standard_plane_cls", "classification", "obstetrics", "auc", 4200),
    ("fetal_brain_plane_cls", "classification", "obstetrics", "auc", 2100),
    ("pubic_symphysis_head_seg", "segmentation", "obstetrics", "dice", 700),
    ("fetal_head_axis_points", "regression", "obstetrics", "mre_px", 800),
    ("breast_lesion", "segmentation", "breast", "dice", 650),
    ("breast_2cls", "classification", "breast", "auc", 780),
    ("breast_lesion_det", "detection", "breast", "iou", 520),
    ("thyroid_nodule_seg", "segmentation", "thyroid", "dice", 1100),
    ("thyroid_tirads_cls", "classification", "thyroid", "auc", 620),
    ("thyroid_nodule_det", "detection", "thyroid", "iou", 480),
    ("cardiac_four_chamber_seg", "segmentation", "cardiac", "dice", 450),
    ("cardiac_view_cls", "classification", "cardiac", "auc", 1500),
    ("left_ventricle_landmarks", "regression", "cardiac", "mre_px", 300),
    ("liver_lesion_seg", "segmentation", "abdomen", "dice", 380),
    ("kidney_seg", "segmentation", "abdomen", "dice", 260),
    ("fatty_liver_cls", "classification", "abdomen", "auc", 550),
    ("lung_b_line_cls", "classification", "lung", "auc", 340),
    ("lung_pleura_det", "detection", "lung", "iou", 210),
    ("nerve_vessel", "segmentation", "musculoskeletal", "dice", 120),
    ("muscle_thickness_points", "regression", "musculoskeletal", "mre_px", 150),
    ("carotid_plaque_seg", "segmentation", "vascular", "dice", 330),
    ("carotid_stenosis_cls", "classification", "vascular", "auc", 270),
    ("ovarian_tumour_cls", "classification", "gynaecology", "auc", 400),
    ("uterus_endometrium_seg", "segmentation", "gynaecology", "dice", 230),
]

TYPE_EFFECT = {"segmentation": -0.02, "classification": 0.01, "detection": -0.04, "regression": -0.06}
PARADIGM_EFFECT = {"grouped": 0.01, "unified": -0.01, "pair": 0.0}
HIGHER = {"dice": True, "auc": True, "iou": True, "mre_px": False}


def make_results(
    tasks=TASKS_27,
    paradigms=("task_specific", "grouped", "unified"),
    fractions=(0.25, 0.5, 1.0),
    seeds=(0, 1),
    split="test",
    rng_seed=0,
) -> pl.DataFrame:
    """Build a results table with one row per run × task (primary metric only)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    base = {name: 0.6 + 0.3 * rng.random() for name, *_ in tasks}
    for paradigm in paradigms:
        for fraction in fractions:
            for seed in seeds:
                for name, task_type, group, metric, n_full in tasks:
                    n_train = max(1, round(n_full * fraction))
                    value_ts = base[name] * (0.9 + 0.1 * fraction) + rng.normal(0, 0.005)
                    if metric == "mre_px":
                        value_ts = 40.0 / value_ts
                    if paradigm == "task_specific":
                        value = value_ts
                    else:
                        # Relative change shrinks with log(n): positive below about 500 images, negative above.
                        rel = (
                            0.08 * (math.log10(500) - math.log10(n_train))
                            + TYPE_EFFECT[task_type]
                            + PARADIGM_EFFECT.get(paradigm, 0.0)
                            + rng.normal(0, 0.02)
                        )
                        sign = 1.0 if HIGHER[metric] else -1.0
                        value = value_ts * (1 + sign * rel)
                    group_name = {"task_specific": name, "grouped": group, "unified": "all"}.get(paradigm, name)
                    rows.append(
                        {
                            "study": STUDY,
                            "run_id": f"{paradigm}-{group_name}-f{fraction:g}-s{seed}",
                            "paradigm": paradigm,
                            "group": group_name,
                            "task": name,
                            "task_type": task_type,
                            "organ": group,
                            "clinical_group": group,
                            "n_train": n_train,
                            "data_fraction": fraction,
                            "seed": seed,
                            "split": split,
                            "metric": metric,
                            "value": value,
                            "higher_is_better": HIGHER[metric],
                            "source": "run",
                        }
                    )
    return validate_results(pl.DataFrame(rows, schema=RESULTS_SCHEMA))


def write_run_dir(
    root: Path,
    paradigm: str,
    group: str,
    tasks: list[str],
    fraction: float = 1.0,
    seed: int = 0,
    steps: int = 60,
    num_experts: int = 8,
    moe_blocks: tuple[int, ...] = (3, 4, 5),
    affinity: bool = False,
    rng_seed: int = 0,
) -> Path:
    """Write a run directory with run.json, train_log.jsonl, routing_stats.json and optionally affinity.json."""
    rng = np.random.default_rng(rng_seed)
    run = root / STUDY / paradigm / group / f"frac-{fraction:g}" / f"seed-{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(
        json.dumps({"paradigm": paradigm, "group": group, "data_fraction": fraction, "seed": seed, "tasks": tasks, "status": "finished"}),
        encoding="utf-8",
    )
    lines = []
    for step in range(steps):
        task = tasks[step % len(tasks)]
        loss = 2.0 * math.exp(-step / 25) + 0.2 + 0.05 * rng.random()
        lines.append({"step": step, "epoch": step / 20, "task": task, "loss": loss, "loss_parts": {"main": loss}, "lr": 1e-4, "images_per_s": 50.0, "time": step * 0.1})
        if (step + 1) % 20 == 0:
            for name in tasks:
                lines.append({"event": "eval", "step": step + 1, "task": name, "metric": "dice" if "seg" in name else "auc", "value": 0.5 + 0.3 * (step + 1) / steps + 0.02 * rng.random()})
    (run / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")

    stats = {"num_experts": num_experts, "layers": list(moe_blocks), "tasks": {}}
    for i, name in enumerate(tasks):
        stats["tasks"][name] = {}
        for block in moe_blocks:
            weights = rng.dirichlet(np.full(num_experts, 0.5))
            weights[(i + block) % num_experts] += 1.0
            tokens = np.round(weights / weights.sum() * 10000).astype(int).tolist()
            share = np.array(tokens) / sum(tokens)
            entropy = float(-(share[share > 0] * np.log(share[share > 0])).sum())
            stats["tasks"][name][str(block)] = {
                "tokens_per_expert": tokens,
                "entropy": entropy,
                "unused_experts": int((np.array(tokens) == 0).sum()),
                "top20_share": float(np.sort(share)[::-1][: max(1, num_experts // 5)].sum()),
            }
    (run / "routing_stats.json").write_text(json.dumps(stats), encoding="utf-8")

    if affinity:
        n = len(tasks)
        group_of = {t[0]: t[2] for t in TASKS_27}
        groups = [group_of.get(name, name) for name in tasks]
        record = {"tasks": tasks}
        for method, scale in (("lookahead", 0.02), ("gradient_cosine", 0.5), ("gradient_magnitude", 1.0)):
            same = np.array([[1.0 if groups[i] == groups[j] else 0.0 for j in range(n)] for i in range(n)])
            matrix = scale * (same - 0.3 + 0.3 * rng.standard_normal((n, n)))
            np.fill_diagonal(matrix, scale if method != "lookahead" else 0.0)
            record[method] = {"matrix": matrix.tolist(), "n_records": 12, "seconds": 1.5}
        (run / "affinity.json").write_text(json.dumps(record), encoding="utf-8")
    return run


def write_study_dir(root: Path, tasks=TASKS_27, **results_options) -> Path:
    """Write a study output folder: results.parquet plus task-specific, grouped and unified run directories.

    ``tasks`` must include the three breast tasks; ``results_options`` go to :func:`make_results`.
    """
    study = root / STUDY
    write_results(make_results(tasks, **results_options), study / "results.parquet")
    names = [t[0] for t in tasks]
    write_run_dir(root, "unified", "all", names, affinity=True, rng_seed=1)
    write_run_dir(root, "grouped", "breast", ["breast_lesion", "breast_2cls", "breast_lesion_det"], rng_seed=2)
    write_run_dir(root, "task_specific", "breast_lesion", ["breast_lesion"], steps=40, rng_seed=3)
    return study


def write_study_yaml(path: Path, output: Path, tasks=TASKS_27) -> Path:
    """Write a study YAML naming the fixture tasks (no data sources: for analyses of existing results only)."""
    cards = []
    for name, task_type, group, _metric, _n in tasks:
        card = {"name": name, "type": task_type, "organ": group, "group": group}
        if task_type in ("segmentation", "classification"):
            card["num_classes"] = 2
        if task_type == "regression":
            card["num_keypoints"] = 2
        cards.append(card)
    study = {"name": STUDY, "output": str(output), "tasks": cards, "fractions": [0.25, 0.5, 1.0], "seeds": [0, 1]}
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def results_27() -> pl.DataFrame:
    return make_results()


@pytest.fixture(scope="session")
def study_dir_27(tmp_path_factory) -> Path:
    return write_study_dir(tmp_path_factory.mktemp("study27"))


def test_fixture_results_follow_schema(results_27):
    assert results_27.columns == list(RESULTS_SCHEMA)
    assert results_27["task"].n_unique() == 27
    counts = dict(zip(*np.unique([t[1] for t in TASKS_27], return_counts=True)))
    assert counts == {"segmentation": 12, "classification": 9, "detection": 3, "regression": 3}
