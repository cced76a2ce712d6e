"""The ``usagg`` entry point (``usagg.cli.main``): exit statuses, usage errors and rich markup in printed text.

Most tests run ``python -m usagg`` in a subprocess, because the exit status and the error output are produced by
``main()`` and not by the typer app that ``CliRunner`` calls.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from usagg.cli import app

runner = CliRunner()

HEADER = "image_path,task_id,task_name,num_classes,point_1_xy,point_2_xy"


def _keypoint_folder(root: Path, first_point: str = "[10.5, 20.25]", rows_with_first_point: int = 1) -> Path:
    """Write a dataset folder in the FMC_UIA layout with one two-point task 'axis' of four 48x64 images.

    ``first_point`` is the ``point_1_xy`` cell of the first ``rows_with_first_point`` rows. The other rows contain
    valid JSON points.
    """
    images = root / "Regression" / "IMAGES"
    images.mkdir(parents=True)
    rows = []
    for i in range(4):
        pixels = (np.random.default_rng(i).random((48, 64)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        point = first_point if i < rows_with_first_point else "[10.5, 20.25]"
        rows.append(f'../Regression/IMAGES/{i}.png,axis,Regression,2,"{point}","[30.0, 40.0]"')
    (root / "csv_files").mkdir()
    (root / "csv_files" / "axis.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return root


def _usagg(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m usagg ARGS`` with a wide terminal so that rich does not wrap table cells."""
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "usagg", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _flat(text: str) -> str:
    """Collapse runs of whitespace, so that assertions do not depend on where rich wrapped a line."""
    return " ".join(text.split())


def test_data_check_exit_status(tmp_path):
    good = _usagg("data", "check", _keypoint_folder(tmp_path / "good"), cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "no errors" in good.stdout

    bad = _usagg("data", "check", _keypoint_folder(tmp_path / "bad", first_point="(34.76, 54.98)"), cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "1 error(s) would break training" in bad.stdout


def test_bench_failure_exit_status(monkeypatch, capsys):
    """Check that ``main()`` exits with status 1 when the bench command raises ``typer.Exit(1)``."""
    from usagg.cli import bench as bench_cli
    from usagg.cli import main

    report = {"quick": True, "machine": {}, "benchmarks": {"broken": {"description": "d", "error": "E: x", "seconds": 0.0}}}
    monkeypatch.setattr(bench_cli, "run_benchmarks", lambda only, quick: report)
    monkeypatch.setattr(sys, "argv", ["usagg", "bench", "--quick"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1


def test_interrupt_exit_status(monkeypatch, capsys):
    """Check that Ctrl-C inside a command exits with status 130 and prints that a rerun resumes."""
    from usagg.cli import bench as bench_cli
    from usagg.cli import main

    def interrupted(only, quick):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cli, "run_benchmarks", interrupted)
    monkeypatch.setattr(sys, "argv", ["usagg", "bench", "--quick"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyse"], "No such command 'analyse'"),
        (["train", "--bogus"], "No such option: --bogus"),
        (["train"], "Missing argument 'STUDY.yaml'"),
        (["data", "check", ".", "--max-problems", "abc"], "Invalid value for '--max-problems'"),
        (["train", "study.yaml", "--dry-run", "true"], "unexpected extra argument"),
    ],
)
def test_usage_error_is_short(tmp_path, args, message):
    result = _usagg(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Usage: " in result.stderr
    assert message in _flat(result.stderr)


def test_data_error_keeps_brackets(tmp_path):
    """Check that ``main()`` prints a ``UsaggError`` message as plain text, not as rich markup."""
    root = _keypoint_folder(tmp_path / "bad", first_point="(34.76, 54.98)", rows_with_first_point=4)
    result = _usagg("data", "show", root, "--task", "axis", "--out", tmp_path / "axis.png", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert 'is not a JSON point "[x, y]"' in _flat(result.stderr)
    assert "task axis: no sample could be read; first problem: task axis: " in _flat(result.stderr)


def test_data_check_table_keeps_brackets(tmp_path):
    root = _keypoint_folder(tmp_path / "bad", first_point="(34.76, 54.98)")
    result = runner.invoke(app, ["data", "check", str(root)], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    text = _flat(result.output)
    assert "point_1_xy '(34.76, 54.98)' is not a JSON point \"[x, y]\"" in text
    assert 'write the point as "[x, y]" in pixels' in text
    assert "[dataset folder (fmc_uia)]" in text


def test_bench_report_keeps_brackets():
    from usagg.cli.bench import print_report

    report = {
        "benchmarks": {
            "model": {
                "description": "forward pass [b, 3, h, w]",
                "seconds": 1.0,
                "error": "RuntimeError: expected [b, c] input",
                "results": {"shape": "[bold]x[/bold]"},
            }
        }
    }
    out = io.StringIO()
    print_report(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "forward pass [b, 3, h, w]" in text
    assert "RuntimeError: expected [b, c] input" in text
    assert "[bold]x[/bold]" in text


def test_analysis_frame_keeps_brackets(monkeypatch):
    from usagg.cli import analysis

    out = io.StringIO()
    monkeypatch.setattr(analysis, "console", Console(file=out, width=200))
    frame = pl.DataFrame({"task[s]": ["lesion [left]"], "value": [0.5]})
    analysis._print_frame("title", frame)
    text = out.getvalue()
    assert "task[s]" in text
    assert "lesion [left]" in text


def test_sigterm_raises_keyboard_interrupt(monkeypatch):
    import signal

    import usagg.cli as cli

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "app", lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ranks_other_than_zero_show_only_errors(tmp_path, monkeypatch):
    """Under torchrun, rank 1 runs the same set-up as rank 0: its warnings are hidden, its errors name the rank."""
    import logging

    from usagg.log import configure_logging

    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "RANK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "usagg", "data", "check", "missing"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: rank 1: {tmp_path / 'missing'}: dataset folder not found")

    configure_logging(verbosity=1)
    assert logging.getLogger("usagg").level == logging.DEBUG
    monkeypatch.setenv("RANK", "1")
    configure_logging(verbosity=1)
    assert logging.getLogger("usagg").level == logging.ERROR
    monkeypatch.delenv("RANK")
    configure_logging()
