"""A user's own data: a CSV or JSONL manifest with ``id, text, image, label[, split]``.

``image`` is a path relative to the manifest's folder (paths that leave it are refused). Labels may be
names or integers; the class list comes from the ``classes`` option (undeclared labels are then dropped as
``unknown_label``), else from the labels themselves: the sentiment triple in its usual order when the labels
are those names, ``0..max`` for integer ids, else sorted names (the triple first when all three occur); a
rare derived class is reported as a warning (a typo must not become a class silently).

Malformed input never becomes a sample: a row with more or fewer cells than the header, a JSONL line
without a required key, or an empty id is dropped as ``malformed_row``. The header is matched ignoring case
and surrounding spaces, with ``,``, ``;`` or tab as separator (UTF-16 with a byte-order mark is decoded);
anything else is an error that lists the columns found and the ones needed. A text cell is kept as written
(whitespace collapsed) unless it is an HTML document (flagged ``html_in_text``: only its visible text is
kept) or shows nothing (only whitespace / zero-width characters: ``empty_text``); a cell of any length is
read, and one over ``max_text_chars`` cut and flagged ``text_truncated``. Extra columns become targets
with the ``targets`` option (``col1,col2``, or ``col:a|b|c`` to fix a column's classes and their order).
"""

from __future__ import annotations

import csv
import difflib
import logging
from collections import Counter
from pathlib import Path

from mmcache.extract.datasets import (
    SENTIMENT3,
    DatasetSpec,
    LoadReport,
    LoadResult,
    Sample,
    Target,
    register_dataset,
)
from mmcache.extract.textio import (
    clean_text,
    csv_table,
    decode_bytes,
    jsonl_records,
    looks_like_html,
    safe_child,
)

from mmcache.errors import BadInputError

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}
log = logging.getLogger(__name__)


def find_manifest(path: Path) -> Path:
    if path.is_file():
        return path
    for name in MANIFEST_NAMES:
        if (path / name).is_file():
            return path / name
    raise BadInputError(f"no manifest in {str(path)!r}: expected {' or '.join(MANIFEST_NAMES)}")


REQUIRED = ("id", "text", "image", "label")
RARE_FACTOR = 20  # a derived class 20x smaller than the largest one, or spelled like a larger one, looks like a typo


def _header_error(manifest: Path, found: list[str]) -> BadInputError:
    shown = ", ".join(repr(c) for c in found) or "none"
    return BadInputError(f"{manifest}: the header must name the columns {', '.join(REQUIRED)} (case and surrounding "
                         f"spaces do not matter; separator ',', ';' or tab); found {shown}")


def _csv_rows(manifest: Path, text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]): the delimiter is the one whose header names every required column."""
    table = csv_table(text, REQUIRED)
    if table is None:
        first = next((ln for ln in text.split("\n") if ln.strip()), "")
        raise _header_error(manifest, [h.strip() for h in next(csv.reader([first]), [])])
    return table


def _jsonl_rows(manifest: Path, text: str) -> list[tuple[int, dict]]:
    """Every line an object, or the whole file is refused (predict reports such lines row by row instead)."""
    rows = jsonl_records(text)
    for n, row in rows:
        if isinstance(row, str):
            raise BadInputError(f"{manifest}:{n}: {row}; each line must be a JSON object")
    return rows


def _read_rows(manifest: Path) -> tuple[list[tuple[int, dict | None]], list[str], str]:
    """(rows, columns, encoding). Each row is (line number, {column: str value}), or None for a row whose
    cell count differs from the header's (CSV) or that lacks a required key (JSONL): a malformed row.
    Column names are stripped; the required ones (and ``split``) are matched case-insensitively."""
    text, enc = decode_bytes(manifest.read_bytes())
    if "\x00" in text:
        raise BadInputError(f"{manifest}: contains NUL bytes (UTF-16 without a byte-order mark?); save it as UTF-8")
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise BadInputError(f"{manifest}: manifest must be .csv or .jsonl")
    if suffix == ".jsonl":
        raw = _jsonl_rows(manifest, text)
        columns = list(dict.fromkeys(str(k).strip() for _n, r in raw for k in r))
        rows = [(n, {str(k).strip(): "" if v is None else str(v) for k, v in r.items()}) for n, r in raw]
    else:
        if not text.strip():
            raise BadInputError(f"{manifest}: manifest is empty")
        columns, cells = _csv_rows(manifest, text)
        rows = [(n, dict(zip(columns, c, strict=True)) if len(c) == len(columns) else None) for n, c in cells]
    canon = {c: c.lower() for c in columns if c.lower() in (*REQUIRED, "split")}
    rows = [(n, None if r is None else {canon.get(k, k): v for k, v in r.items()}) for n, r in rows]
    if suffix == ".jsonl":
        missing = [c for c in REQUIRED if c not in canon.values()]
        if rows and missing:
            raise _header_error(manifest, columns)
        rows = [(n, r if r is not None and all(c in r for c in REQUIRED) else None) for n, r in rows]
    return rows, [canon.get(c, c) for c in columns], enc


def _derive_classes(values: list[str], what: str, report: LoadReport, *, sentiment_first: bool) -> tuple[str, ...]:
    """Class names from the labels themselves: the sentiment triple (in its order) when they are those
    names, ``0..max`` for integer ids, else sorted names (the triple first when all three occur, so a stray
    name never moves their ids). Rare or near-duplicate classes are reported as warnings: a typo becomes a
    class only loudly."""
    counts = Counter(v for v in values if v)
    if sentiment_first and set(counts) <= set(SENTIMENT3):
        return SENTIMENT3
    if counts and all(v.lstrip("-").isdigit() for v in counts):
        return tuple(str(i) for i in range(max(int(v) for v in counts) + 1))
    names = sorted(counts)
    if sentiment_first and set(SENTIMENT3) <= set(counts):
        names = [*SENTIMENT3, *(n for n in names if n not in SENTIMENT3)]
    top = max(counts.values(), default=0)
    odd = [n for n in names if counts[n] * RARE_FACTOR < top
           or difflib.get_close_matches(n, [m for m in names if m != n and counts[m] > counts[n]], n=1, cutoff=0.8)]
    if odd:
        msg = (f"{what}: classes derived from the data as {', '.join(names)}; rare or near-duplicate: "
               f"{', '.join(f'{n} ({counts[n]})' for n in odd)}. A typo? Fix the manifest, or declare the classes "
               f"(-o classes=... / -o targets=col:a|b) so undeclared values are dropped / masked")
        report.warnings.append(msg)
        log.warning("%s", msg)
    return tuple(names)


def _parse_targets(spec: str, columns: list[str], manifest: Path) -> list[tuple[str, tuple[str, ...] | None]]:
    """``col1,col2:a|b|c`` -> [(col1, None), (col2, (a, b, c))]: extra label columns, classes optional."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        col, _, classes = item.partition(":")
        col = col.strip()
        if col not in columns or col in (*REQUIRED, "split"):
            extra = [c for c in columns if c not in (*REQUIRED, "split")]
            raise BadInputError(f"{manifest}: target column {col!r} is not an extra column of the manifest "
                                f"(extra columns: {', '.join(extra) or 'none'})")
        out.append((col, tuple(c.strip() for c in classes.split("|") if c.strip()) or None))
    return out


def load_folder(root: Path, *, classes: str = "", targets: str = "") -> LoadResult:
    manifest = find_manifest(root)
    base = manifest.parent
    rows, columns, enc = _read_rows(manifest)
    if not rows:
        raise BadInputError(f"{manifest}: manifest is empty")
    report = LoadReport()
    report.decoded_with[enc] += 1
    good = []
    for n, row in rows:
        report.rows_seen += 1
        sid = "" if row is None else str(row.get("id", "")).strip()
        if row is None or not sid:  # wrong cell count, missing key or empty id: never guessed into a sample
            report.drop("malformed_row", sid or f"<line {n}>")
            continue
        good.append((sid, row))
    raw_labels = [str(r.get("label", "")).strip() for _sid, r in good]
    if classes:
        class_names = tuple(c.strip() for c in classes.split(",") if c.strip())
    else:
        class_names = _derive_classes(raw_labels, "label", report, sentiment_first=True)
    extra_targets = _parse_targets(targets, columns, manifest)
    samples, seen = [], set()
    for (sid, row), lbl in zip(good, raw_labels, strict=True):
        sample = _sample(sid, row, lbl, class_names, base, report, seen)
        if sample is not None:
            samples.append(sample)
    declared = [Target("label", class_names, description="the manifest's label column")]
    for col, fixed in extra_targets:
        values = [str(s.extra.get(col, "")).strip() for s in samples]
        found = fixed or _derive_classes(values, f"target {col}", report, sentiment_first=False)
        declared.append(Target(col, found, field=col, description=f"manifest column {col}"))
    return LoadResult("folder", root, class_names, samples, report, targets=tuple(declared))


def _sample(sid: str, row: dict, lbl: str, class_names: tuple[str, ...], base: Path, report: LoadReport,
            seen: set[str]) -> Sample | None:
    if sid in seen:
        report.drop("duplicate_id", sid)
        return None
    seen.add(sid)
    if lbl in class_names:
        label = class_names.index(lbl)
    elif lbl.isdigit() and int(lbl) < len(class_names):  # integer label ids against named classes
        label = int(lbl)
    else:
        report.drop("unknown_label", sid)
        return None
    image = str(row.get("image") or "").strip()
    img = safe_child(base, image) if image else None
    if image and img is None:
        report.drop("path_outside_root", sid)
        return None
    if img is None or not img.is_file():
        report.flag("missing_image", sid)
    raw_text = str(row.get("text") or "")
    if looks_like_html(raw_text):  # an HTML document: only its visible text is kept, and that is said
        report.flag("html_in_text", sid)
    text = clean_text(raw_text)
    if not text:
        report.flag("empty_text", sid)
    split = str(row.get("split") or "").strip().lower() or None
    if split is not None:
        split = _SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            report.flag("unknown_split", sid)
            split = None
    extra = {k: v for k, v in row.items() if k not in ("id", "text", "image", "label", "split")}
    return Sample(sid, text, img, label, class_names[label], extra, split)


register_dataset(DatasetSpec(
    name="folder",
    description="your own data: a CSV/JSONL manifest of id, text, image, label[, split]",
    layout="manifest.csv or manifest.jsonl (columns id,text,image,label[,split]; image relative to it)",
    loader=load_folder,
    options={"classes": (str, "", "comma-separated class names in label-id order (default: from the labels)"),
             "targets": (str, "", "extra label columns as targets: col1,col2 or col:a|b|c to fix a column's classes")},
    default_dirs=("data/folder",), accepts_file=True,
    targets=(Target("label", (), description="the manifest's label column"),),
))
