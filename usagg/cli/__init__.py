"""The ``usagg`` command line: a thin typer layer over the library.

Each sub-module registers the commands of one stage of the data flow and calls one library function per command.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from usagg import __version__
from usagg.errors import UsaggError
from usagg.log import configure_logging, process_rank

app = typer.Typer(
    name="usagg",
    help="Task-aggregation analysis for multi-task ultrasound foundation models (M2DINO).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: typer 0.29's rich help prints a type such as <bool> after every flag, which reads as if the
    # flag took a value.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)

err_console = Console(stderr=True)
logger = logging.getLogger(__name__)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"usagg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False, help="Show debug logging (-vv adds source locations).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show only warnings and errors.")] = False,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    configure_logging(verbose, quiet)


def _register_commands() -> None:
    from usagg.cli import analysis, bench, data, plots, train

    for module in (data, train, analysis, plots, bench):
        module.register(app)


_register_commands()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Run the ``usagg`` console script (also ``python -m usagg``) and exit with the command's status.

    typer runs in standalone mode, so typer itself prints usage errors (status 2) and exits with the code of
    ``typer.Exit``. This works whether typer uses its vendored click (as 0.29 does) or the click package. A
    ``UsaggError`` is printed as one line, with status 2. typer turns Ctrl-C into status 130, which gets a resume
    hint, and SIGTERM is handled as Ctrl-C.
    """
    # A job scheduler or `timeout` stops a job with SIGTERM. Raising KeyboardInterrupt lets a run record
    # itself as interrupted, as Ctrl-C does, instead of dying with run.json still saying "running".
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except UsaggError as exc:
        # One unbroken line, so that a log file keeps the whole message on one line for grep.
        # Under torchrun each process raises the same error; name the rank so that repeats read as such.
        rank = process_rank()
        where = f"rank {rank}: " if rank else ""
        err_console.print(f"[bold red]error:[/] {where}{escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit as exc:
        if exc.code == 130:
            err_console.print("interrupted; rerun the same command to resume", highlight=False)
        raise
