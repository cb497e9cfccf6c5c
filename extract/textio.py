"""Small text helpers shared by the dataset readers (and predict's manifests): tolerant decoding, HTML junk
removal, safe paths, CSV / JSON Lines manifest rows, the cap on a text's length."""

from __future__ import annotations

import codecs
import csv
import html
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

# Order matters: UTF-8 first (strict, so a wrong guess fails loudly), then GB18030, which is what the
# non-UTF-8 MVSA tweets turn out to be (e.g. b"\xa1\xad" is the GBK ellipsis), then cp1252 for Western
# mojibake; latin-1 never fails, so decoding always ends somewhere and is counted.
FALLBACK_ENCODINGS = ("utf-8", "gb18030", "cp1252", "latin-1")

# A real HTML document (a scraping accident), not text that mentions a tag ("use the <script> tag"): it starts
# as a document does, or it holds both ends of an <html> or <body> element.
_HTML_START = re.compile(r"\s*(<!doctype\s+html\b|<html\b)", re.I)
_HTML_PAIRS = tuple((re.compile(rf"<{t}\b[^>]*>", re.I), re.compile(rf"</{t}\s*>", re.I)) for t in ("html", "body"))
_SKIP_TAGS = {"style", "script", "head", "title"}
# Characters that print as nothing: zero-width space / non-joiner / joiner, word joiner, BOM (zero-width
# no-break space). str.split() does not count them as whitespace, so a text made of them alone looked real.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# Long enough for any post (a tweet is 280, a meme's OCR a few hundred), short enough that one pasted
# document cannot dominate a tokenizer pass; a longer text is cut and flagged ``text_truncated``.
MAX_TEXT_CHARS = 100_000
# Python's csv refuses a field over 131,072 characters with an exception; a long cell must instead reach
# the reader, which cuts and flags it. 2**31 - 1 is the largest limit a C long takes on every platform.
CSV_FIELD_LIMIT = 2**31 - 1


def decode_bytes(raw: bytes) -> tuple[str, str]:
    """Decode ``raw`` with the first encoding of :data:`FALLBACK_ENCODINGS` that works.

    Returns ``(text, encoding_used)``; a UTF-8 BOM is removed. Bytes starting with a UTF-16 byte-order
    mark are UTF-16 (a spreadsheet's "Unicode text" export), never a guess down the chain.
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16").lstrip("\ufeff"), "utf-16"
        except UnicodeDecodeError:
            pass  # not really UTF-16 after all: the chain below decides
    for enc in FALLBACK_ENCODINGS:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        return text.lstrip("\ufeff"), enc
    raise AssertionError("latin-1 decodes any byte string")  # pragma: no cover


class _TextOnly(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):  # noqa: ARG002
        if tag in _SKIP_TAGS:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def looks_like_html(text: str) -> bool:
    """True when ``text`` is an HTML document: it starts with ``<!DOCTYPE html`` or ``<html``, or holds
    both an opening and a closing ``<html>`` or ``<body>`` tag. The one rule every reader uses to strip
    markup (and flag ``html_in_<column>``); text that merely mentions a tag ("use the <script> tag"),
    ``<3`` or ``a < b`` is text and is kept as written."""
    if _HTML_START.match(text):
        return True
    return any(opening.search(text) and closing.search(text) for opening, closing in _HTML_PAIRS)


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace and zero-width characters (U+200B, U+200C,
    U+200D, U+2060, U+FEFF). Such a text is an empty text, whatever its length."""
    return not text.translate(_INVISIBLE).strip()


def clean_text(text: str) -> str:
    """Strip the markup of an HTML document (:func:`looks_like_html`; keeping visible text, dropping
    <head>/<style>/<script>), unescape entities, and collapse whitespace. Plain text only has its
    whitespace normalised; a text that shows nothing (:func:`is_blank`) becomes ``""``."""
    if looks_like_html(text):
        parser = _TextOnly()
        parser.feed(text)
        parser.close()
        text = "".join(parser.parts)
    elif "&" in text:
        text = html.unescape(text)
    return "" if is_blank(text) else " ".join(text.split())


def cap_text(text: str, max_chars: int = MAX_TEXT_CHARS) -> tuple[str, bool]:
    """(``text`` cut to its first ``max_chars`` characters, whether it was cut). The caller flags a cut
    text (``text_truncated``): a cap that changes a text is never silent."""
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars], True


def safe_child(root: Path, relative: str | Path) -> Path | None:
    """Resolve ``relative`` under ``root``; ``None`` if it escapes the root (``..``, absolute paths,
    symlinks pointing outside). Datasets are untrusted input: never follow a path out of them."""
    root = Path(root).resolve()
    try:
        candidate = (root / relative).resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13, OSError after)
        # Cannot be resolved, so cannot be opened either: keep the lexical path when it stays inside the
        # root, and the reader flags it / extraction records it as an unreadable image, not a traceback.
        candidate = Path(os.path.normpath(root / relative))
    try:
        candidate.relative_to(root)
    except ValueError:
        return None
    return candidate


CSV_DELIMITERS = (",", ";", "\t")


def allow_long_csv_fields() -> None:
    """Lift Python's csv field limit (131,072 characters, process-wide) to :data:`CSV_FIELD_LIMIT`, so a
    huge cell is read (and then capped by the reader) instead of raising ``_csv.Error``."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)


def csv_table(text: str, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, list[str]]]] | None:
    """(header, [(line number, cells)] of the non-blank rows after it) of a CSV text whose separator is the
    first of ``CSV_DELIMITERS`` whose header names every ``required`` column (case and surrounding spaces
    ignored; names come back stripped); None when no separator does. Cells of any length are read."""
    allow_long_csv_fields()
    first = next((ln for ln in text.split("\n") if ln.strip()), "")
    for delim in CSV_DELIMITERS:
        header = [h.strip() for h in next(csv.reader([first], delimiter=delim), [])]
        if set(required) <= {h.lower() for h in header}:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
            rows = [(reader.line_num, cells) for cells in reader if cells]
            return header, rows[1:]
    return None


def jsonl_records(text: str) -> list[tuple[int, dict | str]]:
    """(line number, object) for every non-blank line of a JSON Lines text; a line that is not valid JSON,
    or not a JSON object, gives its reason (a str) instead, for the caller to refuse or report."""
    rows: list[tuple[int, dict | str]] = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((n, f"not valid JSON ({e.msg})"))
            continue
        rows.append((n, row if isinstance(row, dict) else "not a JSON object"))
    return rows
