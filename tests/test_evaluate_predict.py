"""FMC_UIA submission files: written by `usagg predict`, read back and scored like the challenge does."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from train_fixtures import run_main, tiny_trained_run  # noqa: F401  (fixture import)

from usagg.errors import DataError
from usagg.evaluate.evaluate import evaluate_task
from usagg.evaluate.predict import prediction_mask_path, read_fmc_uia_predictions, score_fmc_uia
from usagg.train import checkpoint as ckpt
from usagg.train.finalize import build_run_model


@pytest.fixture(scope="module")
def predictions(tiny_trained_run, shared_data, tmp_path_factory):
    from _pytest.monkeypatch import MonkeyPatch

    out = tmp_path_factory.mktemp("fmc_predictions")
    with MonkeyPatch.context() as monkeypatch:
        code, stderr = run_main(
            ["predict", str(tiny_trained_run["run_dir"]), str(shared_data / "fmc_uia_sample_val"), "--out", str(out),
             "--device", "cpu"],
            monkeypatch,
        )
    assert code == 0, stderr
    return out


def _csv(shared_data, task: str) -> pl.DataFrame:
    return pl.read_csv(shared_data / "fmc_uia_sample_val" / "csv_files" / f"{task}.csv", infer_schema=False)


def test_predict_json_files_follow_the_format(predictions, shared_data):
    classification = json.loads((predictions / "classification_predictions.json").read_text())
    rows = _csv(shared_data, "breast_2cls")
    assert [e["image_path"] for e in classification] == rows["image_path"].to_list()
    for entry in classification:
        assert set(entry) == {"image_path", "task_id", "predicted_class", "predicted_probs"}
        assert entry["task_id"] == "breast_2cls"
        assert sum(entry["predicted_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert entry["predicted_class"] == int(np.argmax(entry["predicted_probs"]))

    detection = json.loads((predictions / "detection_predictions.json").read_text())
    assert len(detection) == _csv(shared_data, "breast_lesion_det").height
    for entry in detection:
        x0, y0, x1, y1 = entry["bbox_pixels"]
        image = Image.open(shared_data / "fmc_uia_sample_val" / "csv_files" / entry["image_path"])
        assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
        assert entry["bbox_normalized"] == pytest.approx([x0 / image.width, y0 / image.height, x1 / image.width, y1 / image.height])

    regression = json.loads((predictions / "regression_predictions.json").read_text())
    assert len(regression) == _csv(shared_data, "fetal_head_axis").height
    assert all(len(e["predicted_points_pixels"]) == 4 for e in regression)


def test_predict_masks_at_csv_paths(predictions, shared_data):
    from usagg.data.decode import read_mask

    rows = _csv(shared_data, "breast_lesion")
    for mask_path in rows["mask_path"].to_list():
        written = predictions / mask_path.replace("../", "")
        assert written.exists(), written
        image = Image.open(written)
        assert image.mode == "L"
        reference = read_mask(shared_data / "fmc_uia_sample_val" / "csv_files" / mask_path)
        assert image.size == (reference.shape[1], reference.shape[0])
        assert set(np.unique(np.asarray(image)).tolist()) <= {0, 1}
    # Tasks the run did not train get no files.
    assert not (predictions / "Segmentation" / "Two" / "HC18").exists()
    assert not (predictions / "Segmentation" / "Three").exists()


def test_predict_read_back_scores_match_evaluation(predictions, tiny_trained_run, shared_data):
    from usagg.data.sources import load_task_records
    from usagg.data.sources.fmc_uia import discover_fmc_uia

    scored = score_fmc_uia(shared_data / "fmc_uia_sample_val", predictions)
    study = tiny_trained_run["study"]
    model = build_run_model(study, tiny_trained_run["spec"])
    ckpt.load_weights(model, tiny_trained_run["run_dir"], "best")
    cards = {c.name: c for c in discover_fmc_uia(shared_data / "fmc_uia_sample_val")}
    checks = {"breast_lesion": ["dice", "hd"], "breast_2cls": ["auc", "accuracy", "mcc"],
              "breast_lesion_det": ["iou"], "fetal_head_axis": ["mre_px"]}
    for task, metrics in checks.items():
        records = load_task_records(cards[task])
        direct = evaluate_task(model, study.task(task), records, study, torch.device("cpu"))
        assert scored[task].reasons["n_scored"] == f"{len(records)} image(s) with a prediction"
        for metric in metrics:
            assert scored[task].values[metric] == pytest.approx(direct.metrics.values[metric], rel=1e-6, abs=1e-6), (task, metric)
    assert "fetal_head" in scored and not scored["fetal_head"].values  # no predictions for untrained tasks


def test_read_back_keys_by_task_and_path(predictions):
    read = read_fmc_uia_predictions(predictions)
    assert set(read) == {"classification", "detection", "keypoints"}
    task_id, image_path = next(iter(read["classification"]))
    assert task_id == "breast_2cls"
    assert image_path.startswith("../Classification/")


def test_prediction_mask_path_rejects_escape(tmp_path):
    assert prediction_mask_path(tmp_path, "../Segmentation/Two/X/MASKS/a.png") == tmp_path / "Segmentation/Two/X/MASKS/a.png"
    with pytest.raises(DataError, match="does not stay inside"):
        prediction_mask_path(tmp_path, "/etc/a.png")


def test_predict_rejects_unknown_format(tiny_trained_run, tmp_path, shared_data, monkeypatch):
    args = ["predict", str(tiny_trained_run["run_dir"]), str(shared_data / "fmc_uia_sample"), "--out", str(tmp_path), "--format", "coco"]
    code, stderr = run_main(args, monkeypatch)
    assert code == 2
    assert "--format coco: unsupported" in stderr


def test_predict_rejects_root_without_trained_tasks(tiny_trained_run, tmp_path, shared_data):
    from usagg.evaluate.predict import write_fmc_uia_predictions

    # A root holding only fetal_head, which the run did not train; its images are reached through a link.
    root = tmp_path / "root"
    (root / "csv_files").mkdir(parents=True)
    source = shared_data / "fmc_uia_sample_val"
    (root / "csv_files" / "fetal_head.csv").write_bytes((source / "csv_files" / "fetal_head.csv").read_bytes())
    (root / "Segmentation").symlink_to(source / "Segmentation")
    with pytest.raises(DataError, match="none of its task ids \\(fetal_head\\) was trained in this run"):
        write_fmc_uia_predictions(tiny_trained_run["run_dir"], root, tmp_path / "out", device="cpu")


def test_failed_predict_keeps_output(tiny_trained_run, tmp_path, shared_data):
    """A bad row in a later task's CSV stops predict before any mask or JSON file of an earlier task is written."""
    import shutil

    from usagg.evaluate.predict import write_fmc_uia_predictions

    root = tmp_path / "root"
    shutil.copytree(shared_data / "fmc_uia_sample_val", root)
    detection_csv = root / "csv_files" / "breast_lesion_det.csv"
    header, *rows = detection_csv.read_text().splitlines()
    detection_csv.write_text("\n".join([header, rows[0].replace(".png", "_missing.png", 1), *rows[1:]]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "classification_predictions.json").write_text('[{"task_id": "thyroid_2cls", "image_path": "a.png"}]')
    with pytest.raises(DataError):
        write_fmc_uia_predictions(tiny_trained_run["run_dir"], root, out, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["classification_predictions.json"]
    assert json.loads((out / "classification_predictions.json").read_text()) == [{"task_id": "thyroid_2cls", "image_path": "a.png"}]


def test_merge_keeps_other_tasks(tmp_path):
    from usagg.evaluate.predict import _merge_into, _read_existing

    file = tmp_path / "classification_predictions.json"
    earlier = [
        {"image_path": "a.png", "task_id": "thyroid_2cls", "predicted_class": 1},
        {"image_path": "b.png", "task_id": "breast_2cls", "predicted_class": 0},
    ]
    file.write_text(json.dumps(earlier))

    _merge_into(file, _read_existing(file), [{"image_path": "b.png", "task_id": "breast_2cls", "predicted_class": 1}], {"breast_2cls"})

    merged = json.loads(file.read_text())
    assert merged == [
        {"image_path": "a.png", "task_id": "thyroid_2cls", "predicted_class": 1},
        {"image_path": "b.png", "task_id": "breast_2cls", "predicted_class": 1},
    ]
    _merge_into(file, _read_existing(file), [], set())
    assert json.loads(file.read_text()) == merged


def test_merge_rejects_broken_file(tmp_path):
    from usagg.evaluate.predict import _read_existing

    file = tmp_path / "detection_predictions.json"
    file.write_text("[{")
    with pytest.raises(DataError, match="cannot read the existing predictions: .*; move the file aside"):
        _read_existing(file)
    file.write_bytes(b"[\xff]")
    with pytest.raises(DataError, match="cannot read the existing predictions: 'utf-8' codec"):
        _read_existing(file)
    file.write_text('{"task_id": "x"}')
    with pytest.raises(DataError, match="not a JSON list of objects"):
        _read_existing(file)
    assert file.read_text() == '{"task_id": "x"}'


def test_read_predictions_rejects_broken_files(tmp_path):
    file = tmp_path / "classification_predictions.json"
    file.write_text("[{")
    with pytest.raises(DataError, match=r"classification_predictions.json: cannot read the predictions: Expecting"):
        read_fmc_uia_predictions(tmp_path)
    file.write_text('[{"task_id": "t1"}]')
    with pytest.raises(DataError, match="each with task_id and image_path"):
        read_fmc_uia_predictions(tmp_path)


def _fail_on_model_build(monkeypatch):
    import usagg.train.finalize

    def fail(*args, **kwargs):
        raise AssertionError("the model was built before the data root was checked")

    monkeypatch.setattr(usagg.train.finalize, "build_run_model", fail)


def test_predict_checks_data_root_first(tiny_trained_run, tmp_path, monkeypatch):
    _fail_on_model_build(monkeypatch)
    missing = tmp_path / "nonexistent"
    code, stderr = run_main(["predict", str(tiny_trained_run["run_dir"]), str(missing), "--out", str(tmp_path / "p")], monkeypatch)
    assert code == 2, stderr
    # Paths are left out of the matched text: the console may fold a long one.
    assert "error: DATA_ROOT" in stderr
    assert "no such folder; give the FMC_UIA data folder that contains csv_files/" in stderr
    assert "task nonexistent" not in stderr
    assert "source.root" not in stderr

    (tmp_path / "plain").mkdir()
    code, stderr = run_main(["predict", str(tiny_trained_run["run_dir"]), str(tmp_path / "plain"), "--out", str(tmp_path / "p")], monkeypatch)
    assert code == 2
    assert "has no csv_files/ folder" in stderr

    (tmp_path / "plain" / "csv_files").mkdir()
    code, stderr = run_main(["predict", str(tiny_trained_run["run_dir"]), str(tmp_path / "plain"), "--out", str(tmp_path / "p")], monkeypatch)
    assert code == 2
    assert "csv_files contains no CSV files" in stderr
    assert not (tmp_path / "p").exists()


def test_predict_follows_study_checkpoint_without_pretrained_warning(tiny_trained_run, shared_data, tmp_path, monkeypatch):
    import shutil

    import yaml

    from usagg.train import checkpoint as ckpt_module

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_trained_run["run_dir"], run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["evaluation"]["checkpoint"] = "latest"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    loaded = []
    original = ckpt_module.load_weights

    def load_weights(model, folder, kind="best"):
        loaded.append(kind)
        return original(model, folder, kind)

    monkeypatch.setattr(ckpt_module, "load_weights", load_weights)
    monkeypatch.setattr("usagg.model.m2dino._WARNED_RANDOM", set())  # as in a fresh process
    root = str(shared_data / "fmc_uia_sample_val")

    code, stderr = run_main(["predict", str(run_dir), root, "--out", str(tmp_path / "a"), "--device", "cpu"], monkeypatch)
    assert code == 0, stderr
    code, stderr_best = run_main(
        ["predict", str(run_dir), root, "--out", str(tmp_path / "b"), "--device", "cpu", "--checkpoint", "best"], monkeypatch
    )
    assert code == 0, stderr_best
    assert loaded == ["latest", "best"]
    # Warnings reach the captured output (tasks of the root that the run did not train), the pretrained one does not.
    assert "has no head in this run" in stderr
    assert "model.pretrained is not set" not in stderr + stderr_best

    code, stderr = run_main(["predict", str(run_dir), root, "--out", str(tmp_path / "c"), "--checkpoint", "last"], monkeypatch)
    assert code == 2
    assert "checkpoint 'last' is invalid; use best or latest" in stderr


def test_evaluate_gives_no_pretrained_warning(tiny_trained_run, tmp_path, monkeypatch):
    import shutil

    study_folder = tiny_trained_run["run_dir"].parents[len(tiny_trained_run["spec"].run_id.split("/")) - 1]
    shutil.copytree(study_folder, tmp_path / study_folder.name)
    run_dir = tmp_path / study_folder.name / tiny_trained_run["spec"].run_id
    monkeypatch.setattr("usagg.model.m2dino._WARNED_RANDOM", set())  # as in a fresh process
    code, stderr = run_main(["evaluate", str(run_dir), "--split", "val", "--device", "cpu"], monkeypatch)
    assert code == 0, stderr
    assert "evaluated 4 task(s) on val" in stderr  # the log reaches the captured output
    assert "model.pretrained is not set" not in stderr
