"""Bad input, each case built from copies of real files: a clear error naming file, row and fix; ``data check``
lists them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_helpers import (
    copy_fmc_task,
    fmc_card,
    read_csv_rows,
    small_config,
    write_csv,
)
from typer.testing import CliRunner

from usagg.cli import app
from usagg.data.check import inspect_path
from usagg.data.dataset import TaskDataset
from usagg.data.problems import ProblemLog
from usagg.data.sources import check_task, load_task_records, read_source
from usagg.data.sources._common import read_csv_strings
from usagg.errors import DataError
from usagg.tasks import TaskCard


def _rewrite(root: Path, task: str, edit) -> Path:
    """Apply ``edit(header, rows)`` to a task CSV of a copied root; returns the CSV path."""
    path = root / "csv_files" / f"{task}.csv"
    header, rows = read_csv_rows(path)
    header, rows = edit(header, rows)
    write_csv(path, header, rows)
    return path


def _set_cell(root: Path, task: str, row: int, column: str, value: str) -> Path:
    """Write ``value`` into ``column`` of data row ``row`` (1-based) of a task CSV of a copied root."""

    def edit(header, rows):
        rows[row - 1][header.index(column)] = value
        return header, rows

    return _rewrite(root, task, edit)


def _file_of(root: Path, task: str, column: str, row: int) -> Path:
    header, rows = read_csv_rows(root / "csv_files" / f"{task}.csv")
    return (root / "csv_files" / rows[row - 1][header.index(column)]).resolve()


def _assert_load_error(card: TaskCard, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        load_task_records(card)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "fix:" in message
    return message


def _only_problem(card: TaskCard, *fragments: str):
    _, problems = check_task(card, small_config())
    errors = [p for p in problems if p.fatal]
    assert len(errors) == 1, [str(p) for p in problems]
    text = str(errors[0])
    for fragment in fragments:
        assert fragment in text, text
    assert errors[0].fix
    return errors[0]


def test_missing_image_file(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")
    _file_of(root, "breast_2cls", "image_path", 2).unlink()
    _assert_load_error(fmc_card("breast_2cls", root), "breast_2cls.csv, row 2", "not found")


def test_missing_mask_file(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_lesion")
    mask = _file_of(root, "breast_lesion", "mask_path", 3)
    mask.unlink()
    _assert_load_error(fmc_card("breast_lesion", root), "row 3", f"mask file {mask} not found")


def test_undecodable_image(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")
    image = _file_of(root, "breast_2cls", "image_path", 1)
    image.write_bytes(image.read_bytes()[:200])  # truncated PNG
    card = fmc_card("breast_2cls", root)
    _only_problem(card, "row 1", image.name, "cannot decode image")
    dataset = TaskDataset(card, load_task_records(card), small_config(), train=False)
    with pytest.raises(DataError, match=r"breast_2cls.csv, row 1: .*cannot decode image"):
        dataset[0]


def test_mask_size_differs_from_image(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_lesion")
    mask = _file_of(root, "breast_lesion", "mask_path", 2)
    small = Image.open(mask).resize((50, 40), Image.NEAREST)
    small.save(mask)
    card = fmc_card("breast_lesion", root)
    _only_problem(card, "row 2", "is 40x50 px but the image is", "resize the mask")
    dataset = TaskDataset(card, load_task_records(card), small_config(), train=False)
    with pytest.raises(DataError, match="40x50 px but the image is"):
        dataset[1]


def test_mask_value_out_of_range(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_lesion")
    mask = _file_of(root, "breast_lesion", "mask_path", 1)
    values = np.array(Image.open(mask))
    values[:5, :5] = 2  # a third class in a two-class task
    Image.fromarray(values).save(mask)
    _only_problem(fmc_card("breast_lesion", root), "row 1", "has value 2 outside the class indices 0..1")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("5", "class label 5 in column 'mask' is outside 0..1"),
        ("abc", "class label 'abc' in column 'mask' is not an integer"),
        ("1.5", "'1.5'"),
        ("", "class label in column 'mask' is empty"),
    ],
)
def test_class_label_invalid(shared_data, tmp_path, value, fragment):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")

    _set_cell(root, "breast_2cls", 2, "mask", value)
    _assert_load_error(fmc_card("breast_2cls", root), "row 2", fragment)


def test_integral_float_label_accepted(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")

    _set_cell(root, "breast_2cls", 1, "mask", "1.0")
    assert load_task_records(fmc_card("breast_2cls", root))[0].label == 1


def test_keypoint_outside_image(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "fetal_head_axis")

    _set_cell(root, "fetal_head_axis", 3, "point_2_xy", "[5000.0, 10.0]")
    card = fmc_card("fetal_head_axis", root)
    _only_problem(card, "row 3", "keypoint 2 (5000, 10) lies outside the 800x540 px image")
    dataset = TaskDataset(card, load_task_records(card), small_config(), train=False)
    with pytest.raises(DataError, match="keypoint 2"):
        dataset[2]


def test_keypoint_not_json(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "fetal_head_axis")

    _set_cell(root, "fetal_head_axis", 1, "point_1_xy", "331.3 413.0")
    _assert_load_error(fmc_card("fetal_head_axis", root), "row 1", "point_1_xy", "is not a JSON point")


def test_box_outside_image(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_lesion_det")

    _set_cell(root, "breast_lesion_det", 1, "x_max", "10000")
    _only_problem(fmc_card("breast_lesion_det", root), "row 1", "box 1 (59, 82, 10000, 195) lies outside")


def test_box_with_x_max_not_above_x_min(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_lesion_det")

    def edit(header, rows):
        rows[1][header.index("x_max")] = rows[1][header.index("x_min")]
        return header, rows

    _rewrite(root, "breast_lesion_det", edit)
    _assert_load_error(fmc_card("breast_lesion_det", root), "row 2", "x_max <= x_min")


def test_empty_csv(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")
    (root / "csv_files" / "breast_2cls.csv").write_text("")
    _assert_load_error(fmc_card("breast_2cls", root), "breast_2cls.csv", "CSV file is empty")


def test_csv_with_header_only(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")
    _rewrite(root, "breast_2cls", lambda header, rows: (header, []))
    _assert_load_error(fmc_card("breast_2cls", root), "breast_2cls.csv", "no rows")


def test_csv_missing_required_column(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_lesion")

    def edit(header, rows):
        drop = header.index("mask_path")
        return header[:drop] + header[drop + 1 :], [r[:drop] + r[drop + 1 :] for r in rows]

    _rewrite(root, "breast_lesion", edit)
    _assert_load_error(fmc_card("breast_lesion", root), "breast_lesion.csv", "missing column(s) mask_path")


def test_csv_missing_base_column(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")

    def edit(header, rows):
        drop = header.index("num_classes")
        return header[:drop] + header[drop + 1 :], [r[:drop] + r[drop + 1 :] for r in rows]

    _rewrite(root, "breast_2cls", edit)
    _assert_load_error(fmc_card("breast_2cls", root), "missing required column(s) num_classes")


def test_duplicate_image_entries(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")
    _rewrite(root, "breast_2cls", lambda header, rows: (header, rows + [rows[0]]))
    _assert_load_error(fmc_card("breast_2cls", root), "row 4", "duplicate entry", "first listed in row 1")


def test_unknown_task_type(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "fetal_head_axis")

    def edit(header, rows):
        for row in rows:
            row[header.index("task_name")] = "keypoints"
        return header, rows

    _rewrite(root, "fetal_head_axis", edit)
    _assert_load_error(fmc_card("fetal_head_axis", root), "row 1", "unknown task type 'keypoints'", "'Regression' with a capital R")


def test_task_id_not_found(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls")
    card = fmc_card("breast_2cls", root, source={"task_id": "breast_3cls"})
    _assert_load_error(card, "no rows with task_id 'breast_3cls'", "task ids found: breast_2cls")


def test_num_classes_mismatch(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "nerve_vessel")
    card = fmc_card("nerve_vessel", root, num_classes=2)
    _assert_load_error(card, "num_classes is 3 in this row but the task's num_classes is 2 (from its task card")


def test_mask_folder_image_without_mask(shared_data, tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for name in ("000_HC.png", "010_2HC.png"):
        shutil.copyfile(shared_data / "hc18_fetal_head" / "images" / name, tmp_path / "images" / name)
    shutil.copyfile(shared_data / "hc18_fetal_head" / "masks" / "000_HC.png", tmp_path / "masks" / "000_HC.png")
    card = TaskCard.model_validate({"name": "hc", "type": "segmentation", "num_classes": 2, "source": {"format": "mask_folder", "root": tmp_path}})
    _assert_load_error(card, "no mask for image 010_2HC.png", "mask_prefix")


def test_class_csv_missing_column(shared_data, tmp_path):
    write_csv(tmp_path / "labels.csv", ["path", "class"], [[str(shared_data / "busbra_breast" / "images" / "bus_0001-l.png"), 1]])
    card = TaskCard.model_validate({"name": "c", "type": "classification", "num_classes": 2, "source": {"format": "class_csv", "root": tmp_path}})
    _assert_load_error(card, "labels.csv", "missing required column(s) label", "set the column names")


def test_coco_box_with_zero_width(shared_data, tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copyfile(shared_data / "busbra_breast" / "images" / "bus_0001-l.png", tmp_path / "images" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]}], "categories": [{"id": 1, "name": "lesion"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    card = TaskCard.model_validate({"name": "d", "type": "detection", "source": {"format": "coco", "root": tmp_path}})
    _assert_load_error(card, "annotations.json", "annotations[0]", "x_max <= x_min")


def _broken_root(shared_data: Path, root: Path) -> Path:
    """An FMC_UIA root with several problems in several tasks."""
    copy_fmc_task(shared_data, root, "breast_2cls", rows=4)
    copy_fmc_task(shared_data, root, "breast_lesion", rows=3)
    copy_fmc_task(shared_data, root, "breast_lesion_det", rows=3)

    def labels(header, rows):
        rows[0][header.index("mask")] = "7"
        rows[1][header.index("mask")] = "x"
        return header, rows + [rows[2]]

    _rewrite(root, "breast_2cls", labels)
    _file_of(root, "breast_lesion", "mask_path", 1).unlink()
    _file_of(root, "breast_lesion", "image_path", 2).write_bytes(b"garbage")

    def boxes(header, rows):
        rows[0][header.index("x_max")] = "5"
        return header, rows

    _rewrite(root, "breast_lesion_det", boxes)
    (root / "csv_files" / "empty_task.csv").write_text("")
    return root


def test_data_check_lists_every_problem(shared_data, tmp_path):
    root = _broken_root(shared_data, tmp_path / "broken")
    report = inspect_path(root)
    texts = [str(p) for p in report.all_problems if p.fatal]
    expected = [
        "class label 7 in column 'mask' is outside",
        "class label 'x'",
        "duplicate entry",
        "mask file",
        "cannot decode image",
        "x_max <= x_min",
        "CSV file is empty",
    ]
    for fragment in expected:
        assert any(fragment in t for t in texts), (fragment, texts)
    assert report.has_errors


def test_cli_check_exits_nonzero_with_all_problems(shared_data, tmp_path):
    root = _broken_root(shared_data, tmp_path / "broken")
    result = CliRunner().invoke(app, ["data", "check", str(root), "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 1, result.output
    assert "would break training" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert sum(p["severity"] == "error" for p in report["problems"]) >= 7


def test_scalar_value_not_numeric_and_unit_mismatch(shared_data, tmp_path):
    image = str(shared_data / "hc18_fetal_head" / "images" / "000_HC.png")
    rows = [[image, "44.3", "cm"], [image.replace("000_HC", "010_2HC"), "n/a", "mm"]]
    write_csv(tmp_path / "values.csv", ["path", "value", "unit"], rows)
    card = TaskCard.model_validate(
        {"name": "hc", "type": "regression", "target": "head_circumference_mm", "unit": "mm", "source": {"format": "scalar_csv", "root": tmp_path, "unit_column": "unit"}}
    )
    _, problems = check_task(card, small_config())
    texts = [str(p) for p in problems if p.fatal]
    assert any("row 1" in t and "unit 'cm' differs from the task card's unit 'mm'" in t for t in texts), texts
    assert any("row 2" in t and "value 'n/a' in column 'value' is not a number" in t for t in texts), texts


def test_keypoint_csv_missing_point_column(shared_data, tmp_path):
    image = str(shared_data / "hc18_fetal_head" / "images" / "000_HC.png")
    write_csv(tmp_path / "keypoints.csv", ["path", "x1", "y1", "x2"], [[image, 1, 2, 3]])
    card = TaskCard.model_validate({"name": "k", "type": "regression", "num_keypoints": 2, "source": {"format": "keypoint_csv", "root": tmp_path}})
    _assert_load_error(card, "keypoints.csv", "missing required column(s) y2")


def _noise_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((40, 48)) * 255).astype(np.uint8)).save(path)
    return path


def _class_csv_root(root: Path, labels: list[int]) -> Path:
    for i in range(len(labels)):
        _noise_png(root / "images" / f"im{i:02d}.png", i)
    write_csv(root / "labels.csv", ["path", "label"], [[f"images/im{i:02d}.png", label] for i, label in enumerate(labels)])
    return root


def test_label_gap_names_row(tmp_path):
    labels = [i % 2 for i in range(12)]
    labels[9] = 7  # row 10: a typo for 1
    root = _class_csv_root(tmp_path / "cls", labels)
    report = inspect_path(root)
    (task,) = report.tasks
    assert task.card.num_classes == 8  # inferred from the largest label
    errors = task.errors
    assert len(errors) == 1, [str(p) for p in task.problems]
    gap = errors[0]
    assert gap.message.startswith("class labels skip 2..6: found 0, 1, 7 with num_classes 8")
    assert "above the gap: 7 in labels.csv row 10" in gap.message
    assert (gap.file, gap.row) == (root / "labels.csv", 10)
    assert not any("have no image" in p.message for p in task.problems), [str(p) for p in task.problems]


def test_label_gap_lists_rarest_first(tmp_path):
    root = _class_csv_root(tmp_path / "cls", [0, 0, 0, 2, 2, 2, 5])
    (task,) = inspect_path(root).tasks
    (gap,) = [p for p in task.errors if "skip" in p.message]
    assert gap.message.startswith("class labels skip 1, 3..4: found 0, 2, 5")
    assert gap.message.endswith("above the gap: 5 in labels.csv row 7; 2 in labels.csv rows 4, 5, 6")
    assert gap.file is None  # more than one row is named in the message


def test_mask_value_gap_warns(tmp_path):
    root = tmp_path / "seg"
    for i in range(4):
        _noise_png(root / "images" / f"s{i}.png", i)
        mask = np.zeros((40, 48), np.uint8)
        mask[10:20, 10:20] = 1
        if i == 2:
            mask[30:32, 30:32] = 7
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    (task,) = inspect_path(root).tasks
    assert not task.errors
    (gap,) = task.warnings
    assert gap.message.startswith("mask values skip 2..6: found 0, 1, 7 with num_classes 8")
    assert gap.file == root / "masks" / "s2.png"


def test_class_folders_named_by_integers(tmp_path):
    for name, count in (("0", 2), ("1", 2), ("7", 1)):
        for i in range(count):
            _noise_png(tmp_path / "planes" / name / f"{name}_{i}.png", i)
    (task,) = inspect_path(tmp_path / "planes").tasks
    (warning,) = [p for p in task.warnings if "class folders" in p.message]
    assert "folder 7 is class 2" in warning.message
    assert "the names skip 2..6, and above the gap are folder(s) 7 (1 image)" in warning.message


def test_class_folders_sorted_numerically(tmp_path):
    for name in range(11):
        _noise_png(tmp_path / "planes" / str(name) / "a.png", name)
    card = TaskCard.model_validate({"name": "p", "type": "classification", "num_classes": 11, "source": {"format": "class_folders", "root": tmp_path / "planes"}})
    records, problems = check_task(card, small_config())
    assert {r.image_path.parent.name: r.label for r in records} == {str(i): i for i in range(11)}
    assert not problems


def test_detection_num_classes_mismatch(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_lesion_det")

    _set_cell(root, "breast_lesion_det", 3, "num_classes", "2")
    _assert_load_error(
        fmc_card("breast_lesion_det", root), "row 3", "num_classes is 2 in this row but the task's num_classes is 1 (from its task card",
        "correct this row's num_classes, or set num_classes: 2 in a study's task card if every row has 2",
    )


HC18_IMAGES = ("000_HC.png", "010_2HC.png", "017_2HC.png")
BUSBRA_STEMS = ("0001-l", "0002-l", "0006-s")
CSV_KINDS = ("fmc_uia", "class_csv", "scalar_csv", "keypoint_csv", "split_csv")


def _write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    """Write ``lines`` as they are (no quoting), each ended by ``newline``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())
    return path


def _csv_source(kind: str, shared_data: Path, root: Path) -> tuple[TaskCard, Path, list[str]]:
    """Build a source of ``kind`` over three real images; returns its card, its CSV and the CSV's lines (header first)."""
    images = [shared_data / "hc18_fetal_head" / "images" / name for name in HC18_IMAGES]
    if kind == "fmc_uia":
        copy_fmc_task(shared_data, root, "breast_2cls", rows=3)
        file = root / "csv_files" / "breast_2cls.csv"
        return fmc_card("breast_2cls", root), file, file.read_text().splitlines()
    if kind == "class_csv":
        card = {"type": "classification", "num_classes": 2}
        lines = ["path,label"] + [f"{image},{i % 2}" for i, image in enumerate(images)]
        file = root / "labels.csv"
    elif kind == "scalar_csv":
        card = {"type": "regression", "target": "head_circumference_mm", "unit": "mm"}
        lines = ["path,value"] + [f"{image},{40 + i}" for i, image in enumerate(images)]
        file = root / "values.csv"
    elif kind == "keypoint_csv":
        card = {"type": "regression", "num_keypoints": 1}
        lines = ["path,x1,y1"] + [f"{image},{10 + i},20" for i, image in enumerate(images)]
        file = root / "keypoints.csv"
    else:  # split_csv: a side table of a mask_folder source, read through iter_path_value_rows
        busbra = shared_data / "busbra_breast"
        for sub in ("images", "masks"):
            (root / sub).mkdir(parents=True)
        for stem in BUSBRA_STEMS:
            shutil.copyfile(busbra / "images" / f"bus_{stem}.png", root / "images" / f"bus_{stem}.png")
            shutil.copyfile(busbra / "masks" / f"mask_{stem}.png", root / "masks" / f"mask_{stem}.png")
        card = {"type": "segmentation", "num_classes": 2}
        source = {"image_prefix": "bus_", "mask_prefix": "mask_", "split_csv": "splits.csv"}
        lines = ["image,split"] + [f"images/bus_{stem}.png,{split}" for stem, split in zip(BUSBRA_STEMS, ("train", "val", "test"))]
        card = TaskCard.model_validate({"name": "t", **card, "source": {"format": "mask_folder", "root": root, **source}})
        return card, _write_lines(root / "splits.csv", lines), lines
    card = TaskCard.model_validate({"name": "t", **card, "source": {"format": kind, "root": root}})
    return card, _write_lines(file, lines), lines


@pytest.mark.parametrize("kind", CSV_KINDS)
def test_blank_rows_at_end_ignored(shared_data, tmp_path, kind):
    card, file, lines = _csv_source(kind, shared_data, tmp_path)
    _write_lines(file, lines + ["", ""], newline="\r\n")
    log = ProblemLog(strict=False)
    records = read_source(card, log)
    assert [str(p) for p in log.problems] == []
    assert len(records) == 3
    if kind == "split_csv":
        assert [r.split for r in records] == ["train", "val", "test"]


@pytest.mark.parametrize("kind", CSV_KINDS)
def test_blank_row_in_middle_warns(shared_data, tmp_path, kind):
    card, file, lines = _csv_source(kind, shared_data, tmp_path)
    _write_lines(file, [lines[0], lines[1], "", lines[2], lines[3]])
    log = ProblemLog(strict=False)
    records = read_source(card, log)
    assert len(log.problems) == 1, [str(p) for p in log.problems]
    problem = log.problems[0]
    assert not problem.fatal
    assert (problem.file, problem.row) == (file, 2)
    assert problem.message == "the row is blank; skipped"
    if kind == "split_csv":
        assert [r.split for r in records] == ["train", "val", "test"]
    else:
        assert [r.row for r in records] == [1, 3, 4]
    assert len(load_task_records(card)) == 3  # a warning does not stop training


def test_blank_row_of_commas_and_spaces(tmp_path):
    file = _write_lines(tmp_path / "t.csv", ["a,b", "1,2", " , ", "3,4", ",", ""])
    log = ProblemLog(strict=False)
    frame = read_csv_strings(file, "t", log, ["a", "b"])
    assert frame is not None
    assert frame.select("a", "b").rows() == [("1", "2"), ("3", "4")]
    assert [(p.row, p.fatal) for p in log.problems] == [(2, False)]


def test_csv_with_header_and_blank_lines_only(shared_data, tmp_path):
    card, file, lines = _csv_source("class_csv", shared_data, tmp_path)
    _write_lines(file, [lines[0], "", ""])
    _assert_load_error(card, "labels.csv", "CSV has a header but no rows")


def test_csv_row_with_extra_field(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "breast_2cls", rows=4)

    def edit(header, rows):
        rows[1].append("extra")  # row 2: one field more than the header
        rows[2][header.index("mask")] = "x"  # row 3: a problem of its own, reported as well
        return header, rows

    file = _rewrite(root, "breast_2cls", edit)
    card = fmc_card("breast_2cls", root)
    log = ProblemLog(strict=False)
    records = read_source(card, log)
    assert [r.row for r in records] == [1, 4]
    errors = [p for p in log.problems if p.fatal]
    assert [p.row for p in errors] == [2, 3], [str(p) for p in log.problems]
    ragged = errors[0]
    assert ragged.file == file
    assert ragged.message == "the row has 6 fields but the header has 5 columns"
    assert "quote values that contain commas" in ragged.fix
    assert "class label 'x'" in errors[1].message
    _assert_load_error(card, "breast_2cls.csv, row 2", "6 fields but the header has 5 columns")


def test_class_csv_unquoted_comma_in_path(shared_data, tmp_path):
    card, file, lines = _csv_source("class_csv", shared_data, tmp_path)
    shutil.copyfile(shared_data / "hc18_fetal_head" / "images" / HC18_IMAGES[1], tmp_path / "head,2.png")
    lines[2] = "head,2.png,1"
    _write_lines(file, lines)
    log = ProblemLog(strict=False)
    records = read_source(card, log)
    assert [r.row for r in records] == [1, 3]
    assert [(p.row, p.message) for p in log.problems] == [(2, "the row has 3 fields but the header has 2 columns")]

    lines[2] = '"head,2.png",1'  # the fix the message gives
    _write_lines(file, lines)
    log = ProblemLog(strict=False)
    assert len(read_source(card, log)) == 3
    assert log.problems == []


def test_trailing_comma_accepted(shared_data, tmp_path):
    card, file, lines = _csv_source("scalar_csv", shared_data, tmp_path)
    _write_lines(file, [lines[0]] + [line + "," for line in lines[1:]])
    log = ProblemLog(strict=False)
    assert len(read_source(card, log)) == 3
    assert log.problems == []


def test_extra_field_reported_by_owning_task_only(shared_data, tmp_path):
    copy_fmc_task(shared_data, tmp_path, "breast_2cls")
    copy_fmc_task(shared_data, tmp_path, "breast_lesion")
    _rewrite(tmp_path, "breast_lesion", lambda header, rows: (header, [rows[0] + ["extra"], *rows[1:]]))
    report = inspect_path(tmp_path)
    ragged = [p for p in report.all_problems if "fields but the header has" in p.message]
    assert [(p.task, p.row, p.fatal) for p in ragged] == [("breast_lesion", 1, True)]


def test_extra_field_in_csv_shared_by_tasks(shared_data, tmp_path):
    copy_fmc_task(shared_data, tmp_path, "breast_2cls", csv_name="all.csv")
    file = tmp_path / "csv_files" / "all.csv"
    header, rows = read_csv_rows(file)
    rows[0].append("extra")
    write_csv(file, header, rows)
    _assert_load_error(fmc_card("breast_2cls", tmp_path), "all.csv, row 1", "6 fields but the header has 5 columns")


def test_csv_quote_error_names_line(shared_data, tmp_path):
    card, file, lines = _csv_source("class_csv", shared_data, tmp_path)
    lines[2] = '"' + lines[2].replace(",", '"x,', 1)  # "path"x,1: text after a closing quote
    _write_lines(file, lines)
    _assert_load_error(card, "labels.csv", "cannot parse CSV line 3")


@pytest.mark.parametrize(
    ("kind", "row", "value", "expected"),
    [
        ("class_csv", 2, "", "class label in column 'label' is empty"),
        ("class_csv", 1, "2", "class label 2 in column 'label' is outside 0..1"),
        ("scalar_csv", 2, "", "value in column 'value' is empty"),
        ("scalar_csv", 2, " ", "value in column 'value' is empty"),
        ("keypoint_csv", 3, "", "keypoint (x1, y1): column 'y1' is empty"),
    ],
)
def test_label_cell_messages(shared_data, tmp_path, kind, row, value, expected):
    card, file, lines = _csv_source(kind, shared_data, tmp_path)
    lines[row] = lines[row].rsplit(",", 1)[0] + "," + value  # the last column contains the label
    _write_lines(file, lines)
    message = _assert_load_error(card, f"row {row}", expected)
    assert "None" not in message


@pytest.mark.parametrize(
    ("suffix", "reason"),
    [(".jpg", "JPEG is lossy and not read as a mask"), (".gif", ".gif is not a mask format")],
)
def test_mask_folder_mask_in_unread_format(shared_data, tmp_path, suffix, reason):
    busbra = shared_data / "busbra_breast"
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for stem in ("0001-l", "0019-r"):
        shutil.copyfile(busbra / "images" / f"bus_{stem}.png", tmp_path / "images" / f"bus_{stem}.png")
    shutil.copyfile(busbra / "masks" / "mask_0001-l.png", tmp_path / "masks" / "mask_0001-l.png")
    Image.open(busbra / "masks" / "mask_0019-r.png").convert("L").save(tmp_path / "masks" / f"mask_0019-r{suffix}")
    source = {"format": "mask_folder", "root": tmp_path, "image_prefix": "bus_", "mask_prefix": "mask_"}
    card = TaskCard.model_validate({"name": "bus", "type": "segmentation", "num_classes": 2, "source": source})
    problem = _only_problem(card, "no mask for image bus_0019-r.png", f"mask_0019-r{suffix} was found but {reason}")
    assert problem.fix.startswith("save the mask as PNG (.png, .bmp, .tif, .tiff, .npy files are read)")
    assert ("export it again" in problem.fix) == (suffix == ".jpg")


def test_keypoint_count_above_csv(shared_data, tmp_path):
    root = copy_fmc_task(shared_data, tmp_path, "fetal_head_axis")
    _assert_load_error(
        fmc_card("fetal_head_axis", root, num_keypoints=3),
        "missing column(s) point_3_xy",
        "set num_keypoints: 2 in the task card if the CSV's 2 point column(s) are all",
    )
