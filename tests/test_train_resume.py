"""Kill-and-resume: a run killed with SIGKILL after its first checkpoint ends exactly like an uninterrupted one,
with or without DataLoader workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from safetensors.torch import load_file
from train_fixtures import run_cli, study_dict, write_study

from usagg.results import read_results

RUN = "task_specific/breast_2cls/frac-1/seed-0"
STEPS = 16


def _study(shared_data, tmp_path, name, num_workers=0):
    train = {"steps": STEPS, "checkpoint_every": 4, "eval_every": 8, "log_every": 1, "batch_size": 2}
    # Augmentation stays on: each sample's draws are seeded by the run seed, the step and its place in the batch,
    # so the killed run (loading in worker processes) must reproduce the reference's (loading in the main process).
    study = study_dict(
        shared_data, tmp_path / name, ["breast_2cls"], train=train, paradigms=["task_specific"], data={"num_workers": num_workers}
    )
    return write_study(tmp_path / f"{name}.yaml", study)


def _final_weights(run_dir):
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert pointer["step"] == STEPS
    return load_file(run_dir / "checkpoints" / pointer["weights"])


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(shared_data, tmp_path):
    reference = _study(shared_data, tmp_path, "reference")
    done = run_cli(["train", str(reference), "--device", "cpu", "--no-progress"], timeout=600)
    assert done.returncode == 0, done.stderr

    killed = _study(shared_data, tmp_path, "killed", num_workers=2)
    run_dir = tmp_path / "killed" / "tiny" / RUN
    pointer = run_dir / "checkpoints" / "latest.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "usagg", "train", str(killed), "--device", "cpu", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not pointer.exists():
        assert process.poll() is None, "the run ended before writing its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = json.loads(pointer.read_text())["step"]
    assert killed_at < STEPS, "the run finished before it could be killed"
    assert not (run_dir / "results.parquet").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    resumed = run_cli(["train", str(killed), "--device", "cpu", "--no-progress"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if line.get("event") == "resume"] == [killed_at]

    expected = read_results(tmp_path / "reference" / "tiny" / RUN / "results.parquet")
    actual = read_results(run_dir / "results.parquet")
    assert_frame_equal(expected, actual)
    weights_expected = _final_weights(tmp_path / "reference" / "tiny" / RUN)
    weights_actual = _final_weights(run_dir)
    assert all(torch.equal(weights_expected[k], weights_actual[k]) for k in weights_expected)
    # The log contains every step once: the lines logged after the checkpoint by the killed process are dropped.
    assert [line["step"] for line in log if "event" not in line] == list(range(1, STEPS + 1))
    per_image = pl.read_parquet(run_dir / "per_image_scores.parquet")
    assert per_image.height > 0


def _interrupt_at_latest_checkpoint(monkeypatch, step):
    """Raise KeyboardInterrupt instead of writing the ``latest`` checkpoint of ``step``, as a kill there would."""
    from usagg.train import checkpoint as ckpt

    original = ckpt.save_checkpoint

    def save(run_dir, kind, model, at_step, training_state, info=None):
        if kind == "latest" and at_step == step:
            raise KeyboardInterrupt
        return original(run_dir, kind, model, at_step, training_state, info)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)


def _train_once(study_file, output):
    from usagg.config import load_study
    from usagg.train.distributed import DistEnv
    from usagg.train.loop import TrainOptions
    from usagg.train.plan import plan_runs
    from usagg.train.run import execute_plan

    study = load_study(study_file)
    options = TrainOptions(output=output, device="cpu", progress=False)
    return execute_plan(study, plan_runs(study), options, DistEnv())


def _interrupted_four_step_run(shared_data, tmp_path, monkeypatch, model=None):
    """Train a 4-step task-specific run that checkpoints every 2 steps and is interrupted at step 4."""
    train = {"steps": 4, "checkpoint_every": 2, "eval_every": 2, "log_every": 1, "batch_size": 2}
    study = study_dict(shared_data, tmp_path / "runs", ["breast_2cls"], train=train, paradigms=["task_specific"], model=model)
    study_file = write_study(tmp_path / "study.yaml", study)
    with monkeypatch.context() as patch:
        _interrupt_at_latest_checkpoint(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            _train_once(study_file, tmp_path / "runs")
    return study_file, tmp_path / "runs" / "tiny" / RUN


def _log(run_dir):
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("interrupted_at", "resumed_from"), [(4, 2), (2, None)])
def test_resume_drops_log_lines_after_checkpoint(shared_data, tmp_path, monkeypatch, interrupted_at, resumed_from):
    """Lines logged after the checkpoint by an interrupted process are not kept beside their retrained copies."""
    from usagg.plots.training import read_train_log

    train = {"steps": 4, "checkpoint_every": 2, "eval_every": 2, "log_every": 1, "batch_size": 2}
    study = study_dict(shared_data, tmp_path / "runs", ["breast_2cls"], train=train, paradigms=["task_specific"])
    study_file = write_study(tmp_path / "study.yaml", study)
    run_dir = tmp_path / "runs" / "tiny" / RUN
    with monkeypatch.context() as patch:
        _interrupt_at_latest_checkpoint(patch, interrupted_at)
        with pytest.raises(KeyboardInterrupt):
            _train_once(study_file, tmp_path / "runs")
    before = _log(run_dir)
    assert max(line["step"] for line in before) == interrupted_at  # logged, but not checkpointed
    with open(run_dir / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 5, "epoch": 2.5, "ta')  # a line torn by a kill

    outcomes = _train_once(study_file, tmp_path / "runs")
    assert outcomes[0].status == "finished"
    log = _log(run_dir)
    steps = [line["step"] for line in log if "event" not in line]
    assert steps == [1, 2, 3, 4]
    selection = [line["step"] for line in log if line.get("metric") == "selection_score"]
    assert selection == [2, 4]
    resumes = [(i, line["step"]) for i, line in enumerate(log) if line.get("event") == "resume"]
    if resumed_from is None:
        assert resumes == []
    else:
        assert [step for _, step in resumes] == [resumed_from]
        index = resumes[0][0]
        assert all(line["step"] <= resumed_from for line in log[:index])
        assert all(line["step"] > resumed_from for line in log[index + 1 :])
    train_rows, eval_rows = read_train_log(run_dir / "train_log.jsonl")
    assert train_rows["step"].to_list() == [1, 2, 3, 4]
    assert eval_rows.group_by("step", "metric").len()["len"].max() == 1


def test_resume_keeps_later_best_checkpoint(shared_data, tmp_path, monkeypatch):
    """A best checkpoint saved after the resumed one stays the best to beat, and run.json names its step."""
    study_file, run_dir = _interrupted_four_step_run(shared_data, tmp_path, monkeypatch)
    pointer_file = run_dir / "checkpoints" / "best.json"
    pointer = json.loads(pointer_file.read_text())
    assert pointer["step"] == 4  # validated and saved as best before the latest checkpoint of step 4
    pointer["score"] = 99.0  # better than any retrained score, so only the stale checkpoint can stay best
    pointer_file.write_text(json.dumps(pointer))

    _train_once(study_file, tmp_path / "runs")

    assert json.loads(pointer_file.read_text())["score"] == 99.0
    assert json.loads((run_dir / "run.json").read_text())["best_step"] == 4


def test_resume_does_not_need_the_pretrained_file(shared_data, tmp_path, monkeypatch, caplog):
    """The checkpoint replaces every weight, so a resumed run trains on after the pretrained file is gone."""
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=2, img_size=32)
    weights = tmp_path / "dinov3_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, weights)
    study_file, run_dir = _interrupted_four_step_run(shared_data, tmp_path, monkeypatch, model={"pretrained": str(weights)})
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "interrupted"
    assert status["step"] == 4
    assert status["checkpoint_step"] == 2  # interrupted while saving step 4, so a rerun resumes from step 2
    assert status["pretrained"]["path"] == str(weights.resolve())
    assert status["pretrained"]["format"] == "timm"
    assert status["pretrained"]["missing"] == []
    assert status["pretrained"]["loaded"] > 0

    weights.unlink()
    with monkeypatch.context() as patch:
        # A failure before the resumed run restores its step leaves the recorded step alone.
        from usagg.train import loop

        def broken(self):
            raise RuntimeError("disk full")

        patch.setattr(loop._Trainer, "_resume", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            _train_once(study_file, tmp_path / "runs")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed"
    assert status["step"] == 4

    # The run records the code that trains it, and a resume under other code logs a warning.
    from usagg.train.loop import code_version
    from usagg.train.rundir import update_run_json

    assert status["code"] == code_version()
    update_run_json(run_dir, code={"version": "0.0.9", "digest": "0123456789ab"})
    with caplog.at_level("WARNING", logger="usagg.train.loop"):
        outcomes = _train_once(study_file, tmp_path / "runs")
    assert outcomes[0].status == "finished"
    assert "this run started with other usagg code (0.0.9 0123456789ab" in caplog.text
    assert [line["step"] for line in _log(run_dir) if line.get("event") == "resume"] == [2]


def test_unfinished_run_kept_out_of_study(shared_data, tmp_path, monkeypatch):
    """An interrupted run's checkpoint is not its trained model.

    evaluate raises unless given allow_unfinished, and the rows never reach the study table or a collected one.
    """
    from usagg.errors import DataError
    from usagg.train.finalize import evaluate_run
    from usagg.train.rundir import collect_results

    study_file, run_dir = _interrupted_four_step_run(shared_data, tmp_path, monkeypatch)
    study_folder = tmp_path / "runs" / "tiny"
    with pytest.raises(DataError, match=r"the run is not finished \(interrupted, last checkpoint at step 2 of 4\)"):
        evaluate_run(run_dir, device="cpu")
    rows = evaluate_run(run_dir, device="cpu", allow_unfinished=True)
    assert rows.height > 0
    assert (run_dir / "results.parquet").exists()
    assert not (study_folder / "results.parquet").exists()
    with pytest.raises(DataError, match="no results of finished runs found"):
        collect_results(study_folder)

    assert _train_once(study_file, tmp_path / "runs")[0].status == "finished"
    _, n_runs, _ = collect_results(study_folder)
    assert n_runs == 1


def test_run_locked_by_other_process_skipped(shared_data, tmp_path, monkeypatch):
    """A second train of the same study leaves a run alone while another process holds its lock."""
    import fcntl

    from usagg.train.rundir import TRAIN_LOCK_FILE

    train = {"steps": 2, "checkpoint_every": 2, "eval_every": 2, "batch_size": 2}
    study = study_dict(shared_data, tmp_path / "runs", ["breast_2cls"], train=train, paradigms=["task_specific"])
    study_file = write_study(tmp_path / "study.yaml", study)
    run_dir = tmp_path / "runs" / "tiny" / RUN
    run_dir.mkdir(parents=True)
    # A child process holds the lock, as a second `usagg train` would.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
         "f.write('process 4242 on host-a'); f.flush(); print('locked', flush=True); time.sleep(60)",
         str(run_dir / TRAIN_LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        dry = run_cli(["train", str(study_file), "--dry-run"], timeout=120)
        assert "being trained by process 4242 on host-a" in dry.stdout
        (outcome,) = _train_once(study_file, tmp_path / "runs")
        assert (outcome.status, outcome.extra["holder"]) == ("busy", "process 4242 on host-a")
        assert not (run_dir / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock with its process, so a killed trainer leaves no stale lock. Temporary files of
    # writes torn by a kill are removed when the run is next trained.
    (run_dir / "checkpoints").mkdir()
    torn = [run_dir / "checkpoints" / ".latest-0000001.pt.x1y2.tmp", run_dir / ".run.json.a1b2.tmp"]
    for path in torn:
        path.write_bytes(b"torn")
    (outcome,) = _train_once(study_file, tmp_path / "runs")
    assert not any(path.exists() for path in torn)
    assert outcome.status == "finished"
    with open(run_dir / TRAIN_LOCK_FILE, "a+") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # A dry run only tests the lock: it writes nothing into the run folder.
    lock = run_dir / TRAIN_LOCK_FILE
    before = (lock.read_text(), lock.stat().st_mtime_ns)
    assert "finished" in run_cli(["train", str(study_file), "--dry-run"], timeout=120).stdout
    assert (lock.read_text(), lock.stat().st_mtime_ns) == before
