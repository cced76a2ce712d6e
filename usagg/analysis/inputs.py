"""Read what the analyses start from: a results table, or a study output directory with its run directories."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from usagg.analysis.relative import describe_runs_by_value
from usagg.errors import DataError
from usagg.results import PER_IMAGE_FILE, PER_IMAGE_SCHEMA, read_results, validate_results

logger = logging.getLogger(__name__)

# Rows with this metric carry the training-image count of a clinical group or task type, as a publication may
# report it. They are not scores, so they are kept apart from the score rows.
SIZE_METRIC = "train_images"

# Keys of run.json that may hold a run's training wall time in seconds, in order of preference.
RUN_SECONDS_KEYS = ("train_seconds", "wall_seconds", "elapsed_s", "seconds", "wall_time_s")


@dataclass
class AnalysisInputs:
    """Results rows (scores and sizes), per-image scores and the folder holding run directories, if any."""

    origin: Path
    results: pl.DataFrame
    sizes: pl.DataFrame
    per_image: pl.DataFrame | None = None
    root: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_pairs(self) -> bool:
        return bool(self.results.filter(pl.col("paradigm") == "pair").height)

    def run_files(self, name: str) -> list[Path]:
        if self.root is None:
            return []
        return sorted(self.root.rglob(name))


def split_size_rows(results: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (score rows, training-size rows) of a results table."""
    sizes = results.filter(pl.col("metric") == SIZE_METRIC)
    return results.filter(pl.col("metric") != SIZE_METRIC), sizes


def _collect_run_results(root: Path) -> pl.DataFrame:
    from usagg.train.rundir import finished_result_files

    files, _ = finished_result_files(root, [f for f in sorted(root.rglob("results.parquet")) if f.parent != root])
    if not files:
        raise DataError(
            f"{root}: no results.parquet in this folder or its run directories; give a results table "
            "(CSV or parquet) or a study output directory after `usagg results collect`"
        )
    frames = [read_results(f) for f in files]
    logger.info("read %d run result tables under %s", len(files), root)
    return pl.concat(frames, how="vertical")


def read_per_image_scores(root: Path) -> pl.DataFrame | None:
    """Concatenate every per_image_scores.parquet under ``root``; None when there is none."""
    files = sorted(root.rglob(PER_IMAGE_FILE))
    if not files:
        return None
    frames = []
    for file in files:
        frame = pl.read_parquet(file)
        missing = [c for c in PER_IMAGE_SCHEMA if c not in frame.columns]
        if missing:
            raise DataError(
                f"{file}: missing column(s) {', '.join(missing)}; per-image scores need {', '.join(PER_IMAGE_SCHEMA)}"
            )
        try:
            frames.append(frame.select([pl.col(c).cast(t) for c, t in PER_IMAGE_SCHEMA.items()]))
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{file}: a column has values of the wrong type: {exc}") from None
    return pl.concat(frames, how="vertical")


# Keys of results_meta.json that change what a metric means; runs compared with each other should share them.
EVALUATION_SETTINGS = ("checkpoint", "empty_mask_policy", "one_class_policy")


def evaluation_setting_notes(root: Path) -> list[str]:
    """Return a note per evaluation setting whose value differs between the runs under ``root``.

    Each run's results_meta.json records, per split, the checkpoint and the policies behind its metrics. Runs
    that differ there give numbers that mean different things.
    """
    from usagg.io import read_json_file

    seen: dict[tuple[str, str], dict[str, list[str]]] = {}
    for file in sorted(root.rglob("results_meta.json")):
        try:
            meta = read_json_file(file, "the results metadata", fix="delete it and evaluate the run again")
        except DataError as exc:
            logger.warning("%s", exc)
            continue
        run = str(file.parent.relative_to(root))
        for split, values in (meta.items() if isinstance(meta, dict) else []):
            for key in EVALUATION_SETTINGS:
                if isinstance(values, dict) and key in values:
                    seen.setdefault((split, key), {}).setdefault(str(values[key]), []).append(run)
    notes = []
    for (split, key), by_value in sorted(seen.items()):
        if len(by_value) > 1:
            notes.append(
                f"runs under {root} were evaluated on {split} with different {key}: {describe_runs_by_value(by_value)}; their "
                f"metrics are not comparable, so evaluate them with one setting (usagg evaluate RUN_DIR)"
            )
    return notes


def load_inputs(path: str | os.PathLike) -> AnalysisInputs:
    """Read a results table (CSV or parquet) or a study output directory.

    A directory gives its ``results.parquet`` (or, when absent, the union of its runs' results.parquet) and
    every per_image_scores.parquet, affinity.json and routing_stats.json below it.
    """
    origin = Path(path)
    if not origin.exists():
        raise DataError(f"{origin}: not found; give a results table (CSV or parquet) or a study output directory")
    notes: list[str] = []
    if origin.is_dir():
        table = read_results(origin) if (origin / "results.parquet").exists() else _collect_run_results(origin)
        per_image = read_per_image_scores(origin)
        if per_image is None:
            notes.append(f"no {PER_IMAGE_FILE} under {origin}: intervals come from seeds only")
        notes.extend(evaluation_setting_notes(origin))
        root: Path | None = origin
    else:
        table = read_results(origin)
        per_image = None
        root = None
        if origin.name == "results.parquet":
            # The study table that `usagg evaluate` keeps beside the run directories: their settings still apply.
            notes.extend(evaluation_setting_notes(origin.parent))
    scores, sizes = split_size_rows(validate_results(table, origin=str(origin)))
    if scores.height == 0:
        raise DataError(f"{origin}: the results table has no score rows (only {SIZE_METRIC} rows or none)")
    return AnalysisInputs(origin=origin, results=scores, sizes=sizes, per_image=per_image, root=root, notes=notes)


def run_seconds(run_dir: Path) -> float | None:
    """Return a run's training wall time from its run.json, or None when it does not record one."""
    file = run_dir / "run.json"
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for source in (data, data.get("status") if isinstance(data.get("status"), dict) else {}):
        for key in RUN_SECONDS_KEYS:
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, (int, float)):
                return float(value)
    return None

