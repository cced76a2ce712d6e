"""Every source reader on the real data in shared/data (fixtures for formats the data does not come in are built
in tmp_path from the real images and labels)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from test_data_helpers import small_config, write_csv, write_dicom

from usagg.config import load_study
from usagg.data.dataset import TaskDataset
from usagg.data.detect import detect_layouts
from usagg.data.problems import ProblemLog
from usagg.data.sources import discover_fmc_uia, load_task_records, read_source
from usagg.data.sources.fmc_uia import parse_point
from usagg.errors import DataError
from usagg.tasks import TaskCard

REPO = Path(__file__).resolve().parents[1]

SAMPLE_TASKS = {
    # task id: (kind, classes or points, training rows)
    "breast_lesion": ("segmentation", 2, 40),
    "breast_2cls": ("classification", 2, 60),
    "breast_lesion_det": ("detection", 1, 40),
    "fetal_head": ("segmentation", 2, 40),
    "fetal_head_axis": ("keypoints", 2, 40),
    "nerve_vessel": ("segmentation", 3, 40),
}


def test_discover_fmc_uia_sample(shared_data):
    cards = discover_fmc_uia(shared_data / "fmc_uia_sample")
    found = {c.name: c for c in cards}
    assert set(found) == set(SAMPLE_TASKS)
    for name, (kind, count, rows) in SAMPLE_TASKS.items():
        card = found[name]
        assert card.kind == kind
        assert (card.num_keypoints if kind == "keypoints" else card.num_classes) == count
        assert len(load_task_records(card)) == rows


def test_discover_fmc_uia_root_problems(tmp_path):
    """Problems of the dataset root itself carry no task name and say which folder to point at."""
    from usagg.errors import DataError

    with pytest.raises(DataError) as info:
        discover_fmc_uia(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: has no csv_files/ folder, so it is not an FMC_UIA root; fix: ")
    (tmp_path / "csv_files").mkdir()
    log = ProblemLog(strict=False)
    assert discover_fmc_uia(tmp_path, log=log) == []
    [problem] = log.problems
    assert problem.task == ""
    assert str(problem) == f"{tmp_path / 'csv_files'}: contains no CSV files; fix: put one CSV per task in csv_files/"


def test_real_demo_study_reads_train_and_val(shared_data):
    study = load_study(REPO / "analysis" / "real_demo.yaml")
    assert {t.name for t in study.tasks} == set(SAMPLE_TASKS)
    for card in study.tasks:
        records = load_task_records(card)
        splits = [r.split for r in records]
        assert splits.count("val") == 10
        assert splits.count(None) == SAMPLE_TASKS[card.name][2]


def test_fmc_uia_record_fields(shared_data):
    study = load_study(REPO / "analysis" / "real_demo.yaml")
    by_name = {t.name: load_task_records(t) for t in study.tasks}
    first = by_name["breast_lesion_det"][0]
    assert first.image_path.name == "bus_0046-r.png"
    assert first.boxes_xyxy == ((59.0, 82.0, 220.0, 195.0),)
    assert first.row == 1
    axis = by_name["fetal_head_axis"][0]
    assert axis.keypoints_xy == ((331.34, 413.05), (368.64, 100.65))
    provenance = pl.read_csv(shared_data / "fmc_uia_sample" / "provenance.csv")
    expected = provenance.filter(pl.col("image_path") == "../Regression/HC18/IMAGES/010_2HC.png")["pixel_size_mm"][0]
    assert axis.spacing_mm_per_px == pytest.approx(float(expected))
    labels = [r.label for r in by_name["breast_2cls"] if r.split is None]
    assert labels.count(0) == 30
    assert labels.count(1) == 30
    assert all(r.mask_path.is_file() for r in by_name["nerve_vessel"])


def test_parse_point():
    assert parse_point("[1.5, 2]") == (1.5, 2.0)
    assert parse_point("[1.5]") is None
    assert parse_point("1.5, 2") is None
    assert parse_point('["a", 2]') is None


def test_mask_folder_busbra_with_prefixes(shared_data):
    card = TaskCard.model_validate(
        {
            "name": "busbra_seg",
            "type": "segmentation",
            "num_classes": 2,
            "source": {"format": "mask_folder", "root": shared_data / "busbra_breast", "image_prefix": "bus_", "mask_prefix": "mask_"},
        }
    )
    records = load_task_records(card)
    assert len(records) == 200
    assert all(r.mask_path.name == "mask_" + r.image_path.name.removeprefix("bus_") for r in records)


def test_mask_folder_hc18_case_regex(shared_data):
    card = TaskCard.model_validate(
        {
            "name": "hc18_seg",
            "type": "segmentation",
            "num_classes": 2,
            "source": {"format": "mask_folder", "root": shared_data / "hc18_fetal_head", "case_regex": r"^(\d+)_"},
        }
    )
    records = load_task_records(card)
    assert len(records) == 100
    by_name = {r.image_path.name: r for r in records}
    assert by_name["010_2HC.png"].case_id == "010"


def test_mask_folder_hc18_spacing_csv(shared_data):
    card = TaskCard.model_validate(
        {
            "name": "hc18_seg",
            "type": "segmentation",
            "num_classes": 2,
            "source": {"format": "mask_folder", "root": shared_data / "hc18_fetal_head", "spacing_csv": "labels.csv"},
        }
    )
    truth = pl.read_csv(shared_data / "hc18_fetal_head" / "labels.csv")
    expected = {Path(image).name: size for image, size in zip(truth["image"], truth["pixel_size_mm"])}
    records = load_task_records(card)
    assert {r.image_path.name: r.spacing_mm_per_px for r in records} == pytest.approx(expected)
    item = TaskDataset(card, records[:1], small_config(), train=False)[0]
    assert float(item["spacing_mm_per_px"]) == pytest.approx(expected[records[0].image_path.name])


def test_mask_folder_bad_spacing_names_file_and_row(shared_data, tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        for name in ("000_HC.png", "010_2HC.png"):
            shutil.copyfile(shared_data / "hc18_fetal_head" / folder / name, tmp_path / folder / name)
    write_csv(tmp_path / "spacing.csv", ["image", "pixel_size_mm"], [["images/000_HC.png", "0.07"], ["images/010_2HC.png", "-1"]])
    source = {"format": "mask_folder", "root": tmp_path, "spacing_csv": "spacing.csv", "pixel_spacing_mm": 0.1}
    card = TaskCard.model_validate({"name": "hc18_seg", "type": "segmentation", "num_classes": 2, "source": source})
    log = ProblemLog(strict=False)
    records = read_source(card, log)
    assert {r.image_path.name: r.spacing_mm_per_px for r in records} == {"000_HC.png": 0.07, "010_2HC.png": None}
    (problem,) = log.problems
    assert (problem.file, problem.row, problem.fatal) == (tmp_path / "spacing.csv", 2, True)
    assert "pixel spacing '-1' in column 'pixel_size_mm' is not a positive number" in problem.message
    with pytest.raises(DataError, match=r"spacing.csv, row 2: .*pixel spacing '-1'"):
        load_task_records(card)


def test_mask_folder_usgra_split_csv(shared_data):
    card = TaskCard.model_validate(
        {
            "name": "usgra",
            "type": "segmentation",
            "num_classes": 3,
            "source": {
                "format": "mask_folder",
                "root": shared_data / "usgra_nerve_vessel",
                "split_csv": "labels.csv",
                "split_path_column": "image",
                "split_column": "source_split",
            },
        }
    )
    splits = [r.split for r in load_task_records(card)]
    assert splits.count("train") == 60
    assert splits.count("test") == 40


def test_class_csv_busbra(shared_data):
    card = TaskCard.model_validate(
        {
            "name": "busbra_cls",
            "type": "classification",
            "num_classes": 2,
            "source": {"format": "class_csv", "root": shared_data / "busbra_breast", "csv": "labels.csv", "path_column": "image", "case_column": "case"},
        }
    )
    records = load_task_records(card)
    truth = pl.read_csv(shared_data / "busbra_breast" / "labels.csv")
    assert [r.label for r in records] == truth["label"].to_list()
    assert [r.case_id for r in records] == [str(c) for c in truth["case"].to_list()]


def test_class_csv_accepts_class_names(shared_data, tmp_path):
    truth = pl.read_csv(shared_data / "busbra_breast" / "labels.csv").head(6)
    rows = [[str(shared_data / "busbra_breast" / p), name] for p, name in zip(truth["image"], truth["pathology"])]
    write_csv(tmp_path / "labels.csv", ["path", "label"], rows)
    card = TaskCard.model_validate(
        {"name": "named", "type": "classification", "num_classes": 2, "class_names": ["benign", "malignant"], "source": {"format": "class_csv", "root": tmp_path}}
    )
    assert [r.label for r in load_task_records(card)] == truth["label"].to_list()
    rows[1][1] = "malignnat"
    write_csv(tmp_path / "labels.csv", ["path", "label"], rows)
    log = ProblemLog(strict=False)
    read_source(card, log)
    assert [(p.row, p.message, p.fix) for p in log.problems] == [(
        2,
        "class label 'malignnat' in column 'label' is neither a class index nor a class name (did you mean 'malignant'?)",
        "write a class index 0..1 or one of benign, malignant",
    )]


def test_class_folders_from_busbra(shared_data, tmp_path):
    truth = pl.read_csv(shared_data / "busbra_breast" / "labels.csv").head(12)
    for image, pathology in zip(truth["image"], truth["pathology"]):
        (tmp_path / "train" / pathology).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / "busbra_breast" / image, tmp_path / "train" / pathology / Path(image).name)
    card = TaskCard.model_validate(
        {"name": "folders", "type": "classification", "num_classes": 2, "source": {"format": "class_folders", "root": tmp_path}}
    )
    records = load_task_records(card)
    assert len(records) == 12
    assert all(r.split == "train" for r in records)
    expected = {Path(i).name: int(label) for i, label in zip(truth["image"], truth["label"])}
    assert {r.image_path.name: r.label for r in records} == expected  # sorted folder names: benign 0, malignant 1


def _busbra_coco(shared_data: Path, dest: Path, count: int, extra_box: bool = False) -> Path:
    truth = pl.read_csv(shared_data / "busbra_breast" / "labels.csv").head(count)
    images, annotations = [], []
    for i, row in enumerate(truth.iter_rows(named=True), start=1):
        images.append({"id": i, "file_name": Path(row["image"]).name, "width": row["width"], "height": row["height"]})
        annotations.append({"id": i, "image_id": i, "category_id": 7, "bbox": [row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]], "iscrowd": 0})
        if extra_box and i == 1:
            annotations.append({"id": 100, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20], "iscrowd": 0})
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for row in truth.iter_rows(named=True):
        shutil.copyfile(shared_data / "busbra_breast" / row["image"], dest / "images" / Path(row["image"]).name)
    data = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "lesion"}]}
    (dest / "annotations.json").write_text(json.dumps(data))
    return dest


def test_coco_from_busbra_boxes(shared_data, tmp_path):
    root = _busbra_coco(shared_data, tmp_path, 5, extra_box=True)
    card = TaskCard.model_validate({"name": "det", "type": "detection", "num_classes": 1, "source": {"format": "coco", "root": root}})
    records = load_task_records(card)
    truth = pl.read_csv(shared_data / "busbra_breast" / "labels.csv").head(5)
    assert len(records) == 5
    x, y, w, h = truth.row(1, named=True)["bbox_x"], truth.row(1, named=True)["bbox_y"], truth.row(1, named=True)["bbox_w"], truth.row(1, named=True)["bbox_h"]
    assert records[1].boxes_xyxy == ((x, y, x + w, y + h),)
    assert len(records[0].boxes_xyxy) == 2  # several boxes per image
    assert records[0].box_labels == (0, 0)
    item = TaskDataset(card, records, small_config(), train=False)[0]
    assert item["target"]["boxes"].shape == (2, 4)


def test_keypoint_csv_from_sample_points(shared_data, tmp_path):
    frame = pl.read_csv(shared_data / "fmc_uia_sample" / "csv_files" / "fetal_head_axis.csv").head(6)
    rows = []
    for path, p1, p2 in zip(frame["image_path"], frame["point_1_xy"], frame["point_2_xy"]):
        (x1, y1), (x2, y2) = json.loads(p1), json.loads(p2)
        rows.append([str((shared_data / "fmc_uia_sample" / "csv_files" / path).resolve()), x1, y1, x2, y2])
    write_csv(tmp_path / "keypoints.csv", ["path", "x1", "y1", "x2", "y2"], rows)
    card = TaskCard.model_validate(
        {"name": "axis", "type": "regression", "num_keypoints": 2, "source": {"format": "keypoint_csv", "root": tmp_path}}
    )
    records = load_task_records(card)
    assert records[0].keypoints_xy == ((rows[0][1], rows[0][2]), (rows[0][3], rows[0][4]))


def test_scalar_csv_hc18_head_circumference(shared_data, tmp_path):
    truth = pl.read_csv(shared_data / "hc18_fetal_head" / "labels.csv").head(8)
    rows = [[r["image"], r["head_circumference_mm"], "mm", r["pixel_size_mm"]] for r in truth.iter_rows(named=True)]
    write_csv(tmp_path / "values.csv", ["path", "value", "unit", "pixel_size_mm"], rows)
    card = TaskCard.model_validate(
        {
            "name": "hc",
            "type": "regression",
            "target": "head_circumference_mm",
            "unit": "mm",
            "source": {
                "format": "scalar_csv",
                "root": shared_data / "hc18_fetal_head",
                "csv": str(tmp_path / "values.csv"),
                "unit_column": "unit",
                "spacing_column": "pixel_size_mm",
            },
        }
    )
    records = load_task_records(card)
    assert [r.value for r in records] == truth["head_circumference_mm"].to_list()
    assert [r.spacing_mm_per_px for r in records] == pytest.approx(truth["pixel_size_mm"].to_list())
    item = TaskDataset(card, records, small_config(), train=False)[0]
    assert float(item["target"]["value"]) == pytest.approx(truth["head_circumference_mm"][0])
    assert float(item["spacing_mm_per_px"]) == pytest.approx(truth["pixel_size_mm"][0])


def test_dicom_source_spacing_from_header(shared_data, tmp_path):
    truth = pl.read_csv(shared_data / "hc18_fetal_head" / "labels.csv").head(3)
    rows = []
    for r in truth.iter_rows(named=True):
        pixels = np.array(Image.open(shared_data / "hc18_fetal_head" / r["image"]).convert("L"))
        name = Path(r["image"]).with_suffix(".dcm").name
        write_dicom(tmp_path / name, pixels, PixelSpacing=[r["pixel_size_mm"], r["pixel_size_mm"]])
        rows.append([name, r["head_circumference_mm"]])
    write_csv(tmp_path / "values.csv", ["path", "value"], rows)
    card = TaskCard.model_validate(
        {"name": "hc_dicom", "type": "regression", "target": "head_circumference_mm", "source": {"format": "scalar_csv", "root": tmp_path, "pixel_spacing_mm": 9.0}}
    )
    dataset = TaskDataset(card, load_task_records(card), small_config(), train=False)
    for i, r in enumerate(truth.iter_rows(named=True)):
        item = dataset[i]
        assert float(item["spacing_mm_per_px"]) == pytest.approx(r["pixel_size_mm"])  # the header beats the default
        assert item["orig_size"].tolist() == [r["height"], r["width"]]


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("fmc_uia_sample", {"fmc_uia"}),
        ("busbra_breast", {"mask_folder", "class_csv"}),
        ("hc18_fetal_head", {"mask_folder"}),
        ("usgra_nerve_vessel", {"mask_folder"}),
    ],
)
def test_detect_layouts_on_real_folders(shared_data, folder, expected):
    cards = detect_layouts(shared_data / folder, ProblemLog(strict=True))
    assert {c.source.format for c in cards} == expected
    for card in cards:
        assert load_task_records(card)


def test_detected_usgra_uses_split_and_classes(shared_data):
    (card,) = detect_layouts(shared_data / "usgra_nerve_vessel", ProblemLog(strict=True))
    assert card.num_classes == 3
    assert card.source.split_column == "source_split"


def test_detected_hc18_reads_pixel_spacing(shared_data):
    (card,) = detect_layouts(shared_data / "hc18_fetal_head", ProblemLog(strict=True))
    assert (card.source.spacing_csv, card.source.spacing_path_column, card.source.spacing_column) == ("labels.csv", "image", "pixel_size_mm")
    assert all(r.spacing_mm_per_px is not None for r in load_task_records(card))


def test_spacing_nan_when_unknown(shared_data):
    card = discover_fmc_uia(shared_data / "fmc_uia_sample")[0]
    item = TaskDataset(card, load_task_records(card)[:1], small_config(), train=False)[0]
    assert math.isnan(float(item["spacing_mm_per_px"]))


def test_detect_class_csv_with_ragged_row(tmp_path):
    """Detection reads a CSV as the task reader does: blank lines before the header, a row with an extra field."""
    for k in range(3):
        Image.fromarray(np.full((8, 8), 40 * k, dtype=np.uint8)).save(tmp_path / f"img{k}.png")
    (tmp_path / "labels.csv").write_text("\n\nimage,label\nimg0.png,0\nimg1.png,2,oops\nimg2.png,1\n")
    log = ProblemLog(strict=False)
    (card,) = detect_layouts(tmp_path, log)
    assert (card.source.format, card.num_classes) == ("class_csv", 3)
    records = read_source(card, log)
    assert [r.row for r in records] == [1, 3]
    assert [(p.row, p.message) for p in log.problems] == [(2, "the row has 3 fields but the header has 2 columns")]


def _write_mask_folder(root: Path, names: list[tuple[str, str]], size: int) -> None:
    """Write ``root/images`` and ``root/masks``: a uniform image and a diagonal mask per (image name, mask name)."""
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for image_name, mask_name in names:
        Image.fromarray(np.full((size, size), 60, dtype=np.uint8)).save(root / "images" / image_name)
        Image.fromarray(np.eye(size, dtype=np.uint8)).save(root / "masks" / mask_name)


def test_unpaired_mask_names_get_one_error(tmp_path):
    """Images bus_N and masks mask_N_lesion pair under no setting given: one error names the settings that pair them."""
    _write_mask_folder(tmp_path, [(f"bus_{k:04d}.png", f"mask_{k:04d}_lesion.png") for k in range(3)], size=8)
    card = TaskCard.model_validate(
        {"name": "lesion", "type": "segmentation", "num_classes": 2, "source": {"format": "mask_folder", "root": tmp_path}}
    )
    log = ProblemLog(strict=False)
    assert read_source(card, log) == []
    (problem,) = log.problems
    assert problem.message.startswith(f"none of the 3 images in {tmp_path / 'images'} has a mask of the same name")
    assert problem.fix == (
        "set image_prefix: 'bus_', mask_prefix: 'mask_', mask_suffix: '_lesion' in the task card's source, which pairs "
        "3 of the 3 images"
    )
    fixed = card.model_copy(update={"source": card.source.model_copy(update={"image_prefix": "bus_", "mask_prefix": "mask_", "mask_suffix": "_lesion"})})
    log = ProblemLog(strict=False)
    assert len(read_source(fixed, log)) == 3
    assert log.problems == []
    # Layout detection finds the same settings.
    (detected,) = detect_layouts(tmp_path, ProblemLog(strict=False))
    assert (detected.source.image_prefix, detected.source.mask_prefix, detected.source.mask_suffix) == ("bus_", "mask_", "_lesion")


def test_docs_scalar_csv_example_loads(shared_data):
    import yaml

    text = (REPO / "docs" / "data.md").read_text()
    block = text.split("### `scalar_csv`")[1].split("```yaml")[1].split("```")[0]
    (card,) = yaml.safe_load(block)
    card["source"]["root"] = str(shared_data / card["source"]["root"])
    records = load_task_records(TaskCard.model_validate(card))
    assert len(records) == 100
    assert all(r.value > 0 for r in records)
    assert all(r.spacing_mm_per_px > 0 for r in records)


def test_detected_bad_mask_reported_once(tmp_path):
    from usagg.data.check import inspect_path

    _write_mask_folder(tmp_path, [(f"a{k}.png", f"a{k}.png") for k in range(3)], size=16)
    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[2:4, 2:4] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "masks" / "a1.png")
    report = inspect_path(tmp_path)
    assert [p.file.name for p in report.all_problems if "colour mask" in p.message] == ["a1.png"]
