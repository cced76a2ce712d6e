"""Per-sample checks that need the decoded image: mask size and values, boxes and keypoints inside the image."""

from __future__ import annotations

import numpy as np

from usagg.data.decode import DecodedImage, decode_image, read_mask
from usagg.data.problems import DataProblem, problem_from_error
from usagg.data.record import SampleRecord
from usagg.errors import DataError
from usagg.tasks import TaskCard


def _problem(record: SampleRecord, message: str, fix: str) -> DataProblem:
    where = record.source_file or record.image_path
    subject = f"image {record.image_path.name}: " if record.source_file is not None else ""
    return DataProblem(task=record.task, message=subject + message, fix=fix, file=where, row=record.row)


def sample_problems(
    record: SampleRecord, card: TaskCard, size_hw: tuple[int, int], mask: np.ndarray | None = None
) -> list[DataProblem]:
    """Return the problems of one decoded sample (empty when it is usable)."""
    height, width = size_hw
    problems: list[DataProblem] = []
    if mask is not None:
        if mask.shape != (height, width):
            problems.append(
                _problem(
                    record,
                    f"mask {record.mask_path} is {mask.shape[0]}x{mask.shape[1]} px but the image is {height}x{width} px (height x width)",
                    "pair the mask with the right image, or resize the mask to the image size with nearest-neighbour interpolation",
                )
            )
        else:
            high = int(mask.max(initial=0))
            low = int(mask.min(initial=0))
            if high >= (card.num_classes or 0) or low < 0:
                values = np.unique(mask)
                shown = ", ".join(str(v) for v in values[:10]) + (" ..." if values.size > 10 else "")
                problems.append(
                    _problem(
                        record,
                        f"mask {record.mask_path} has value {high if high >= (card.num_classes or 0) else low} outside the class indices 0..{card.num_classes - 1} (values: {shown})",
                        "store class indices 0..num_classes-1 (binary masks as 0/1 or 0/255), or raise num_classes",
                    )
                )
    for i, box in enumerate(record.boxes_xyxy or ()):
        x_min, y_min, x_max, y_max = box
        if x_min < 0 or y_min < 0 or x_max > width or y_max > height:
            problems.append(
                _problem(
                    record,
                    f"box {i + 1} ({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g}) lies outside the {width}x{height} px image (width x height)",
                    "clip the box to 0 <= x <= width, 0 <= y <= height, or correct the coordinates",
                )
            )
    for i, (x, y) in enumerate(record.keypoints_xy or ()):
        # Pixel centres are on integers, so the image covers [-0.5, width - 0.5].
        if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
            problems.append(
                _problem(
                    record,
                    f"keypoint {i + 1} ({x:g}, {y:g}) lies outside the {width}x{height} px image (width x height)",
                    "check the point order (x = column, y = row) and units (pixels of the original image)",
                )
            )
    return problems


def load_sample(record: SampleRecord, card: TaskCard) -> tuple[DecodedImage | None, np.ndarray | None, list[DataProblem]]:
    """Decode a record's image (and mask, for segmentation) and check its labels against them.

    Returns (image, mask, problems). Image or mask is None when it cannot be decoded. The problem then names the
    label file and row, or the image file when the source has no label file, as ``data check`` lists it.
    """
    where = {"file": record.source_file or record.image_path, "row": record.row}
    try:
        decoded = decode_image(record.image_path)
    except DataError as exc:
        return None, None, [problem_from_error(card.name, exc, **where)]
    mask = None
    if card.kind == "segmentation" and record.mask_path is not None:
        try:
            mask = read_mask(record.mask_path)
        except DataError as exc:
            return decoded, None, [problem_from_error(card.name, exc, **where)]
    return decoded, mask, sample_problems(record, card, decoded.size_hw, mask)
