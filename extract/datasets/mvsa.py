"""MVSA-Single and MVSA-Multiple in their original download layout.

``labelResultAll.txt`` (tab-separated, a header line, CRLF tolerated) gives per post ``text,image`` label
pairs: one pair for MVSA-Single, one per annotator (three) for MVSA-Multiple. ``data/<ID>.txt`` holds the
tweet (often not UTF-8) and ``data/<ID>.jpg`` the image.
"""

from __future__ import annotations

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
from mmcache.extract.textio import clean_text, decode_bytes, looks_like_html, safe_child

from mmcache.errors import BadInputError

LABEL_FILE = "labelResultAll.txt"
_POLAR = {"positive", "negative"}


def merge_labels(text_label: str, image_label: str) -> str | None:
    """The cleaning rule of MultiSentiNet / CLMLF: agree -> that label; neutral + polar -> the polar one;
    positive vs negative -> ``None`` (drop the post)."""
    if text_label == image_label:
        return text_label
    if text_label == "neutral" and image_label in _POLAR:
        return image_label
    if image_label == "neutral" and text_label in _POLAR:
        return text_label
    return None


def majority(labels: list[str]) -> str | None:
    """The label at least two of three annotators gave, else ``None`` (a single annotator's is kept)."""
    if len(labels) == 1:
        return labels[0]
    label, n = Counter(labels).most_common(1)[0]
    return label if n >= 2 else None


def _read_label_rows(root: Path) -> list[list[str]]:
    path = root / LABEL_FILE
    if not path.is_file():
        raise BadInputError(f"{str(root)!r} is not an MVSA folder: {LABEL_FILE} not found")
    raw, _enc = decode_bytes(path.read_bytes())
    lines = [ln.strip("\r") for ln in raw.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    if not lines or not lines[0].lower().startswith("id"):
        raise BadInputError(f"{path}: expected a header line starting with 'ID'")
    return [ln.split("\t") for ln in lines[1:]]


def _load_mvsa(root: Path, *, annotators: int, name: str, strict_agree: bool) -> LoadResult:
    report = LoadReport()
    samples: list[Sample] = []
    seen: set[str] = set()
    data_dir = root / "data"
    if not data_dir.is_dir():
        raise BadInputError(f"{str(root)!r} is not an MVSA folder: data/ not found")
    for cols in _read_label_rows(root):
        report.rows_seen += 1
        sid = cols[0].strip()
        pairs = [c.strip().lower().split(",") for c in cols[1:] if c.strip()]
        if not sid or len(pairs) != annotators or any(len(p) != 2 for p in pairs):
            report.drop("malformed_row", sid or f"row{report.rows_seen}")
            continue
        if sid in seen:
            report.drop("duplicate_id", sid)
            continue
        seen.add(sid)
        if any(lbl.strip() not in SENTIMENT3 for p in pairs for lbl in p):
            report.drop("unknown_label", sid)
            continue
        text_votes = [p[0].strip() for p in pairs]
        image_votes = [p[1].strip() for p in pairs]
        text_label, image_label = majority(text_votes), majority(image_votes)
        if text_label is None or image_label is None:
            report.drop("no_annotator_majority", sid)
            continue
        if strict_agree and text_label != image_label:
            report.drop("labels_disagree_strict", sid)
            continue
        label = merge_labels(text_label, image_label)
        if label is None:
            report.drop("positive_vs_negative", sid)
            continue

        text = ""
        txt_path = safe_child(data_dir, f"{sid}.txt")
        if txt_path is None:
            report.drop("path_outside_root", sid)
            continue
        if txt_path.is_file():
            text, enc = decode_bytes(txt_path.read_bytes())
            report.decoded_with[enc] += 1
            if enc != "utf-8":
                report.flag(f"text_decoded_{enc}", sid)
            if looks_like_html(text):  # the same rule, and the same flag, as every reader
                report.flag("html_in_text", sid)
            text = clean_text(text)
            if not text:
                report.flag("empty_text", sid)
        else:
            report.flag("missing_text_file", sid)
        img_path = safe_child(data_dir, f"{sid}.jpg")
        if img_path is None or not img_path.is_file():
            report.flag("missing_image", sid)
        extra = {"text_label": text_label, "image_label": image_label, "labels_agree": int(text_label == image_label)}
        samples.append(Sample(sid, text, img_path, SENTIMENT3.index(label), label, extra))
    return LoadResult(name, root, SENTIMENT3, samples, report)


def load_mvsa_single(root: Path, *, strict_agree: bool = False) -> LoadResult:
    return _load_mvsa(root, annotators=1, name="mvsa_single", strict_agree=strict_agree)


def load_mvsa_multiple(root: Path, *, strict_agree: bool = False) -> LoadResult:
    return _load_mvsa(root, annotators=3, name="mvsa_multiple", strict_agree=strict_agree)


_OPTS = {"strict_agree": (bool, False, "keep only posts whose text and image labels agree (stricter protocol)")}
_DL = "https://mcrlab.net/research/mvsa-sentiment-analysis-on-multi-view-social-data/"
_TARGETS = (Target("sentiment", SENTIMENT3, description="text and image labels merged by the standard rule"),
            Target("text_label", SENTIMENT3, field="text_label", description="the text's own label"),
            Target("image_label", SENTIMENT3, field="image_label", description="the image's own label"))
register_dataset(DatasetSpec(
    name="mvsa_single",
    description="MVSA-Single: 4,869 tweets, one annotator; 4,511 after the standard cleaning rule",
    layout=f"{LABEL_FILE} (ID<TAB>text,image) + data/<ID>.txt + data/<ID>.jpg",
    loader=load_mvsa_single, options=_OPTS,
    default_dirs=("data/mvsa_single", "../shared/data/mvsa_single_sample"), download=_DL, targets=_TARGETS,
))
register_dataset(DatasetSpec(
    name="mvsa_multiple",
    description="MVSA-Multiple: 19,600 tweets, three annotators (majority per modality, then the same rule)",
    layout=f"{LABEL_FILE} (ID<TAB>text,image x3) + data/<ID>.txt + data/<ID>.jpg",
    loader=load_mvsa_multiple, options=_OPTS,
    default_dirs=("data/mvsa_multiple",), download=_DL, targets=_TARGETS,
))
