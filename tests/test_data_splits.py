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
