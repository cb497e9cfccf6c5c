"""A user's own data: a CSV or JSONL manifest with ``id, text, image, label[, split]``.

``image`` is a path relative to the manifest's folder (paths that leave it are refused). Labels may be
names or integers; the class list comes from the ``classes`` option, else from the labels themselves
(the sentiment triple in its usual order when the labels are exactly those names).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mmcache.extract.datasets import SENTIMENT3, DatasetSpec, LoadReport, LoadResult, Sample, register_dataset
from mmcache.extract.textio import clean_text, decode_bytes, safe_child

from mmcache.errors import BadInputError

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}


def find_manifest(path: Path) -> Path:
    if path.is_file():
        return path
    for name in MANIFEST_NAMES:
        if (path / name).is_file():
            return path / name
    raise BadInputError(f"no manifest in {str(path)!r}: expected {' or '.join(MANIFEST_NAMES)}")


def _read_rows(manifest: Path) -> tuple[list[dict], str]:
    text, enc = decode_bytes(manifest.read_bytes())
    if manifest.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(f"{manifest}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{manifest}:{n}: each line must be a JSON object")
            rows.append(row)
        return rows, enc
    if manifest.suffix.lower() != ".csv":
        raise BadInputError(f"{manifest}: manifest must be .csv or .jsonl")
    return list(csv.DictReader(io.StringIO(text, newline=""))), enc


def load_folder(root: Path, *, classes: str = "") -> LoadResult:
    manifest = find_manifest(root)
    base = manifest.parent
    rows, enc = _read_rows(manifest)
    if not rows:
        raise BadInputError(f"{manifest}: manifest is empty")
    missing_cols = [c for c in ("id", "text", "image", "label") if c not in rows[0]]
    if missing_cols:
        raise BadInputError(f"{manifest}: missing column(s) {', '.join(missing_cols)}")
    raw_labels = [str(r.get("label", "")).strip() for r in rows]
    if classes:
        class_names = tuple(c.strip() for c in classes.split(",") if c.strip())
    elif set(raw_labels) <= set(SENTIMENT3):
        class_names = SENTIMENT3
    elif all(lbl.lstrip("-").isdigit() for lbl in raw_labels if lbl):
        class_names = tuple(str(i) for i in range(max(int(x) for x in raw_labels if x) + 1))
    else:
        class_names = tuple(sorted({lbl for lbl in raw_labels if lbl}))

    report = LoadReport()
    report.decoded_with[enc] += 1
    samples, seen = [], set()
    for row, lbl in zip(rows, raw_labels, strict=True):
        report.rows_seen += 1
        sid = str(row.get("id", "")).strip() or f"row{report.rows_seen}"
        if sid in seen:
            report.drop("duplicate_id", sid)
            continue
        seen.add(sid)
        if lbl in class_names:
            label = class_names.index(lbl)
        elif lbl.isdigit() and int(lbl) < len(class_names):  # integer label ids against named classes
            label = int(lbl)
        else:
            report.drop("unknown_label", sid)
            continue
        img = safe_child(base, str(row.get("image") or "").strip()) if row.get("image") else None
        if row.get("image") and img is None:
            report.drop("path_outside_root", sid)
            continue
        if img is None or not img.is_file():
            report.flag("missing_image", sid)
        text = clean_text(str(row.get("text") or ""))
        if not text:
            report.flag("empty_text", sid)
        split = str(row.get("split") or "").strip().lower() or None
        if split is not None:
            split = _SPLIT_ALIASES.get(split, split)
            if split not in SPLITS:
                report.flag("unknown_split", sid)
                split = None
        extra = {k: v for k, v in row.items() if k not in ("id", "text", "image", "label", "split")}
        samples.append(Sample(sid, text, img, label, class_names[label], extra, split))
    return LoadResult("folder", root, class_names, samples, report)


register_dataset(DatasetSpec(
    name="folder",
    description="your own data: a CSV/JSONL manifest of id, text, image, label[, split]",
    layout="manifest.csv or manifest.jsonl (columns id,text,image,label[,split]; image relative to it)",
    loader=load_folder,
    options={"classes": (str, "", "comma-separated class names in label-id order (default: from the labels)")},
    default_dirs=("data/folder",),
))
