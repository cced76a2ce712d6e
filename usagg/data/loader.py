"""DataLoaders: a multi-task training loader driven by ``MultiTaskBatchSampler``, and an evaluation loader."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from usagg.data.dataset import TaskDataset, collate_task_batch
from usagg.data.sampler import MultiTaskBatchSampler


class _TaskKeyedDataset(Dataset):
    """Routes a ``(task, index, draw seed)`` key to that task's dataset, so one DataLoader serves every task.

    Each sample's augmentation draws come from a torch generator seeded with its draw seed, in whichever process
    loads it, and the caller's generator is left as it was. So the draws do not depend on the number of worker
    processes, survive a resume and match between one process and several under DDP.
    """

    def __init__(self, datasets: Mapping[str, TaskDataset]) -> None:
        self.datasets = dict(datasets)

    def __getitem__(self, key: tuple[str, int, int]) -> dict[str, Any]:
        task, index, draw_seed = key
        # Only the CPU generator: the transforms run on the CPU, and torch.manual_seed would also seed every GPU.
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(draw_seed)
        try:
            return self.datasets[task][index]
        finally:
            torch.set_rng_state(saved)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())


def draw_seed(seed: int, step: int, slot: int) -> int:
    """Seed of the augmentation draws of the sample in ``slot`` of ``step``'s global batch (all ranks together)."""
    return int(np.random.SeedSequence([seed, 0xA06, step, slot]).generate_state(1, np.uint64)[0] >> 1)


class _KeyedBatches:
    """Batch sampler view of a ``MultiTaskBatchSampler`` that yields lists of ``(task, index, draw seed)`` keys.

    The slot of a sample is its position in the step's global batch (``rank * batch_size + position``), which is
    where the sampler takes its index from, so a sample gets the same draws on any number of ranks.
    """

    def __init__(self, sampler: MultiTaskBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        sampler = self.sampler
        first_slot = sampler.rank * sampler.batch_size
        for step, (task, indices) in enumerate(sampler, start=sampler.step):
            yield [(task, i, draw_seed(sampler.seed, step, first_slot + p)) for p, i in enumerate(indices)]

    def __len__(self) -> int:
        return len(self.sampler)


class MultiTaskLoader:
    """Iterable of ``(task, batch)`` pairs. It records in the sampler how many steps were delivered, so the
    sampler's state is exact even though the workers prefetch batches ahead."""

    def __init__(self, loader: DataLoader, sampler: MultiTaskBatchSampler) -> None:
        self.loader = loader
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        self.sampler._loader_tracks_consumption = True
        step = self.sampler.step
        for batch in self.loader:
            step += 1
            self.sampler.mark_consumed(step)
            yield batch["task"], batch

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def build_multitask_loader(
    datasets: Mapping[str, TaskDataset],
    sampler: MultiTaskBatchSampler,
    num_workers: int,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
) -> MultiTaskLoader:
    """Return an iterable of ``(task, collated batch)`` following ``sampler``, with persistent workers."""
    missing = set(sampler.tasks) - set(datasets)
    if missing:
        raise ValueError(f"the sampler draws tasks without a dataset: {', '.join(sorted(missing))}")
    for task, size in sampler.task_sizes.items():
        if len(datasets[task]) != size:
            raise ValueError(f"task {task}: the sampler expects {size} images but the dataset has {len(datasets[task])}")
    loader = DataLoader(
        _TaskKeyedDataset(datasets),
        batch_sampler=_KeyedBatches(sampler),
        num_workers=num_workers,
        collate_fn=collate_task_batch,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return MultiTaskLoader(loader, sampler)


def build_eval_loader(dataset: TaskDataset, batch_size: int, num_workers: int, pin_memory: bool | None = None) -> DataLoader:
    """Return a DataLoader over ``dataset`` in record order (no shuffling), with persistent workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_task_batch,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
    )
