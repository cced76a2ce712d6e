"""DDP: two gloo processes on loopback train the same run as one process, within floating-point tolerance."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import study_dict, write_study

from usagg.config import load_study
from usagg.model import build_model
from usagg.results import read_results
from usagg.train.distributed import DistEnv
from usagg.train.loop import TrainOptions, seed_everything
from usagg.train.plan import plan_runs
from usagg.train.run import execute_plan

RUN = "unified/all/frac-1/seed-0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(run_dir):
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return load_file(run_dir / "checkpoints" / pointer["weights"])


@pytest.mark.slow
def test_ddp_two_processes_match_one(shared_data, tmp_path):
    # Classification and keypoint losses are means over images, so the mean of two half-batch losses equals the
    # full-batch loss. The segmentation Dice loss and the MoE load-balancing loss pool over the batch and would not.
    study = study_dict(
        shared_data,
        tmp_path / "single",
        ["breast_2cls", "fetal_head_axis"],
        data={"augment": {"enabled": False}},
        model={"balance_loss_weight": 0.0},
        train={"steps": 4, "eval_every": 4, "checkpoint_every": 4},
        paradigms=["unified"],
    )
    study_file = write_study(tmp_path / "study.yaml", study)
    env = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    loaded = load_study(study_file)
    execute_plan(loaded, plan_runs(loaded), TrainOptions(output=tmp_path / "single", device="cpu", progress=False), DistEnv())

    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "usagg", "train", str(study_file), "--device", "cpu", "--no-progress", "--output", str(tmp_path / "ddp"),
    ]
    ddp = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]

    run_single = tmp_path / "single" / "tiny" / RUN
    run_ddp = tmp_path / "ddp" / "tiny" / RUN
    assert json.loads((run_ddp / "run.json").read_text())["world_size"] == 2
    weights_single, weights_ddp = _weights(run_single), _weights(run_ddp)
    assert weights_single.keys() == weights_ddp.keys()
    for key, value in weights_single.items():
        torch.testing.assert_close(weights_ddp[key], value, atol=1e-3, rtol=1e-3, msg=key)
    # Relative to how far training moved the weights, the two runs differ by float rounding only; two ranks
    # that did not synchronise their gradients would differ by a sizeable fraction of the update.
    seed_everything(0, deterministic=True)
    initial = build_model(loaded.model, loaded.tasks, loaded.data.size_hw).state_dict()
    gap = torch.sqrt(sum(((weights_ddp[k] - v).double() ** 2).sum() for k, v in weights_single.items()))
    update = torch.sqrt(sum(((v - initial[k]).double() ** 2).sum() for k, v in weights_single.items()))
    assert gap / update < 1e-2
    results_single = read_results(run_single / "results.parquet").sort("task", "metric")
    results_ddp = read_results(run_ddp / "results.parquet").sort("task", "metric")
    assert results_single["metric"].to_list() == results_ddp["metric"].to_list()
    mre_single = results_single.filter(results_single["metric"] == "mre_px")["value"][0]
    mre_ddp = results_ddp.filter(results_ddp["metric"] == "mre_px")["value"][0]
    assert mre_ddp == pytest.approx(mre_single, rel=1e-2)
    # Only rank 0 writes: one log line per step, not two.
    log = [json.loads(x) for x in (run_ddp / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if "event" not in line] == [1, 2, 3, 4]
    # The logged loss is the mean over the ranks' half batches, so it matches the single process's loss.
    single_log = [json.loads(x) for x in (run_single / "train_log.jsonl").read_text().splitlines()]
    losses_single = [line["loss"] for line in single_log if "loss" in line and "event" not in line]
    losses_ddp = [line["loss"] for line in log if "loss" in line and "event" not in line]
    assert losses_ddp == pytest.approx(losses_single, rel=1e-3)
