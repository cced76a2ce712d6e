"""Multi-task batch sampler: task probabilities, coverage, DDP slices, exact resume; the multi-task loader."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
import torch
from test_data_helpers import small_config

from usagg.data.dataset import TaskDataset
from usagg.data.loader import build_eval_loader, build_multitask_loader
from usagg.data.sampler import MultiTaskBatchSampler, task_probabilities
from usagg.data.sources import discover_fmc_uia, load_task_records

SIZES = {"a": 100, "b": 25, "c": 400}


def test_task_probabilities():
    assert task_probabilities(SIZES, "uniform") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert task_probabilities(SIZES, "proportional") == pytest.approx({"a": 100 / 525, "b": 25 / 525, "c": 400 / 525})
    temperature = task_probabilities(SIZES, "temperature", 2.0)
    assert temperature == pytest.approx({"a": 10 / 35, "b": 5 / 35, "c": 20 / 35})


def test_draw_frequencies_follow_probabilities():
    sampler = MultiTaskBatchSampler(SIZES, batch_size=4, num_steps=3000, sampling="proportional", seed=1)
    counts = Counter(task for task, _ in sampler)
    for task, size in SIZES.items():
        assert counts[task] / 3000 == pytest.approx(size / 525, abs=0.03)


def test_single_task_batches_cover_each_epoch():
    sampler = MultiTaskBatchSampler({"a": 12, "b": 8}, batch_size=4, num_steps=200, sampling="uniform", seed=0)
    drawn: dict[str, list[int]] = {"a": [], "b": []}
    for task, indices in sampler:
        assert len(indices) == 4
        drawn[task].extend(indices)
    for task, size in (("a", 12), ("b", 8)):
        stream = drawn[task]
        for start in range(0, len(stream) - size + 1, size):  # every epoch is a permutation
            assert sorted(stream[start : start + size]) == list(range(size))


def test_deterministic_from_seed():
    first = list(MultiTaskBatchSampler(SIZES, 8, 50, seed=3))
    assert first == list(MultiTaskBatchSampler(SIZES, 8, 50, seed=3))
    assert first != list(MultiTaskBatchSampler(SIZES, 8, 50, seed=4))


def test_ranks_share_task_with_distinct_indices():
    ranks = [list(MultiTaskBatchSampler(SIZES, 8, 100, seed=2, rank=r, world_size=2)) for r in range(2)]
    for (task0, idx0), (task1, idx1) in zip(*ranks):
        assert task0 == task1
        assert not set(idx0) & set(idx1)


def test_resume_continues_the_same_sequence():
    full = list(MultiTaskBatchSampler(SIZES, 8, 60, sampling="temperature", seed=5))
    first = MultiTaskBatchSampler(SIZES, 8, 60, sampling="temperature", seed=5)
    head = list(islice(iter(first), 23))
    state = first.state_dict()
    assert state["step"] == 23
    resumed = MultiTaskBatchSampler(SIZES, 8, 60, sampling="temperature", seed=5)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full


def test_resume_rejects_other_settings():
    state = MultiTaskBatchSampler(SIZES, 8, 60, seed=5).state_dict()
    other = MultiTaskBatchSampler(SIZES, 8, 60, seed=6)
    with pytest.raises(ValueError, match="saved seed=5"):
        other.load_state_dict(state)


def test_empty_task_rejected():
    with pytest.raises(ValueError, match="empty: b"):
        MultiTaskBatchSampler({"a": 3, "b": 0}, 2, 10)


@pytest.fixture(scope="module")
def sample_datasets(shared_data):
    cards = discover_fmc_uia(shared_data / "fmc_uia_sample")
    keep = {"breast_2cls", "fetal_head", "breast_lesion_det"}
    cfg = small_config(img_size=32)
    return {c.name: TaskDataset(c, load_task_records(c)[:12], cfg, train=True) for c in cards if c.name in keep}


def _delivered(loader, limit=None):
    out = []
    for task, batch in islice(loader, limit):
        out.append((task, batch["index"].tolist(), batch["image"]))
    return out


def test_multitask_loader_with_workers_resumes_exactly(sample_datasets):
    """Batches and augmentation draws do not depend on workers or on a resume."""
    sizes = {name: len(d) for name, d in sample_datasets.items()}
    reference = _delivered(build_multitask_loader(sample_datasets, MultiTaskBatchSampler(sizes, 4, 12, sampling="uniform", seed=0), num_workers=0))
    sampler = MultiTaskBatchSampler(sizes, batch_size=4, num_steps=12, sampling="uniform", seed=0)
    loader = build_multitask_loader(sample_datasets, sampler, num_workers=2, pin_memory=False)
    seen = _delivered(loader, 5)
    assert seen[0][2].shape == (4, 3, 32, 32)
    state = loader.state_dict()
    assert state["step"] == 5  # the workers prefetched more, but five batches were delivered
    expected = list(MultiTaskBatchSampler(sizes, 4, 12, sampling="uniform", seed=0))
    assert [(t, i) for t, i, _ in reference] == [(t, i) for t, i in expected]
    resumed = MultiTaskBatchSampler(sizes, batch_size=4, num_steps=12, sampling="uniform", seed=0)
    resumed.load_state_dict(state)
    torch.manual_seed(123)  # the caller's generator state does not reach the augmentations
    rest = _delivered(build_multitask_loader(sample_datasets, resumed, num_workers=0))
    for (task, indices, images), (ref_task, ref_indices, ref_images) in zip(seen + rest, reference, strict=True):
        assert (task, indices) == (ref_task, ref_indices)
        assert torch.equal(images, ref_images)
    keyed = build_multitask_loader(sample_datasets, sampler, num_workers=0).loader.dataset
    draws = [keyed[("fetal_head", 0, seed)]["image"] for seed in (1, 1, 2, 3, 4)]
    assert torch.equal(draws[0], draws[1])  # the draw seed fixes the augmentation
    assert any(not torch.equal(draws[0], other) for other in draws[2:])


def test_ranks_get_the_draws_of_one_process(sample_datasets):
    """Under DDP each rank's slice of a step is augmented as the same samples of one process's batch."""
    sizes = {name: len(d) for name, d in sample_datasets.items()}
    single = _delivered(build_multitask_loader(sample_datasets, MultiTaskBatchSampler(sizes, 4, 6, seed=2), num_workers=0))
    ranks = [
        _delivered(build_multitask_loader(sample_datasets, MultiTaskBatchSampler(sizes, 2, 6, seed=2, rank=r, world_size=2), num_workers=0))
        for r in range(2)
    ]
    for (task, indices, images), first, second in zip(single, *ranks, strict=True):
        assert task == first[0] == second[0]
        assert indices == first[1] + second[1]
        assert torch.equal(images, torch.cat([first[2], second[2]]))


def test_eval_loader_keeps_order(sample_datasets):
    dataset = sample_datasets["breast_2cls"]
    batches = list(build_eval_loader(dataset, batch_size=5, num_workers=0))
    assert [i for b in batches for i in b["index"].tolist()] == list(range(len(dataset)))
    assert batches[0]["target"]["label"].shape == (5,)
