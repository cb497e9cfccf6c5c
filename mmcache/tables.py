"""Plain-text tables and lines for terminal output, shared by both stages and the CLI.

Owns :func:`format_table` (aligned columns), :func:`fit_table` / :func:`fit_line` (fit a width, the
terminal's by default: :func:`terminal_width`) and :func:`human_bytes`. Stdlib only: a neutral core
module, so stage two formats its tables without importing stage one.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

__all__ = ["fit_line", "fit_table", "format_table", "human_bytes", "terminal_width"]


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units; bytes shown whole)."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"  # pragma: no cover


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned (numbers line up)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def terminal_width(default: int = 120) -> int:
    """Columns of the terminal (``COLUMNS`` when set; ``default`` when output goes to a file or pipe)."""
    return max(40, shutil.get_terminal_size((default, 24)).columns)


def fit_table(headers: list[str], rows: list[list[Any]], width: int) -> str:
    """``format_table`` when it fits in ``width`` columns; otherwise one record per row: the first
    cell, then ``header value`` pairs wrapped to ``width`` (long paths stay whole on their own line)."""
    table = format_table(headers, rows)
    if max(map(len, table.splitlines())) <= width:
        return table
    out = []
    for r in rows:
        out.append(str(r[0]))
        line = " "
        for h, c in zip(headers[1:], r[1:], strict=True):
            pair = f" {h} {c},"
            if len(line) + len(pair) > width and line.strip():
                out.append(line)
                line = "   "
            line += pair
        out.append(line.rstrip(","))
    return "\n".join(out)


def fit_line(line: str, width: int) -> str:
    """``line`` wrapped to ``width`` columns, continuation lines indented under its first word."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.fill(line, width=width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)
