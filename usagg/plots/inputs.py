"""Figure inputs: a results table, run directories, or a study output folder that contains both."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from usagg.errors import ConfigError, DataError
from usagg.results import read_results, validate_results

logger = logging.getLogger(__name__)

# Files whose presence marks a run directory (<output>/<study>/<paradigm>/<group>/frac-<f>/seed-<s>/).
RUN_MARKERS = ("run.json", "train_log.jsonl", "routing_stats.json")
_FRACTION_RE = re.compile(r"^frac-(.+)$")
_SEED_RE = re.compile(r"^seed-(.+)$")


@dataclass(frozen=True)
class RunInfo:
    """A run directory and the run coordinates read from its path (and run.json when present)."""

    path: Path
    paradigm: str
    group: str
    data_fraction: float | None
    seed: int | None

    @property
    def label(self) -> str:
        parts = [self.paradigm, self.group]
        if self.data_fraction is not None:
            parts.append(f"frac {self.data_fraction:g}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return " / ".join(parts)


def read_run_info(path: Path) -> RunInfo:
    """Read the run coordinates of ``path`` from its folder names, overridden by run.json keys when present."""
    parts = path.resolve().parts
    paradigm, group, fraction, seed = "run", path.name, None, None
    if len(parts) >= 4:
        seed_match = _SEED_RE.match(parts[-1])
        fraction_match = _FRACTION_RE.match(parts[-2])
        if seed_match and fraction_match:
            paradigm, group = parts[-4], parts[-3]
            fraction = _to_float(fraction_match.group(1))
            seed = _to_int(seed_match.group(1))
    spec_file = path / "run.json"
    if spec_file.is_file():
        try:
            spec = json.loads(spec_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("%s: cannot read run spec (%s); using the folder names", spec_file, exc)
            spec = {}
        if isinstance(spec.get("spec"), dict):
            spec = {**spec, **spec["spec"]}
        paradigm = str(spec.get("paradigm", paradigm))
        group = str(spec.get("group", group))
        fraction = _to_float(spec.get("data_fraction", spec.get("fraction", fraction)))
        seed = _to_int(spec.get("seed", seed))
    return RunInfo(path, paradigm, group, fraction, seed)


def _to_float(value: object) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _to_int(value: object) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


@dataclass
class FigureInputs:
    """The material figures are drawn from; each figure reads the parts it needs.

    ``results`` is a table in the results schema; ``runs`` are run directories (training logs, routing
    statistics, affinity records); ``study_dir`` is a study output folder, ``<output>/<study>``.
    """

    results: pl.DataFrame | None = None
    runs: list[RunInfo] = field(default_factory=list)
    study_dir: Path | None = None
    origin: str = "inputs"
    # Results computed from these inputs (the relative change, affinity matrices), so that the figures drawn from
    # them compute each once and log its warnings once.
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def coerce(cls, inputs: "FigureInputs | pl.DataFrame | str | os.PathLike | Sequence[str | os.PathLike]") -> "FigureInputs":
        """Return ``inputs`` as FigureInputs: a results DataFrame, one path or a list of paths as ``from_paths`` reads them."""
        if isinstance(inputs, cls):
            return inputs
        if isinstance(inputs, pl.DataFrame):
            return cls(results=validate_results(inputs), origin="results table")
        if isinstance(inputs, (str, os.PathLike)):
            return cls.from_paths([inputs])
        if isinstance(inputs, Sequence) and all(isinstance(item, (str, os.PathLike)) for item in inputs):
            return cls.from_paths(list(inputs))
        raise ConfigError(
            f"figure inputs of type {type(inputs).__name__}: pass FigureInputs, a results DataFrame, or paths of "
            "results tables, run directories or study output folders"
        )

    @classmethod
    def from_paths(cls, paths: Sequence[str | os.PathLike]) -> "FigureInputs":
        """Collect inputs from results files (.parquet, .csv), run directories and study output folders."""
        tables: list[pl.DataFrame] = []
        runs: dict[Path, RunInfo] = {}
        study_dir: Path | None = None
        for raw in paths:
            path = Path(raw)
            if not path.exists():
                raise DataError(f"{path}: not found; pass a results table (.parquet or .csv), a run directory or a study output folder")
            if path.is_file():
                if path.suffix in (".parquet", ".csv"):
                    tables.append(read_results(path))
                    continue
                raise DataError(f"{path}: unsupported input; figures read .parquet or .csv results tables and folders")
            if _is_run_dir(path):
                runs[path.resolve()] = read_run_info(path)
                continue
            study_dir = study_dir or path
            found = discover_runs(path)
            if (path / "results.parquet").is_file():
                tables.append(read_results(path / "results.parquet"))
            else:
                # Before `usagg results collect`, the runs' own tables are the results.
                tables += [read_results(r.path / "results.parquet") for r in found if (r.path / "results.parquet").is_file()]
            if not found and not (path / "results.parquet").is_file():
                raise DataError(
                    f"{path}: no results.parquet and no run directories (folders with {' or '.join(RUN_MARKERS)}) inside"
                )
            runs.update({r.path.resolve(): r for r in found})
        results = pl.concat(tables, how="vertical").unique(maintain_order=True) if tables else None
        origin = ", ".join(str(p) for p in paths) or "inputs"
        return cls(results=results, runs=list(runs.values()), study_dir=study_dir, origin=origin)

    def require_results(self, figure: str) -> pl.DataFrame:
        if self.results is None or self.results.height == 0:
            raise ConfigError(
                f"figure {figure!r} needs a results table; pass a results .parquet/.csv file or a study output "
                f"folder with results.parquet (got {self.origin})"
            )
        return self.results

    def require_runs(self, figure: str, marker: str) -> list[RunInfo]:
        """Return the runs that have file ``marker``, or raise naming what the figure needs."""
        runs = [r for r in self.runs if (r.path / marker).is_file()]
        if not runs:
            raise ConfigError(
                f"figure {figure!r} needs run directories with {marker}; pass run directories or a study output "
                f"folder that contains them (got {self.origin})"
            )
        return runs


def discover_runs(root: Path) -> list[RunInfo]:
    """Find every run directory below ``root``, sorted by path."""
    seen: set[Path] = set()
    for marker in RUN_MARKERS:
        for file in root.rglob(marker):
            seen.add(file.parent)
    return [read_run_info(p) for p in sorted(seen)]
