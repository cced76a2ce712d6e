"""The training progress bar keeps the step count, bar and times on a narrow terminal."""

from __future__ import annotations

import io

from rich.console import Console

from usagg.train.progress import TrainProgress


def _render(width: int) -> str:
    progress = TrainProgress("task_specific/thyroid_echogenicity_cls/frac-0.25/seed-2", total_steps=1056, start_step=21)
    progress.update(21, "thyroid_echogenicity_cls", 1.6415, 3.8)
    out = io.StringIO()
    Console(file=out, width=width).print(progress._progress.make_tasks_table(progress._progress.tasks))
    return out.getvalue().rstrip("\n")


def test_narrow_terminal_keeps_counts():
    line = _render(80)
    assert "\n" not in line
    assert len(line) <= 80
    assert "21/1056" in line
    assert "ETA" in line
    assert "loss 1." in line
    assert "task_specific/thyroid_echog…" in line  # the run id is cut, not the numbers


def test_wide_terminal_shows_all():
    line = _render(150)
    assert "task_specific/thyroid_echog…" in line
    assert "loss 1.6415  3.8 img/s  thyroid_echogenicity_cls" in line
