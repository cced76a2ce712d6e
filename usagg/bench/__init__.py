"""Benchmarks reachable from ``usagg bench``; each compares against a baseline measured in the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# name -> (one-line description, function(quick: bool) -> dict of measured numbers)
BENCHMARKS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {}


def register_benchmark(name: str, description: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register a benchmark function under ``name`` for ``usagg bench``."""

    def decorator(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        BENCHMARKS[name] = (description, fn)
        return fn

    return decorator


def load_all() -> dict[str, tuple[str, Callable[..., dict[str, Any]]]]:
    """Import every benchmark module so that its functions register themselves."""
    import importlib
    import pkgutil

    import usagg.bench as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"usagg.bench.{info.name}")
    return BENCHMARKS
