"""CSV outputs a spreadsheet cannot run: the one place cells are neutralised against formula injection.

A spreadsheet treats a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and, in some, a tab or a
carriage return) as a formula, so a post id or text such as ``=HYPERLINK(...)`` copied from a dataset
into a predictions CSV would run when the file is opened. Following the OWASP recommendation, such a text
cell is written with a leading ``'`` (shown as text, the quote itself hidden). Every CSV writer of the
project passes its rows through :func:`csv_row` (or :func:`csv_dict` for a ``csv.DictWriter``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# A plain decimal number ("-0.5", "+3", "-1e-05"): a spreadsheet reads it as that number, nothing runs, so
# it is left alone. "-inf", "-nan" or "-1+2" are not in this form and are prefixed.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _risky(text: str) -> bool:
    """A formula start (not a plain number), possibly behind quotes we added: those are prefixed again,
    so :func:`csv_value` can undo exactly one quote and the round trip is lossless."""
    bare = text.lstrip("'")
    return bare.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(bare)


def csv_cell(value: Any) -> Any:
    """``value`` made safe for a CSV cell.

    Only a *text* cell (a ``str``) that starts with one of :data:`FORMULA_STARTS` and is not a plain
    decimal number gets a leading ``'`` (so does such a text already behind quotes, to keep the round
    trip exact); numbers (``int`` / ``float``, or a ``str`` such as ``"-0.5"``), ``None`` and every other
    text are returned unchanged, so numeric columns stay numeric."""
    if not isinstance(value, str) or not _risky(value):
        return value
    return "'" + value


def csv_value(text: str) -> str:
    """The value :func:`csv_cell` was given, from the cell text read back (one added quote removed):
    the project's own readers of its CSV outputs (ids in ``predictions.csv``) go through this."""
    return text[1:] if text.startswith("'") and _risky(text[1:]) else text


def csv_row(row: Iterable[Any]) -> list[Any]:
    """Every cell of ``row`` through :func:`csv_cell` (for ``csv.writer(...).writerow``)."""
    return [csv_cell(v) for v in row]


def csv_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every value of ``row`` through :func:`csv_cell` (for ``csv.DictWriter(...).writerow``)."""
    return {k: csv_cell(v) for k, v in row.items()}
