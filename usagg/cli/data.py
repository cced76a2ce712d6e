"""CLI commands of the data stage: ``usagg data check`` and ``usagg data show``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
)
from rich.table import Table

from usagg.errors import UsaggError

data_app = typer.Typer(help="Check data sources and draw their labels.", no_args_is_help=True)
console = Console()

# Warnings printed by `data show` before "... and N more".
MAX_WARNINGS = 10


def _widen_for_files() -> None:
    """Give piped or redirected output room for the tables (rich falls back to 80 columns there)."""
    # Measure afresh on every command (COLUMNS or the terminal), so one command's widening does not stick.
    console.width = None  # type: ignore[assignment]
    if not console.is_terminal and console.width < 160:
        console.width = 160


def _size_text(report) -> str:
    if report.size_min_hw is None:
        return "-"
    (h0, w0), (h1, w1) = report.size_min_hw, report.size_max_hw
    if (h0, w0) == (h1, w1):
        return f"{h0}x{w0}"
    return f"{h0}-{h1} x {w0}-{w1}"


def _class_text(report) -> str:
    card = report.card
    if card.kind == "scalar" and report.value_range is not None:
        return f"{report.value_range[0]:g} .. {report.value_range[1]:g}"
    if card.kind == "keypoints":
        return f"{card.num_keypoints} points per image"
    parts = []
    for split in ("train", "val", "test"):
        counts = report.class_counts.get(split)
        if counts:
            parts.append(f"{split} " + " ".join(f"{name}:{n}" for name, n in counts.items()))
    text = "\n".join(parts) or "-"
    if card.kind == "segmentation" and parts:
        text = "images with class c>0\n" + text
    if card.kind == "detection" and report.boxes_per_image is not None:
        low, high = report.boxes_per_image
        text += f"\nboxes per image {low}" + (f"-{high}" if high != low else "")
    return text


def _summary_table(result) -> Table:
    table = Table(title=escape(f"usagg data check: {result.path} [{result.kind}]"), show_lines=True)
    for column in ("task", "type", "labels", "train", "val", "test", "per class", "image size (h x w)", "spacing", "errors", "warnings"):
        table.add_column(column, justify="right" if column in ("train", "val", "test", "errors", "warnings") else "left")
    for report in result.tasks:
        counts = report.split_counts
        errors, warnings = len(report.errors), len(report.warnings)
        table.add_row(
            escape(report.card.name),
            # The card's type, as the results table and the analyses name it, with the kind of regression.
            report.card.type.value + (f" ({report.card.kind})" if report.card.kind in ("keypoints", "scalar") else ""),
            escape(report.labels_text()),
            str(counts["train"]),
            str(counts["val"]),
            str(counts["test"]),
            escape(_class_text(report)),
            _size_text(report),
            f"{report.with_spacing}/{len(report.records)}",
            f"[red]{errors}[/]" if errors else "0",
            f"[yellow]{warnings}[/]" if warnings else "0",
        )
    return table


def _problem_table(problems, limit: int) -> Table:
    """Tabulate the problems, one row for each that several tasks share (a missing data folder of a study)."""
    merged: dict[tuple, list[str]] = {}
    for problem in problems:
        key = (problem.fatal, problem.location, problem.message, problem.fix)
        merged.setdefault(key, []).append(problem.task or "(all)")
    table = Table(title=f"problems ({len(problems)})", show_lines=False)
    for column in ("", "task", "where", "problem", "fix"):
        table.add_column(column, overflow="fold")
    rows = list(merged.items())
    for (fatal, location, message, fix), tasks in rows if limit <= 0 else rows[:limit]:
        table.add_row(
            "[red]error[/]" if fatal else "[yellow]warning[/]",
            escape(", ".join(dict.fromkeys(tasks))),
            escape(location),
            escape(message),
            escape(fix),
        )
    return table


@data_app.command("check")
def check(
    path: Annotated[Path, typer.Argument(help="A study YAML, or a dataset folder whose layout is detected.", metavar="PATH")],
    task: Annotated[list[str] | None, typer.Option("--task", "-t", metavar="TASK", help="Check only this task (repeatable).")] = None,
    max_problems: Annotated[int, typer.Option(help="Rows of the problem table to print (0 prints all).")] = 200,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the full report to this JSON file.")] = None,
) -> None:
    """Read every sample and report per task the type, labels, counts per split and class, image sizes and every
    problem found. Exits with status 1 if any problem would break training."""
    from usagg.data.check import inspect_cards, select_cards
    from usagg.data.problems import ProblemLog

    _widen_for_files()
    log = ProblemLog(strict=False)
    # Resolve the path, study and task names before any progress display, so that an error prints alone.
    cards, data_cfg, kind, others = select_cards(path, task or None, log)
    # The progress display is for terminals; in a pipe or file it would only leave an empty line.
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )
    def on_task(card, _):
        handle = progress.add_task(f"checking {card.name}", total=None)
        return lambda k: progress.advance(handle, k)

    with progress:
        result = inspect_cards(path, cards, data_cfg, kind, log.problems, on_task, others)
    console.print(_summary_table(result))
    problems = sorted(result.all_problems, key=lambda p: (not p.fatal, p.task, str(p.file or ""), p.row or 0))
    if problems:
        table = _problem_table(problems, max_problems)
        console.print(table)
        if 0 < max_problems < len(problems) and table.row_count >= max_problems:
            where = f"all are in {json_out}" if json_out is not None else "rerun with --max-problems 0 or --json FILE to see all"
            console.print(escape(f"... and {len(problems) - max_problems} more; {where}"))
    if json_out is not None:
        _write_json(result, json_out)
    errors = sum(p.fatal for p in problems)
    if errors:
        console.print(f"[red]{errors} error(s)[/] would break training; fix them and rerun `usagg data check`.")
        raise typer.Exit(1)
    console.print("[green]no errors[/]" + (f" ({len(problems)} warning(s))" if problems else ""))


def _write_json(result, out: Path) -> None:
    from usagg.io import write_json_atomic

    payload = {
        "path": str(result.path),
        "kind": result.kind,
        "tasks": [
            {
                "task": r.card.name,
                "type": r.card.type.value,
                "kind": r.card.kind,
                "num_classes": r.card.num_classes,
                "num_keypoints": r.card.num_keypoints,
                "splits": r.split_counts,
                "class_counts": r.class_counts,
                "size_min_hw": r.size_min_hw,
                "size_max_hw": r.size_max_hw,
                "with_spacing": r.with_spacing,
            }
            for r in result.tasks
        ],
        "problems": [
            {"severity": "error" if p.fatal else "warning", "task": p.task, "file": p.file, "row": p.row, "message": p.message, "fix": p.fix}
            for p in result.all_problems
        ],
    }
    write_json_atomic(out, payload)


@data_app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="A study YAML, or a dataset folder whose layout is detected.", metavar="PATH")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task to draw.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o",
            help="Figure file to write: .png, .jpg, .jpeg, .pdf, .svg, .tif, .tiff or .webp; a name without a suffix "
            "gets .png.",
        ),
    ],
    n: Annotated[int, typer.Option("--n", help="Number of samples to draw.", min=1)] = 8,
    split: Annotated[str | None, typer.Option("--split", help="Draw only samples of this split (train, val or test).")] = None,
    transformed: Annotated[bool, typer.Option("--transformed", help="Draw samples after the training transform (augmentation, resize).")] = False,
) -> None:
    """Draw a grid of samples with their masks, boxes, keypoints or labels over the image. Samples that cannot be
    decoded, or whose labels do not fit the image, are left out with a warning naming the file and row. So are rows
    of a label file with a bad cell or a missing image (training stops on those; `usagg data check` lists them all)."""
    from usagg.data.check import cards_for_path, read_split_context
    from usagg.data.problems import ProblemLog
    from usagg.data.show import figure_path, render_samples
    from usagg.data.sources import read_source
    from usagg.data.splits import SPLITS, split_study_records

    if split is not None and split not in SPLITS:
        raise UsaggError(f"--split {split!r} is invalid; use train, val or test")
    # Checked before any data is read, so that a bad --out fails at once.
    out = figure_path(out)
    _widen_for_files()
    # Not strict, because a mask that cannot be decoded during layout detection only means one sample to skip.
    log = ProblemLog(strict=False)
    cards, data_cfg, _ = cards_for_path(path, log)
    chosen = [c for c in cards if c.name == task]
    if not chosen:
        raise UsaggError(f"{path}: unknown task {task!r}; tasks here: {', '.join(c.name for c in cards)}")
    card = chosen[0]
    # A bad row in a label file leaves that sample out and is listed below, like an image that cannot be decoded.
    source_log = ProblemLog(strict=False)
    records = read_source(card, source_log)
    if not records:
        first = next((f"; first problem: {p}" for p in source_log.problems if p.fatal), "")
        raise UsaggError(f"task {card.name}: no sample could be read{first}")
    if split is not None:
        # Split with the other tasks, as training does: an image they share lands in one split for all of them.
        others = read_split_context([c for c in cards if c.name != card.name])
        records = split_study_records(cards, {**others, card.name: records}, data_cfg)[card.name][split]
    drawing = render_samples(card, records, out, n=n, data_cfg=data_cfg, transformed=transformed,
                           title=f"{card.name} ({card.kind})" + (f", {split} split" if split else "") + (", transformed" if transformed else ""))
    problems = list(source_log.problems) + list(drawing.skipped)
    seen = {p.message for p in problems}
    # Layout detection decodes masks of every task; keep this task's problems that no skipped sample repeats.
    problems += [p for p in log.problems if p.task == card.name and p.message not in seen]
    for problem in problems[:MAX_WARNINGS]:
        console.print(f"[yellow]warning:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
    if len(problems) > MAX_WARNINGS:
        console.print(f"... and {len(problems) - MAX_WARNINGS} more", highlight=False)
    parts = [f"{len(drawing.skipped)} left out"] if drawing.skipped else []
    label_errors = sum(p.fatal for p in source_log.problems)
    if label_errors:
        parts.append(f"{label_errors} label-file error(s)")
    note = f"; {', '.join(parts)}, run `usagg data check {path}` to list every problem" if parts else ""
    console.print(f"wrote {escape(str(drawing.path))} ({drawing.drawn} sample(s){escape(note)})", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    from usagg.cli.synth import add_synth_command

    add_synth_command(data_app)
    app.add_typer(data_app, name="data")
