"""Standard-library logging set-up shared by the CLI and scripts."""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler


def configure_logging(verbosity: int = 0, quiet: bool = False) -> None:
    """Route every ``usagg`` logger to a rich handler on stderr.

    ``verbosity`` 0 shows INFO, 1 or more shows DEBUG; ``quiet`` shows only warnings and errors. Under torchrun
    every process runs the same set-up and would repeat each message, so ranks other than 0 show only errors.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 0 else logging.INFO)
    if process_rank() > 0:
        level = logging.ERROR
    handler = RichHandler(console=Console(stderr=True), show_path=verbosity > 1, rich_tracebacks=verbosity > 0, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    root = logging.getLogger("usagg")
    root.handlers.clear()
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def process_rank() -> int:
    """Return this process's global rank under torchrun (its ``RANK`` variable), 0 outside torchrun."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
