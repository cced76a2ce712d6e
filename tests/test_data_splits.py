"""Deterministic, stratified, leakage-free splits and nested data fractions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_data_helpers import small_config

from usagg.config import load_study
from usagg.data.record import SampleRecord
from usagg.data.sources import load_task_records
from usagg.data.splits import select_fraction, split_records
from usagg.tasks import TaskCard

REPO = Path(__file__).resolve().parents[1]
CLS = TaskCard.model_validate({"name": "cls", "type": "classification", "num_classes": 3})
SEG = TaskCard.model_validate({"name": "seg", "type": "segmentation", "num_classes": 2})


def _records(n: int, labels: int | None = 3, cases: int | None = None, split: str | None = None) -> list[SampleRecord]:
    return [
        SampleRecord(
            task="cls",
            image_path=Path(f"/data/img_{i:04d}.png"),
            label=(i % labels) if labels else None,
            case_id=str(i % cases) if cases else None,
            split=split,
        )
        for i in range(n)
    ]


def test_split_deterministic_and_seeded():
    records = _records(200)
    cfg = small_config(split_seed=3)
    first = split_records(records, CLS, cfg)
    assert first == split_records(records, CLS, cfg)
    other = split_records(records, CLS, small_config(split_seed=4))
    assert first["test"] != other["test"]
    assert sum(len(v) for v in first.values()) == 200
    assert len(first["val"]) == 30
    assert len(first["test"]) == 30


def test_split_stratified_by_class():
    records = _records(300)
    splits = split_records(records, CLS, small_config(val_fraction=0.2, test_fraction=0.2))
    for split in ("train", "val", "test"):
        counts = Counter(r.label for r in splits[split])
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)


def test_split_keeps_cases_together():
    records = _records(240, labels=None, cases=40)  # 6 images per case
    splits = split_records(records, SEG, small_config(val_fraction=0.2, test_fraction=0.2))
    owner: dict[str, str] = {}
    for split, members in splits.items():
        for record in members:
            assert owner.setdefault(record.case_id, split) == split
    assert {len(v) for v in splits.values()} == {144, 48}


def test_val_root_is_the_val_split():
    records = _records(60, split=None) + _records(10, split="val")
    splits = split_records(records, CLS, small_config())
    assert len(splits["val"]) == 10
    assert all(r.split == "val" for r in splits["val"])
    assert len(splits["test"]) == 9  # carved from the 60 unsplit images, 15 % of 3 strata x 20


def test_fixed_train_test_carves_val_from_train():
    records = _records(60, split="train") + _records(20, split="test")
    splits = split_records(records, CLS, small_config(val_fraction=0.2))
    assert len(splits["test"]) == 20
    assert len(splits["val"]) == 12
    assert all(r.split == "train" for r in splits["val"])


def test_real_demo_splits(shared_data):
    study = load_study(REPO / "analysis" / "real_demo.yaml")
    card = study.task("breast_2cls")
    splits = split_records(load_task_records(card), card, study.data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 48, "val": 10, "test": 12}
    assert Counter(r.label for r in splits["test"]) == {0: 6, 1: 6}


def test_fractions_nested_and_stratified():
    train = _records(400)
    subsets = {f: select_fraction(train, CLS, f, seed=7) for f in (0.1, 0.25, 0.5, 1.0)}
    sizes = {f: len(s) for f, s in subsets.items()}
    assert sizes[1.0] == 400
    assert sizes[0.1] == pytest.approx(40, abs=3)
    assert sizes[0.25] == pytest.approx(100, abs=3)
    ids = {f: {r.image_path for r in s} for f, s in subsets.items()}
    assert ids[0.1] <= ids[0.25] <= ids[0.5] <= ids[1.0]
    counts = Counter(r.label for r in subsets[0.1])
    assert max(counts.values()) - min(counts.values()) <= 1
    assert select_fraction(train, CLS, 0.1, seed=7) == subsets[0.1]
    assert select_fraction(train, CLS, 0.1, seed=8) != subsets[0.1]


def test_fraction_keeps_cases_whole():
    train = _records(120, labels=None, cases=30)
    subset = select_fraction(train, SEG, 0.25, seed=0)
    chosen_cases = {r.case_id for r in subset}
    assert all(r.case_id not in chosen_cases or r in subset for r in train)
    assert len(subset) == 32  # whole cases of 4 images until at least 30 images


def test_fraction_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        select_fraction(_records(10), CLS, 0.0, seed=0)


def _paths(records) -> set[str]:
    return {str(r.image_path) for r in records}


def test_study_split_keeps_shared_images_together():
    """A segmentation and a classification task over the same 200 images put each image in one split."""
    from usagg.data.splits import cross_task_conflicts, split_study_records

    cls = _records(200)
    seg = [SampleRecord(task="seg", image_path=r.image_path) for r in reversed(cls)]
    splits = split_study_records([SEG, CLS], {"seg": seg, "cls": cls}, small_config())
    assert cross_task_conflicts(splits) == []
    for split in ("train", "val", "test"):
        assert _paths(splits["seg"][split]) == _paths(splits["cls"][split])
    assert {k: len(v) for k, v in splits["seg"].items()} == {"train": 140, "val": 30, "test": 30}
    # Alone, each task carves its own split from its own random stream, and test images leak into train.
    alone = split_records(seg, SEG, small_config())
    assert _paths(alone["test"]) & _paths(splits["cls"]["train"])


def test_study_split_stratified_any_order():
    """The classification task is split first, stratified, and the segmentation task over its images follows."""
    from collections import Counter

    from usagg.data.splits import split_study_records

    cls = _records(200)
    seg = [SampleRecord(task="seg", image_path=r.image_path) for r in cls]
    first = split_study_records([SEG, CLS], {"seg": seg, "cls": cls}, small_config())
    second = split_study_records([CLS, SEG], {"seg": seg, "cls": cls}, small_config())
    for split in ("train", "val", "test"):
        assert _paths(first["cls"][split]) == _paths(second["cls"][split]) == _paths(first["seg"][split])
    alone = split_records(cls, CLS, small_config())
    for split in ("train", "val", "test"):
        assert Counter(r.label for r in first["cls"][split]) == Counter(r.label for r in alone[split])


def test_study_split_inherits_fixed_splits_and_cases():
    """A task with a val folder goes first; the other task's copies of those images, and their cases, follow it."""
    from usagg.data.splits import split_study_records

    fixed = _records(40, split="train") + [
        SampleRecord(task="cls", image_path=Path(f"/data/val_{i}.png"), label=i % 3, case_id=f"v{i}", split="val")
        for i in range(10)
    ]
    # The second task has the val images, another image of each val case, and 50 images of its own.
    other = [SampleRecord(task="seg", image_path=Path(f"/data/val_{i}.png")) for i in range(10)]
    other += [SampleRecord(task="seg", image_path=Path(f"/data/val_{i}_b.png"), case_id=f"v{i}") for i in range(10)]
    other += [SampleRecord(task="seg", image_path=Path(f"/data/own_{i}.png")) for i in range(50)]
    other += [SampleRecord(task="seg", image_path=r.image_path) for r in fixed[:40]]
    splits = split_study_records([SEG, CLS], {"seg": other, "cls": fixed}, small_config())
    seg = splits["seg"]
    assert {f"/data/val_{i}.png" for i in range(10)} | {f"/data/val_{i}_b.png" for i in range(10)} <= _paths(seg["val"])
    # The fixed task carves its test split from its training images; the other task's copies follow it.
    for split in ("train", "val", "test"):
        assert _paths(fixed[:40]) & _paths(seg[split]) == _paths(fixed[:40]) & _paths(splits["cls"][split])
    assert _paths(fixed[:40]) & _paths(seg["test"])
    own = {f"/data/own_{i}.png" for i in range(50)}
    assert len(own & _paths(seg["test"])) == 8  # test_fraction 0.15 of the 50 images the task alone has
    assert len(own & _paths(seg["val"])) == 8


def test_study_split_reports_conflicting_fixed_splits(tmp_path):
    from usagg.data.check import _cross_task_problems
    from usagg.data.splits import cross_task_conflicts, split_study_records

    one = [SampleRecord(task="cls", image_path=Path("/data/a.png"), label=0, split="test")] + _records(20, split="train")
    two = [SampleRecord(task="seg", image_path=Path("/data/a.png"), split="train")] + [
        SampleRecord(task="seg", image_path=Path(f"/data/b{i}.png")) for i in range(20)
    ]
    splits = split_study_records([CLS, SEG], {"cls": one, "seg": two}, small_config())
    assert cross_task_conflicts(splits) == [("image:/data/a.png", {"cls": "test", "seg": "train"})]
    [problem] = _cross_task_problems(splits)
    assert problem.task == ""
    assert not problem.fatal
    assert str(problem).startswith("image /data/a.png is in different splits in different tasks (cls: test, seg: train)")


def test_fraction_same_images_for_tasks_sharing_them():
    """Two tasks over the same training images take the same half, so a joint run gets no extra images."""
    first = _records(80, labels=None)
    second = [SampleRecord(task="seg", image_path=r.image_path) for r in reversed(first)]
    half_first = _paths(select_fraction(first, SEG, 0.5, seed=3))
    half_second = _paths(select_fraction(second, TaskCard.model_validate({"name": "other", "type": "segmentation", "num_classes": 2}), 0.5, seed=3))
    assert len(half_first) == 40
    assert half_first == half_second


def test_fraction_does_not_depend_on_where_data_lie():
    here = _records(60, labels=None)
    moved = [SampleRecord(task="cls", image_path=Path("/elsewhere/copy") / r.image_path.relative_to("/")) for r in here]
    names = lambda records: [Path(r.image_path).name for r in records]  # noqa: E731
    assert names(select_fraction(here, SEG, 0.25, seed=1)) == names(select_fraction(moved, SEG, 0.25, seed=1))


def test_case_ids_scoped_to_dataset():
    """Case 7 of one dataset and case 7 of another are different patients: no shared split, no conflict."""
    from usagg.data.splits import cross_task_conflicts, dataset_scopes, split_study_records

    cls = _records(60, cases=30)
    seg = [SampleRecord(task="seg", image_path=Path(f"/other/img_{i:04d}.png"), case_id=str(i % 30)) for i in range(60)]
    # A third task labels the first dataset's images, so it shares that dataset's cases.
    axis = [SampleRecord(task="axis", image_path=r.image_path, case_id=r.case_id) for r in cls[:20]]
    records = {"cls": cls, "seg": seg, "axis": axis}
    assert dataset_scopes(records) == {"cls": "cls", "seg": "seg", "axis": "cls"}
    axis_card = SEG.model_copy(update={"name": "axis"})
    splits = split_study_records([SEG, CLS, axis_card], records, small_config())
    assert cross_task_conflicts(splits) == []
    for split in ("train", "val", "test"):
        cases = {r.case_id for r in splits["cls"][split]}
        assert {r.case_id for r in splits["axis"][split]} <= cases
    # The unrelated dataset carves its own split: its case 7 need not follow the first dataset's case 7.
    alone = split_records(seg, SEG, small_config())
    assert {k: _paths(v) for k, v in splits["seg"].items()} == {k: _paths(v) for k, v in alone.items()}
