"""The ``usagg`` command line: a thin typer layer over the library.

Each sub-module registers the commands of one stage of the data flow and calls one library function per command.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from usagg import __version__
from usagg.errors import UsaggError
from usagg.log import configure_logging

app = typer.Typer(
    name="usagg",
    help="Task-aggregation analysis for multi-task ultrasound foundation models (M2DINO).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True)
logger = logging.getLogger(__name__)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"usagg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Show debug logging (-vv adds source locations).")] = 0,
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


def main() -> None:
    """Entry point of the ``usagg`` console script: user errors print one message and exit with status 2."""
    try:
        app(standalone_mode=False)
    except UsaggError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
