"""Tiny studies on the FMC_UIA-layout sample for the training and evaluation tests.

Tests import what they need from here; the ``tiny_trained_run`` fixture trains one unified run per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# Task cards of the sample: one per head kind, plus the second segmentation task.
SAMPLE_TASKS: dict[str, dict[str, Any]] = {
    "breast_lesion": {"type": "segmentation", "organ": "breast", "num_classes": 2},
    "breast_2cls": {"type": "classification", "organ": "breast", "num_classes": 2},
    "breast_lesion_det": {"type": "detection", "organ": "breast"},
    "fetal_head_axis": {"type": "regression", "organ": "fetal_head", "num_keypoints": 2},
    "nerve_vessel": {"type": "segmentation", "organ": "nerve", "num_classes": 3},
}


def study_dict(
    shared_data: Path,
    output: Path,
    tasks: list[str],
    name: str = "tiny",
    train: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A study of ``tasks`` from the sample with a 2-block tiny ViT at 32 px and a few steps."""
    root = shared_data / "fmc_uia_sample"
    val_root = shared_data / "fmc_uia_sample_val"
    cards = []
    for task in tasks:
        card = {"name": task, **SAMPLE_TASKS[task]}
        card["source"] = {"format": "fmc_uia", "root": str(root), "val_root": str(val_root)}
        cards.append(card)
    study = {
        "name": name,
        "output": str(output),
        "tasks": cards,
        "data": {"img_size": 32, "num_workers": 0, **(data or {})},
        "model": {
            "backbone": "vit_tiny_patch16_dinov3_qkvb",
            "depth": 2,
            "num_experts": 2,
            "top_k": 1,
            "decoder_dim": 16,
            **(model or {}),
        },
        "train": {
            "budget": "steps",
            "steps": 4,
            "batch_size": 4,
            "checkpoint_every": 2,
            "eval_every": 2,
            "log_every": 1,
            "eval_batch_size": 8,
            **(train or {}),
        },
    }
    study.update(extra)
    return study


def write_study(path: Path, study: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def run_cli(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m usagg ARGS`` in a fresh process and return the completed process (text output)."""
    # A wide terminal keeps rich from wrapping error messages, so tests can search them.
    full_env = {**os.environ, "COLUMNS": "400", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "usagg", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(args: list[str], monkeypatch) -> tuple[int, str]:
    """Run the ``usagg`` entry point in this process; return its exit status and stderr with whitespace collapsed.

    Collapsing whitespace undoes rich's line wrapping, so tests can search messages.
    """
    import io

    from usagg.cli import main

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["usagg", *args])
    # Replace sys.stderr rather than the console's file: rich reads sys.stderr at each print, while undoing a
    # patch of Console.file would pin the console to the stream of this test, closed once the test ends.
    monkeypatch.setattr(sys, "stderr", buffer)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, " ".join(buffer.getvalue().split())


@pytest.fixture(scope="session")
def tiny_trained_run(shared_data, tmp_path_factory) -> dict[str, Any]:
    """Train one unified run over four kinds of task (segmentation, classification, detection, keypoints)."""
    from usagg.config import load_study
    from usagg.train.distributed import DistEnv
    from usagg.train.loop import TrainOptions
    from usagg.train.plan import plan_runs
    from usagg.train.run import execute_plan

    folder = tmp_path_factory.mktemp("tiny_run")
    tasks = ["breast_lesion", "breast_2cls", "breast_lesion_det", "fetal_head_axis"]
    study_file = write_study(folder / "study.yaml", study_dict(shared_data, folder / "runs", tasks))
    study = load_study(study_file)
    specs = plan_runs(study, paradigms=["unified"])
    options = TrainOptions(output=folder / "runs", device="cpu", progress=False)
    outcomes = execute_plan(study, specs, options, DistEnv())
    return {"study": study, "study_file": study_file, "spec": specs[0], "outcome": outcomes[0], "run_dir": outcomes[0].run_dir}
