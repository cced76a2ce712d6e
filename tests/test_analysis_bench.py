"""The analysis benchmark runs, its two relative-change implementations agree, and it meets its target."""

from __future__ import annotations

from usagg.bench import BENCHMARKS
from usagg.bench.analysis import bench_analysis, naive_relative_change


def test_benchmark_is_registered():
    assert "analysis" in BENCHMARKS
    assert BENCHMARKS["analysis"][1] is bench_analysis


def test_naive_loop_known_value():
    rows = [
        {"study": "s", "task": "a", "metric": "mre_px", "split": "test", "data_fraction": 1.0, "seed": 0,
         "paradigm": "task_specific", "value": 30.4, "higher_is_better": False},
        {"study": "s", "task": "a", "metric": "mre_px", "split": "test", "data_fraction": 1.0, "seed": 0,
         "paradigm": "unified", "value": 15.6, "higher_is_better": False},
    ]
    assert round(100 * naive_relative_change(rows)[0], 2) == 48.68


def test_quick_benchmark_meets_target():
    numbers = bench_analysis(quick=True)
    assert numbers["rows"] == 27 * 3 * 5 * 3 + (7 + 7) * 3 * 5 * 3  # 27 tasks, 14 with a second metric
    assert numbers["comparisons"] == 27 * 2 * 5
    assert numbers["relative_change_results_match"] is True
    assert numbers["within_target"] is True
