"""The analysis report: key tables, matrices and warnings as data, and the files they were written to."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from usagg.analysis.advise import Advice
from usagg.analysis.affinity import Matrix, write_matrix_csv
from usagg.analysis.affinity_analysis import AffinityAnalysis
from usagg.analysis.data_scale import DataScaleFit
from usagg.analysis.grouping import GroupingResult
from usagg.analysis.inference import GroupTest
from usagg.analysis.transfer import TransferAnalysis
from usagg.io import atomic_path, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)


def write_table(table: pl.DataFrame, path: str | os.PathLike, parquet: bool = False) -> Path:
    """Write ``table`` as CSV (and a parquet copy with ``parquet``) atomically; return the CSV path."""
    target = Path(path).with_suffix(".csv")
    with atomic_path(target) as tmp:
        table.write_csv(tmp)
    if parquet:
        with atomic_path(target.with_suffix(".parquet")) as tmp:
            table.write_parquet(tmp)
    return target


def jsonable(value: Any) -> Any:
    """Convert numpy numbers, NaN and infinities into JSON-safe values (NaN and ±inf become null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class AnalysisReport:
    """Everything one analysis run produced, as data: tables by name, matrices, fits, warnings and output files.

    ``tables`` names follow the files written (``relative_change``, ``negative_transfer``, ``delta_m``,
    ``data_scale_coefficients``, ``data_scale_crossings``, ``data_scale_groups``, ``task_type_tests``,
    ``task_type_pairwise``, ``advice``, ``advice_predictions``, ``affinity_agreement``, ``affinity_scores``,
    ``affinity_costs``). ``messages`` list the analyses that were skipped and why. ``warnings`` contain the statistical
    warnings collected while fitting.
    """

    origin: str
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    matrices: dict[str, Matrix] = field(default_factory=dict)
    transfer: TransferAnalysis | None = None
    data_scale: DataScaleFit | None = None
    sensitivity: dict[str, GroupTest] = field(default_factory=dict)
    advice: Advice | None = None
    affinity: AffinityAnalysis | None = None
    grouping: GroupingResult | None = None
    warnings: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Key numbers as plain values: study Δm per paradigm, flagged tasks, model fit, grouping, scores."""
        out: dict[str, Any] = {"origin": self.origin}
        if self.transfer is not None:
            dm = self.transfer.delta_m.filter(pl.col("level") == "study")
            out["delta_m"] = dm.to_dicts()
            flagged = self.transfer.flagged()
            out["negative_transfer"] = flagged.select(
                "paradigm", "task", "metric", "data_fraction", "mean_rel_change", "ci_lo", "ci_hi", "ci_method"
            ).to_dicts()
            out["n_comparisons"] = self.transfer.summary.height
            out["ci_methods"] = dict(self.transfer.summary.group_by("ci_method").len().iter_rows())
        if self.data_scale is not None:
            out["data_scale"] = self.data_scale.summary()
        if self.sensitivity:
            out["task_type_tests"] = {p: t.as_row() for p, t in self.sensitivity.items()}
        if self.affinity is not None and self.affinity.scores is not None:
            out["affinity_scores"] = self.affinity.scores.to_dicts()
        if self.grouping is not None:
            out["grouping"] = self.grouping.summary()
        out["messages"] = list(self.messages)
        out["warnings"] = list(self.warnings)
        out["timings_s"] = dict(self.timings)
        return jsonable(out)

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write every table (CSV; the relative change also as parquet), matrix and the report JSON.

        An earlier analysis in ``out_dir`` is read from its ``analysis_report.json``. When it analysed the same
        input, its files that this analysis does not rewrite are kept and listed (several commands may share one
        folder). When it analysed another input, they are deleted, so that no file of other data looks current.
        """
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        earlier = _earlier_outputs(root, self.origin)
        for name, table in self.tables.items():
            self.outputs[name] = write_table(table, root / f"{name}.csv", parquet=name == "relative_change")
        for name, (tasks, matrix) in self.matrices.items():
            self.outputs[f"affinity_{name}"] = write_matrix_csv(tasks, matrix, root / f"affinity_{name}.csv")
        if self.data_scale is not None:
            path = root / "data_scale_model.json"
            write_json_atomic(path, jsonable(self.data_scale.summary()))
            self.outputs["data_scale_model"] = path
        if self.grouping is not None:
            path = root / "groups.yaml"
            write_text_atomic(path, self.grouping.to_yaml(comment=_grouping_comment(self.grouping)))
            self.outputs["groups"] = path
            path = root / "grouping.json"
            write_json_atomic(path, jsonable(self.grouping.summary()))
            self.outputs["grouping"] = path
        report_path = root / "analysis_report.json"
        written = {Path(path).resolve() for path in self.outputs.values()} | {report_path.resolve()}
        kept: dict[str, Path] = {}
        for name, (path, same_input) in earlier.items():
            if path.resolve() in written or name in self.outputs:
                continue
            if same_input:
                kept[name] = path
            else:
                path.unlink()
                logger.info("%s: removed, it belonged to an earlier analysis of other data", path)
        summary = self.summary()
        summary["outputs"] = {k: str(v) for k, v in sorted({**kept, **self.outputs, "report": report_path}.items())}
        write_json_atomic(report_path, summary)
        self.outputs["report"] = report_path
        return self.outputs


def _earlier_outputs(root: Path, origin: str) -> dict[str, tuple[Path, bool]]:
    """Return the files an earlier analysis listed in ``root``'s report: name -> (path, whether of ``origin``)."""
    report_path = root / "analysis_report.json"
    try:
        earlier = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict) or not isinstance(earlier.get("outputs"), dict):
        return {}
    same_input = earlier.get("origin") == origin
    found = {}
    for name, text in earlier["outputs"].items():
        path = Path(str(text))
        # Only files inside the folder that still exist; the report itself is rewritten.
        if name != "report" and path.parent.resolve() == root.resolve() and path.is_file():
            found[name] = (path, same_input)
    return found


def _grouping_comment(grouping: GroupingResult) -> str:
    text = f"{grouping.k} groups found by {grouping.method}; total within-group affinity {grouping.score:.4g}"
    if grouping.taxonomy_score is not None:
        text += f" (clinical taxonomy: {grouping.taxonomy_score:.4g})"
    return text
