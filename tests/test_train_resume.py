"""Kill-and-resume: a run killed with SIGKILL after its first checkpoint ends exactly like an uninterrupted one."""

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


def _study(shared_data, tmp_path, name):
    train = {"steps": STEPS, "checkpoint_every": 4, "eval_every": 8, "log_every": 1, "batch_size": 2}
    # Augmentation stays on: its random draws come from the restored RNG state, so resuming must reproduce them.
    study = study_dict(shared_data, tmp_path / name, ["breast_2cls"], train=train, paradigms=["task_specific"])
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

    killed = _study(shared_data, tmp_path, "killed")
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
    # The log holds every step at least once: lines after the checkpoint are written again on resume.
    assert set(range(1, STEPS + 1)) <= {line.get("step") for line in log}
    per_image = pl.read_parquet(run_dir / "per_image_scores.parquet")
    assert per_image.height > 0
