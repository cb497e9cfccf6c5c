"""Memotion 7k (SemEval-2020 Task 8): ``labels.csv`` + ``images/``.

Task A (sentiment) merges the five ``overall_sentiment`` values into positive / neutral / negative.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mmcache.extract.datasets import (
    SENTIMENT3,
    DatasetSpec,
    LoadReport,
    LoadResult,
    Sample,
    Target,
    degree_mapping,
    register_dataset,
)
from mmcache.extract.textio import (
    allow_long_csv_fields,
    clean_text,
    decode_bytes,
    looks_like_html,
    safe_child,
)

from mmcache.errors import BadInputError

SENTIMENT5 = ("very_positive", "positive", "neutral", "negative", "very_negative")
TO_TASK_A = {"very_positive": "positive", "positive": "positive", "neutral": "neutral",
             "negative": "negative", "very_negative": "negative"}
EXTRA_COLUMNS = ("humour", "sarcasm", "offensive", "motivational")
# The scales of the four Task C labels, in their own order (not inferred from the data).
SCALES = {
    "humour": ("not_funny", "funny", "very_funny", "hilarious"),
    "sarcasm": ("not_sarcastic", "general", "twisted_meaning", "very_twisted"),
    "offensive": ("not_offensive", "slight", "very_offensive", "hateful_offensive"),
    "motivational": ("not_motivational", "motivational"),
}
# Task B: each label as "not" vs any degree of it.
BINARY = {"humour": ("not_funny", "funny"), "sarcasm": ("not_sarcastic", "sarcastic"),
          "offensive": ("not_offensive", "offensive"), "motivational": ("not_motivational", "motivational")}
TARGETS = (
    Target("sentiment", SENTIMENT3, description="Task A: overall_sentiment merged to positive / neutral / negative"),
    Target("sentiment5", SENTIMENT5, field="sentiment5", description="overall_sentiment, five levels"),
    *(Target(c, SCALES[c], field=c, description=f"Task C: {c} scale") for c in EXTRA_COLUMNS),
    *(Target(f"{c}_b", BINARY[c], field=c, mapping=degree_mapping(SCALES[c], BINARY[c]),
             description=f"Task B: {BINARY[c][0]} vs any degree") for c in EXTRA_COLUMNS),
)
TASKS = {"task_b": tuple(f"{c}_b" for c in EXTRA_COLUMNS), "task_c": EXTRA_COLUMNS}
REQUIRED = ("image_name", "text_ocr", "text_corrected", "overall_sentiment")


def load_memotion(root: Path) -> LoadResult:
    path = root / "labels.csv"
    if not path.is_file():
        raise BadInputError(f"{str(root)!r} is not a Memotion folder: labels.csv not found")
    text, enc = decode_bytes(path.read_bytes())
    allow_long_csv_fields()  # a huge cell is capped by load_dataset, never a csv error
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or any(c not in rows[0] for c in REQUIRED):
        raise BadInputError(f"{path}: expected columns {', '.join(REQUIRED)}")
    report = LoadReport()
    report.decoded_with[enc] += 1
    images = root / "images"
    samples, seen = [], set()
    for row in rows:
        report.rows_seen += 1
        name = (row.get("image_name") or "").strip()
        sid = Path(name).stem or f"row{report.rows_seen}"
        if not name:
            report.drop("missing_image_name", sid)
            continue
        if sid in seen:
            report.drop("duplicate_id", sid)
            continue
        seen.add(sid)
        s5 = (row.get("overall_sentiment") or "").strip().lower()
        if s5 not in TO_TASK_A:
            report.drop("unknown_label", sid)
            continue
        img = safe_child(images, name)
        if img is None:
            report.drop("path_outside_root", sid)
            continue
        # text_corrected is the human-fixed OCR; fall back to raw OCR when empty. A cell that is an HTML
        # dump (a scraping accident) contributes only its visible text, which is usually nothing.
        txt = ""
        for col in ("text_corrected", "text_ocr"):
            cell = row.get(col) or ""
            if looks_like_html(cell):
                report.flag(f"html_in_{col}", sid)
            txt = clean_text(cell)
            if txt:
                break
        if not txt:
            report.flag("empty_text", sid)
        if not img.is_file():
            report.flag("missing_image", sid)
        label = TO_TASK_A[s5]
        extra = {"sentiment5": s5, "sentiment5_label": SENTIMENT5.index(s5)}
        extra.update({c: (row.get(c) or "").strip() for c in EXTRA_COLUMNS})
        samples.append(Sample(sid, txt, img, SENTIMENT3.index(label), label, extra))
    return LoadResult("memotion", root, SENTIMENT3, samples, report)


register_dataset(DatasetSpec(
    name="memotion",
    description="Memotion 7k (SemEval-2020 Task 8), Task A: 6,992 memes, 5 sentiments merged to 3",
    layout="labels.csv (image_name, text_ocr, text_corrected, overall_sentiment, ...) + images/<image_name>",
    loader=load_memotion,
    default_dirs=("data/memotion7k", "../shared/data/memotion7k"),
    download="https://www.kaggle.com/datasets/williamscott701/memotion-dataset-7k",
    targets=TARGETS, tasks=TASKS,
))
