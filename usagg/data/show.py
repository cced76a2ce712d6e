"""``usagg data show``: a grid of samples with their masks, boxes, keypoints or labels drawn over the image."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from usagg.data.decode import read_image, read_mask
from usagg.data.record import SampleRecord
from usagg.io import atomic_path
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)


def pick_evenly(records: Sequence[SampleRecord], n: int) -> list[int]:
    """Return up to ``n`` indices spread evenly over ``records`` (deterministic)."""
    if n <= 0 or not records:
        return []
    if n >= len(records):
        return list(range(len(records)))
    return sorted({int(i) for i in np.linspace(0, len(records) - 1, n).round()})


def _draw(ax, card: TaskCard, image: np.ndarray, target: dict, caption: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    colours = plt.get_cmap("tab10")
    if card.kind == "segmentation":
        mask = target["mask"]
        overlay = np.zeros((*mask.shape, 4))
        for c in range(1, card.num_classes or 2):
            region = mask == c
            if region.any():
                overlay[region] = (*colours((c - 1) % 10)[:3], 0.35)
                ax.contour(region.astype(float), levels=[0.5], colors=[colours((c - 1) % 10)], linewidths=0.8)
        ax.imshow(overlay, interpolation="nearest")
    elif card.kind == "detection":
        for box, label in zip(target["boxes"], target["labels"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colours(int(label) % 10), linewidth=1.5))
    elif card.kind == "keypoints":
        for i, (x, y) in enumerate(target["keypoints"]):
            ax.plot([x], [y], marker="+", color=colours(i % 10), markersize=12, markeredgewidth=2)
            ax.annotate(str(i + 1), (x, y), xytext=(4, 4), textcoords="offset points", color=colours(i % 10), fontsize=9, weight="bold")
    ax.set_title(caption, fontsize=8)
    ax.set_axis_off()


def _raw_panel(card: TaskCard, record: SampleRecord) -> tuple[np.ndarray, dict, str]:
    image, _ = read_image(record.image_path)
    target: dict = {}
    caption = record.image_path.name
    if card.kind == "segmentation":
        target["mask"] = read_mask(record.mask_path)
    elif card.kind == "detection":
        target["boxes"] = list(record.boxes_xyxy or ())
        target["labels"] = list(record.box_labels or ())
    elif card.kind == "keypoints":
        target["keypoints"] = list(record.keypoints_xy or ())
    elif card.kind == "classification":
        caption += f"\nlabel {_label_name(card, record.label)}"
    else:
        caption += f"\n{card.target} = {record.value:g}" + (f" {card.unit}" if card.unit else "")
    return image, target, caption


def _transformed_panel(card: TaskCard, dataset, index: int) -> tuple[np.ndarray, dict, str]:
    from usagg.data.transforms import denormalize

    item = dataset[index]
    image = denormalize(item["image"]).permute(1, 2, 0).numpy()
    record = dataset.records[index]
    target: dict = {}
    t = item["target"]
    caption = f"{record.image_path.name} (transformed)"
    if card.kind == "segmentation":
        target["mask"] = t["mask"].numpy()
    elif card.kind == "detection":
        target["boxes"] = t["boxes"].tolist()
        target["labels"] = t["box_labels"].tolist()
    elif card.kind == "keypoints":
        target["keypoints"] = t["keypoints"].tolist()
    elif card.kind == "classification":
        caption += f"\nlabel {_label_name(card, int(t['label']))}"
    else:
        caption += f"\n{card.target} = {float(t['value']):g}"
    return image, target, caption


def _label_name(card: TaskCard, label: int | None) -> str:
    if label is not None and card.class_names and 0 <= label < len(card.class_names):
        return f"{label} ({card.class_names[label]})"
    return str(label)


def render_samples(
    card: TaskCard,
    records: Sequence[SampleRecord],
    out: str | Path,
    n: int = 8,
    data_cfg=None,
    transformed: bool = False,
    title: str | None = None,
) -> Path:
    """Draw ``n`` samples of a task in a grid and write it to ``out`` (PNG); returns the path.

    With ``transformed`` the samples go through the training transform (crops, flips, resize, intensity changes),
    so the drawing shows whether labels stay aligned with the image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usagg.config import DataConfig

    chosen = pick_evenly(records, n)
    if not chosen:
        raise ValueError(f"task {card.name}: no samples to show")
    dataset = None
    if transformed:
        from usagg.data.dataset import TaskDataset

        dataset = TaskDataset(card, records, data_cfg or DataConfig(), train=True)
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(chosen) :]:
        ax.set_axis_off()
    for ax, index in zip(axes.flat, chosen):
        if dataset is not None:
            image, target, caption = _transformed_panel(card, dataset, index)
        else:
            image, target, caption = _raw_panel(card, records[index])
        _draw(ax, card, image, target, caption)
    fig.suptitle(title or f"{card.name} ({card.kind})", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=110)
    plt.close(fig)
    logger.debug("wrote %s", out)
    return out
