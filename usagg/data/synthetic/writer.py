"""Write the synthetic benchmark to disk in the FMC_UIA layout, with relations, provenance and a manifest.

Output folder::

    OUT/
      train/ val/ test/                 three FMC_UIA roots with the same layout
        csv_files/<task>.csv            paths relative to csv_files/, starting with ../
        Segmentation/<Two|Three|Five>/SYN_<ORGAN>/IMAGES/*.png  and  .../MASKS/*.png
        Classification/SYN_<ORGAN>/IMAGES/*.png   Detection/...   Regression/...
        provenance.csv                  image -> organ, pixel size (mm) and latent factors
      scalar/train/ scalar/val/ scalar/test/
        <task>.csv                      scalar_csv source: path,value,unit,pixel_spacing_mm
        images/*.png   provenance.csv
      relations.csv                     ground-truth task x task relatedness in [-1, 1]
      manifest.json                     generator version, configuration, per-task facts, content digest
      README.md

The images are drawn in chunks of CHUNK_SIZE, each with its own random generator keyed by (seed, task, split,
chunk), so the output is byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from usagg import __version__
from usagg.data.synthetic.render import SPLITS, render_task_batch, unit_rng
from usagg.data.synthetic.tasks import (
    PRESETS,
    TASK_BY_NAME,
    TASKS,
    SyntheticTask,
    pixel_spacing_mm,
    relation_matrix,
)
from usagg.errors import ConfigError, DataError
from usagg.io import read_json_file, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

# Bump when a change alters the generated files for a given configuration.
GENERATOR_VERSION = 1
CHUNK_SIZE = 32
MANIFEST = "manifest.json"
# Entries this generator creates in the output folder; only these are replaced by --overwrite.
OUTPUT_ENTRIES = ("train", "val", "test", "scalar", "relations.csv", "README.md", MANIFEST)
_CLASS_COUNT_WORDS = {2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six", 7: "Seven", 8: "Eight"}
_PNG_COMPRESS_LEVEL = 1  # fast zlib level: files about 5 % larger than the default level, written 3x faster


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines the generated files."""

    preset: str
    seed: int
    image_size: int
    train_sizes: dict[str, int]
    val_size: int
    test_size: int

    @property
    def tasks(self) -> tuple[SyntheticTask, ...]:
        return tuple(TASK_BY_NAME[name] for name in self.train_sizes)

    def split_size(self, task: str, split: str) -> int:
        return {"train": self.train_sizes[task], "val": self.val_size, "test": self.test_size}[split]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_config(
    preset: str = "small",
    seed: int = 0,
    image_size: int | None = None,
    train_sizes: Mapping[str, int] | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    tasks: Sequence[str] | None = None,
) -> SynthConfig:
    """Build a configuration from a preset, with optional overrides; raises ConfigError on invalid values.

    ``train_sizes`` overrides the training-set size of the named tasks; ``tasks`` keeps only the named tasks.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    sizes = dict(base.train_sizes)
    for name, value in (train_sizes or {}).items():
        if name not in sizes:
            raise ConfigError(f"train size given for unknown synthetic task {name!r}; known tasks: {', '.join(sizes)}")
        sizes[name] = int(value)
    if tasks is not None:
        unknown = [name for name in tasks if name not in sizes]
        if unknown:
            raise ConfigError(f"unknown synthetic task(s) {', '.join(unknown)}; known tasks: {', '.join(sizes)}")
        sizes = {name: sizes[name] for name in sizes if name in set(tasks)}
    config = SynthConfig(
        preset=preset,
        seed=int(seed),
        image_size=int(image_size if image_size is not None else base.image_size),
        train_sizes=sizes,
        val_size=int(val_size if val_size is not None else base.val_size),
        test_size=int(test_size if test_size is not None else base.test_size),
    )
    if config.image_size < 32 or config.image_size % 2:
        raise ConfigError(f"synthetic image size {config.image_size} px is invalid; use an even number of at least 32")
    for name, value in [*(("train size of " + k, v) for k, v in sizes.items()), ("val size", config.val_size), ("test size", config.test_size)]:
        if value < 1:
            raise ConfigError(f"synthetic {name} is {value}; every split needs at least 1 image")
    if not sizes:
        raise ConfigError("no synthetic tasks selected")
    return config


@dataclass
class SynthSummary:
    """Result of one ``generate_benchmark`` call: the benchmark written, or the one found already in place."""

    out: Path
    config: SynthConfig
    counts: dict[str, dict[str, int]]  # task -> split -> images
    seconds: float
    digest: str
    reused: bool = False
    workers: int = 1

    @property
    def num_images(self) -> int:
        return sum(sum(splits.values()) for splits in self.counts.values())

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("nan")


# --- layout ----------------------------------------------------------------------------------------


def _dataset_folder(task: SyntheticTask) -> str:
    return f"SYN_{task.organ.upper()}"


def task_image_dir(task: SyntheticTask) -> str:
    """Folder of the task's images inside its root, relative to the root (FMC_UIA type folders)."""
    if task.kind == "segmentation":
        return f"Segmentation/{_CLASS_COUNT_WORDS[task.num_classes]}/{_dataset_folder(task)}/IMAGES"
    if task.kind == "classification":
        return f"Classification/{_dataset_folder(task)}/IMAGES"
    if task.kind == "detection":
        return f"Detection/{_dataset_folder(task)}/IMAGES"
    if task.kind == "keypoints":
        return f"Regression/{_dataset_folder(task)}/IMAGES"
    return "images"


def task_root(task: SyntheticTask, split: str) -> str:
    """Root of the task's split, relative to the output folder: ``<split>`` or ``scalar/<split>``."""
    return f"scalar/{split}" if task.kind == "scalar" else split


def csv_columns(task: SyntheticTask) -> list[str]:
    """Column names of the task's CSV, in order."""
    if task.kind == "scalar":
        return ["path", "value", "unit", "pixel_spacing_mm"]
    head = ["image_path", "task_id", "task_name", "num_classes"]
    if task.kind == "segmentation":
        return [*head, "mask_path"]
    if task.kind == "classification":
        return [*head, "mask"]
    if task.kind == "detection":
        return [*head, "x_min", "y_min", "x_max", "y_max"]
    return [*head, *(f"point_{k}_xy" for k in range(1, task.num_keypoints + 1))]


PROVENANCE_COLUMNS = ["task_id", "image_path", "organ", "pixel_size_mm", "latents"]


# --- one chunk of images ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    staging: str
    task: str
    split: str
    chunk: int
    start: int
    count: int
    seed: int
    image_size: int


def _save_png(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    path.write_bytes(buffer.getvalue())


def _point_json(x: float, y: float) -> str:
    return json.dumps([round(float(x), 2), round(float(y), 2)])


def _render_unit(unit: _Unit) -> tuple[str, str, int, list[list[Any]], list[list[Any]]]:
    """Render and write one chunk; returns (task, split, chunk, CSV rows, provenance rows)."""
    task = TASK_BY_NAME[unit.task]
    rng = unit_rng(unit.seed, unit.task, unit.split, unit.chunk)
    batch = render_task_batch(task, rng, unit.count, unit.image_size, offset=unit.start)
    root = Path(unit.staging) / task_root(task, unit.split)
    image_dir = task_image_dir(task)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    if task.kind == "segmentation":
        (root / image_dir).parent.joinpath("MASKS").mkdir(parents=True, exist_ok=True)

    rows: list[list[Any]] = []
    provenance: list[list[Any]] = []
    for i in range(unit.count):
        file_name = f"{task.name}_{unit.start + i:05d}.png"
        _save_png(batch.images[i], root / image_dir / file_name)
        # FMC_UIA paths are relative to csv_files/; scalar_csv paths are relative to the root.
        image_path = f"images/{file_name}" if task.kind == "scalar" else f"../{image_dir}/{file_name}"
        head = [image_path, task.name, task.fmc_task_name, task.num_classes or task.num_keypoints]
        if task.kind == "segmentation":
            mask_dir = image_dir.rsplit("/", 1)[0] + "/MASKS"
            _save_png(batch.masks[i], root / mask_dir / file_name)
            rows.append([*head, f"../{mask_dir}/{file_name}"])
        elif task.kind == "classification":
            rows.append([*head, int(batch.labels[i])])
        elif task.kind == "detection":
            rows.append([*head, *(int(v) for v in batch.boxes[i])])
        elif task.kind == "keypoints":
            rows.append([*head, *(_point_json(x, y) for x, y in batch.keypoints[i])])
        else:
            rows.append([image_path, round(float(batch.values[i]), 3), task.unit, round(float(batch.spacing_mm[i]), 6)])
        latents = json.dumps(batch.latents[i], sort_keys=True)
        provenance.append([task.name, image_path, batch.organs[i], round(float(batch.spacing_mm[i]), 6), latents])
    return unit.task, unit.split, unit.chunk, rows, provenance


def _plan_units(config: SynthConfig, staging: Path) -> list[_Unit]:
    units = []
    for task in config.tasks:
        for split in SPLITS:
            total = config.split_size(task.name, split)
            for chunk, start in enumerate(range(0, total, CHUNK_SIZE)):
                count = min(CHUNK_SIZE, total - start)
                units.append(_Unit(str(staging), task.name, split, chunk, start, count, config.seed, config.image_size))
    # Large units first so that the process pool finishes evenly.
    return sorted(units, key=lambda u: -u.count)


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Keep BLAS/OpenMP in worker processes to one thread each; the pool is the parallelism."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ.setdefault(name, "1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def default_workers() -> int:
    """Worker processes used by default: two, or one on a single-core machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def _run_units(units: list[_Unit], workers: int) -> list[tuple[str, str, int, list[list[Any]], list[list[Any]]]]:
    if workers <= 1 or len(units) <= 1:
        return [_render_unit(unit) for unit in units]
    # spawn: workers start clean, whatever threads (torch, BLAS) the parent process already runs. A worker that
    # dies raises BrokenProcessPool here instead of being replaced silently.
    context = multiprocessing.get_context("spawn")
    with single_threaded_children(), ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_render_unit, units))


# --- whole benchmark -------------------------------------------------------------------------------


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def relations_csv_text(tasks: Sequence[SyntheticTask] = TASKS) -> str:
    """Render the relations table as CSV text: header ``task,<names...>``, one row per task."""
    matrix = relation_matrix(tasks)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", *(t.name for t in tasks)])
    for task, row in zip(tasks, matrix):
        writer.writerow([task.name, *(f"{v:.2f}" for v in row)])
    return buffer.getvalue()


def dataset_digest(out: str | os.PathLike) -> str:
    """SHA-256 over every file's relative path and content, in sorted order, leaving out the manifest."""
    root = Path(out)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST or relative.startswith("."):
            continue
        digest.update(relative.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _task_facts(config: SynthConfig, task: SyntheticTask) -> dict[str, Any]:
    return {
        "type": task.task_type,
        "kind": task.kind,
        "organ": task.organ,
        "group": task.group,
        "num_classes": task.num_classes,
        "class_names": list(task.class_names) if task.class_names else None,
        "num_keypoints": task.num_keypoints,
        "target": task.target,
        "unit": task.unit,
        "format": "scalar_csv" if task.kind == "scalar" else "fmc_uia",
        "roots": {split: task_root(task, split) for split in SPLITS},
        "csv": f"{task.name}.csv" if task.kind == "scalar" else f"csv_files/{task.name}.csv",
        "pixel_spacing_mm": pixel_spacing_mm(task, config.image_size),
        "factors": sorted(task.factors),
        "nuisance": sorted(task.nuisance),
        "description": task.description,
        "counts": {split: config.split_size(task.name, split) for split in SPLITS},
    }


def _readme_text(config: SynthConfig) -> str:
    return (
        "# usagg synthetic ultrasound benchmark\n\n"
        f"Generated by `usagg data synth` (usagg {__version__}, generator version {GENERATOR_VERSION}), "
        f"preset `{config.preset}`, seed {config.seed}, {config.image_size} x {config.image_size} px.\n"
        "Every image is simulated; no patient data is involved.\n\n"
        "- `train/`, `val/`, `test/`: FMC_UIA layout (`csv_files/<task>.csv`, paths relative to `csv_files/`).\n"
        "- `scalar/<split>/<task>.csv`: scalar regression targets (`path,value,unit,pixel_spacing_mm`).\n"
        "- `<split>/provenance.csv`: organ, pixel size in mm and latent factors of every image.\n"
        "- `relations.csv`: ground-truth task relatedness in [-1, 1] (positive: shared latent factors; "
        "negative: designed conflict).\n"
        "- `manifest.json`: configuration, per-task facts and the SHA-256 digest of all other files.\n\n"
        "See docs/synthetic.md in the usagg repository for what is simulated and its limits.\n"
    )


def _prepare_output(out: Path, config: SynthConfig, overwrite: bool) -> SynthSummary | None:
    """Return the existing benchmark when it matches ``config``; clear or reject anything else in ``out``."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder; choose a folder for --out")
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = read_json_file(manifest_path, "the manifest", fix="delete the folder and generate again")
        same = manifest.get("generator_version") == GENERATOR_VERSION and manifest.get("config") == config.to_json()
        if same and not overwrite:
            counts = {name: facts["counts"] for name, facts in manifest["tasks"].items()}
            return SynthSummary(out=out, config=config, counts=counts, seconds=0.0, digest=manifest["digest"], reused=True)
        if not same and not overwrite:
            raise DataError(
                f"{out}: contains a synthetic benchmark made with another configuration "
                f"(preset {manifest.get('config', {}).get('preset')!r}, seed {manifest.get('config', {}).get('seed')!r}); "
                "replace it with --overwrite (overwrite=True in Python) or choose another output folder"
            )
        for name in OUTPUT_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return None
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".synth-partial-")):
        raise DataError(
            f"{out}: folder is not empty and contains no synthetic benchmark ({MANIFEST} missing); "
            "choose an empty or new --out folder"
        )
    return None


def generate_benchmark(
    out: str | os.PathLike,
    config: SynthConfig | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> SynthSummary:
    """Generate the benchmark into ``out``, or reuse it when ``out`` already contains the same configuration.

    Files are written into a hidden staging folder inside ``out`` and moved into place when every image is done;
    the manifest is written last, so a folder with a manifest is always complete.
    """
    config = config or make_config()
    if not isinstance(config, SynthConfig):
        raise ConfigError(
            f"config must be a SynthConfig, e.g. make_config('small', seed=0); got {type(config).__name__} {config!r}"
        )
    out = Path(out)
    existing = _prepare_output(out, config, overwrite)
    if existing is not None:
        logger.info("%s already contains this synthetic benchmark (digest %s); nothing to do", out, existing.digest[:12])
        return existing
    workers = default_workers() if workers is None else max(1, int(workers))

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".synth-partial-*"):  # left by an interrupted run; one generator per folder at a time
        logger.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale)
    staging = out / f".synth-partial-{os.getpid()}"
    start = time.perf_counter()
    try:
        units = _plan_units(config, staging)
        logger.info(
            "generating %d images for %d tasks at %d px with %d worker(s)",
            sum(u.count for u in units), len(config.tasks), config.image_size, workers,
        )
        results = _run_units(units, workers)
        _write_tables(staging, config, results)
        for name in OUTPUT_ENTRIES:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    digest = dataset_digest(out)
    seconds = time.perf_counter() - start
    manifest = {
        "generator": "usagg.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "usagg_version": __version__,
        "config": config.to_json(),
        "tasks": {task.name: _task_facts(config, task) for task in config.tasks},
        "relations": "relations.csv",
        "digest": digest,
    }
    write_json_atomic(out / MANIFEST, manifest)
    counts = {task.name: {split: config.split_size(task.name, split) for split in SPLITS} for task in config.tasks}
    summary = SynthSummary(out=out, config=config, counts=counts, seconds=seconds, digest=digest, workers=workers)
    logger.info("wrote %d images to %s in %.1f s (%.0f images/s)", summary.num_images, out, seconds, summary.images_per_s)
    return summary


def _write_tables(staging: Path, config: SynthConfig, results: list[tuple[str, str, int, list, list]]) -> None:
    by_key: dict[tuple[str, str], list[tuple[int, list, list]]] = {}
    for task, split, chunk, rows, provenance in results:
        by_key.setdefault((task, split), []).append((chunk, rows, provenance))
    provenance_by_root: dict[str, list[list[Any]]] = {}
    for task in config.tasks:
        for split in SPLITS:
            chunks = sorted(by_key[(task.name, split)], key=lambda item: item[0])
            rows = [row for _, chunk_rows, _ in chunks for row in chunk_rows]
            root = task_root(task, split)
            csv_path = staging / root / (f"{task.name}.csv" if task.kind == "scalar" else f"csv_files/{task.name}.csv")
            _write_csv(csv_path, csv_columns(task), rows)
            provenance_by_root.setdefault(root, []).extend(row for _, _, prov in chunks for row in prov)
    for root, rows in provenance_by_root.items():
        _write_csv(staging / root / "provenance.csv", PROVENANCE_COLUMNS, rows)
    write_text_atomic(staging / "relations.csv", relations_csv_text(config.tasks))
    write_text_atomic(staging / "README.md", _readme_text(config))
