"""``usagg bench`` and the model benchmark at tiny size (the figures themselves are recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import usagg.bench.model as model_bench
from usagg.bench.model import BenchSetting, run_model_benchmark
from usagg.cli import app

TINY = BenchSetting(backbone="vit_tiny_patch16_dinov3_qkvb", depth=2, img_size=32, batch_size=2,
                    num_experts=4, top_k=2, train_rounds=1, forward_rounds=1, layer_rounds=1)


def test_model_benchmark_figures():
    results = run_model_benchmark(TINY)
    for key in ("moe_vs_dense_ratio", "moe_vs_every_expert_speedup", "moe_dispatch_overhead",
                "dense_train_images_per_s", "moe_forward_images_per_s", "moe_peak_memory_mb"):
        assert key in results
    assert results["moe_vs_dense_ratio"] > 0
    assert results["moe_blocks"] == [1]
    # Experts are dense width / k wide, so active FLOPs match the dense model up to the small router.
    assert results["moe_train_gflops_per_image"] == pytest.approx(results["dense_train_gflops_per_image"], rel=0.02)
    assert results["moe_peak_memory_mb"] > results["dense_peak_memory_mb"]  # E / k times the MLP weights
    assert results["mfu"] is None  # no GPU peak on CPU
    assert results["every_expert_model_flop_ratio"] > 1
    # The targets are set for the full setting; another setting reports no verdict.
    assert results["meets_moe_vs_dense"] is None
    assert results["meets_moe_vs_every_expert"] is None


def test_bench_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(model_bench, "QUICK", TINY)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--only", "model", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "moe_vs_dense_ratio" in result.output
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["machine"]["cpu_count"] >= 1
    figures = report["benchmarks"]["model"]["results"]
    assert figures["moe_vs_every_expert_speedup"] > 0
    assert set(report["benchmarks"]) == {"model"}


def test_bench_cli_rejects_unknown_name():
    result = CliRunner().invoke(app, ["bench", "--only", "nope"])
    assert result.exit_code != 0
    assert "unknown benchmark 'nope'" in str(result.exception) + result.output


def test_bench_help_lists_every_registered_benchmark():
    from usagg.bench import load_all
    from usagg.cli.bench import BENCHMARK_NAMES

    assert tuple(sorted(load_all())) == BENCHMARK_NAMES
