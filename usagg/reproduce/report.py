"""The study report: a markdown page and a self-contained HTML page with the figures and key tables.

The HTML page embeds every figure as a base64 PNG and uses inline CSS only, so it opens offline and can be
sent as one file. The markdown page links the PNG files by relative path.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from usagg.io import write_text_atomic
from usagg.plots.registry import RenderedFigure
from usagg.plots.style import PNG_DPI

logger = logging.getLogger(__name__)

MAX_TABLE_ROWS = 40


@dataclass
class ReportTable:
    """A table shown in the report, with a caption saying what its rows are."""

    title: str
    table: pl.DataFrame
    caption: str = ""


@dataclass
class ReportContent:
    """Everything the report shows."""

    title: str
    summary: list[str] = field(default_factory=list)  # key findings, one sentence each
    figures: list[RenderedFigure] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # statistical warnings of the analysis (degenerate tasks, ...)
    messages: list[str] = field(default_factory=list)  # skipped steps and figure problems
    stages: list[dict[str, Any]] = field(default_factory=list)  # name, status, seconds, detail
    meta: dict[str, str] = field(default_factory=dict)  # study, command, version, device, ...


def format_value(value: Any) -> str:
    """Format a table cell: floats to 4 significant digits, NaN and null as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _rows(table: pl.DataFrame) -> tuple[list[str], list[list[str]], int]:
    head = table.head(MAX_TABLE_ROWS)
    rows = [[format_value(v) for v in row] for row in head.iter_rows()]
    return list(table.columns), rows, table.height - head.height


def markdown_table(table: pl.DataFrame) -> str:
    """Render ``table`` as a GitHub-flavoured markdown table (at most ``MAX_TABLE_ROWS`` rows)."""
    header, rows, hidden = _rows(table)
    if not header:
        return "_(empty table)_\n"

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    out += [line(r) for r in rows]
    if hidden:
        out.append(f"\n_{hidden} more row(s) in the CSV file._")
    return "\n".join(out) + "\n"


def html_table(table: pl.DataFrame) -> str:
    header, rows, hidden = _rows(table)
    parts = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    if hidden:
        parts.append(f"<p class='note'>{hidden} more row(s) in the CSV file.</p>")
    return "\n".join(parts)


def render_markdown(content: ReportContent, report_dir: Path) -> str:
    """Return the markdown page; figure links are relative to ``report_dir``."""
    out = [f"# {content.title}", ""]
    if content.meta:
        out += [f"- **{key}**: {value}" for key, value in content.meta.items()] + [""]
    if content.summary:
        out += ["## Key findings", ""] + [f"- {line}" for line in content.summary] + [""]
    if content.warnings:
        out += ["## Warnings about the results", ""] + [f"- {line}" for line in content.warnings] + [""]
    for figure in content.figures:
        png = figure.path("png")
        out += [f"## Figure: {figure.name}", "", figure.description, ""]
        if png is not None:
            out += [f"![{figure.name}]({_relative(png, report_dir)})", ""]
        links = [f"[{p.suffix.lstrip('.')}]({_relative(p, report_dir)})" for p in figure.paths if p.suffix != ".png"]
        if links:
            out += ["Files: " + ", ".join(links), ""]
        out += [f"- {note}" for note in figure.notes]
        if figure.notes:
            out.append("")
    for item in content.tables:
        out += [f"## {item.title}", ""]
        if item.caption:
            out += [item.caption, ""]
        out += [markdown_table(item.table), ""]
    if content.stages:
        out += ["## Pipeline stages", "", markdown_table(pl.DataFrame(content.stages)), ""]
    if content.messages:
        out += ["## Messages", ""] + [f"- {m}" for m in content.messages] + [""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body { font-family: 'DejaVu Sans', Arial, Helvetica, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #0072B2; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: .9em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; }
th { background: #f3f3f3; }
ul.meta { list-style: none; padding-left: 0; color: #444; }
"""


def render_html(content: ReportContent) -> str:
    """Return a self-contained HTML page: figures embedded as base64 PNG, no external resources."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{esc(content.title)}</title>", f"<style>{_CSS}</style>", "</head><body>", f"<h1>{esc(content.title)}</h1>"]
    if content.meta:
        out.append("<ul class='meta'>" + "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in content.meta.items()) + "</ul>")
    if content.summary:
        out.append("<h2>Key findings</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in content.summary) + "</ul>")
    if content.warnings:
        out.append("<h2>Warnings about the results</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in content.warnings) + "</ul>")
    for figure in content.figures:
        out.append(f"<h2 id='figure-{esc(figure.name)}'>Figure: {esc(figure.name)}</h2>")
        png = figure.path("png")
        if png is not None and png.is_file():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{esc(figure.name)}' style='width: {_display_width_px(png)}px' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(figure.description)}</figcaption></figure>"
            )
        else:
            out.append(f"<p class='note'>{esc(figure.description)} (no PNG was rendered)</p>")
        if figure.notes:
            out.append("<ul class='note'>" + "".join(f"<li>{esc(n)}</li>" for n in figure.notes) + "</ul>")
    for item in content.tables:
        out.append(f"<h2>{esc(item.title)}</h2>")
        if item.caption:
            out.append(f"<p class='note'>{esc(item.caption)}</p>")
        out.append(html_table(item.table))
    if content.stages:
        out.append("<h2>Pipeline stages</h2>" + html_table(pl.DataFrame(content.stages)))
    if content.messages:
        out.append("<h2>Messages</h2><ul>" + "".join(f"<li>{esc(m)}</li>" for m in content.messages) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _display_width_px(png: Path) -> int:
    """On-screen width of a figure: its printed width (pixels / dpi) at 1.5 times the CSS 96 px per inch.

    A single-column figure (3.5 in) then shows at about 500 px and a double-column one fills the page.
    """
    with Image.open(png) as image:
        dpi = image.info.get("dpi", (PNG_DPI, PNG_DPI))[0] or PNG_DPI
        width_px = image.size[0]
    return round(width_px / float(dpi) * 96 * 1.5)


def write_report(content: ReportContent, out_dir: str | os.PathLike, stem: str = "report") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.html`` into ``out_dir`` atomically; return both paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    md_path, html_path = folder / f"{stem}.md", folder / f"{stem}.html"
    write_text_atomic(md_path, render_markdown(content, folder))
    write_text_atomic(html_path, render_html(content))
    logger.info("report written to %s and %s", md_path, html_path)
    return md_path, html_path


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
