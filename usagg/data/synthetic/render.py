"""Render one batch of a task's images and derive that task's targets from the scenes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from usagg.data.synthetic.geometry import balanced_labels
from usagg.data.synthetic.organs import ORGANS
from usagg.data.synthetic.tasks import MULTI_ORGAN, SyntheticTask

SPLITS = ("train", "val", "test")


@dataclass
class TaskBatch:
    """Images of one task with one target per image, in original pixels (x = column, y = row)."""

    images: np.ndarray  # (B, S, S) uint8
    organs: list[str]  # organ shown in each image
    spacing_mm: np.ndarray  # (B,) pixel size of each image
    latents: list[dict[str, Any]]  # scalar latent factors of each image, for provenance
    masks: np.ndarray | None = None  # segmentation: (B, S, S) uint8 class indices
    labels: np.ndarray | None = None  # classification: (B,)
    boxes: np.ndarray | None = None  # detection: (B, 4) x_min, y_min, x_max, y_max in pixel edges (exclusive max)
    keypoints: np.ndarray | None = None  # (B, K, 2) x, y in pixels, pixel centres on integers
    values: np.ndarray | None = None  # scalar: (B,) in the task's unit


def unit_rng(seed: int, task: str, split: str, chunk: int) -> np.random.Generator:
    """Random generator of one chunk of images, independent of how chunks are spread over processes."""
    key = [seed, zlib.crc32(task.encode("utf-8")), SPLITS.index(split), chunk]
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(key)))


def _scalar_latents(latents: dict[str, np.ndarray], index: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, values in latents.items():
        if name.startswith("_") or np.ndim(values) != 1:
            continue
        value = values[index].item()
        row[name] = round(value, 4) if isinstance(value, float) else value
    return row


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (B, 4) around the non-zero pixels of each mask, as pixel edges: max is exclusive."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.int64)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(masks.shape[0]):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if ys.size == 0:
            raise ValueError(f"mask {i} of the batch is empty; a detection image needs its structure in view")
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def render_task_batch(task: SyntheticTask, rng: np.random.Generator, n: int, size: int, offset: int = 0) -> TaskBatch:
    """Draw ``n`` images of ``task`` at ``size`` px with their targets.

    ``offset`` is the index of the first image within its split; it keeps classes balanced across chunks.
    """
    if task.organ == MULTI_ORGAN:
        return _render_multi_organ(task, rng, n, size, offset)
    organ = ORGANS[task.organ]
    scenes = organ.render(rng, n, size, {**task.scene_options, "index_offset": offset})
    batch = TaskBatch(
        images=scenes.images,
        organs=[organ.name] * n,
        spacing_mm=np.full(n, scenes.spacing_mm),
        latents=[_scalar_latents(scenes.latents, i) for i in range(n)],
    )
    if task.kind == "segmentation":
        batch.masks = scenes.label_maps
    elif task.kind == "detection":
        batch.boxes = tight_boxes(scenes.label_maps > 0)
    elif task.kind == "classification":
        batch.labels = np.asarray(scenes.latents[task.label_latent], dtype=np.int64)
    elif task.kind == "keypoints":
        points = [
            np.stack([scenes.latents[f"point_{k}_x_px"], scenes.latents[f"point_{k}_y_px"]], axis=1)
            for k in range(1, task.num_keypoints + 1)
        ]
        batch.keypoints = np.stack(points, axis=1)
    elif task.kind == "scalar":
        batch.values = np.asarray(scenes.latents[task.value_latent], dtype=np.float64)
    return batch


def _render_multi_organ(task: SyntheticTask, rng: np.random.Generator, n: int, size: int, offset: int) -> TaskBatch:
    names = list(ORGANS)
    labels = balanced_labels(rng, n, len(names), offset=offset)
    images = np.zeros((n, size, size), dtype=np.uint8)
    spacing = np.zeros(n)
    latents: list[dict[str, Any]] = [{} for _ in range(n)]
    for index, name in enumerate(names):
        members = np.flatnonzero(labels == index)
        if members.size == 0:
            continue
        scenes = ORGANS[name].render(rng, members.size, size)
        images[members] = scenes.images
        spacing[members] = scenes.spacing_mm
        for j, member in enumerate(members):
            latents[member] = _scalar_latents(scenes.latents, j)
    return TaskBatch(
        images=images,
        organs=[names[label] for label in labels],
        spacing_mm=spacing,
        latents=latents,
        labels=labels.astype(np.int64),
    )
