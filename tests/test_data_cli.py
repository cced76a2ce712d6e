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
        "fetal_head_axis": ("keypoints", "2 points", 40),
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
