"""DataLoaders: a multi-task training loader driven by ``MultiTaskBatchSampler``, and an evaluation loader."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from usagg.data.dataset import TaskDataset, collate_task_batch
from usagg.data.sampler import MultiTaskBatchSampler


class _TaskKeyedDataset(Dataset):
    """Routes a ``(task, index)`` key to that task's dataset, so one DataLoader serves every task."""

    def __init__(self, datasets: Mapping[str, TaskDataset]) -> None:
        self.datasets = dict(datasets)

    def __getitem__(self, key: tuple[str, int]) -> dict[str, Any]:
        task, index = key
        return self.datasets[task][index]

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())


class _KeyedBatches:
    """Batch sampler view of a ``MultiTaskBatchSampler`` that yields lists of ``(task, index)`` keys."""

    def __init__(self, sampler: MultiTaskBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        for task, indices in self.sampler:
            yield [(task, i) for i in indices]

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
