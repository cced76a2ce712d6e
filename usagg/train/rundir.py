"""Files of a run directory: resolved config, run status, results, per-image scores and the study table."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from usagg.config import StudyConfig, load_study, study_to_yaml
from usagg.errors import DataError, TrainingError
from usagg.io import atomic_path, read_json_file, write_json_atomic, write_text_atomic
from usagg.results import PER_IMAGE_FILE, append_results, read_results, write_results
from usagg.tasks import TaskCard
from usagg.train.plan import RunSpec

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
RESULTS_FILE = "results.parquet"
RESULTS_META_FILE = "results_meta.json"
ROUTING_FILE = "routing_stats.json"
AFFINITY_FILE = "affinity.json"

# Parts of the study that change what a run trains; a resumed or skipped run must see the same values.
_TRAINING_KEYS = ("data", "model", "train")
# Keys in those parts that change only speed, memory or logging, not what the run learns.
_UNCOMPARED_KEYS = frozenset(
    {"data.num_workers", "data.cache_images", "train.log_every", "train.tensorboard", "train.checkpoint_every",
     "train.eval_batch_size"}
)


def write_config(run_dir: Path, study: StudyConfig, spec: RunSpec) -> None:
    """Write the resolved study into the run, or check that a resumed run still has the same training settings."""
    from usagg.train.checkpoint import read_pointer

    file = run_dir / CONFIG_FILE
    if file.exists() and read_pointer(run_dir, "latest") is None:
        # Nothing was trained yet (e.g. the first attempt failed while building the model), so the new
        # settings simply replace the old ones.
        logger.info("%s: no checkpoint to resume; replacing the recorded study settings", run_dir)
    elif file.exists():
        changes = config_changes(run_dir, study, spec)
        if changes:
            raise TrainingError(
                f"{file}: the study's training settings changed since this run started ({list_changes(changes)}); "
                "restore the old values, or delete the run directory to train it again with the new ones"
            )
        return
    write_text_atomic(file, study_to_yaml(study))


def check_finished_config(run_dir: Path, study: StudyConfig, spec: RunSpec) -> None:
    """Raise when a finished run was trained with other settings than the study now gives, instead of skipping it."""
    changes = config_changes(run_dir, study, spec)
    if changes:
        raise TrainingError(
            f"{run_dir}: this run finished with other training settings than the study now gives "
            f"({list_changes(changes)}); to keep it, restore the old values; to train it with the new ones, delete "
            f"the run directory or write the runs to another output folder (-o DIR)"
        )


def config_changes(run_dir: Path, study: StudyConfig, spec: RunSpec) -> list[str]:
    """Return the training settings (the run's tasks and their cards, ``data``, ``model``, ``train``) that differ.

    Each entry reads ``key: old -> new`` with a dotted key. A card's ``source`` may move (another data folder)
    without changing what the run learns, so it is not compared.
    """
    file = run_dir / CONFIG_FILE
    if not file.exists():
        return []
    old = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    new = study.model_dump(mode="json")
    changes: list[str] = []
    # A group keeps its run directory when a new partition gives it other tasks, so compare the task sets.
    recorded = ((read_run_json(run_dir) or {}).get("spec") or {}).get("tasks")
    if recorded is not None and list(recorded) != list(spec.tasks):
        changes.append(f"tasks of the run: {json.dumps(list(recorded))} -> {json.dumps(list(spec.tasks))}")
    for key in _TRAINING_KEYS:
        # A setting that usagg added after the run was trained is no change while the study leaves it at its default.
        defaults = type(getattr(study, key))().model_dump(mode="json")
        changes += _differences(old.get(key), new.get(key), key, defaults)
    card_defaults = {
        name: field.get_default(call_default_factory=True)
        for name, field in TaskCard.model_fields.items()
        if not field.is_required() and name != "source"
    }
    old_cards = {c["name"]: _without_source(c) for c in old.get("tasks", [])}
    for task in spec.tasks:
        new_card = _without_source(new["tasks"][_task_index(study, task)])
        changes += _differences(old_cards.get(task), new_card, f"tasks.{task}", card_defaults)
    return changes


_NOT_SET = object()


def _differences(old: Any, new: Any, key: str, defaults: Any = _NOT_SET) -> list[str]:
    """Return ``key: old -> new`` for each leaf that differs; a leaf missing from ``old`` whose new value equals
    its value in ``defaults`` is not listed."""
    if key in _UNCOMPARED_KEYS:
        return []
    if old is _NOT_SET and defaults is not _NOT_SET and new == defaults:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        below = defaults if isinstance(defaults, dict) else {}
        for name in [*old, *(k for k in new if k not in old)]:
            found += _differences(old.get(name, _NOT_SET), new.get(name, _NOT_SET), f"{key}.{name}", below.get(name, _NOT_SET))
        return found
    if old == new:
        return []
    old_text, new_text = ("(not set)" if value is _NOT_SET else json.dumps(value) for value in (old, new))
    return [f"{key}: {old_text} -> {new_text}"]


def list_changes(changes: list[str], limit: int = 5) -> str:
    """Join ``config_changes`` entries for a message, the first ``limit`` of them."""
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def _without_source(card: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in card.items() if key != "source"}


def _task_index(study: StudyConfig, task: str) -> int:
    return [c.name for c in study.tasks].index(task)


def read_run_json(run_dir: Path) -> dict[str, Any] | None:
    file = run_dir / RUN_FILE
    if not file.exists():
        return None
    return read_json_file(file, "the run status", fix="delete it and rerun training")


def update_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    data = read_run_json(run_dir) or {}
    data.update(fields)
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(run_dir / RUN_FILE, data)
    return data


def truncate_train_log(run_dir: Path, step: int) -> int:
    """Drop the lines of ``train_log.jsonl`` logged after ``step``; return how many lines were dropped.

    A run resumes from its latest checkpoint, so what an interrupted process logged after that checkpoint is
    logged again as the steps are retrained. Dropping it first keeps each step once in the log. Lines that are
    not valid JSON are dropped too: a kill can tear the last line, and the next line would be appended to it.
    Lines without a ``step`` are kept. The file is replaced atomically.
    """
    file = run_dir / LOG_FILE
    if not file.exists():
        return 0
    lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
    remaining: list[str] = []
    torn = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        logged_at = record.get("step") if isinstance(record, dict) else None
        if isinstance(logged_at, (int, float)) and logged_at > step:
            continue
        remaining.append(line if line.endswith("\n") else line + "\n")
    dropped = sum(1 for line in lines if line.strip()) - len(remaining)
    if torn:
        logger.warning("%s: dropped %d line(s) that are not valid JSON, such as a last line cut off by a kill", file, torn)
    if dropped:
        write_text_atomic(file, "".join(remaining))
    return dropped


def is_finished(run_dir: Path) -> bool:
    data = read_run_json(run_dir)
    return bool(data and data.get("status") == "finished" and (run_dir / RESULTS_FILE).exists())


def unfinished_reason(run_dir: Path) -> str | None:
    """Return why a run's weights are not its trained model (None when they are).

    A run is trained when its run.json status is finished, or when its latest checkpoint reached the planned
    steps (training ended, and only the evaluation after it is missing or failed).
    """
    from usagg.train import checkpoint as ckpt

    data = read_run_json(run_dir) or {}
    status = data.get("status") or "not started"
    if status == "finished":
        return None
    pointer = ckpt.read_pointer(run_dir, "latest")
    saved = int(pointer["step"]) if pointer else 0
    steps = data.get("steps")
    if steps is not None and saved >= int(steps):
        return None
    return f"{status}, last checkpoint at step {saved} of {steps if steps is not None else 'an unknown number'}"


def load_run(run_dir: str | os.PathLike) -> tuple[StudyConfig, RunSpec]:
    """Read a run directory's resolved config and run spec."""
    folder = Path(run_dir)
    if not (folder / CONFIG_FILE).exists() or not (folder / RUN_FILE).exists():
        raise DataError(
            f"{folder}: not a run directory (needs {CONFIG_FILE} and {RUN_FILE}); "
            "give a folder like <output>/<study>/<paradigm>/<group>/frac-<f>/seed-<s>"
        )
    study = load_study(folder / CONFIG_FILE)
    data = read_run_json(folder) or {}
    if "spec" not in data:
        raise DataError(f"{folder / RUN_FILE}: missing 'spec'; the run directory is incomplete")
    return study, RunSpec.from_dict(data["spec"])


def study_dir(study: StudyConfig, output: Path | None = None) -> Path:
    return Path(output if output is not None else study.output) / study.name


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed), so parallel jobs append one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


TRAIN_LOCK_FILE = ".train.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[str | None]:
    """Try to hold the run's training lock; yield None when held, else the holder's description.

    An advisory POSIX record lock (``lockf``) on ``run_dir/.train.lock``. The kernel drops it when the holding
    process dies, so a killed run leaves no stale lock. Unlike ``flock`` it is not shared with forked children,
    so DataLoader workers that outlive a killed trainer for a moment do not keep it. The holder writes its host
    and process id into the file.
    NOTE: on network file systems without lock support two hosts may both take it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / TRAIN_LOCK_FILE, "a+") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            fh.seek(0)
            yield fh.read().strip() or "another process"
            return
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"process {os.getpid()} on {os.uname().nodename}")
            fh.flush()
            yield None
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)


def lock_holder(run_dir: Path) -> str | None:
    """Return the description of the process holding the run's training lock, or None when there is none.

    Only tests the lock: a shared lock, which needs no write access and conflicts with the trainer's exclusive
    one, is taken and dropped at once, and the file is left as it is (``--dry-run`` writes nothing).
    """
    file = run_dir / TRAIN_LOCK_FILE
    try:
        fh = open(file)
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return fh.read().strip() or "another process"
        fcntl.lockf(fh, fcntl.LOCK_UN)
    return None


def write_evaluation(
    run_dir: Path,
    study_folder: Path,
    split: str,
    results: pl.DataFrame,
    per_image: pl.DataFrame,
    meta: dict[str, Any],
    merge: bool = True,
) -> None:
    """Store one split's results in the run (replacing that split's old rows) and, with ``merge``, merge them
    into the study table."""
    append_results(results, run_dir / RESULTS_FILE, key=("run_id", "task", "metric", "split"))
    _replace_split_rows(run_dir / PER_IMAGE_FILE, per_image, split)
    meta_file = run_dir / RESULTS_META_FILE
    all_meta = read_json_file(meta_file, "the results metadata", fix="delete it and evaluate again") if meta_file.exists() else {}
    all_meta[split] = meta
    write_json_atomic(meta_file, all_meta)
    if merge:
        with locked(study_folder / ".results.lock"):
            append_results(results, study_folder / RESULTS_FILE)


def _replace_split_rows(file: Path, new: pl.DataFrame, split: str) -> None:
    if file.exists():
        old = pl.read_parquet(file).filter(pl.col("split") != split)
        new = pl.concat([old, new], how="vertical")
    with atomic_path(file) as tmp:
        new.write_parquet(tmp)


def finished_result_files(root: Path, files: list[Path]) -> tuple[list[Path], list[str]]:
    """Split results files into those of finished runs and a description of each unfinished run left out.

    A results file outside a run folder (no run.json beside it) is kept. Results of a run that stopped before its
    last step (evaluated with ``--allow-unfinished``) are not that run's results, so they are left out with a
    logged warning.
    """
    kept, left_out = [], []
    for file in files:
        reason = unfinished_reason(file.parent) if (file.parent / RUN_FILE).exists() else None
        if reason:
            left_out.append(f"{os.path.relpath(file.parent, root)} ({reason})")
        else:
            kept.append(file)
    if left_out:
        logger.warning(
            "%d run(s) with results are not finished and are left out: %s; finish them with usagg train STUDY",
            len(left_out), "; ".join(left_out),
        )
    return kept, left_out


def collect_results(study_folder: str | os.PathLike) -> tuple[Path, int, int]:
    """Merge every run's results.parquet under ``study_folder`` into ``study_folder/results.parquet``.

    Returns the table path, the number of runs and the number of rows. An output root with several studies
    (``<output>/<study>/...``) can also be given. Then each study gets its own table, and the root a merged one.
    """
    folder = Path(study_folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; give a study output directory such as runs/<study>")
    files, left_out = finished_result_files(
        folder, sorted(p for p in folder.rglob(RESULTS_FILE) if (p.parent / RUN_FILE).exists())
    )
    if not files:
        found = "no results of finished runs" if left_out else "no run results"
        raise DataError(f"{folder}: {found} found below this folder; train or evaluate runs first")
    tables = [read_results(f) for f in files]
    merged = pl.concat(tables, how="vertical").unique(subset=["run_id", "task", "metric", "split", "study"], keep="last")
    merged = merged.sort(["study", "paradigm", "group", "data_fraction", "seed", "task", "split", "metric"])
    studies = merged["study"].unique().to_list()
    if len(studies) == 1 and (folder.name == studies[0] or not (folder / studies[0]).is_dir()):
        out = write_results(merged, folder / RESULTS_FILE)
    else:
        for name in studies:
            write_results(merged.filter(pl.col("study") == name), folder / name / RESULTS_FILE)
        out = folder / RESULTS_FILE
        write_results(merged, out)
    return out, len(files), merged.height
