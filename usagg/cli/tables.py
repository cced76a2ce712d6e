"""Print tables that fit the console: wide off a terminal, matrices in column blocks, short wide tables transposed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# rich sizes a console that writes to a file or pipe at 80 columns, which cuts task names and run ids in logs.
OFF_TERMINAL_WIDTH = 200
# A table wider than the console with at most this many rows is printed with rows and columns swapped.
MAX_TRANSPOSED_ROWS = 8


def output_console(console: Console) -> Console:
    """Return ``console``, or one OFF_TERMINAL_WIDTH columns wide on the same stream when it is not a terminal."""
    return console if console.is_terminal else Console(file=console.file, width=OFF_TERMINAL_WIDTH)


def natural_width(console: Console, table: Table) -> int:
    """Return the columns ``table`` takes when nothing is wrapped or cut."""
    return console.measure(table, options=console.options.update(max_width=10**6)).maximum


def _matrix_table(title: str, labels: Sequence[str], cells: list[list[str]], columns: range) -> Table:
    table = Table(title=escape(title))
    table.add_column("source \\ target")
    for j in columns:
        table.add_column(str(j + 1), justify="right")
    for i, label in enumerate(labels):
        table.add_row(escape(f"{i + 1:>2} {label}"), *(cells[i][j] for j in columns))
    return table


def print_matrix(console: Console, title: str, labels: Sequence[str], matrix: np.ndarray, fmt: str = ".3f") -> None:
    """Print a square matrix with numbered rows and columns, in blocks of columns that fit the console width.

    Rows carry the number and the label, columns only the number, so a 15 x 15 matrix of long task names stays
    readable. Non-finite entries print as "–". A matrix whose largest off-diagonal entry is below 0.1 is printed
    multiplied by a power of ten that the title names.
    """
    values = np.asarray(matrix, dtype=float)
    off_diagonal = values[~np.eye(len(values), dtype=bool)] if values.shape[0] > 1 else values.ravel()
    finite = np.abs(off_diagonal[np.isfinite(off_diagonal)])
    # Lookahead affinities between tasks are often of order 1e-4, so small matrices are scaled until the printed
    # digits carry the ranking of the off-diagonal entries.
    exponent = math.floor(math.log10(finite.max())) if finite.size and finite.max() > 0 else 0
    if exponent < -1:
        values = values * 10.0**-exponent
        title = f"{title}, entries multiplied by 1e{-exponent} (1.000 means {10.0**exponent:g})"
    cells = [["–" if not math.isfinite(v) else format(v, fmt) for v in row] for row in values.tolist()]
    n = len(labels)
    blocks: list[range] = []
    start = 0
    while start < n:
        end = start + 1
        while end < n and natural_width(console, _matrix_table(title, labels, cells, range(start, end + 1))) <= console.width:
            end += 1
        blocks.append(range(start, end))
        start = end
    for block in blocks:
        block_title = title if len(blocks) == 1 else f"{title}, columns {block.start + 1}-{block.stop} of {n}"
        console.print(_matrix_table(block_title, labels, cells, block))


def print_rows(
    console: Console, title: str, header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]
) -> None:
    """Print already formatted rows, transposed when the table is too wide for the console and has few rows.

    Transposed, each original column becomes a row and each original row a column headed by its first cell.
    """
    # A table at least as wide as its title keeps the title on one line.
    min_width = min(len(title) + 4, console.width)
    table = Table(title=escape(title), min_width=min_width)
    for name, right_aligned in zip(header, right):
        table.add_column(escape(name), justify="right" if right_aligned else "left")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    if natural_width(console, table) <= console.width or not rows or len(rows) > MAX_TRANSPOSED_ROWS:
        console.print(table)
        return

    transposed = Table(title=escape(title), min_width=min_width)
    transposed.add_column(escape(header[0]))
    for row in rows:
        transposed.add_column(escape(row[0]), justify="right")
    for k in range(1, len(header)):
        transposed.add_row(escape(header[k]), *(escape(row[k]) for row in rows))
    console.print(transposed)
