"""CLI commands of the plots stage: ``usagg plot`` and ``usagg reproduce``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usagg.cli.tables import output_console
from usagg.errors import ConfigError

console = Console()


def plot(
    figure: Annotated[Optional[str], typer.Option("--figure", "-f", help="Figure name; see --list.")] = None,
    inputs: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Results table (.parquet/.csv), run directories or a study output folder.", metavar="RESULTS"),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder the figure files are written to.")] = Path("figures"),
    formats: Annotated[str, typer.Option("--format", help="Comma-separated output formats: pdf, png, svg.")] = "pdf,png",
    options: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", metavar="KEY=VALUE", help="Figure option KEY=VALUE, e.g. -O fraction=0.5 or -O methods=lookahead,experts; repeatable."),
    ] = None,
    list_figures: Annotated[bool, typer.Option("--list", help="List the figures with one line each and exit.")] = False,
) -> None:
    """Draw one publication figure (PDF with embedded TrueType fonts, 300 dpi PNG, SVG) and its data as CSV."""
    from usagg.plots.inputs import FigureInputs
    from usagg.plots.registry import get_figure, load_figures, parse_options, render_figure

    if list_figures:
        figures = load_figures()
        width = max(len(name) for name in figures)
        for name, spec in figures.items():
            options_text = f" Options: {', '.join(spec.options())}." if spec.options() else ""
            typer.echo(f"{name:<{width}}  {spec.description}{options_text}")
        return
    if figure is None:
        raise ConfigError("name a figure with --figure NAME (see `usagg plot --list`)")
    if not inputs:
        raise ConfigError(f"give the input of figure {figure!r}: a results table, run directories or a study output folder")
    spec = get_figure(figure)
    rendered = render_figure(figure, FigureInputs.from_paths(inputs), out, formats, **parse_options(spec, options or []))
    for path in rendered.paths:
        console.print(escape(str(path)), highlight=False)
    for note in rendered.notes:
        console.print(f"note: {escape(str(note))}", highlight=False)
    if rendered.layout_problems:
        console.print(f"[yellow]warning:[/] {len(rendered.layout_problems)} layout problem(s); see the log above")


def reproduce(
    study: Annotated[Optional[Path], typer.Argument(help="Study YAML; omit with --quick for the synthetic benchmark.", metavar="STUDY.yaml")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Without a study: generate the small synthetic benchmark and train tiny models (5-7 minutes on 2 idle CPU cores).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Root of the run directories; default the study's output (usagg-output/runs for --quick).")] = None,
    figures_dir: Annotated[Optional[Path], typer.Option("--figures", help="Folder for the figures; default figures/ with --quick, else <output>/<study>/figures.")] = None,
    formats: Annotated[str, typer.Option("--format", help="Comma-separated figure formats: pdf, png, svg.")] = "pdf,png",
    device: Annotated[str, typer.Option(help="auto (GPU when available), cpu or cuda.")] = "auto",
    train: Annotated[bool, typer.Option("--train/--no-train", help="--no-train analyses the results already on disk.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show training progress bars.")] = True,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a study key, e.g. --set train.epochs=2; repeatable. A relative path is taken from the current folder.")] = None,
) -> None:
    """Run a study end to end: data check, training, evaluation, analyses, figures and a report.

    Rerunning the same command resumes: finished runs are skipped and interrupted runs continue.
    """
    from usagg.plots.style import parse_formats
    from usagg.reproduce.pipeline import ReproduceOptions, reproduce as run_reproduce

    parsed: dict[str, object] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, for example --set train.epochs=2")
        parsed[key.strip()] = yaml.safe_load(value)
    result = run_reproduce(
        ReproduceOptions(
            study=study,
            quick=quick,
            output=output,
            figures_dir=figures_dir,
            formats=parse_formats(formats),
            device=device,
            overrides=parsed,
            train=train,
            progress=progress,
        )
    )
    table = Table(title=escape(f"usagg reproduce: {result.study_name}"))
    for column in ("stage", "status", "seconds", "detail"):
        table.add_column(column, justify="right" if column == "seconds" else "left", overflow="fold")
    for record in result.stages:
        table.add_row(escape(record.name), escape(record.status), f"{record.seconds:.1f}", escape(record.detail))
    output_console(console).print(table)
    console.print(f"figures: {escape(str(result.figures_dir))}", highlight=False)
    console.print(f"report:  {escape(str(result.report_html))}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    app.command("plot")(plot)
    app.command("reproduce")(reproduce)
