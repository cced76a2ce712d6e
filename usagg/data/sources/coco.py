"""Reader for COCO detection annotations (``bbox`` as [x, y, width, height] in pixels, one or several per image)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from usagg.data.problems import ProblemLog
from usagg.data.record import SampleRecord
from usagg.data.sources._common import case_from_path
from usagg.tasks import CocoSource, TaskCard


def _category_labels(card: TaskCard, categories: list[dict], file: Path, log: ProblemLog) -> dict[int, int] | None:
    """Map COCO category ids to class indices: by ``class_names`` when the card has them, else by sorted id."""
    task = card.name
    ids = []
    for i, category in enumerate(categories, start=1):
        if not isinstance(category, dict) or "id" not in category:
            log.error(task, f"categories[{i - 1}] has no 'id'", "give every category an integer id and a name", file=file)
            return None
        ids.append(category)
    if card.class_names:
        labels = {}
        for category in ids:
            name = str(category.get("name", ""))
            if name not in card.class_names:
                log.error(task, f"category {name!r} (id {category['id']}) is not in class_names {card.class_names}", "add it to class_names or remove its boxes", file=file)
                return None
            labels[category["id"]] = card.class_names.index(name)
        return labels
    ordered = sorted(c["id"] for c in ids)
    if len(ordered) > (card.num_classes or 1):
        log.error(
            task,
            f"{len(ordered)} categories but the task card has num_classes {card.num_classes}",
            "set num_classes to the number of categories (or class_names to their names)",
            file=file,
        )
        return None
    return {category_id: index for index, category_id in enumerate(ordered)}


def read_coco(card: TaskCard, source: CocoSource, root: Path, split: str | None, log: ProblemLog) -> list[SampleRecord]:
    task = card.name
    file = root / source.annotations
    if not file.is_file():
        log.error(task, "COCO annotation file not found", "correct source.annotations (relative to source.root)", file=file)
        return []
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.error(task, f"invalid JSON ({exc})", "save the annotations as COCO JSON", file=file)
        return []
    missing = [k for k in ("images", "annotations") if not isinstance(data, dict) or k not in data]
    if missing:
        log.error(task, f"COCO file is missing required key(s) {', '.join(missing)}", "write 'images', 'annotations' and 'categories' lists", file=file)
        return []

    labels = _category_labels(card, data.get("categories") or [{"id": 1, "name": "object"}], file, log)
    if labels is None:
        return []

    image_dir = root / source.images
    images: dict[object, dict] = {}
    seen_names: dict[str, int] = {}
    for index, image in enumerate(data["images"], start=1):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            log.error(task, f"images[{index - 1}] needs 'id' and 'file_name'", "add both keys", file=file, row=index)
            continue
        name = str(image["file_name"])
        if name in seen_names:
            log.error(task, f"duplicate image entry {name!r} (also images[{seen_names[name] - 1}])", "list each image once and give it one id", file=file, row=index)
            continue
        if image["id"] in images:
            log.error(task, f"duplicate image id {image['id']!r}", "give every image a distinct id", file=file, row=index)
            continue
        seen_names[name] = index
        images[image["id"]] = {"entry": image, "index": index, "boxes": [], "labels": []}

    for index, annotation in enumerate(data["annotations"], start=1):
        where = f"annotations[{index - 1}]"
        if not isinstance(annotation, dict):
            log.error(task, f"{where} is not an object", "write each annotation as {image_id, category_id, bbox}", file=file)
            continue
        image = images.get(annotation.get("image_id"))
        if image is None:
            log.error(task, f"{where} refers to unknown image_id {annotation.get('image_id')!r}", "fix image_id or add the image to 'images'", file=file)
            continue
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            log.error(task, f"{where} bbox {bbox!r} is not [x, y, width, height]", "write four numbers in pixels", file=file)
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            log.error(task, f"{where} bbox {bbox} has x_max <= x_min or y_max <= y_min (width or height <= 0)", "write a positive width and height", file=file)
            continue
        category = annotation.get("category_id", next(iter(labels)))
        if category not in labels:
            log.error(task, f"{where} category_id {category!r} is not among the categories", "fix category_id or add the category", file=file)
            continue
        image["boxes"].append((x, y, x + w, y + h))
        image["labels"].append(labels[category])

    records: list[SampleRecord] = []
    for image in images.values():
        entry = image["entry"]
        path = Path(os.path.normpath(image_dir / str(entry["file_name"])))
        if not path.is_file():
            log.error(task, f"image file {path} not found", f"correct file_name (relative to {image_dir}) or restore the file", file=file, row=image["index"])
            continue
        if not image["boxes"]:
            log.warning(task, f"image {entry['file_name']} has no box", "add its box, or keep it only if the model handles images without objects", file=file, row=image["index"])
        case = entry.get("case_id", entry.get("patient_id"))
        records.append(
            SampleRecord(
                task=task,
                image_path=path,
                source_file=file,
                row=image["index"],
                case_id=str(case) if case is not None else case_from_path(path, source.case_regex),
                split=split,
                boxes_xyxy=tuple(image["boxes"]),
                box_labels=tuple(image["labels"]),
            )
        )
    return records
