"""Dataset readers on small fixtures written into tmp_path (no real data needed).

Every reader must account for every row it saw: ``rows_seen == kept + sum(dropped)``; dropped samples
never reach the cache, flagged ones are kept with a known defect.
"""

from __future__ import annotations

import csv
import json
import os
import re
from itertools import product
from pathlib import Path

import pytest
from mmcache.extract.datasets import SENTIMENT3, get_dataset, list_datasets, load_dataset
from mmcache.extract.datasets.demo import demo_words, generate_demo
from PIL import Image

from mmcache.errors import BadInputError

EXPECTED_DATASETS = {"demo", "folder", "memotion", "mvsa_single", "mvsa_multiple"}


# --------------------------------------------------------------------------- helpers


def _image(path: Path, color=(200, 30, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _accounted(result) -> None:
    rep = result.report
    assert rep.rows_seen == len(result.samples) + sum(rep.dropped.values()), rep.to_dict()


def _by_id(result) -> dict:
    return {s.id: s for s in result.samples}


def _make_mvsa(root: Path, rows: list[str], *, texts: dict[str, bytes] | None = None,
               images: set[str] | None = None, header: str = "ID\ttext,image") -> Path:
    """``rows`` are raw label lines (``ID<TAB>text,image...``); written with CRLF line ends.
    By default every id gets a UTF-8 .txt and a .jpg."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (root / "labelResultAll.txt").write_bytes(("\r\n".join([header, *rows]) + "\r\n").encode("utf-8"))
    ids = [r.split("\t")[0].strip() for r in rows]
    texts = {sid: f"tweet number {sid}".encode() for sid in ids} if texts is None else texts
    images = set(ids) if images is None else images
    for sid, raw in texts.items():
        (data / f"{sid}.txt").write_bytes(raw)
    for sid in images:
        _image(data / f"{sid}.jpg")
    return root


# Explicit table of the cleaning rule (written out, not computed with the library's merge_labels).
RULE = {
    ("positive", "positive"): "positive",
    ("neutral", "neutral"): "neutral",
    ("negative", "negative"): "negative",
    ("positive", "neutral"): "positive",
    ("neutral", "positive"): "positive",
    ("negative", "neutral"): "negative",
    ("neutral", "negative"): "negative",
    ("positive", "negative"): None,
    ("negative", "positive"): None,
}
COMBOS = list(product(SENTIMENT3, SENTIMENT3))


# --------------------------------------------------------------------------- registry


def test_list_datasets_has_the_five_builtins():
    names = list_datasets()
    assert EXPECTED_DATASETS <= set(names)
    assert names == sorted(names)


def test_get_dataset_unknown_lists_names():
    with pytest.raises(BadInputError) as e:
        get_dataset("nope")
    msg = str(e.value)
    assert "nope" in msg
    for name in EXPECTED_DATASETS:
        assert name in msg


def test_load_dataset_unknown_name():
    with pytest.raises(BadInputError, match="known datasets"):
        load_dataset("nope", "/nonexistent")


def test_unknown_option_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="bogus"):
        load_dataset("demo", tmp_path / "demo", bogus="1")
    with pytest.raises(BadInputError, match="colour"):
        load_dataset("mvsa_single", tmp_path, colour="red")


@pytest.mark.parametrize(("name", "opts"), [
    ("demo", {"n": "abc"}),
    ("demo", {"seed": "1.5"}),
    ("mvsa_single", {"strict_agree": "maybe"}),
])
def test_badly_typed_option_is_bad_input(tmp_path, name, opts):
    # an mvsa folder that would otherwise load, so only the option can fail
    _make_mvsa(tmp_path / "m", ["1\tpositive,positive"])
    with pytest.raises(BadInputError, match=next(iter(opts))):
        load_dataset(name, tmp_path / ("d" if name == "demo" else "m"), **opts)


@pytest.mark.parametrize("value", ["true", "YES", "1", "on"])
def test_bool_option_strings_coerce(tmp_path, value):
    _make_mvsa(tmp_path, ["1\tpositive,positive", "2\tneutral,positive"])
    res = load_dataset("mvsa_single", tmp_path, strict_agree=value)
    assert res.options["strict_agree"] is True
    assert [s.id for s in res.samples] == ["1"]


@pytest.mark.parametrize("name", ["mvsa_single", "mvsa_multiple", "memotion", "folder"])
def test_missing_folder_is_bad_input(tmp_path, name):
    with pytest.raises(BadInputError, match="does not exist"):
        load_dataset(name, tmp_path / "absent")


@pytest.mark.parametrize(("name", "match"), [
    ("mvsa_single", "labelResultAll.txt"),
    ("mvsa_multiple", "labelResultAll.txt"),
    ("memotion", "labels.csv"),
    ("folder", "manifest"),
])
def test_missing_label_file_is_bad_input(tmp_path, name, match):
    (tmp_path / "data").mkdir()  # MVSA checks data/ first; give it one so the label file is the problem
    (tmp_path / "images").mkdir()
    with pytest.raises(BadInputError, match=match):
        load_dataset(name, tmp_path)


def test_mvsa_missing_data_dir_is_bad_input(tmp_path):
    (tmp_path / "labelResultAll.txt").write_text("ID\ttext,image\n1\tpositive,positive\n")
    with pytest.raises(BadInputError, match="data/"):
        load_dataset("mvsa_single", tmp_path)


def test_no_data_dir_and_no_default_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default folders are relative; none exists here
    with pytest.raises(BadInputError, match="no --data-dir"):
        load_dataset("mvsa_multiple")


def test_no_usable_samples_is_bad_input(tmp_path):
    _make_mvsa(tmp_path, ["1\tpositive,negative", "2\thappy,positive"])
    with pytest.raises(BadInputError, match="no usable samples"):
        load_dataset("mvsa_single", tmp_path)


# --------------------------------------------------------------------------- mvsa_single


def test_mvsa_single_rule_on_all_nine_combos(tmp_path):
    rows = [f"{i}\t{t},{im}" for i, (t, im) in enumerate(COMBOS, 1)]
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, rows))
    got = _by_id(res)
    assert res.dataset == "mvsa_single"
    assert res.classes == ("positive", "neutral", "negative")
    for i, (t, im) in enumerate(COMBOS, 1):
        want = RULE[(t, im)]
        if want is None:
            assert str(i) not in got, (t, im)
            continue
        s = got[str(i)]
        assert s.label_name == want, (t, im)
        assert s.label == SENTIMENT3.index(want)
        assert s.extra["text_label"] == t and s.extra["image_label"] == im
        assert s.extra["labels_agree"] == int(t == im)
        assert s.text == f"tweet number {i}"
        assert s.image_path is not None and s.image_path.is_file()
    assert dict(res.report.dropped) == {"positive_vs_negative": 2}
    assert res.report.rows_seen == 9
    assert dict(res.report.flagged) == {}
    assert res.class_counts() == {"positive": 3, "neutral": 1, "negative": 3}
    _accounted(res)


def test_mvsa_single_strict_agree_drops_disagreeing(tmp_path):
    rows = [f"{i}\t{t},{im}" for i, (t, im) in enumerate(COMBOS, 1)]
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, rows), strict_agree=True)
    assert sorted(s.label_name for s in res.samples) == sorted(SENTIMENT3)
    assert all(s.extra["text_label"] == s.extra["image_label"] for s in res.samples)
    assert sum(res.report.dropped.values()) == 6
    assert res.report.dropped["labels_disagree_strict"] >= 4  # the neutral+polar ones at least
    _accounted(res)


def test_mvsa_single_crlf_header_and_case(tmp_path):
    # upper-case labels, spaces around the comma, blank lines: all tolerated
    rows = ["10\tPositive , Neutral", "", "11\tNEGATIVE,negative"]
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, rows, images={"10", "11"},
                                                 texts={"10": b"a", "11": b"b"}))
    assert {s.id: s.label_name for s in res.samples} == {"10": "positive", "11": "negative"}
    assert all("\r" not in s.id and "\r" not in s.label_name for s in res.samples)
    assert res.report.rows_seen == 2
    _accounted(res)


def test_mvsa_single_header_required(tmp_path):
    _make_mvsa(tmp_path, ["1\tpositive,positive"], header="1\tpositive,positive")
    with pytest.raises(BadInputError, match="header"):
        load_dataset("mvsa_single", tmp_path)


@pytest.mark.parametrize(("raw", "encoding", "expected"), [
    ("你好，世界…今天很开心".encode("gb18030"), "gb18030", "你好，世界…今天很开心"),
    (b"I love caf\xe9", "cp1252", "I love café"),
])
def test_mvsa_single_fallback_decoding_counted_and_flagged(tmp_path, raw, encoding, expected):
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # the fixture really is not UTF-8
    texts = {"1": raw, "2": b"plain ascii tweet"}
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, ["1\tpositive,positive", "2\tneutral,neutral"],
                                                 texts=texts))
    got = _by_id(res)
    assert got["1"].text == expected
    assert got["2"].text == "plain ascii tweet"
    assert res.report.decoded_with[encoding] == 1
    assert res.report.decoded_with["utf-8"] == 1
    assert res.report.fallback_decodes == 1
    assert res.report.flagged[f"text_decoded_{encoding}"] == 1
    assert res.report.examples[f"text_decoded_{encoding}"] == ["1"]
    _accounted(res)


def test_mvsa_single_missing_files_are_flagged_and_kept(tmp_path):
    rows = ["1\tpositive,positive", "2\tneutral,neutral", "3\tnegative,negative", "4\tpositive,positive"]
    texts = {"1": b"ok", "2": b"no image for me", "4": b"   \r\n  "}
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, rows, texts=texts, images={"1", "3", "4"}))
    got = _by_id(res)
    assert set(got) == {"1", "2", "3", "4"}
    assert res.report.flagged["missing_image"] == 1
    assert res.report.examples["missing_image"] == ["2"]
    assert got["2"].image_path is None or not got["2"].image_path.exists()
    assert got["2"].text == "no image for me"
    assert res.report.flagged["missing_text_file"] == 1
    assert res.report.examples["missing_text_file"] == ["3"]
    assert got["3"].text == ""
    assert res.report.flagged["empty_text"] == 1
    assert res.report.examples["empty_text"] == ["4"]
    assert got["4"].text == ""
    assert sum(res.report.dropped.values()) == 0
    _accounted(res)


def test_mvsa_single_drops_duplicates_unknown_and_malformed(tmp_path):
    rows = [
        "1\tpositive,positive",
        "1\tnegative,negative",  # duplicate id: the first one wins
        "2\thappy,positive",  # unknown label
        "3\tpositive",  # malformed: no image label
        "4",  # malformed: no labels at all
        "5\tpositive,neutral,negative",  # malformed: three labels
        "6\tneutral,positive\tneutral,positive",  # malformed: two pairs in a single-annotator file
        "\tpositive,positive",  # malformed: no id
        "7\tneutral,negative",
        "8\tpositive,negative",
    ]
    ids = [str(i) for i in range(1, 9)]
    texts = {sid: b"t" for sid in ids}
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, rows, texts=texts, images=set(ids)))
    got = _by_id(res)
    assert set(got) == {"1", "7"}
    assert got["1"].label_name == "positive"
    assert got["7"].label_name == "negative"
    rep = res.report
    assert rep.rows_seen == 10
    assert dict(rep.dropped) == {"duplicate_id": 1, "unknown_label": 1, "malformed_row": 5,
                                 "positive_vs_negative": 1}
    assert rep.examples["duplicate_id"] == ["1"]
    assert rep.examples["unknown_label"] == ["2"]
    _accounted(res)


def test_mvsa_single_id_escaping_data_dir_is_dropped(tmp_path):
    (tmp_path / "secret.txt").write_text("outside the data folder")
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, ["../secret\tpositive,positive", "1\tneutral,neutral"],
                                                 texts={"1": b"fine"}, images={"1"}))
    assert [s.id for s in res.samples] == ["1"]
    assert res.report.dropped["path_outside_root"] == 1
    _accounted(res)


def test_mvsa_single_sample_order_is_file_order(tmp_path):
    rows = ["30\tpositive,positive", "4\tneutral,neutral", "100\tnegative,negative"]
    res = load_dataset("mvsa_single", _make_mvsa(tmp_path, rows))
    assert [s.id for s in res.samples] == ["30", "4", "100"]


# --------------------------------------------------------------------------- mvsa_multiple


def _multi_row(sid: str, text_votes: str, image_votes: str) -> str:
    t, i = text_votes.split(), image_votes.split()
    return sid + "\t" + "\t".join(f"{a},{b}" for a, b in zip(t, i, strict=True))


MULTI_ROWS = [
    # id, text votes, image votes, expected label (None: dropped) and reason
    ("1", "positive positive neutral", "neutral neutral positive", "positive", None),
    ("2", "positive neutral negative", "positive positive positive", None, "no_annotator_majority"),
    ("3", "neutral neutral neutral", "positive neutral negative", None, "no_annotator_majority"),
    ("4", "negative negative negative", "positive positive negative", None, "positive_vs_negative"),
    ("5", "neutral neutral positive", "neutral negative negative", "negative", None),
    ("6", "neutral neutral neutral", "neutral neutral negative", "neutral", None),
    ("7", "positive negative negative", "negative neutral negative", "negative", None),
    ("8", "negative neutral neutral", "positive positive neutral", "positive", None),
]


def test_mvsa_multiple_majority_then_rule(tmp_path):
    rows = [_multi_row(sid, t, i) for sid, t, i, _, _ in MULTI_ROWS]
    rows.append("9\tpositive,positive\tpositive,positive")  # only two annotators: malformed
    res = load_dataset("mvsa_multiple", _make_mvsa(tmp_path, rows,
                                                   header="ID\ttext,image\ttext,image\ttext,image"))
    got = _by_id(res)
    assert res.dataset == "mvsa_multiple"
    assert {k: s.label_name for k, s in got.items()} == {
        sid: want for sid, _, _, want, _ in MULTI_ROWS if want is not None}
    assert dict(res.report.dropped) == {"no_annotator_majority": 2, "positive_vs_negative": 1, "malformed_row": 1}
    assert got["1"].extra["text_label"] == "positive" and got["1"].extra["image_label"] == "neutral"
    assert got["6"].extra["labels_agree"] == 1
    assert got["8"].extra["labels_agree"] == 0
    assert res.report.rows_seen == 9
    _accounted(res)


def test_mvsa_multiple_strict_agree(tmp_path):
    rows = [_multi_row(sid, t, i) for sid, t, i, _, _ in MULTI_ROWS]
    rows.append(_multi_row("10", "positive positive neutral", "positive neutral positive"))
    res = load_dataset("mvsa_multiple", _make_mvsa(tmp_path, rows), strict_agree=True)
    assert [s.id for s in res.samples] == ["6", "7", "10"]
    assert res.report.dropped["no_annotator_majority"] == 2  # majority is decided before the agree check
    _accounted(res)


def test_mvsa_multiple_single_pair_rows_are_malformed(tmp_path):
    _make_mvsa(tmp_path, ["1\tpositive,positive", _multi_row("2", "positive " * 3, "neutral " * 3)])
    res = load_dataset("mvsa_multiple", tmp_path)
    assert [s.id for s in res.samples] == ["2"]
    assert res.report.dropped["malformed_row"] == 1


# --------------------------------------------------------------------------- memotion

MEMOTION_HEADER = ["", "image_name", "text_ocr", "text_corrected", "humour", "sarcasm", "offensive",
                   "motivational", "overall_sentiment"]
# The truncated dump the real file holds in ~110 cells (an unclosed <style>), and a complete one.
HTML_TRUNCATED = ('<html><head><meta content="text/html; charset=UTF-8" http-equiv="content-type">'
                  '<style type="text/css">ol{margin:0;padding:0}table td')
HTML_FULL = ('<html><head><meta content="text/html; charset=UTF-8" http-equiv="content-type">'
             '<style type="text/css">ol{margin:0;padding:0}table td{border:1px solid}</style>'
             '<title>doc</title></head><body class="c5"><p class="c1"><span class="c0"></span></p></body></html>')


def _mem_row(name, ocr, corrected, s5, humour="funny", sarcasm="general", offensive="not_offensive",
             motivational="not_motivational"):
    return [name, ocr, corrected, humour, sarcasm, offensive, motivational, s5]


def _make_memotion(root: Path, rows: list[list[str]], *, images: set[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MEMOTION_HEADER)
        for i, r in enumerate(rows):
            w.writerow([i, *r])
    names = {r[0] for r in rows} if images is None else images
    for name in names:
        if "/" not in name:
            _image(root / "images" / name)
    return root


MEMOTION_ROWS = [
    _mem_row("image_1.jpg", "HELLO, WORLD ocr", 'Hello, "world", again, with commas', "very_positive",
             humour="hilarious", sarcasm="twisted_meaning", offensive="slight", motivational="motivational"),
    _mem_row("image_2.png", "FALLBACK OCR TEXT", "", "positive"),
    _mem_row("image_3.jpeg", "real ocr words", HTML_TRUNCATED, "neutral"),
    _mem_row("image_4.PNG", "", HTML_FULL, "negative"),
    _mem_row("image_5.jpg", "x", "i <3 you so much <3 & more", "very_negative"),
    _mem_row("image_6.bmp", HTML_TRUNCATED, "   ", "neutral"),
]


def test_memotion_parsing_text_and_labels(tmp_path):
    res = load_dataset("memotion", _make_memotion(tmp_path, MEMOTION_ROWS))
    got = _by_id(res)
    assert res.dataset == "memotion"
    assert list(got) == ["image_1", "image_2", "image_3", "image_4", "image_5", "image_6"]
    # quoting and commas inside a cell
    assert got["image_1"].text == 'Hello, "world", again, with commas'
    # empty text_corrected -> text_ocr
    assert got["image_2"].text == "FALLBACK OCR TEXT"
    # an HTML dump is never the text: fall back to the OCR, or stay empty
    assert got["image_3"].text == "real ocr words"
    assert got["image_4"].text == ""
    assert got["image_6"].text == ""
    for s in res.samples:
        assert not re.search(r"<\s*/?\s*[a-zA-Z]", s.text), s.text
        for junk in ("charset", "margin", "http-equiv", "{", "doc"):
            assert junk not in s.text, (s.id, s.text)
    # '<3' is not markup
    assert got["image_5"].text == "i <3 you so much <3 & more"
    rep = res.report
    assert rep.flagged["empty_text"] == 2
    assert set(rep.examples["empty_text"]) == {"image_4", "image_6"}
    assert rep.flagged["html_in_text_corrected"] == 2
    assert rep.flagged["html_in_text_ocr"] == 1
    assert rep.decoded_with == {"utf-8": 1}
    assert all(s.image_path is not None and s.image_path.is_file() for s in res.samples)
    assert "missing_image" not in rep.flagged
    _accounted(res)


def test_memotion_five_to_three_and_extra_fields(tmp_path):
    res = load_dataset("memotion", _make_memotion(tmp_path, MEMOTION_ROWS))
    got = _by_id(res)
    want = {"image_1": ("positive", "very_positive", 0), "image_2": ("positive", "positive", 1),
            "image_3": ("neutral", "neutral", 2), "image_4": ("negative", "negative", 3),
            "image_5": ("negative", "very_negative", 4), "image_6": ("neutral", "neutral", 2)}
    for sid, (task_a, s5, s5_id) in want.items():
        s = got[sid]
        assert s.label_name == task_a
        assert s.label == SENTIMENT3.index(task_a)
        assert s.extra["sentiment5"] == s5
        assert s.extra["sentiment5_label"] == s5_id
        for key in ("humour", "sarcasm", "offensive", "motivational"):
            assert key in s.extra
    assert got["image_1"].extra["humour"] == "hilarious"
    assert got["image_1"].extra["sarcasm"] == "twisted_meaning"
    assert got["image_1"].extra["offensive"] == "slight"
    assert got["image_1"].extra["motivational"] == "motivational"
    assert res.class_counts() == {"positive": 2, "neutral": 2, "negative": 2}


def test_memotion_unsafe_missing_duplicate_unknown(tmp_path):
    _image(tmp_path / "m" / "escape.jpg")  # exists, but outside images/: must still be refused
    rows = [
        _mem_row("image_1.jpg", "a", "first", "positive"),
        _mem_row("../escape.jpg", "b", "sneaky", "positive"),
        _mem_row("../../etc/passwd", "c", "sneakier", "negative"),
        _mem_row("image_7.jpg", "d", "no file on disk", "neutral"),
        _mem_row("image_8.jpg", "e", "what label", "meh"),
        _mem_row("image_1.png", "f", "same stem again", "negative"),
        _mem_row("", "g", "no image name", "neutral"),
    ]
    res = load_dataset("memotion", _make_memotion(tmp_path / "m", rows, images={"image_1.jpg", "image_8.jpg"}))
    got = _by_id(res)
    assert set(got) == {"image_1", "image_7"}
    assert got["image_1"].text == "first"
    rep = res.report
    assert rep.dropped["path_outside_root"] == 2
    assert rep.dropped["unknown_label"] == 1
    assert rep.dropped["duplicate_id"] == 1
    assert rep.dropped["missing_image_name"] == 1
    assert rep.flagged["missing_image"] == 1
    assert rep.examples["missing_image"] == ["image_7"]
    assert got["image_7"].text == "no file on disk"
    _accounted(res)


def test_memotion_missing_required_column(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "labels.csv").write_text("image_name,text_ocr\nimage_1.jpg,hi\n")
    with pytest.raises(BadInputError, match="overall_sentiment"):
        load_dataset("memotion", tmp_path)


def test_memotion_multiline_quoted_cell_keeps_word_boundary(tmp_path):
    rows = [_mem_row("image_1.jpg", "x", "line one\nline two", "positive")]
    res = load_dataset("memotion", _make_memotion(tmp_path, rows))
    assert res.samples[0].text == "line one line two"


def test_memotion_dropped_rows_are_not_also_flagged(tmp_path):
    rows = [_mem_row("image_1.jpg", "a", "kept", "positive"),
            _mem_row("../escape.jpg", HTML_TRUNCATED, "", "positive")]
    res = load_dataset("memotion", _make_memotion(tmp_path / "m", rows, images={"image_1.jpg"}))
    assert res.report.dropped["path_outside_root"] == 1
    assert dict(res.report.flagged) == {}


# --------------------------------------------------------------------------- folder


def _folder_fixture(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png", "c.jpg", "d.png", "e.png"):
        _image(root / "imgs" / name)
    _image(root.parent / "outside.png")  # exists, but outside the manifest folder
    return root


FOLDER_ROWS = [
    {"id": "a", "text": "good, very good", "image": "imgs/a.png", "label": "positive", "split": "train"},
    {"id": "b", "text": "meh", "image": "imgs/b.png", "label": "neutral", "split": "dev"},
    {"id": "c", "text": "bad", "image": "imgs/c.jpg", "label": "negative", "split": "test"},
    {"id": "d", "text": "escape", "image": "../outside.png", "label": "positive", "split": "train"},
    {"id": "a", "text": "again", "image": "imgs/a.png", "label": "negative", "split": "train"},
    {"id": "e", "text": "what", "image": "imgs/e.png", "label": "ecstatic", "split": "train"},
    {"id": "f", "text": "", "image": "imgs/missing.png", "label": "neutral", "split": "VALID"},
]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_manifest(tmp_path, fmt):
    root = _folder_fixture(tmp_path / "ds")
    (_write_csv if fmt == "csv" else _write_jsonl)(root / f"manifest.{fmt}", FOLDER_ROWS)
    res = load_dataset("folder", root, classes="positive,neutral,negative")
    got = _by_id(res)
    assert list(got) == ["a", "b", "c", "f"]
    assert res.classes == SENTIMENT3
    assert got["a"].text == "good, very good" and got["a"].label_name == "positive" and got["a"].label == 0
    assert got["c"].label == 2
    # image paths resolve relative to the manifest, not the working directory
    assert got["a"].image_path == (root / "imgs" / "a.png").resolve()
    assert got["c"].image_path.is_file()
    # splits: dev / VALID -> val
    assert {k: s.split for k, s in got.items()} == {"a": "train", "b": "val", "c": "test", "f": "val"}
    rep = res.report
    assert rep.dropped == {"path_outside_root": 1, "duplicate_id": 1, "unknown_label": 1}
    assert rep.examples["path_outside_root"] == ["d"]
    assert rep.examples["duplicate_id"] == ["a"]
    assert rep.examples["unknown_label"] == ["e"]
    assert rep.flagged["missing_image"] == 1 and rep.flagged["empty_text"] == 1
    _accounted(res)


def test_folder_manifest_in_subfolder_paths_relative_to_it(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _image(root / "pics" / "x.png")
    _write_csv(root / "manifest.csv", [{"id": "x", "text": "hi", "image": "pics/x.png", "label": "positive"}])
    monkeypatch.chdir(tmp_path)  # a relative data dir must still resolve images next to the manifest
    res = load_dataset("folder", "ds")
    assert res.samples[0].image_path.is_file()
    assert res.samples[0].split is None


def test_folder_symlink_out_of_root_is_refused(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    target = _image(tmp_path / "elsewhere" / "x.png")
    try:
        os.symlink(target, root / "link.png")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    _write_csv(root / "manifest.csv", [
        {"id": "x", "text": "hi", "image": "link.png", "label": "positive"},
        {"id": "y", "text": "hi", "image": "", "label": "negative"},
    ])
    res = load_dataset("folder", root)
    assert [s.id for s in res.samples] == ["y"]
    assert res.report.dropped["path_outside_root"] == 1
    assert res.report.flagged["missing_image"] == 1  # no image given at all


def test_folder_integer_labels_inferred_classes(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    rows = [{"id": "a", "text": "t", "image": "imgs/a.png", "label": 0},
            {"id": "b", "text": "t", "image": "imgs/b.png", "label": 2},
            {"id": "c", "text": "t", "image": "imgs/c.jpg", "label": 1}]
    _write_jsonl(root / "manifest.jsonl", rows)
    res = load_dataset("folder", root)
    assert res.classes == ("0", "1", "2")
    assert {s.id: s.label for s in res.samples} == {"a": 0, "b": 2, "c": 1}


def test_folder_integer_labels_with_classes_option(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    rows = [{"id": "a", "text": "t", "image": "imgs/a.png", "label": "0"},
            {"id": "b", "text": "t", "image": "imgs/b.png", "label": "1"},
            {"id": "c", "text": "t", "image": "imgs/c.jpg", "label": "cat"},
            {"id": "d", "text": "t", "image": "imgs/d.png", "label": "2"}]  # out of range for two classes
    _write_csv(root / "manifest.csv", rows)
    res = load_dataset("folder", root, classes="cat, dog")
    assert res.classes == ("cat", "dog")
    assert {s.id: s.label_name for s in res.samples} == {"a": "cat", "b": "dog", "c": "cat"}
    assert res.report.dropped == {"unknown_label": 1}
    assert res.report.examples["unknown_label"] == ["d"]


def test_folder_named_labels_classes_default(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    rows = [{"id": "a", "text": "t", "image": "imgs/a.png", "label": "negative"},
            {"id": "b", "text": "t", "image": "imgs/b.png", "label": "positive"}]
    _write_csv(root / "manifest.csv", rows)
    assert load_dataset("folder", root).classes == SENTIMENT3  # the sentiment triple, in its usual order
    rows.append({"id": "c", "text": "t", "image": "imgs/c.jpg", "label": "mixed"})
    _write_csv(root / "manifest.csv", rows)
    assert load_dataset("folder", root).classes == ("mixed", "negative", "positive")


def test_folder_extra_columns_and_unknown_split(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    rows = [{"id": "a", "text": "t", "image": "imgs/a.png", "label": "positive", "split": "holdout", "src": "x"}]
    _write_csv(root / "manifest.csv", rows)
    res = load_dataset("folder", root)
    assert res.samples[0].split is None
    assert res.samples[0].extra == {"src": "x"}
    assert res.report.flagged["unknown_split"] == 1


def test_folder_bad_json_line_is_bad_input(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    good = json.dumps({"id": "a", "text": "t", "image": "imgs/a.png", "label": "positive"})
    (root / "manifest.jsonl").write_text(good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(BadInputError, match=r"manifest\.jsonl:2"):
        load_dataset("folder", root)


def test_folder_jsonl_non_object_line_is_bad_input(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    (root / "manifest.jsonl").write_text('["a", "b"]\n', encoding="utf-8")
    with pytest.raises(BadInputError, match="JSON object"):
        load_dataset("folder", root)


@pytest.mark.parametrize(("content", "match"), [
    ("id,text,label\na,hi,positive\n", "image"),
    ("id,text,image,label\n", "empty"),
])
def test_folder_bad_manifest_is_bad_input(tmp_path, content, match):
    (tmp_path / "manifest.csv").write_text(content)
    with pytest.raises(BadInputError, match=match):
        load_dataset("folder", tmp_path)


def test_folder_multiline_text_cell(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    _write_csv(root / "manifest.csv", [{"id": "a", "text": "great day\nlove it", "image": "imgs/a.png",
                                        "label": "positive"}])
    assert load_dataset("folder", root).samples[0].text == "great day love it"


def test_folder_unicode_line_separator_in_text(tmp_path):
    root = _folder_fixture(tmp_path / "ds")
    _write_csv(root / "manifest.csv", [
        {"id": "a", "text": "first line\u2028second line", "image": "imgs/a.png", "label": "positive"},
        {"id": "b", "text": "plain", "image": "imgs/b.png", "label": "negative"},
    ])
    res = load_dataset("folder", root, classes="positive,neutral,negative")
    assert [s.id for s in res.samples] == ["a", "b"]
    assert res.report.rows_seen == 2


# --------------------------------------------------------------------------- demo


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_deterministic(tmp_path):
    m1 = generate_demo(tmp_path / "a", n=40, seed=3)
    m2 = generate_demo(tmp_path / "b", n=40, seed=3)
    t1, t2 = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert m1.read_bytes() == m2.read_bytes()
    assert t1 == t2
    assert sum(1 for k in t1 if k.startswith("images")) == 40
    m3 = generate_demo(tmp_path / "c", n=40, seed=4)
    assert m3.read_bytes() != m1.read_bytes()
    assert _tree_bytes(tmp_path / "c") != t1


def test_demo_reused_when_params_equal_regenerated_otherwise(tmp_path):
    out = tmp_path / "demo"
    manifest = generate_demo(out, n=30, seed=0)
    first_img = out / "images" / "demo_0000.png"
    old = 1_000_000_000  # push mtimes far into the past so any rewrite is visible
    for p in (manifest, first_img):
        os.utime(p, (old, old))
    before = manifest.read_bytes()
    assert generate_demo(out, n=30, seed=0) == manifest
    assert manifest.stat().st_mtime == old and first_img.stat().st_mtime == old
    # through the registry too
    res = load_dataset("demo", out, n="30", seed="0")
    assert manifest.stat().st_mtime == old
    assert len(res.samples) == 30 and res.dataset == "demo"
    # other params: regenerated, no stale images left behind
    generate_demo(out, n=20, seed=0)
    assert manifest.stat().st_mtime != old
    assert len(list((out / "images").iterdir())) == 20
    assert manifest.read_bytes() != before


def test_demo_interrupted_generation_is_redone(tmp_path):
    out = tmp_path / "demo"
    generate_demo(out, n=20, seed=1)
    good = _tree_bytes(out)
    (out / "demo.json").unlink()  # as if killed before the marker was written
    (out / "images" / "demo_0003.png").write_bytes(b"truncated")
    generate_demo(out, n=20, seed=1)
    assert _tree_bytes(out) == good


def test_demo_groups_classes_and_words(tmp_path):
    res = load_dataset("demo", tmp_path / "demo", n=200, seed=0)
    assert res.classes == SENTIMENT3
    assert {s.extra["group"] for s in res.samples} == {"text", "image", "both", "combo"}
    assert set(res.class_counts()) == set(SENTIMENT3)
    assert all(v > 0 for v in res.class_counts().values())
    assert all(s.image_path is not None and s.image_path.is_file() for s in res.samples)
    assert dict(res.report.dropped) == {} and dict(res.report.flagged) == {}
    vocab = set(demo_words())
    used = {w.strip(",.") for s in res.samples for w in s.text.split()}
    assert used <= vocab, used - vocab
    assert demo_words() == sorted(vocab)
    # combo posts are positive / negative only
    assert {s.label_name for s in res.samples if s.extra["group"] == "combo"} <= {"positive", "negative"}


@pytest.mark.parametrize("n", [0, -5])
def test_demo_non_positive_n_is_bad_input(tmp_path, n):
    with pytest.raises(BadInputError):
        load_dataset("demo", tmp_path / "demo", n=n)


# --------------------------------------------------------------------------- reader contract (every registered reader)

#: reader name -> builder of a small dataset folder of that reader's layout: tmp_path -> (path, options).
#: A reader module without an entry here fails test_every_reader_has_a_contract_fixture: adding a reader
#: is its module plus one line here.
FIXTURES = {
    "demo": lambda d: (d / "demo", {"n": 12, "seed": 1}),  # generated on first use (generates_data)
    "folder": lambda d: (_write_csv(_folder_fixture(d / "folder") / "manifest.csv", FOLDER_ROWS), {}),
    "memotion": lambda d: (_make_memotion(d / "memotion", MEMOTION_ROWS), {}),
    "mvsa_single": lambda d: (_make_mvsa(d / "mvsa_single", [f"{i}\t{t},{m}" for i, (t, m) in enumerate(COMBOS)]), {}),
    "mvsa_multiple": lambda d: (_make_mvsa(d / "mvsa_multiple", [_multi_row(*r[:3]) for r in MULTI_ROWS],
                                           header="ID\ttext,image\ttext,image\ttext,image"), {}),
}


def test_every_reader_has_a_contract_fixture():
    assert set(FIXTURES) == set(list_datasets())


@pytest.mark.parametrize("name", list_datasets())
def test_reader_contract(tmp_path, name):
    """Each reader: its samples carry the declared fields, every row it saw is kept or dropped with a
    reason, and every target it declares has classes that its samples' codes index."""
    from mmcache.extract.datasets import TARGET_REASONS

    spec = get_dataset(name)
    path, options = FIXTURES[name](tmp_path)
    res = load_dataset(name, path, **options)
    assert res.dataset == name and res.samples
    _accounted(res)
    assert len({s.id for s in res.samples}) == len(res.samples), "ids must be unique"
    for s in res.samples:
        assert isinstance(s.id, str) and s.id and isinstance(s.text, str)
        assert s.image_path is None or isinstance(s.image_path, Path)
        assert 0 <= s.label < len(res.classes) and s.label_name == res.classes[s.label]
    declared = [t.name for t in spec.targets]
    assert [t.name for t in res.targets][:len(declared)] == declared and res.targets[0].field is None
    for t in res.targets:
        assert t.classes, f"target {t.name!r} has no classes"
        if t.field is not None:
            assert all(t.field in s.extra for s in res.samples), f"samples lack the declared field {t.field!r}"
    for target, codes in res.target_codes().items():
        n = len(next(t for t in res.targets if t.name == target).classes)
        assert all(0 <= c < n or c in TARGET_REASONS for c in codes), target
    for task, members in res.tasks.items():
        assert set(members) <= {t.name for t in res.targets}, task


def test_spec_properties_replace_name_checks(tmp_path):
    """What used to be `name == "demo"` / `name == "folder"` is what the specs declare."""
    assert {n for n in list_datasets() if get_dataset(n).generates_data} == {"demo"}
    assert {n for n in list_datasets() if get_dataset(n).accepts_file} == {"folder"}
    manifest, _ = FIXTURES["folder"](tmp_path)
    assert load_dataset("folder", manifest).samples  # a file path, accepted
    with pytest.raises(BadInputError, match="does not exist"):
        load_dataset("mvsa_single", manifest)  # a file where a folder is needed
    assert load_dataset("demo", tmp_path / "new" / "demo", n=6).samples  # a folder that is not there yet
