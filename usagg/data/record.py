"""The sample record every source reader yields, whatever its on-disk layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleRecord:
    """One labelled image of one task, with coordinates in original image pixels."""

    task: str
    image_path: Path
    # Where the record came from, for error messages: the CSV/JSON file and its 1-based data row.
    source_file: Path | None = None
    row: int | None = None
    case_id: str | None = None  # patient or case id; keeps all images of a case in one split
    split: str | None = None  # train / val / test when the source fixes it
    mask_path: Path | None = None  # segmentation: PNG (or other) of class indices
    label: int | None = None  # classification
    boxes_xyxy: tuple[tuple[float, float, float, float], ...] | None = None  # detection, pixels
    box_labels: tuple[int, ...] | None = None
    keypoints_xy: tuple[tuple[float, float], ...] | None = None  # keypoint regression, pixels
    value: float | None = None  # scalar regression, in the task's unit
    spacing_mm_per_px: float | None = None
