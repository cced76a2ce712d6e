"""``usagg data show``: a grid of samples with their masks, boxes, keypoints or labels drawn over the image."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from usagg.data.problems import DataProblem, problem_from_error
from usagg.data.record import SampleRecord
from usagg.data.validate import load_sample
from usagg.errors import ConfigError, DataError
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


# A sample that cannot be drawn is replaced by the next readable one. After this many skipped samples,
# render_samples stops looking and draws the samples it has.
MAX_SKIPPED = 50


@dataclass
class ShownSamples:
    """Result of ``render_samples``: the figure file written, the number of samples drawn, and the samples left out."""

    path: Path
    drawn: int
    # Samples that cannot be decoded or whose labels do not fit the image, as warnings naming file and row.
    skipped: list[DataProblem] = field(default_factory=list)


def class_colour(index: int, num_classes: int) -> tuple[float, float, float]:
    """Colour of class ``index`` (for masks, class 1 takes the first colour, since background is not drawn)."""
    import matplotlib.pyplot as plt

    if num_classes <= 10:
        return plt.get_cmap("tab10")(index % 10)[:3]
    if num_classes <= 20:
        return plt.get_cmap("tab20")(index % 20)[:3]
    return plt.get_cmap("turbo")(index / max(1, num_classes - 1))[:3]


def _legend_entries(card: TaskCard) -> list[tuple[str, tuple[float, float, float]]]:
    """(text, colour) per class of a multi-class mask or detection task; empty for other tasks."""
    num_classes = card.num_classes or 0

    def text(c: int) -> str:
        return _label_name(card, c) if card.class_names else f"class {c}"

    if card.kind == "segmentation" and num_classes > 2:
        return [(text(c), class_colour(c - 1, num_classes - 1)) for c in range(1, num_classes)]
    if card.kind == "detection" and num_classes > 1:
        return [(text(c), class_colour(c, num_classes)) for c in range(num_classes)]
    return []


def _draw(ax, card: TaskCard, image: np.ndarray, target: dict, caption: str) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    num_classes = card.num_classes or 2
    if card.kind == "segmentation" and target.get("mask") is not None:
        mask = target["mask"]
        overlay = np.zeros((*mask.shape, 4))
        for c in range(1, num_classes):
            region = mask == c
            if region.any():
                colour = class_colour(c - 1, num_classes - 1)
                overlay[region] = (*colour, 0.35)
                ax.contour(region.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
        ax.imshow(overlay, interpolation="nearest")
    elif card.kind == "detection":
        for box, label in zip(target["boxes"], target["labels"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            colour = class_colour(int(label), num_classes)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
    elif card.kind == "keypoints":
        for i, (x, y) in enumerate(target["keypoints"]):
            colour = class_colour(i, card.num_keypoints or 1)
            ax.plot([x], [y], marker="+", color=colour, markersize=12, markeredgewidth=2)
            ax.annotate(str(i + 1), (x, y), xytext=(4, 4), textcoords="offset points", color=colour, fontsize=9, weight="bold")
    ax.set_title(caption, fontsize=8)
    ax.set_axis_off()


def _raw_panel(card: TaskCard, record: SampleRecord, pixels: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, dict, str]:
    image = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
    target: dict = {}
    caption = record.image_path.name
    if card.kind == "segmentation":
        target["mask"] = mask
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


def _candidates(records: Sequence[SampleRecord], n: int) -> list[int]:
    """Indices to try: ``n`` spread evenly over ``records``, then the others in order as replacements."""
    chosen = pick_evenly(records, n)
    chosen_set = set(chosen)
    return chosen + [i for i in range(len(records)) if i not in chosen_set]


# Suffixes of the figure files ``usagg data show --out`` writes, each a format matplotlib's savefig writes without
# extra software (LaTeX-based .pgf and raw pixel buffers are left out).
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".tif", ".tiff", ".webp")


def figure_path(out: str | Path) -> Path:
    """Return the file to write a figure to: ``out``, with ``.png`` added when it has no suffix.

    Raises ``ConfigError`` when the suffix is not one of ``FIGURE_SUFFIXES``, when the path is an existing folder
    or when a folder above it is an existing file.
    """
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; fix: give a file name, for example {path / 'samples.png'}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
        if path.is_dir():
            raise ConfigError(f"--out {path} is a folder; fix: give a file name, for example {path / 'samples.png'}")
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise ConfigError(
            f"--out {path}: suffix {path.suffix!r} is not a supported figure format; "
            f"fix: end the file name with one of {', '.join(FIGURE_SUFFIXES)}"
        )
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out {path}: {blocking} is a file, not a folder; fix: choose another output folder")
    return path


def render_samples(
    card: TaskCard,
    records: Sequence[SampleRecord],
    out: str | Path,
    n: int = 8,
    data_cfg=None,
    transformed: bool = False,
    title: str | None = None,
) -> ShownSamples:
    """Draw ``n`` samples of a task in a grid and write it to ``out`` (see :func:`figure_path` for its name).

    With ``transformed`` the samples go through the training transform (crops, flips, resize, intensity changes),
    so the drawing shows whether labels stay aligned with the image. A sample that cannot be decoded, or whose
    labels do not fit its image (the samples training would reject), is left out and replaced by the next
    readable one; the returned ``skipped`` problems name each one's file and row. Multi-class masks and boxes get
    a legend of class colours. Raises ``DataError`` when no sample can be drawn.
    """
    out = figure_path(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from usagg.config import DataConfig

    if n <= 0 or not records:
        raise DataError(f"task {card.name}: no samples to show; fix: check the source, or choose another --split")
    dataset = None
    if transformed:
        from usagg.data.dataset import TaskDataset

        dataset = TaskDataset(card, records, data_cfg or DataConfig(), train=True)
    panels: list[tuple[int, tuple[np.ndarray, dict, str]]] = []
    skipped: list[DataProblem] = []
    for index in _candidates(records, n):
        if len(panels) == n or len(skipped) >= MAX_SKIPPED:
            break
        record = records[index]
        decoded, mask, problems = load_sample(record, card)
        fatal = [p for p in problems if p.fatal]
        if decoded is None or fatal:
            skipped.append(replace((fatal or problems)[0], fatal=False))
            continue
        if dataset is None:
            panels.append((index, _raw_panel(card, record, decoded.pixels, mask)))
            continue
        try:
            panels.append((index, _transformed_panel(card, dataset, index)))
        except DataError as exc:
            problem = problem_from_error(card.name, exc, file=record.source_file or record.image_path, row=record.row)
            skipped.append(replace(problem, fatal=False))
    if not panels:
        first = f": {skipped[0]}" if skipped else ""
        raise DataError(
            f"task {card.name}: none of the {len(skipped)} samples tried can be drawn{first}; "
            "fix: run `usagg data check` to list every problem"
        )
    panels.sort(key=lambda item: item[0])
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    legend = _legend_entries(card)
    legend_height = 0.3 * math.ceil(len(legend) / 6)  # inches below the grid
    # Constrained layout keeps room for the captions, the title and the legend below the grid.
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + legend_height), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    for ax, (_, (image, target, caption)) in zip(axes.flat, panels):
        _draw(ax, card, image, target, caption)
    fig.suptitle(title or f"{card.name} ({card.kind})", fontsize=10)
    if legend:
        handles = [Patch(facecolor=colour, edgecolor=colour, label=text) for text, colour in legend]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(legend), 6), fontsize=8, frameon=False)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower(), dpi=110)
    plt.close(fig)
    logger.debug("wrote %s (%d samples, %d skipped)", out, len(panels), len(skipped))
    return ShownSamples(out, len(panels), skipped)
