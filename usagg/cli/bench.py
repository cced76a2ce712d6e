"""CLI commands of the bench stage: ``usagg bench`` runs the registered benchmarks and prints their figures."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usagg.cli.tables import output_console
from usagg.errors import ConfigError

logger = logging.getLogger(__name__)


def machine_info() -> dict[str, Any]:
    """Describe the machine the figures were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def run_benchmarks(only: list[str] | None, quick: bool) -> dict[str, Any]:
    """Run every registered benchmark (or those named in ``only``); a failing benchmark is recorded, not raised."""
    from usagg.bench import load_all

    registry = load_all()
    names = list(registry) if not only else list(dict.fromkeys(only))
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ConfigError(
            f"--only: unknown benchmark {', '.join(repr(n) for n in unknown)}; available: {', '.join(sorted(registry)) or 'none'}"
        )
    report: dict[str, Any] = {"quick": quick, "machine": machine_info(), "benchmarks": {}}
    for name in names:
        description, fn = registry[name]
        logger.info("running benchmark %s%s", name, " (quick)" if quick else "")
        start = time.perf_counter()
        entry: dict[str, Any] = {"description": description}
        try:
            entry["results"] = fn(quick=quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            logger.exception("benchmark %s failed", name)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["seconds"] = time.perf_counter() - start
        report["benchmarks"][name] = entry
    return report


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def print_report(report: dict[str, Any], console: Console) -> None:
    for name, entry in report["benchmarks"].items():
        table = Table(title=escape(f"{name}: {entry['description']} (benchmark took {entry['seconds']:.1f} s in all)"), title_justify="left")
        table.add_column("figure")
        table.add_column("value", justify="right")
        if "error" in entry:
            table.add_row("error", escape(entry["error"]))
        for key, value in (entry.get("results") or {}).items():
            if isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    table.add_row(escape(f"{key}.{sub_key}"), escape(_format(sub_value)))
            else:
                table.add_row(escape(str(key)), escape(_format(value)))
        console.print(table)


# The modules under usagg/bench register these names; listed here so that --help does not import torch.
BENCHMARK_NAMES = ("analysis", "data", "model", "synthetic", "training")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""

    @app.command("bench")
    def bench(
        only: Annotated[
            list[str] | None,
            typer.Option("--only", metavar="NAME", help=f"Run only this benchmark (repeatable): {', '.join(BENCHMARK_NAMES)}."),
        ] = None,
        quick: Annotated[bool, typer.Option("--quick", help="Smaller batches, images and step counts (about 2 minutes in all on 2 CPU cores).")] = False,
        json_path: Annotated[
            Path | None, typer.Option("--json", help="Also write every figure and the machine description to this JSON file.")
        ] = None,
        threads: Annotated[
            int | None, typer.Option("--threads", min=1, help="PyTorch intra-op CPU threads for all benchmarks (default: PyTorch's choice).")
        ] = None,
    ) -> None:
        """Measure the model's train step, data loading, the training loop, synthetic generation and the analysis,
        each against a baseline timed in the same run (docs/benchmarks.md)."""
        from usagg.io import write_json_atomic

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        report = run_benchmarks(only, quick)
        print_report(report, output_console(Console()))
        if json_path is not None:
            write_json_atomic(json_path, report)
            logger.info("wrote %s", json_path)
        failed = [name for name, entry in report["benchmarks"].items() if "error" in entry]
        if failed:
            raise typer.Exit(code=1)
