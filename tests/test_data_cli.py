"""``usagg data check`` / ``usagg data show`` on the real sample, the study configs, and the data benchmark's registration."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from usagg.cli import app
from usagg.config import load_study
from usagg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_check_fmc_uia_sample(shared_data):
    result = runner.invoke(app, ["data", "check", str(shared_data / "fmc_uia_sample")])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│") and line.split("│")[1].strip()}
    expected = {
        "breast_lesion": ("segmentation", "2 classes", 40),
        "breast_2cls": ("classification", "2 classes", 60),
        "breast_lesion_det": ("detection", "1 box class", 40),
        "fetal_head": ("segmentation", "2 classes", 40),
        "fetal_head_axis": ("regression (keypoints)", "2 points", 40),
        "nerve_vessel": ("segmentation", "3 classes", 40),
    }
    for task, (kind, labels, total) in expected.items():
        cells = [c.strip() for c in lines[task].split("│")]
        assert cells[2] == kind
        assert cells[3] == labels
        assert int(cells[4]) + int(cells[5]) + int(cells[6]) == total
    assert "no errors" in result.output


def test_check_study_with_val_root(shared_data):
    result = runner.invoke(app, ["data", "check", str(REPO / "analysis" / "real_demo.yaml"), "--task", "breast_2cls"])
    assert result.exit_code == 0, result.output
    assert "benign:24 malignant:24" in result.output
    assert "benign:5 malignant:5" in result.output


@pytest.mark.parametrize("task", ["nerve_vessel", "breast_lesion_det", "fetal_head_axis"])
@pytest.mark.parametrize("transformed", [False, True])
def test_show_writes_png(shared_data, tmp_path, task, transformed):
    out = tmp_path / f"{task}.png"
    args = ["data", "show", str(shared_data / "fmc_uia_sample"), "--task", task, "--out", str(out), "--n", "2", "--split", "train"]
    result = runner.invoke(app, args + (["--transformed"] if transformed else []))
    assert result.exit_code == 0, result.output
    pixels = np.array(Image.open(out).convert("RGB"))
    assert pixels.shape[0] > 100
    assert pixels.shape[1] > 200
    # Coloured overlay pixels exist (the images themselves are grey).
    spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2).astype(int)
    assert (spread > 60).sum() > 20


def test_show_unknown_task(shared_data, tmp_path):
    from usagg.errors import UsaggError

    with pytest.raises(UsaggError, match="unknown task 'nope'"):
        runner.invoke(app, ["data", "show", str(shared_data / "fmc_uia_sample"), "--task", "nope", "--out", str(tmp_path / "x.png")], catch_exceptions=False)


def test_real_demo_study_config():
    study = load_study(REPO / "analysis" / "real_demo.yaml")
    assert len(study.tasks) == 6
    assert study.group_partition() == {
        "breast": ["breast_lesion", "breast_2cls", "breast_lesion_det"],
        "obstetrics": ["fetal_head", "fetal_head_axis"],
        "regional_anaesthesia": ["nerve_vessel"],
    }
    assert study.model.backbone == "vit_tiny_patch16_dinov3_qkvb"
    assert study.model.depth is not None and study.model.depth <= 6
    assert study.data.size_hw[0] <= 96


def test_fmc_uia_27_study_config(monkeypatch, tmp_path):
    monkeypatch.setenv("FMC_UIA_ROOT", str(tmp_path))
    study = load_study(REPO / "analysis" / "fmc_uia_27.yaml")
    assert len(study.tasks) == 27
    assert Counter(t.kind for t in study.tasks) == {"segmentation": 12, "classification": 9, "detection": 3, "keypoints": 3}
    assert study.task("IUGC").num_keypoints == 3
    assert study.task("fetal_abdomen_multi").num_classes == 5
    assert study.task("cardiac_multi").num_classes == 4
    assert all(t.source.root == tmp_path / "train" for t in study.tasks)
    assert all(t.group for t in study.tasks)


def test_fmc_uia_27_needs_root(monkeypatch):
    monkeypatch.delenv("FMC_UIA_ROOT", raising=False)
    with pytest.raises(ConfigError, match="FMC_UIA_ROOT is not set"):
        load_study(REPO / "analysis" / "fmc_uia_27.yaml")


def test_data_benchmark_registered():
    import usagg.bench.data  # noqa: F401  (registers on import)
    from usagg.bench import BENCHMARKS

    assert "data" in BENCHMARKS


def _usagg(*args, cwd: Path):
    """Run ``python -m usagg ARGS``: the error line and exit status come from ``main()``, not the typer app."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "usagg", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("nonexist.yaml", "nonexist.yaml: study file not found"), ("study.YML", "study.YML: study file not found"), ("nonexist", "nonexist: dataset folder not found")],
)
def test_check_missing_path_wording(tmp_path, given, expected):
    result = _usagg("data", "check", given, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # no empty line left by the progress display
    assert result.stderr.startswith("error: ")
    assert expected in " ".join(result.stderr.split())


def _noise_png(path: Path, seed: int, size=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random(size) * 255).astype(np.uint8)).save(path)
    return path


def test_check_output_starts_with_table(tmp_path):
    for i in range(6):
        _noise_png(tmp_path / "planes" / ("a" if i % 2 else "b") / f"{i}.png", i)
    result = runner.invoke(app, ["data", "check", str(tmp_path / "planes")])
    assert result.exit_code == 0, result.output
    assert result.output.lstrip(" ").startswith("usagg data check:"), result.output[:200]


@pytest.mark.parametrize("transformed", [False, True])
def test_show_skips_unreadable_image(shared_data, tmp_path, transformed):
    from test_data_helpers import copy_fmc_task, read_csv_rows

    root = copy_fmc_task(shared_data, tmp_path / "fmc", "nerve_vessel", rows=4)
    header, rows = read_csv_rows(root / "csv_files" / "nerve_vessel.csv")
    broken = (root / "csv_files" / rows[1][header.index("image_path")]).resolve()
    broken.write_bytes(broken.read_bytes()[:2000])  # truncated PNG in row 2
    out = tmp_path / "show.png"
    args = ["data", "show", str(root), "--task", "nerve_vessel", "--out", str(out), "--n", "4"]
    result = runner.invoke(app, args + (["--transformed"] if transformed else []), env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: task nerve_vessel:" in text
    assert "nerve_vessel.csv, row 2:" in text
    assert f"{broken.name}: cannot decode image" in text
    assert "(3 sample(s); 1 left out" in text
    assert Image.open(out).size[0] > 200


def test_show_replaces_unreadable_sample(shared_data, tmp_path):
    from test_data_helpers import copy_fmc_task, read_csv_rows

    root = copy_fmc_task(shared_data, tmp_path / "fmc", "breast_2cls", rows=4)
    header, rows = read_csv_rows(root / "csv_files" / "breast_2cls.csv")
    first = (root / "csv_files" / rows[0][header.index("image_path")]).resolve()
    first.write_bytes(b"not an image")
    result = runner.invoke(app, ["data", "show", str(root), "--task", "breast_2cls", "--out", str(tmp_path / "s.png"), "--n", "2"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "breast_2cls.csv, row 1:" in result.output
    assert "(2 sample(s); 1 left out" in result.output  # the next readable row took its place


def _legend_labels(monkeypatch) -> list[list[str]]:
    """Record the labels of every figure legend drawn from now on."""
    from matplotlib.figure import Figure

    calls: list[list[str]] = []
    original = Figure.legend

    def spy(self, *args, **kwargs):
        calls.append([h.get_label() for h in kwargs.get("handles", [])])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "legend", spy)
    return calls


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({"class_names": ["background", "nerve", "vessel"]}, ["1 (nerve)", "2 (vessel)"]), ({}, ["class 1", "class 2"])],
)
def test_show_legend_for_multiclass_masks(shared_data, tmp_path, monkeypatch, fields, expected):
    from test_data_helpers import copy_fmc_task, fmc_card

    from usagg.data.show import render_samples
    from usagg.data.sources import load_task_records

    calls = _legend_labels(monkeypatch)
    root = copy_fmc_task(shared_data, tmp_path / "fmc", "nerve_vessel", rows=2)
    card = fmc_card("nerve_vessel", root, **fields)
    drawing = render_samples(card, load_task_records(card), tmp_path / "nv.png", n=2)
    assert drawing.drawn == 2
    assert not drawing.skipped
    assert calls == [expected]


def test_show_no_legend_for_binary_masks(shared_data, tmp_path, monkeypatch):
    from test_data_helpers import copy_fmc_task, fmc_card

    from usagg.data.show import render_samples
    from usagg.data.sources import load_task_records

    calls = _legend_labels(monkeypatch)
    root = copy_fmc_task(shared_data, tmp_path / "fmc", "breast_lesion", rows=2)
    card = fmc_card("breast_lesion", root)
    render_samples(card, load_task_records(card), tmp_path / "bl.png", n=2)
    assert calls == []


def test_show_fails_without_drawable_sample(shared_data, tmp_path):
    from test_data_helpers import copy_fmc_task, fmc_card

    from usagg.data.show import render_samples
    from usagg.data.sources import load_task_records
    from usagg.errors import DataError

    root = copy_fmc_task(shared_data, tmp_path / "fmc", "breast_2cls", rows=2)
    card = fmc_card("breast_2cls", root)
    records = load_task_records(card)
    for record in records:
        record.image_path.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"none of the 2 samples tried can be drawn: .*breast_2cls.csv, row 1: .*cannot decode image"):
        render_samples(card, records, tmp_path / "none.png", n=2)
    assert not (tmp_path / "none.png").exists()


def test_show_leaves_out_bad_label_rows(shared_data, tmp_path):
    """A bad cell in the label CSV costs its row, not the whole figure; the note points at `data check`."""
    from test_data_helpers import copy_fmc_task, read_csv_rows, write_csv

    root = copy_fmc_task(shared_data, tmp_path / "fmc", "breast_2cls", rows=4)
    file = root / "csv_files" / "breast_2cls.csv"
    header, rows = read_csv_rows(file)
    rows[2][header.index("mask")] = "seven"
    write_csv(file, header, rows)
    out = tmp_path / "s.png"
    result = runner.invoke(app, ["data", "show", str(root), "--task", "breast_2cls", "--out", str(out), "--n", "4"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: task breast_2cls: " in text
    assert "breast_2cls.csv, row 3:" in text
    assert "'seven'" in text
    assert "(3 sample(s); 1 label-file error(s), run `usagg data check" in text
    assert out.is_file()


def test_problem_table_merges_problem_shared_by_tasks():
    """A data folder missing for six tasks is one row naming the six tasks, not six rows."""
    from rich.console import Console

    from usagg.cli.data import _problem_table
    from usagg.data.problems import DataProblem

    missing = [DataProblem(t, "source root not found", "correct source.root", file=Path("/data/x")) for t in ("a", "b", "c")]
    other = DataProblem("a", "CSV file is empty", "write the header", file=Path("/data/a.csv"))
    table = _problem_table([*missing, other], limit=0)
    assert table.row_count == 2
    console = Console(width=200, record=True)
    console.print(table)
    assert "a, b, c" in console.export_text()
    assert _problem_table([*missing, other], limit=1).row_count == 1


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("grid.jpgg", r"suffix '\.jpgg' is not a supported figure format; fix: end the file name with one of \.png, \.jpg, "),
        ("figures", r"figures is a folder; fix: give a file name, for example .*figures/samples\.png"),
    ],
)
def test_show_rejects_bad_out(shared_data, tmp_path, out, message):
    (tmp_path / "figures").mkdir()
    args = ["data", "show", str(shared_data / "fmc_uia_sample"), "--task", "breast_2cls", "--out", str(tmp_path / out)]
    with pytest.raises(ConfigError, match=message):
        runner.invoke(app, args, catch_exceptions=False)
    assert [p.name for p in tmp_path.rglob("*")] == ["figures"]


@pytest.mark.parametrize(("out", "written", "image_format"), [("grid", "grid.png", "PNG"), ("grid.JPG", "grid.JPG", "JPEG")])
def test_show_out_suffix(shared_data, tmp_path, out, written, image_format):
    args = ["data", "show", str(shared_data / "fmc_uia_sample"), "--task", "breast_2cls", "--out", str(tmp_path / out), "--n", "1"]
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == [written]
    assert Image.open(tmp_path / written).format == image_format
    assert f"wrote {tmp_path / written} " in " ".join(result.output.split())


def test_show_help_lists_figure_suffixes():
    from usagg.data.show import FIGURE_SUFFIXES

    result = runner.invoke(app, ["data", "show", "--help"], env={"COLUMNS": "300"})
    text = " ".join(result.output.split())
    assert ", ".join(FIGURE_SUFFIXES[:-1]) + f" or {FIGURE_SUFFIXES[-1]}" in text


def test_check_one_task_uses_study_splits(shared_data):
    """--task checks one task but splits it with the others, so its counts are those training will use."""
    from usagg.data.check import inspect_path

    # BUS-BRA gives a mask folder and a class CSV over the same images; the class task is split first.
    root = shared_data / "busbra_breast"
    whole = {r.card.name: r.splits for r in inspect_path(root).tasks}
    for task in whole:
        (alone,) = inspect_path(root, tasks=[task]).tasks
        assert {s: [r.image_path for r in rs] for s, rs in alone.splits.items()} == {
            s: [r.image_path for r in rs] for s, rs in whole[task].items()
        }
