"""Run planning: which runs a study implies, filters, group files, pairs and the matched per-task budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from usagg.config import StudyConfig
from usagg.errors import ConfigError
from usagg.train.plan import RunSpec, budget_steps, expected_images_per_task, load_groups_file, plan_runs


def _study(**train) -> StudyConfig:
    tasks = [
        {"name": "seg_a", "type": "segmentation", "organ": "breast", "num_classes": 2},
        {"name": "cls_a", "type": "classification", "organ": "breast", "num_classes": 2},
        {"name": "kp_b", "type": "regression", "organ": "fetal", "num_keypoints": 2},
        {"name": "det_b", "type": "detection", "organ": "fetal"},
    ]
    return StudyConfig.model_validate(
        {"name": "s", "tasks": tasks, "fractions": [0.5, 1.0], "seeds": [0, 1], "train": {"batch_size": 4, **train}}
    )


def test_plan_counts_every_paradigm():
    specs = plan_runs(_study())
    by_paradigm = {p: [s for s in specs if s.paradigm == p] for p in ("task_specific", "grouped", "unified")}
    assert len(by_paradigm["task_specific"]) == 4 * 2 * 2
    assert len(by_paradigm["grouped"]) == 2 * 2 * 2  # clinical groups breast and fetal
    assert len(by_paradigm["unified"]) == 2 * 2
    assert {s.group for s in by_paradigm["grouped"]} == {"breast", "fetal"}
    assert by_paradigm["unified"][0].tasks == ("seg_a", "cls_a", "kp_b", "det_b")


def test_plan_run_id_and_directory():
    spec = RunSpec("s", "grouped", "breast", ("seg_a", "cls_a"), 0.25, 3)
    assert spec.run_id == "grouped/breast/frac-0.25/seed-3"
    assert spec.run_dir(Path("/out")) == Path("/out/s/grouped/breast/frac-0.25/seed-3")
    assert RunSpec.from_dict(spec.to_dict()) == spec


def test_plan_filters():
    study = _study()
    assert {s.paradigm for s in plan_runs(study, paradigms=["unified"])} == {"unified"}
    only_group = plan_runs(study, group_filter=["fetal"])
    assert {(s.paradigm, s.group) for s in only_group} == {("grouped", "fetal")}
    with_task = plan_runs(study, task_filter=["kp_b"], fractions=[1.0], seeds=[0])
    assert sorted(s.run_id for s in with_task) == [
        "grouped/fetal/frac-1/seed-0",
        "task_specific/kp_b/frac-1/seed-0",
        "unified/all/frac-1/seed-0",
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"paradigms": ["joint"]}, "unknown paradigm 'joint'"),
        ({"task_filter": ["nope"]}, "--task nope: not a task"),
        ({"fractions": [0.3]}, "--fraction 0.3: not in the study's list"),
        ({"seeds": [7]}, "--seed 7"),
        ({"group_filter": ["lung"]}, "--group lung"),
    ],
)
def test_plan_rejects_unknown_filter_values(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_runs(_study(), **kwargs)


def test_plan_groups_file_overrides_partition(tmp_path):
    file = tmp_path / "groups.yaml"
    file.write_text("groups:\n  dense: [seg_a, det_b]\n  sparse: [cls_a, kp_b]\n", encoding="utf-8")
    study = _study()
    groups = load_groups_file(file, study)
    specs = plan_runs(study, paradigms=["grouped"], groups=groups, fractions=[1.0], seeds=[0])
    assert {s.group: s.tasks for s in specs} == {"dense": ("seg_a", "det_b"), "sparse": ("cls_a", "kp_b")}


@pytest.mark.parametrize(
    "text, message",
    [
        ("dense: [seg_a]\n", "expected a mapping with a 'groups:' block"),
        ("groups:\n  g: [seg_a, lung_x]\n", "groups.g: task 'lung_x' is not in study 's'"),
        ("groups:\n  g: [seg_a]\n  h: [seg_a]\n", "groups.h: task 'seg_a' is already in group 'g'"),
        ("groups:\n  g: []\n", "groups.g: expected a non-empty list"),
    ],
)
def test_plan_groups_file_errors_name_file_and_key(tmp_path, text, message):
    file = tmp_path / "bad.yaml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_groups_file(file, _study())
    assert str(file) in str(info.value)
    assert message in str(info.value)


def test_plan_pairs_default_to_every_pair():
    specs = plan_runs(_study(), paradigms=["unified"], pairs=True, fractions=[1.0], seeds=[0])
    pairs = [s for s in specs if s.paradigm == "pair"]
    assert len(pairs) == math.comb(4, 2)
    assert pairs[0].group == "seg_a+cls_a"
    assert pairs[0].tasks == ("seg_a", "cls_a")


def test_plan_pairs_use_study_task_order():
    study = _study()
    study.pairs = [("kp_b", "seg_a"), ("seg_a", "kp_b"), ("cls_a", "seg_a")]
    specs = plan_runs(study, paradigms=["pair"], fractions=[1.0], seeds=[0])
    assert [s.run_id for s in specs] == ["pair/seg_a+kp_b/frac-1/seed-0", "pair/seg_a+cls_a/frac-1/seed-0"]
    every = plan_runs(_study(), paradigms=["pair"], pairs=True, fractions=[1.0], seeds=[0])
    assert {s.run_id for s in specs} <= {s.run_id for s in every}


def test_plan_pairs_from_study():
    study = _study()
    study.pairs = [("seg_a", "kp_b")]
    specs = plan_runs(study, paradigms=["pair"], fractions=[1.0], seeds=[0])
    assert [s.run_id for s in specs] == ["pair/seg_a+kp_b/frac-1/seed-0"]


def test_budget_epochs_matches_per_task_passes():
    study = _study(budget="epochs", epochs=2)
    single, epoch = budget_steps(study, {"seg_a": 10})
    assert single == math.ceil(2 * 10 / 4)
    assert epoch == math.ceil(10 / 4)
    joint, _ = budget_steps(study, {"seg_a": 10, "cls_a": 30})
    assert joint == math.ceil(2 * 40 / 4)
    # Proportional sampling: every task expects epochs x its own images in the joint run too.
    expected = expected_images_per_task(study, {"seg_a": 10, "cls_a": 30}, joint)
    assert expected["seg_a"] == pytest.approx(joint * 4 * 10 / 40)
    assert expected["seg_a"] == pytest.approx(2 * 10)


def test_budget_samples_and_steps():
    samples = _study(budget="samples", samples_per_task=100, task_sampling="uniform")
    assert budget_steps(samples, {"a": 10, "b": 50})[0] == math.ceil(200 / 4)
    expected = expected_images_per_task(samples, {"a": 10, "b": 50}, 50)
    assert expected == {"a": 100, "b": 100}
    fixed = _study(budget="steps", steps=17)
    assert budget_steps(fixed, {"a": 10, "b": 50})[0] == 17
    assert budget_steps(fixed, {"a": 10})[0] == 17
