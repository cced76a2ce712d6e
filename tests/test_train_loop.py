"""The training loop on real images with a tiny model: outputs, determinism, re-evaluation, NaN handling, affinity."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from safetensors.torch import load_file
from train_fixtures import run_main, study_dict, tiny_trained_run, write_study  # noqa: F401  (fixture import)

from usagg.config import load_study
from usagg.errors import ConfigError, TrainingError
from usagg.model import M2DINO
from usagg.results import read_results
from usagg.train.distributed import DistEnv
from usagg.train.finalize import evaluate_run
from usagg.train.loop import TrainOptions, train_run
from usagg.train.plan import plan_runs
from usagg.train.run import execute_plan


def _train(tmp_path, shared_data, tasks, paradigm="unified", **study_kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    study_file = write_study(tmp_path / "study.yaml", study_dict(shared_data, tmp_path / "runs", tasks, **study_kwargs))
    study = load_study(study_file)
    specs = plan_runs(study, paradigms=[paradigm])
    options = TrainOptions(output=tmp_path / "runs", device="cpu", progress=False)
    return study, specs, options, execute_plan(study, specs, options, DistEnv())


def _latest_weights(run_dir):
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return load_file(run_dir / "checkpoints" / pointer["weights"])


def test_train_writes_run_directory(tiny_trained_run):
    run_dir = tiny_trained_run["run_dir"]
    for name in ("config.yaml", "run.json", "train_log.jsonl", "routing_stats.json", "per_image_scores.parquet",
                 "results.parquet", "results.csv", "results_meta.json"):
        assert (run_dir / name).exists(), name
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished"
    assert status["step"] == 4
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "event" not in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    assert {"step", "epoch", "task", "loss", "loss_parts", "lr", "images_per_s", "time"} <= set(steps[0])
    evals = [line for line in lines if line.get("event") == "eval"]
    assert {line["step"] for line in evals} == {2, 4}
    assert any(line.get("event") == "routing" for line in lines)
    routing = json.loads((run_dir / "routing_stats.json").read_text())
    assert {"num_experts", "layers", "tasks"} <= set(routing)
    assert set(routing["tasks"]) == set(tiny_trained_run["spec"].tasks)


def test_train_results_cover_every_task_and_metric(tiny_trained_run):
    results = read_results(tiny_trained_run["run_dir"] / "results.parquet")
    metrics = {(row["task"], row["metric"]) for row in results.iter_rows(named=True)}
    expected = {
        ("breast_lesion", "dice"), ("breast_lesion", "hd"), ("breast_lesion", "hd95"),
        ("breast_2cls", "accuracy"), ("breast_2cls", "auc"), ("breast_2cls", "f1_macro"),
        ("breast_2cls", "f1_weighted"), ("breast_2cls", "mcc"),
        ("breast_lesion_det", "iou"), ("fetal_head_axis", "mre_px"),
    }
    assert expected <= metrics
    assert set(results["split"]) == {"test"}
    assert set(results["paradigm"]) == {"unified"}
    assert results.filter(pl.col("task") == "breast_2cls")["n_train"][0] > 0
    study_table = read_results(tiny_trained_run["run_dir"].parents[4] / "tiny" / "results.parquet")
    assert study_table.height == results.height
    per_image = pl.read_parquet(tiny_trained_run["run_dir"] / "per_image_scores.parquet")
    assert per_image.columns == ["run_id", "task", "split", "image", "metric", "value"]
    meta = json.loads((tiny_trained_run["run_dir"] / "results_meta.json").read_text())["test"]
    assert meta["empty_mask_policy"] == "fmc_uia"
    assert meta["one_class_policy"] == "nan"


def test_train_same_seed_same_metrics(tmp_path, shared_data):
    tasks = ["breast_2cls", "fetal_head_axis"]
    _, _, _, first = _train(tmp_path / "a", shared_data, tasks)
    _, _, _, second = _train(tmp_path / "b", shared_data, tasks)
    results_a = read_results(first[0].run_dir / "results.parquet")
    results_b = read_results(second[0].run_dir / "results.parquet")
    assert_frame_equal(results_a, results_b)
    weights_a = _latest_weights(first[0].run_dir)
    weights_b = _latest_weights(second[0].run_dir)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_train_rerun_skips_finished(tiny_trained_run):
    study = tiny_trained_run["study"]
    options = TrainOptions(output=tiny_trained_run["run_dir"].parents[4], device="cpu", progress=False)
    outcome = train_run(study, tiny_trained_run["spec"], options, DistEnv())
    assert outcome.status == "skipped"


def test_rerun_logs_one_line_per_skipped_run(tiny_trained_run, caplog):
    study = tiny_trained_run["study"]
    options = TrainOptions(output=tiny_trained_run["run_dir"].parents[4], device="cpu", progress=False)
    with caplog.at_level("INFO", logger="usagg"):
        execute_plan(study, [tiny_trained_run["spec"]], options, DistEnv())
    lines = [r.getMessage() for r in caplog.records if tiny_trained_run["spec"].run_id in r.getMessage()]
    assert lines == [f"run 1 of 1: {tiny_trained_run['spec'].run_id} finished earlier, skipped"]


def test_evaluate_reproduces_training_results(tiny_trained_run):
    stored = read_results(tiny_trained_run["run_dir"] / "results.parquet")
    again = evaluate_run(tiny_trained_run["run_dir"], device="cpu")
    assert_frame_equal(stored.sort("task", "metric"), again.sort("task", "metric"))


def test_evaluate_val_split_adds_rows(tiny_trained_run, tmp_path):
    rows = evaluate_run(tiny_trained_run["run_dir"], split="val", checkpoint="latest", device="cpu")
    assert set(rows["split"]) == {"val"}
    table = read_results(tiny_trained_run["run_dir"] / "results.parquet")
    assert set(table["split"]) == {"val", "test"}
    meta = json.loads((tiny_trained_run["run_dir"] / "results_meta.json").read_text())
    assert meta["val"]["checkpoint"] == "latest"


def _nan_loss_from_step(step: int):
    original = M2DINO.compute_loss
    calls = {"n": 0}

    def compute_loss(self, outputs, target, task, label_smoothing=0.0):
        loss, parts = original(self, outputs, target, task, label_smoothing)
        if self.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= step:
                loss = loss * float("nan")
        return loss, parts

    return compute_loss


def test_train_nonfinite_loss_stops_with_context(tmp_path, shared_data, monkeypatch):
    monkeypatch.setattr(M2DINO, "compute_loss", _nan_loss_from_step(3))
    with pytest.raises(TrainingError) as info:
        _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific")
    message = str(info.value)
    assert "task 'breast_2cls' at step 3" in message
    assert "latest-0000002.safetensors (step 2)" in message
    assert "--skip-nonfinite" in message
    run = json.loads((tmp_path / "runs/tiny/task_specific/breast_2cls/frac-1/seed-0/run.json").read_text())
    assert run["status"] == "failed"


def test_train_build_failure_marks_run_failed(tmp_path, shared_data):
    """An invalid model setting fails the run in run.json, and the corrected study then trains it."""
    with pytest.raises(ConfigError, match="moe_blocks"):
        _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific", model={"moe_blocks": [2]})
    run_file = tmp_path / "runs/tiny/task_specific/breast_2cls/frac-1/seed-0/run.json"
    run = json.loads(run_file.read_text())
    assert run["status"] == "failed"
    assert "moe_blocks" in run["error"]

    _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific", model={"moe_blocks": [1]})
    assert json.loads(run_file.read_text())["status"] == "finished"


def test_final_evaluation_failure_marks_run_failed(tmp_path, shared_data, monkeypatch):
    """A failing evaluation after training is recorded, and a rerun evaluates without training again."""
    from usagg.train.loop import _Trainer

    original = _Trainer._final_evaluation

    def broken(self):
        raise TrainingError("mask size does not match its image")

    monkeypatch.setattr(_Trainer, "_final_evaluation", broken)
    with pytest.raises(TrainingError, match="mask size"):
        _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific")
    run_file = tmp_path / "runs/tiny/task_specific/breast_2cls/frac-1/seed-0/run.json"
    run = json.loads(run_file.read_text())
    assert run["status"] == "failed"
    assert run["error"].startswith(f"evaluation after training (step {run['steps']}) failed: ")
    assert "mask size" in run["error"]

    monkeypatch.setattr(_Trainer, "_final_evaluation", original)
    *_, outcomes = _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific")
    assert outcomes[0].status == "finished"
    assert json.loads(run_file.read_text())["status"] == "finished"


def test_interrupt_marks_run_interrupted(tmp_path, shared_data, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(M2DINO, "compute_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific")
    run = json.loads((tmp_path / "runs/tiny/task_specific/breast_2cls/frac-1/seed-0/run.json").read_text())
    assert run["status"] == "interrupted"


def test_finished_run_with_changed_settings_stops(tmp_path, shared_data):
    _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific")
    with pytest.raises(TrainingError, match=r"this run finished with other training settings .*train\.lr_head"):
        _train(tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific", train={"lr_head": 0.5})


def test_train_skip_nonfinite_counts_batches(tmp_path, shared_data, monkeypatch):
    monkeypatch.setattr(M2DINO, "compute_loss", _nan_loss_from_step(3))
    _, _, _, outcomes = _train(
        tmp_path, shared_data, ["breast_2cls"], paradigm="task_specific", train={"skip_nonfinite": True}
    )
    run = json.loads((outcomes[0].run_dir / "run.json").read_text())
    assert run["status"] == "finished"
    assert run["nonfinite_skipped"] == 2
    weights = _latest_weights(outcomes[0].run_dir)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_train_records_affinity_and_uncertainty(tmp_path, shared_data):
    _, _, _, outcomes = _train(
        tmp_path,
        shared_data,
        ["breast_2cls", "fetal_head_axis"],
        train={
            "lookahead_every": 2,
            "gradient_affinity_every": 2,
            "loss_weighting": "uncertainty",
            "affinity_batch_size": 2,
            "fisher_images": 2,
        },
    )
    affinity = json.loads((outcomes[0].run_dir / "affinity.json").read_text())
    fisher = affinity["fisher"]
    assert fisher["images_per_task"] == {"breast_2cls": 2, "fetal_head_axis": 2}
    assert fisher["n_records"] == 1
    assert [r["step"] for r in fisher["records"]] == [4]  # once, on the final weights
    values = np.array(fisher["matrix"], dtype=float)
    assert np.isnan(np.diag(values)).all()
    assert values[0, 1] == pytest.approx(values[1, 0])
    assert -1 <= values[0, 1] <= 1
    assert affinity["tasks"] == ["breast_2cls", "fetal_head_axis"]
    for key in ("lookahead", "gradient_cosine", "gradient_magnitude"):
        matrix = affinity[key]["matrix"]
        assert len(matrix) == 2 and len(matrix[0]) == 2, key
        assert affinity[key]["n_records"] == 2
        records = affinity[key]["records"]
        assert [r["step"] for r in records] == [2, 4], key
        mean_of_records = np.nanmean(np.array([r["matrix"] for r in records], dtype=float), axis=0)
        assert np.array(matrix, dtype=float) == pytest.approx(mean_of_records), key
    assert affinity["lookahead"]["reference"] == "momentum"
    cosine = affinity["gradient_cosine"]["matrix"]
    assert cosine[0][0] == pytest.approx(1.0)
    assert cosine[0][1] == pytest.approx(cosine[1][0])
    steps = [json.loads(x) for x in (outcomes[0].run_dir / "train_log.jsonl").read_text().splitlines()]
    weights = [s["loss_weights"] for s in steps if "loss_weights" in s]
    assert weights[0] != weights[-1]  # the learned log-variances moved
    assert all(math.isfinite(v) for w in weights for v in w.values())


def test_evaluate_adds_fisher_affinity(tiny_trained_run, tmp_path, monkeypatch):
    source = tiny_trained_run["run_dir"]
    spec = tiny_trained_run["spec"]
    study_folder = source.parents[len(spec.run_id.split("/")) - 1]  # <output>/<study>
    shutil.copytree(study_folder, tmp_path / "runs" / study_folder.name)
    run_dir = tmp_path / "runs" / study_folder.name / spec.run_id
    tasks = list(spec.tasks)
    lookahead = {"matrix": [[0.5] * len(tasks)] * len(tasks), "n_records": 3, "seconds": 1.0}
    (run_dir / "affinity.json").write_text(json.dumps({"tasks": tasks, "lookahead": lookahead}))

    code, stderr = run_main(["evaluate", str(run_dir), "--split", "val", "--fisher-images", "2", "--device", "cpu"], monkeypatch)
    assert code == 0, stderr
    affinity = json.loads((run_dir / "affinity.json").read_text())
    assert affinity["lookahead"] == lookahead  # entries already there are kept
    values = np.array(affinity["fisher"]["matrix"], dtype=float)
    assert values.shape == (len(tasks), len(tasks))
    assert np.isnan(np.diag(values)).all()
    assert np.isfinite(values[~np.eye(len(tasks), dtype=bool)]).all()
    assert affinity["fisher"]["records"][0]["step"] == json.loads((run_dir / "run.json").read_text())["step"]
    assert set(affinity["fisher"]["images_per_task"]) == set(tasks)

    out = tmp_path / "analysis"
    code, stderr = run_main(["transfer-matrix", str(tmp_path / "runs" / study_folder.name), "--method", "fisher", "--out", str(out)], monkeypatch)
    assert code == 0, stderr
    header = (out / "affinity_fisher.csv").read_text().splitlines()[0]
    assert header.split(",")[1:] == tasks

    (run_dir / "affinity.json").write_text(json.dumps({"tasks": tasks[::-1], "lookahead": lookahead}))
    results_before = (run_dir / "results.csv").read_bytes()
    code, stderr = run_main(["evaluate", str(run_dir), "--split", "test", "--fisher-images", "2"], monkeypatch)
    assert code == 2
    assert "lists the tasks" in stderr
    assert "move it aside" in stderr
    assert (run_dir / "results.csv").read_bytes() == results_before  # stopped before evaluating

    single = tmp_path / "runs" / study_folder.name / "task_specific" / tasks[0] / "frac-1" / "seed-0"
    single.mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", single / "config.yaml")
    run_json = json.loads((run_dir / "run.json").read_text())
    run_json["spec"].update(run_id=f"task_specific/{tasks[0]}/frac-1/seed-0", paradigm="task_specific", group=tasks[0], tasks=[tasks[0]])
    (single / "run.json").write_text(json.dumps(run_json))
    code, stderr = run_main(["evaluate", str(single), "--fisher-images", "2"], monkeypatch)
    assert code == 2
    assert "is not a unified run of two or more tasks" in stderr

    code, stderr = run_main(["evaluate", str(run_dir), "--fisher-images", "0"], monkeypatch)
    assert code == 2
    assert "--fisher-images" in stderr  # typer prints its own usage error


def test_train_summary_shows_skipped_runs(tiny_trained_run, monkeypatch, capsys):
    study_file = tiny_trained_run["study_file"]
    code, stderr = run_main(["train", str(study_file), "-p", "unified", "--device", "cpu", "--no-progress"], monkeypatch)
    assert code == 0, stderr
    row = next(line for line in capsys.readouterr().out.splitlines() if tiny_trained_run["spec"].run_id in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells == [tiny_trained_run["spec"].run_id, "skipped: finished earlier", "–", "–", "–"]


def test_affinity_mean_and_state_round_trip():
    """The mean of each entry skips the records where it is NaN; a resumed recorder keeps every record."""
    from usagg.train.affinity import AffinityRecorder, _Mean

    recorder = AffinityRecorder.__new__(AffinityRecorder)
    recorder.means = {"lookahead": _Mean(2)}
    mean = recorder.means["lookahead"]
    assert np.isnan(mean.mean()).all()
    mean.add(np.array([[np.nan, 1.0], [2.0, np.nan]]), seconds=0.5, step=10)
    mean.add(np.array([[np.nan, 3.0], [np.nan, np.nan]]), seconds=0.25, step=20)
    np.testing.assert_array_equal(mean.mean(), np.array([[np.nan, 2.0], [2.0, np.nan]]))

    resumed = AffinityRecorder.__new__(AffinityRecorder)
    resumed.means = {"lookahead": _Mean(2)}
    resumed.load_state_dict(recorder.state_dict())
    again = resumed.means["lookahead"]
    assert (again.records, again.seconds) == (2, 0.75)
    assert [step for step, _ in again.history] == [10, 20]
    np.testing.assert_array_equal(again.mean(), mean.mean())


def test_dry_run_names_changed_settings(tiny_trained_run):
    from usagg.train.loop import TrainOptions
    from usagg.train.run import describe_plan

    study = tiny_trained_run["study"]
    options = TrainOptions(output=tiny_trained_run["study_file"].parent / "runs", device="cpu", progress=False)
    assert tiny_trained_run["spec"].run_dir(options.output) == tiny_trained_run["run_dir"]
    (same,) = describe_plan(study, [tiny_trained_run["spec"]], options)
    assert same.state == "finished"
    changed = study.model_copy(update={"train": study.train.model_copy(update={"lr_head": study.train.lr_head * 2})})
    (planned,) = describe_plan(changed, [tiny_trained_run["spec"]], options)
    assert planned.state == f"finished with other settings (train.lr_head: {study.train.lr_head} -> {study.train.lr_head * 2})"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "training"}, "split 'training' is invalid; evaluate on val or test"),
        ({"checkpoint": "final"}, "checkpoint 'final' is invalid; use best or latest"),
        ({"device": "tpu"}, "device 'tpu' is invalid; use auto, cpu or cuda"),
    ],
)
def test_evaluate_run_rejects_bad_arguments(tiny_trained_run, kwargs, message):
    from usagg.errors import ConfigError
    from usagg.train.finalize import evaluate_run

    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate_run(tiny_trained_run["run_dir"], **kwargs)
