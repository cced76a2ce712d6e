"""``usagg data synth``: generate the built-in synthetic ultrasound benchmark."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usagg.errors import ConfigError

console = Console()


class PresetName(str, Enum):
    small = "small"
    medium = "medium"


def _parse_train_sizes(items: list[str] | None) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise ConfigError(f"--train-size {item!r} is invalid; write TASK=N, for example --train-size fetal_hc_mm=40")
        sizes[name.strip()] = int(value)
    return sizes


def _summary_table(summary) -> Table:
    from usagg.data.synthetic.tasks import TASK_BY_NAME, pixel_spacing_mm
    from usagg.data.synthetic.writer import task_root

    title = f"usagg data synth: {summary.out} (preset {summary.config.preset}, seed {summary.config.seed})"
    table = Table(title=escape(title))
    for column in ("task", "type", "organ", "group", "train", "val", "test", "root", "mm/px"):
        table.add_column(column, justify="right" if column in ("train", "val", "test", "mm/px") else "left")
    for name, counts in summary.counts.items():
        task = TASK_BY_NAME[name]
        spacing = pixel_spacing_mm(task, summary.config.image_size)
        table.add_row(
            escape(name),
            task.kind,
            escape(task.organ),
            escape(task.group),
            str(counts["train"]),
            str(counts["val"]),
            str(counts["test"]),
            escape(str(task_root(task, "train"))),
            "mixed" if spacing is None else f"{spacing:.4f}",
        )
    return table


def add_synth_command(data_app: typer.Typer) -> None:
    """Add the ``synth`` command to the ``data`` sub-app."""

    @data_app.command("synth")
    def synth(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created; must be empty or contain a benchmark made by this command).")],
        preset: Annotated[PresetName, typer.Option(help="Benchmark size: small (128 px, 16-240 training images per task) or medium (256 px, 40-2000).")] = PresetName.small,
        seed: Annotated[int, typer.Option(help="Random seed; the same seed and options give byte-identical files.")] = 0,
        image_size: Annotated[int | None, typer.Option(help="Image side in pixels, overriding the preset.")] = None,
        train_size: Annotated[list[str] | None, typer.Option("--train-size", metavar="TASK=N", help="Training images of one task, as TASK=N (repeatable).")] = None,
        val_size: Annotated[int | None, typer.Option(help="Validation images per task, overriding the preset.")] = None,
        test_size: Annotated[int | None, typer.Option(help="Test images per task, overriding the preset.")] = None,
        task: Annotated[list[str] | None, typer.Option("--task", "-t", metavar="TASK", help="Generate only this task (repeatable).")] = None,
        workers: Annotated[int | None, typer.Option(help="Worker processes (default: 2, or 1 on a single core).", min=1)] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a benchmark made with other options in --out.")] = False,
    ) -> None:
        """Generate the synthetic B-mode benchmark (5 anatomies, 15 tasks, known task relations) in the FMC_UIA
        layout, with relations.csv and a manifest. Reuses --out when it already contains the same benchmark."""
        from usagg.data.synthetic import generate_benchmark, make_config

        config = make_config(
            preset=preset.value,
            seed=seed,
            image_size=image_size,
            train_sizes=_parse_train_sizes(train_size),
            val_size=val_size,
            test_size=test_size,
            tasks=task or None,
        )
        summary = generate_benchmark(out, config, workers=workers, overwrite=overwrite)
        if not console.is_terminal and console.width < 140:
            console.width = 140  # piped output: room for the table instead of rich's 80-column fallback
        console.print(_summary_table(summary))
        if summary.reused:
            console.print(f"{escape(str(summary.out))} already contains this benchmark ({summary.num_images} images); nothing written")
        else:
            console.print(
                f"wrote {summary.num_images} images in {summary.seconds:.1f} s "
                f"({summary.images_per_s:.0f} images/s, {summary.workers} worker(s)); digest {summary.digest[:16]}"
            )
