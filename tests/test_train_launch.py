"""Launchers and the train CLI: submitit jobs, dry runs, option errors and `results collect`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner
from train_fixtures import run_main, study_dict, write_study

from usagg.cli import app
from usagg.config import load_study
from usagg.errors import ConfigError, TrainingError
from usagg.results import read_results
from usagg.train.launch import SlurmOptions, launch
from usagg.train.loop import TrainOptions
from usagg.train.plan import plan_runs

runner = CliRunner()


@pytest.mark.slow
def test_submitit_local_launcher_trains_each_run(shared_data, tmp_path):
    study_file = write_study(
        tmp_path / "study.yaml",
        study_dict(shared_data, tmp_path / "runs", ["breast_2cls", "fetal_head_axis"], train={"steps": 2}),
    )
    study = load_study(study_file)
    specs = plan_runs(study, paradigms=["task_specific"])
    options = TrainOptions(output=tmp_path / "runs", device="cpu", progress=False)
    submitted = launch(study, specs, options, launcher="submitit-local", slurm=SlurmOptions(time_min=10))
    assert [s.result["status"] for s in submitted] == ["finished", "finished"]
    assert len({s.job_id for s in submitted}) == 2
    table = read_results(tmp_path / "runs" / "tiny" / "results.parquet")
    assert set(table["run_id"]) == {spec.run_id for spec in specs}
    assert (tmp_path / "runs" / "tiny" / "submitit").is_dir()
    assert not (tmp_path / "runs" / "tiny" / "submitit" / "%j").exists()

    # Collecting rebuilds the same study table from the run folders.
    (tmp_path / "runs" / "tiny" / "results.parquet").unlink()
    result = runner.invoke(app, ["results", "collect", str(tmp_path / "runs" / "tiny")])
    assert result.exit_code == 0, result.output
    assert "from 2 runs" in result.output
    collected = read_results(tmp_path / "runs" / "tiny" / "results.parquet")
    assert collected.height == table.height


@pytest.mark.slow
def test_submitit_local_reports_every_failed_run(shared_data, tmp_path):
    study_file = write_study(
        tmp_path / "study.yaml",
        study_dict(shared_data, tmp_path / "runs", ["breast_2cls", "fetal_head_axis"], train={"steps": 2}),
    )
    first = runner.invoke(app, ["train", str(study_file), "-p", "task_specific", "-t", "breast_2cls", "--launcher",
                                "submitit-local", "--device", "cpu", "--no-progress"])
    assert first.exit_code == 0, first.output
    assert "job logs:" in first.output
    assert "results:" in first.output

    # The finished run now has other settings and fails; the other run still trains and is waited for.
    study = load_study(study_file, {"train.lr_head": 0.5})
    specs = plan_runs(study, paradigms=["task_specific"])
    options = TrainOptions(output=tmp_path / "runs", device="cpu", progress=False)
    with pytest.raises(TrainingError) as info:
        launch(study, specs, options, launcher="submitit-local", slurm=SlurmOptions(time_min=10))
    message = str(info.value)
    assert message.startswith("1 of 2 submitted run(s) failed: task_specific/breast_2cls/frac-1/seed-0 (job ")
    assert "train.lr_head: 0.001 -> 0.5" in message
    assert "submitit/<job id>/" in message
    other = tmp_path / "runs" / "tiny" / "task_specific" / "fetal_head_axis" / "frac-1" / "seed-0"
    assert json.loads((other / "run.json").read_text())["status"] == "finished"


def test_launcher_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--launcher submitit-local submits jobs; run it as one process"):
        launch(None, [], TrainOptions(output=tmp_path), launcher="submitit-local")


def test_launch_rejects_unknown_launcher(tmp_path):
    with pytest.raises(ConfigError, match="unknown launcher"):
        launch(None, [], TrainOptions(output=tmp_path), launcher="pbs")


def test_train_dry_run_prints_plan(shared_data, tmp_path):
    study = study_dict(shared_data, tmp_path / "runs", ["breast_2cls", "fetal_head_axis", "breast_lesion"], fractions=[0.5, 1.0])
    study_file = write_study(tmp_path / "study.yaml", study)
    result = runner.invoke(app, ["train", str(study_file), "--dry-run", "--fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert "plan for study tiny (6 runs)" in result.output  # 3 task-specific, 2 groups, 1 unified
    assert "frac-0.5" in result.output
    assert "frac-1/" not in result.output
    assert not (tmp_path / "runs").exists()


def test_train_dry_run_checks_model_settings(shared_data, tmp_path, monkeypatch):
    """A missing weights file or an impossible block list stops the dry run, before any job is submitted."""
    study_file = write_study(tmp_path / "study.yaml", study_dict(shared_data, tmp_path / "runs", ["breast_2cls"]))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, stderr = run_main(["train", str(study_file), "--dry-run", "--set", "model.pretrained=w.pth"], monkeypatch)
    assert code == 2
    # A relative path on the command line is taken from the current folder, not from the study's.
    assert f"model.pretrained: file {tmp_path / 'elsewhere' / 'w.pth'} not found" in stderr
    code, stderr = run_main(["train", str(study_file), "--dry-run", "--set", "model.feature_blocks=[]"], monkeypatch)
    assert code == 2
    assert "model.feature_blocks: the heads need at least one block" in stderr


def test_dry_run_warns_budget_sampling(shared_data, tmp_path, monkeypatch):
    train = {"budget": "epochs", "epochs": 1, "task_sampling": "uniform"}
    study_file = write_study(tmp_path / "study.yaml", study_dict(shared_data, tmp_path / "runs", ["breast_2cls"], train=train))
    code, stderr = run_main(["train", str(study_file), "--dry-run"], monkeypatch)
    assert code == 0
    assert "train.budget is 'epochs' but train.task_sampling is 'uniform'" in " ".join(stderr.split())


def test_train_cli_reports_bad_option(shared_data, tmp_path, monkeypatch):
    study_file = write_study(tmp_path / "study.yaml", study_dict(shared_data, tmp_path / "runs", ["breast_2cls"]))
    code, stderr = run_main(["train", str(study_file), "--dry-run", "--task", "lung"], monkeypatch)
    assert code == 2
    assert "--task lung: not a task of study 'tiny'" in stderr


def test_train_cli_set_override_and_groups_file(shared_data, tmp_path):
    study_file = write_study(tmp_path / "study.yaml", study_dict(shared_data, tmp_path / "runs", ["breast_2cls", "fetal_head_axis"]))
    groups = tmp_path / "groups.yaml"
    groups.write_text("groups:\n  both: [breast_2cls, fetal_head_axis]\n", encoding="utf-8")
    result = runner.invoke(
        app,
        ["train", str(study_file), "--dry-run", "-p", "grouped", "--groups", str(groups), "--set", "train.steps=7"],
    )
    assert result.exit_code == 0, result.output
    assert "grouped/both/frac-1/seed-0" in result.output
    assert "total: 7 steps" in result.output


def test_evaluate_cli_rejects_non_run_folder(tmp_path, monkeypatch):
    code, stderr = run_main(["evaluate", str(tmp_path)], monkeypatch)
    assert code == 2
    assert "not a run directory" in stderr


def test_results_collect_without_runs(tmp_path, monkeypatch):
    code, stderr = run_main(["results", "collect", str(tmp_path)], monkeypatch)
    assert code == 2
    assert "no run results found" in stderr


def test_dry_run_warns_underfed_task(shared_data, tmp_path, monkeypatch):
    train = {"budget": "steps", "steps": 2, "batch_size": 4, "task_sampling": "proportional"}
    study = study_dict(shared_data, tmp_path / "runs", ["breast_2cls", "fetal_head_axis"], train=train)
    study_file = write_study(tmp_path / "study.yaml", study)
    code, stderr = run_main(["train", str(study_file), "--dry-run", "-p", "unified"], monkeypatch)
    assert code == 0
    text = " ".join(stderr.split())
    assert "expected to get less than one batch of 4 training images in 2 steps" in text


def test_untrained_task_error_says_why(shared_data, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "sample"
    shutil.copytree(shared_data / "fmc_uia_sample", root)
    csv = root / "csv_files" / "breast_2cls.csv"
    header, first, *rest = csv.read_text().splitlines()
    cells = first.split(",")
    cells[-1] = "7"  # the class label column of a classification row
    csv.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
    study = study_dict(shared_data, tmp_path / "runs", ["breast_lesion", "breast_2cls"])
    for card in study["tasks"]:
        card["source"]["root"] = str(root)
    study_file = write_study(tmp_path / "study.yaml", study)
    code, stderr = run_main(["train", str(study_file), "--dry-run", "-p", "task_specific", "-t", "breast_lesion"], monkeypatch)
    assert code == 2
    assert "breast_2cls.csv, row 1" in stderr
    assert "(task 'breast_2cls' is read for the run of task 'breast_lesion' too, because a study's tasks are split together" in stderr
