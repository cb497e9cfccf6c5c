"""The readers against the real files in ../shared/data (see its README).

Every expected number is computed here from the raw files with csv / plain string handling, never
through the library, and compared with what ``cli.py inspect --json`` reports. Skipped cleanly when
../shared/data is absent (a plain clone).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from mmcache.extract.datasets import load_dataset

from mmcache import cli

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEMOTION = DATA / "memotion7k"
MVSA_SINGLE = DATA / "mvsa_single_sample"
CLMLF_SINGLE = DATA / "splits" / "mvsa_single_clmlf"
CLASSES = ("positive", "neutral", "negative")

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not available ({DATA} is absent)"),
]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def _inspect_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    code = cli.main(["inspect", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


# --------------------------------------------------------------------------- memotion


@pytest.fixture(scope="module")
def memotion_rows() -> list[dict]:
    _need(MEMOTION / "labels.csv")
    with open(MEMOTION / "labels.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_memotion_task_a_counts(capsys, memotion_rows):
    task_a = {"very_positive": "positive", "positive": "positive", "neutral": "neutral",
              "negative": "negative", "very_negative": "negative"}
    indep = Counter(task_a[r["overall_sentiment"].strip()] for r in memotion_rows)
    assert len(memotion_rows) == 6992
    assert indep == {"positive": 4160, "neutral": 2201, "negative": 631}

    s = _inspect_json(capsys, "--dataset", "memotion", "--data-dir", str(MEMOTION))
    assert s["dataset"] == "memotion"
    assert s["samples"] == 6992
    assert s["class_counts"] == {"positive": 4160, "neutral": 2201, "negative": 631}
    assert s["report"]["rows_seen"] == 6992
    assert s["dropped_total"] == 0
    assert "missing_image" not in s["report"]["flagged"]
    # the default 8:1:1 split covers everything
    assert sum(sum(row.values()) for row in s["split_counts"].values()) == 6992


def test_memotion_every_image_exists(memotion_rows):
    names = [r["image_name"].strip() for r in memotion_rows]
    assert len(set(names)) == len(names)
    missing = [n for n in names if not (MEMOTION / "images" / n).is_file()]
    assert missing == []
    assert len({Path(n).suffix.lower() for n in names}) > 2  # mixed extensions, as the README says


def test_memotion_html_cells_never_become_text(memotion_rows):
    html_rows = {Path(r["image_name"]).stem for r in memotion_rows
                 if any("<html" in r[c].lower() for c in ("text_ocr", "text_corrected"))}
    assert len(html_rows) > 50  # "about 110 cells hold raw HTML"
    res = load_dataset("memotion", MEMOTION)
    for s in res.samples:
        low = s.text.lower()
        for junk in ("<html", "<head", "<meta", "<style", "charset", "http-equiv", "margin:0"):
            assert junk not in low, (s.id, s.text[:120])
    # text_corrected empty -> text_ocr (when that is real text)
    by_id = {s.id: s for s in res.samples}
    fallback = [r for r in memotion_rows
                if not r["text_corrected"].strip() and r["text_ocr"].strip() and "<" not in r["text_ocr"]]
    for r in fallback:
        assert by_id[Path(r["image_name"]).stem].text == " ".join(r["text_ocr"].split())


# --------------------------------------------------------------------------- mvsa_single_sample


def _rule(text_label: str, image_label: str) -> str | None:
    """The cleaning rule, written independently: set-based instead of case by case."""
    labels = {text_label, image_label}
    if len(labels) == 1:
        return text_label
    if labels == {"positive", "negative"}:
        return None
    (polar,) = labels - {"neutral"}
    return polar


@pytest.fixture(scope="module")
def mvsa_expected() -> dict:
    path = _need(MVSA_SINGLE / "labelResultAll.txt")
    raw = path.read_bytes().decode("utf-8")
    lines = raw.split("\r\n")
    assert lines[0] == "ID\ttext,image"
    kept: dict[str, str] = {}
    dropped: Counter = Counter()
    rows = 0
    for line in lines[1:]:
        if not line.strip():
            continue
        rows += 1
        sid, pair = line.split("\t")
        text_label, image_label = pair.split(",")
        if sid in kept:
            dropped["duplicate_id"] += 1
            continue
        label = _rule(text_label, image_label)
        if label is None:
            dropped["positive_vs_negative"] += 1
        else:
            kept[sid] = label
    not_utf8 = 0
    for sid in kept:
        try:
            (MVSA_SINGLE / "data" / f"{sid}.txt").read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
    no_image = sum(1 for sid in kept if not (MVSA_SINGLE / "data" / f"{sid}.jpg").is_file())
    return {"rows": rows, "kept": kept, "dropped": dropped, "not_utf8": not_utf8, "no_image": no_image}


def test_mvsa_single_sample_counts(capsys, mvsa_expected):
    exp = mvsa_expected
    assert exp["rows"] == 1000
    s = _inspect_json(capsys, "--dataset", "mvsa_single", "--data-dir", str(MVSA_SINGLE))
    assert s["report"]["rows_seen"] == exp["rows"]
    assert s["samples"] == len(exp["kept"])
    assert s["class_counts"] == {c: sum(1 for v in exp["kept"].values() if v == c) for c in CLASSES}
    assert s["report"]["dropped"] == dict(exp["dropped"])
    assert s["fallback_decodes"] == exp["not_utf8"] > 0  # "many .txt files are not valid UTF-8"
    assert s["report"]["flagged"].get("missing_image", 0) == exp["no_image"]
    assert s["report"]["rows_seen"] == s["samples"] + s["dropped_total"]


def test_mvsa_single_sample_clmlf_split(capsys, mvsa_expected):
    _need(CLMLF_SINGLE)
    given: dict[str, tuple[str, int]] = {}
    for fname, split in (("train.json", "train"), ("dev.json", "val"), ("test.json", "test")):
        for item in json.loads((CLMLF_SINGLE / fname).read_text(encoding="utf-8")):
            given[str(item["id"])] = (split, item["emotion_label"])
    kept = mvsa_expected["kept"]
    # every kept post has a split, and the split file's label agrees with the independent rule
    assert [sid for sid in kept if sid not in given] == []
    assert [sid for sid, lbl in kept.items() if CLASSES[given[sid][1]] != lbl] == []

    s = _inspect_json(capsys, "--dataset", "mvsa_single", "--data-dir", str(MVSA_SINGLE),
                      "--split-file", str(CLMLF_SINGLE))
    assert s["split_source"] == str(CLMLF_SINGLE)
    assert s["split_file_unassigned_ids"] == 0
    assert "none" not in s["split_counts"]
    assert s["split_file_unknown_ids"] == len(set(given) - set(kept))
    expected = {sp: dict.fromkeys(CLASSES, 0) for sp in ("train", "val", "test")}
    for sid, lbl in kept.items():
        expected[given[sid][0]][lbl] += 1
    assert s["split_counts"] == expected
