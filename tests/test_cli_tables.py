"""Printed tables fit the console: matrices in column blocks, short wide tables transposed."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

from usagg.cli.tables import OFF_TERMINAL_WIDTH, output_console, print_matrix, print_rows

LONG_NAMES = [f"anatomy_{i:02d}_structure_segmentation" for i in range(15)]


def _console(width: int) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, color_system=None), buffer


def test_matrix_splits_into_column_blocks():
    console, buffer = _console(80)
    matrix = np.arange(225, dtype=float).reshape(15, 15) / 225

    print_matrix(console, "demo affinity", LONG_NAMES, matrix)

    text = buffer.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "columns 1-" in text
    assert "of 15" in text
    for i, name in enumerate(LONG_NAMES):
        assert f"{i + 1:>2} {name}" in text
    for value in matrix.ravel():
        assert f"{value:.3f}" in text


def test_matrix_one_block_when_wide():
    console, buffer = _console(200)

    print_matrix(console, "demo affinity", LONG_NAMES[:4], np.eye(4))

    text = buffer.getvalue()
    assert "columns" not in text
    assert text.count("demo affinity") == 1


def test_matrix_scales_small_entries():
    console, buffer = _console(120)
    matrix = np.array([[0.02, 3e-4, np.nan], [-2e-4, 0.01, 1e-4], [5e-4, 0.0, 0.03]])

    print_matrix(console, "lookahead affinity", ["a", "b", "c"], matrix)

    text = buffer.getvalue()
    assert "entries multiplied by 1e4 (1.000 means 0.0001)" in " ".join(text.split())
    assert "3.000" in text
    assert "-2.000" in text
    assert "200.000" in text
    assert "–" in text


def test_rows_transposed_when_too_wide():
    console, buffer = _console(60)
    header = ["method", "training_runs_for_all_pairs", "estimator_seconds_recorded", "analysis_seconds"]
    rows = [["measured", "105", "12.5", "0.03"], ["fisher", "1", "7.0", "0.01"]]

    print_rows(console, "Cost", header, rows, [False, True, True, True])

    lines = buffer.getvalue().splitlines()
    assert "…" not in buffer.getvalue()
    header_line = next(line for line in lines if "method" in line)
    assert "measured" in header_line
    assert "fisher" in header_line
    assert any("training_runs_for_all_pairs" in line and "105" in line for line in lines)


def test_rows_not_transposed_when_many():
    console, buffer = _console(60)
    header = ["task", "a_rather_long_column_name", "another_long_column_name"]
    rows = [[f"task_{i}", str(i), str(2 * i)] for i in range(20)]

    print_rows(console, "Many rows", header, rows, [False, True, True])

    text = buffer.getvalue()
    assert text.count("task_") == 20
    assert not any("task_0" in line and "task_1" in line for line in text.splitlines())


def test_output_console_widens_off_terminal():
    plain = Console(file=io.StringIO())

    assert output_console(plain).width == OFF_TERMINAL_WIDTH


def test_output_console_keeps_stream():
    buffer = io.StringIO()

    output_console(Console(file=buffer)).print("kept")

    assert "kept" in buffer.getvalue()
