"""Generated benchmark: FMC_UIA layout, determinism, reuse, relations, presets, study file and CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from usagg.cli.synth import add_synth_command
from usagg.config import load_study
from usagg.data.synthetic import (
    PRESETS,
    TASKS,
    dataset_digest,
    generate_benchmark,
    make_config,
    relation_matrix,
)
from usagg.data.synthetic.tasks import TASK_BY_NAME, pixel_spacing_mm, relation_pairs
from usagg.data.synthetic.writer import csv_columns
from usagg.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TINY_SIZES = {task.name: 3 for task in TASKS}


def tiny_config(seed: int = 0):
    return make_config("small", seed=seed, image_size=64, train_sizes=TINY_SIZES, val_size=2, test_size=2)


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "bench"
    generate_benchmark(out, tiny_config(), workers=1)
    return out


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_layout_is_fmc_uia(tiny_benchmark):
    for split in ("train", "val", "test"):
        csv_dir = tiny_benchmark / split / "csv_files"
        fmc_tasks = [t for t in TASKS if t.kind != "scalar"]
        assert sorted(p.stem for p in csv_dir.glob("*.csv")) == sorted(t.name for t in fmc_tasks)
        for task in fmc_tasks:
            header, rows = read_rows(csv_dir / f"{task.name}.csv")
            assert header == csv_columns(task)
            assert len(rows) == (3 if split == "train" else 2)
            for row in rows:
                assert row["task_id"] == task.name
                assert row["task_name"] == task.fmc_task_name
                assert row["image_path"].startswith("../")
                image = Image.open(csv_dir / row["image_path"])
                assert image.mode == "L"
                assert image.size == (64, 64)
                if task.kind == "segmentation":
                    assert int(row["num_classes"]) == task.num_classes
                    mask = np.array(Image.open(csv_dir / row["mask_path"]))
                    assert mask.shape == (64, 64)
                    assert 0 < mask.max() < task.num_classes
                elif task.kind == "classification":
                    assert 0 <= int(row["mask"]) < task.num_classes
                elif task.kind == "detection":
                    assert int(row["num_classes"]) == 1
                    x0, y0, x1, y1 = (int(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
                    assert 0 <= x0 < x1 <= 64
                    assert 0 <= y0 < y1 <= 64
                else:
                    assert int(row["num_classes"]) == task.num_keypoints
                    for k in range(1, task.num_keypoints + 1):
                        x, y = json.loads(row[f"point_{k}_xy"])
                        assert 0 <= x <= 63
                        assert 0 <= y <= 63
        _, provenance = read_rows(tiny_benchmark / split / "provenance.csv")
        assert len(provenance) == sum(len(read_rows(p)[1]) for p in csv_dir.glob("*.csv"))
        assert all(float(row["pixel_size_mm"]) > 0 for row in provenance)


def test_scalar_task_written_as_scalar_csv(tiny_benchmark):
    header, rows = read_rows(tiny_benchmark / "scalar" / "train" / "fetal_hc_mm.csv")
    assert header == ["path", "value", "unit", "pixel_spacing_mm"]
    assert len(rows) == 3
    for row in rows:
        assert (tiny_benchmark / "scalar" / "train" / row["path"]).is_file()
        assert row["unit"] == "mm"
        assert 100 < float(row["value"]) < 330  # head circumference range of the scene
        assert float(row["pixel_spacing_mm"]) == pytest.approx(160.0 / 64)


def test_relations_csv_and_manifest(tiny_benchmark):
    header, rows = read_rows(tiny_benchmark / "relations.csv")
    names = [t.name for t in TASKS]
    assert header == ["task", *names]
    assert [row["task"] for row in rows] == names
    values = np.array([[float(row[name]) for name in names] for row in rows])
    assert np.allclose(values, relation_matrix(TASKS), atol=0.005)
    manifest = json.loads((tiny_benchmark / "manifest.json").read_text())
    assert manifest["digest"] == dataset_digest(tiny_benchmark)
    assert manifest["config"]["seed"] == 0
    assert manifest["tasks"]["fetal_hc_mm"]["roots"]["val"] == "scalar/val"


def test_generation_deterministic_across_workers(tmp_path, tiny_benchmark):
    two = generate_benchmark(tmp_path / "two_workers", tiny_config(), workers=2)
    assert two.digest == dataset_digest(tiny_benchmark)
    other_seed = generate_benchmark(tmp_path / "seed1", tiny_config(seed=1), workers=1)
    assert other_seed.digest != two.digest


def test_config_must_be_synth_config(tmp_path):
    with pytest.raises(ConfigError, match="config must be a SynthConfig, e.g. make_config"):
        generate_benchmark(tmp_path / "b", "small")


def test_reuse_overwrite_and_foreign_folder(tmp_path):
    config = make_config("small", image_size=48, train_sizes={"vessel_seg": 2}, val_size=1, test_size=1, tasks=["vessel_seg"])
    first = generate_benchmark(tmp_path / "b", config, workers=1)
    again = generate_benchmark(tmp_path / "b", config, workers=1)
    assert again.reused and again.digest == first.digest
    other = make_config("small", seed=5, image_size=48, train_sizes={"vessel_seg": 2}, val_size=1, test_size=1, tasks=["vessel_seg"])
    with pytest.raises(DataError, match="--overwrite"):
        generate_benchmark(tmp_path / "b", other, workers=1)
    replaced = generate_benchmark(tmp_path / "b", other, workers=1, overwrite=True)
    assert not replaced.reused
    assert replaced.digest != first.digest
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        generate_benchmark(foreign, config, workers=1, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_interrupted_run_leftovers_removed(tmp_path):
    out = tmp_path / "b"
    leftover = out / ".synth-partial-999"
    leftover.mkdir(parents=True)
    (leftover / "half_written.png").write_bytes(b"")
    config = make_config("small", image_size=48, train_sizes={"vessel_seg": 1}, val_size=1, test_size=1, tasks=["vessel_seg"])
    summary = generate_benchmark(out, config, workers=1)
    assert not leftover.exists()
    assert summary.digest == dataset_digest(out)
    with pytest.raises(DataError, match="is a file"):
        generate_benchmark(out / "manifest.json", config, workers=1)


def test_make_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown synthetic preset 'huge'"):
        make_config("huge")
    with pytest.raises(ConfigError, match="'liver_seg'"):
        make_config(train_sizes={"liver_seg": 10})
    with pytest.raises(ConfigError, match="at least 1 image"):
        make_config(val_size=0)
    with pytest.raises(ConfigError, match="image size 33"):
        make_config(image_size=33)


def test_relations_designed_pairs():
    matrix = relation_matrix(TASKS)
    assert np.allclose(matrix, matrix.T)
    assert np.all(np.diag(matrix) == 1)
    assert matrix.min() >= -1
    assert matrix.max() <= 1
    index = {t.name: i for i, t in enumerate(TASKS)}
    assert matrix[index["fetal_head_seg"], index["fetal_head_axis"]] == pytest.approx(0.9)
    assert matrix[index["breast_lesion_seg"], index["breast_malignancy_cls"]] == pytest.approx(0.65)
    assert matrix[index["thyroid_gain_qc_cls"], index["thyroid_echogenicity_cls"]] == pytest.approx(-0.6)
    assert matrix[index["breast_density_cls"], index["breast_malignancy_cls"]] == pytest.approx(-0.6)
    assert matrix[index["cardiac_chamber_seg"], index["vessel_seg"]] == 0
    pairs = relation_pairs(TASKS)
    assert {(a, b) for a, b, _ in pairs["conflicting"]} == {
        ("breast_malignancy_cls", "breast_density_cls"),
        ("thyroid_echogenicity_cls", "thyroid_gain_qc_cls"),
    }


def test_presets_mix_data_rich_and_poor_tasks():
    assert len(TASKS) >= 12 and len({t.group for t in TASKS}) >= 4
    assert {t.task_type for t in TASKS} == {"segmentation", "classification", "detection", "regression"}
    for preset in PRESETS.values():
        assert set(preset.train_sizes) == set(TASK_BY_NAME)
    assert min(PRESETS["small"].train_sizes.values()) == 16
    assert max(PRESETS["small"].train_sizes.values()) == 240
    assert min(PRESETS["medium"].train_sizes.values()) == 40
    assert max(PRESETS["medium"].train_sizes.values()) == 2000


@pytest.mark.parametrize("study_file, preset, variable", [
    ("synthetic.yaml", "small", "USAGG_SYNTH_ROOT"),
    ("synthetic_medium.yaml", "medium", "USAGG_SYNTH_MEDIUM_ROOT"),
])
def test_study_file_matches_generator(study_file, preset, variable, monkeypatch, tmp_path):
    monkeypatch.setenv(variable, str(tmp_path))
    study = load_study(REPO / "analysis" / study_file)
    assert [card.name for card in study.tasks] == [t.name for t in TASKS]
    image_size = PRESETS[preset].image_size
    for card in study.tasks:
        task = TASK_BY_NAME[card.name]
        assert (card.kind, card.organ, card.group) == (task.kind, task.organ, task.group)
        assert card.num_classes == task.num_classes
        assert card.num_keypoints == task.num_keypoints
        assert card.source.pixel_spacing_mm == pixel_spacing_mm(task, image_size)
        expected_root = tmp_path / ("scalar/train" if task.kind == "scalar" else "train")
        assert card.source.root == expected_root
        assert card.source.test_root == expected_root.parent / "test"
    assert 0.25 in study.fractions
    assert 1.0 in study.fractions


def test_generated_data_loads_through_study(tiny_benchmark, monkeypatch):
    from usagg.data.sources import load_task_records

    monkeypatch.setenv("USAGG_SYNTH_ROOT", str(tiny_benchmark))
    study = load_study(REPO / "analysis" / "synthetic.yaml")
    for card in study.tasks:
        records = load_task_records(card)
        splits = sorted(r.split or "train" for r in records)  # records of the training root have no fixed split
        assert splits == ["test"] * 2 + ["train"] * 3 + ["val"] * 2
        assert all(r.spacing_mm_per_px and r.spacing_mm_per_px > 0 for r in records)
    organ_records = load_task_records(study.task("organ_cls"))
    organs = [r.label for r in organ_records]
    spacings = {r.label: r.spacing_mm_per_px for r in organ_records}
    assert len(set(organs)) >= 2
    assert len(set(spacings.values())) >= 2  # per-image spacing from provenance.csv


def test_synth_command(tmp_path):
    data_app = typer.Typer()
    add_synth_command(data_app)
    data_app.command("noop")(lambda: None)  # a second command keeps typer from collapsing the group
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--image-size", "48", "--task", "organ_cls", "--task", "fetal_hc_mm",
            "--train-size", "organ_cls=5", "--train-size", "fetal_hc_mm=2", "--val-size", "1", "--test-size", "1",
            "--workers", "1"]
    result = runner.invoke(data_app, args)
    assert result.exit_code == 0, result.output
    assert "organ_cls" in result.output
    assert "wrote 11 images" in result.output
    assert (out / "manifest.json").is_file()
    rerun = runner.invoke(data_app, args)
    assert "nothing written" in rerun.output
    bad = runner.invoke(data_app, ["synth", "--out", str(tmp_path / "x"), "--train-size", "organ_cls"])
    assert isinstance(bad.exception, ConfigError)
    assert "TASK=N" in str(bad.exception)


def test_bench_registered_and_reports_rates():
    from usagg.bench import load_all
    from usagg.bench.synthetic import measure_generation

    assert "synthetic" in load_all()
    result = measure_generation(rounds=1, per_worker=5, single_count=5, loop_count=2, end_to_end_per_task=4)
    for key in ("images_per_s_2_processes", "baseline_images_per_s_per_image_loop", "baseline_images_per_s_plain_noise",
                "end_to_end_images_per_s_2_processes", "cpu_ms_per_image_batched"):
        assert result[key] > 0, key
    assert result["ratio_2_processes_vs_per_image_loop"] == pytest.approx(
        result["images_per_s_2_processes"] / result["baseline_images_per_s_per_image_loop"]
    )
    assert result["image_size"] == 256
    assert result["end_to_end_images"] == 5 * (4 + 1 + 1)
