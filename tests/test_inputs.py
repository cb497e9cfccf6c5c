"""Malformed inputs never crash and never silently change (issue: inputs tried as an adversary).

Each case is injected and its outcome asserted: a CSV cell over Python's csv field limit, text that merely
mentions an HTML tag, text made of zero-width characters, formula-looking cells in CSV outputs, a run in
which every row fails, a symlink loop as an image path."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from mmcache.extract import tiny_models as tm
from mmcache.extract.datasets import load_dataset
from mmcache.extract.textio import MAX_TEXT_CHARS, clean_text, is_blank, looks_like_html
from PIL import Image

from mmcache import cache as cf
from mmcache import cli
from mmcache.csvsafe import csv_cell, csv_dict, csv_row
from mmcache.errors import BadInputError

CSV_LIMIT = 131_072  # Python's default csv field size limit, the crash being fixed
LONG = ("word " * (CSV_LIMIT // 5 + 10_000)).strip()  # ~180,000 characters, no single token absurd
INVISIBLE = "\u200b\u200c \u200d\u2060\ufeff\t\u200b"
FORMULA_ID = "=HYPERLINK(\"http://x\",\"y\")"


def _write_manifest(root: Path, rows: list[dict], images: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.fromarray(np.full((24, 24, 3), 90, dtype=np.uint8)).save(root / name)
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        w.writerows(rows)
    return root


def _row(sid: str, text: str, image: str = "", label: str = "positive") -> dict:
    return {"id": sid, "text": text, "image": image, "label": label}


def _by_id(res) -> dict:
    return {s.id: s for s in res.samples}


def _flags(res) -> dict:
    """The report's flags but ``missing_image`` (most rows here have no image on purpose)."""
    return {k: v for k, v in res.report.flagged.items() if k != "missing_image"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"bert": tm.build_bert(root / "bert", hidden_size=16, num_heads=2, seed=41),
            "dinov2": tm.build_dinov2(root / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32,
                                      seed=42)}


def _extract(data: Path, cache: Path, models, *extra: str) -> list[str]:
    return ["extract", "-d", "folder", "--data-dir", str(data), "--cache-dir", str(cache), "--name", "posts",
            "--text-model", str(models["bert"]), "--image-model", str(models["dinov2"]), "--text-max-length", "16",
            "--dtype", "float32", "--device", "cpu", "--batch-size", "4", "--num-workers", "0", "--no-progress",
            *extra]


def _failures(cache: Path) -> list[dict]:
    with open(cache / "posts" / cf.FAILURES_NAME, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ 1. long cells

def test_cell_over_the_csv_field_limit_is_read_cut_and_flagged(tmp_path, capsys):
    root = _write_manifest(tmp_path / "ds", [_row("a", "short"), _row("b", LONG, label="negative"),
                                             _row("c", "also short", label="neutral")])
    res = load_dataset("folder", root)
    got = _by_id(res)
    assert len(LONG) > CSV_LIMIT and list(got) == ["a", "b", "c"]  # the rows after the long one are kept too
    assert got["b"].text == LONG[:MAX_TEXT_CHARS] and got["a"].text == "short"
    assert _flags(res) == {"text_truncated": 1} and res.report.examples["text_truncated"] == ["b"]
    assert "max_text_chars" not in res.options  # the default cap is not an option the user set
    small = load_dataset("folder", root, max_text_chars="50")  # as -o passes it: a string
    assert _by_id(small)["b"].text == LONG[:50] and _by_id(small)["c"].text == "also short"
    assert small.options["max_text_chars"] == 50  # stored with the index: another cap, another index
    assert cli.main(["inspect", "-d", "folder", "--data-dir", str(root)]) == 0
    assert "text_truncated" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_bad_max_text_chars_is_bad_input(tmp_path, capsys, value):
    root = _write_manifest(tmp_path / "ds", [_row("a", "short")])
    with pytest.raises(BadInputError, match="max_text_chars"):
        load_dataset("folder", root, max_text_chars=value)
    assert cli.main(["inspect", "-d", "folder", "--data-dir", str(root), "-o", f"max_text_chars={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_predict_manifest_with_a_huge_cell_is_read(tmp_path):
    from mmcache.posts import read_manifest

    root = _write_manifest(tmp_path / "ds", [_row("a", LONG), _row("b", "fine")])
    posts = read_manifest(root / "manifest.csv")
    assert [p.id for p in posts] == ["a", "b"] and posts[0].text == LONG and posts[1].text == "fine"


def test_memotion_cell_over_the_csv_field_limit_is_cut_and_flagged(tmp_path):
    root = tmp_path / "mem"
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "image_name", "text_ocr", "text_corrected", "overall_sentiment"])
        w.writerow([0, "image_1.jpg", "ocr", LONG, "positive"])
        w.writerow([1, "image_2.jpg", "ocr two", INVISIBLE, "negative"])  # shows nothing: the OCR instead
    res = load_dataset("memotion", root)
    got = _by_id(res)
    assert got["image_1"].text == LONG[:MAX_TEXT_CHARS] and got["image_2"].text == "ocr two"
    assert res.report.flagged["text_truncated"] == 1 and "empty_text" not in res.report.flagged


# ------------------------------------------------------------------------------ 2. HTML

def test_text_that_mentions_a_tag_is_kept_as_written(tmp_path):
    page = "<!DOCTYPE html><html><head><title>t</title><style>p{margin:0}</style></head><body><p>hi there</p></body></html>"
    rows = [_row("a", "use the <script> tag, it is great fun"), _row("b", "<b>bold</b> move, a <div> or <p>"),
            _row("c", page), _row("d", "pasted <body class='x'>the body</body> here"),
            _row("e", "  <HTML><p>caps</p>", label="neutral"), _row("f", "i <3 html & <br> tags", label="negative")]
    res = load_dataset("folder", _write_manifest(tmp_path / "ds", rows))
    got = _by_id(res)
    assert got["a"].text == "use the <script> tag, it is great fun"
    assert got["b"].text == "<b>bold</b> move, a <div> or <p>"
    assert got["f"].text == "i <3 html & <br> tags"
    assert got["c"].text == "hi there" and got["d"].text == "pasted the body here" and got["e"].text == "caps"
    assert _flags(res) == {"html_in_text": 3}
    assert sorted(res.report.examples["html_in_text"]) == ["c", "d", "e"]


def test_one_html_rule():
    assert looks_like_html("<!doctype HTML>\n<p>x</p>") and looks_like_html("\n <html lang='en'>")
    assert looks_like_html("x <html>y</html> z") and looks_like_html("<body>y</BODY >")
    for text in ("use the <script> tag", "<b>bold</b>", "a </html> alone", "<body> without its end", "i <3 you",
                 "a < b > c", "<htmlish>"):
        assert not looks_like_html(text), text
    assert clean_text("use the <script> tag, it is great fun") == "use the <script> tag, it is great fun"


# ------------------------------------------------------------------------------ 3. zero-width text

def test_text_of_zero_width_characters_is_empty_text(tmp_path):
    rows = [_row("a", INVISIBLE), _row("b", "\ufeff"), _row("c", "fam\u200dily \u200bok"), _row("d", "plain")]
    res = load_dataset("folder", _write_manifest(tmp_path / "ds", rows))
    got = _by_id(res)
    assert got["a"].text == "" and got["b"].text == ""
    assert got["c"].text == "fam\u200dily \u200bok"  # real text keeps its joiners: nothing changed silently
    assert _flags(res) == {"empty_text": 2} and sorted(res.report.examples["empty_text"]) == ["a", "b"]
    assert is_blank(INVISIBLE) and not is_blank("\u200bx")


# ------------------------------------------------------------------------------ 4. CSV outputs

@pytest.mark.parametrize("text", ["=1+2", "+cmd", "-2+3", "@SUM(A1)", "\tx", "\r=x", "-", "-inf", "=-0.5"])
def test_formula_like_text_cells_are_prefixed(text):
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize("value", [-0.5, 3, 0, None, "-0.5", "+3", "-1e-05", ".5", "plain", "a=b", "", "'plain"])
def test_numbers_and_other_cells_are_unchanged(value):
    assert csv_cell(value) == value


def test_a_formula_already_behind_a_quote_gets_one_more_so_reading_back_is_exact():
    assert csv_cell("'=x") == "''=x"  # csv_value("''=x") == "'=x": the round trip never loses a quote


def test_csv_row_and_dict_round_trip_through_a_writer():
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(csv_row(["=evil()", -0.25, "-0.25", "ok"]))
    w.writerow(csv_dict({"id": "@x", "p": 0.5}).values())
    assert list(csv.reader(io.StringIO(buf.getvalue()))) == [["'=evil()", "-0.25", "-0.25", "ok"], ["'@x", "0.5"]]


# ------------------------------------------------------------------------------ 1, 3, 4, 6 through extract

def test_extract_survives_every_malformed_row_and_records_each(tmp_path, models, capsys):
    data = tmp_path / "ds"
    data.mkdir()
    os.symlink("loop.png", data / "loop.png")  # a symlink to itself: resolving it loops
    rows = [_row("a", "good words", "a.png"), _row("b", LONG, "b.png", "negative"),
            _row("c", INVISIBLE, "c.png", "neutral"), _row(FORMULA_ID, "formula id", "nowhere.png"),
            _row("-5", "numeric id", "nowhere.png", "negative"), _row("loop", "looping", "loop.png", "neutral")]
    _write_manifest(data, rows, images=("a.png", "b.png", "c.png"))
    cache = tmp_path / "cache"
    capsys.readouterr()
    assert cli.main(_extract(data, cache, models, "--modality", "both")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failures = {(r["modality"], r["id"]): r["reason"] for r in _failures(cache)}
    assert set(failures) == {("text", "c"), ("image", "'" + FORMULA_ID), ("image", "-5"), ("image", "loop")}
    assert "symlink loop" in failures[("image", "loop")] and failures[("text", "c")] == "empty text"
    idx = cf.read_index(cache / "posts" / cf.INDEX_NAME)
    assert idx.ids.tolist()[:2] == ["a", "b"] and len(idx.texts[1]) == MAX_TEXT_CHARS  # cut, kept, encoded
    files = {p.name.split("--")[0]: p for p in cf.list_feature_files(cache / "posts")}
    with h5py.File(files["text"], "r") as f:
        assert int(f["valid"][...].sum()) == 5  # every text but the invisible one
    with h5py.File(files["image"], "r") as f:
        assert int(f["valid"][...].sum()) == 3


# ------------------------------------------------------------------------------ 5. nothing usable

def test_extract_where_every_row_fails_exits_non_zero_and_keeps_the_failures(tmp_path, models, capsys):
    rows = [_row(f"p{i}", f"text {i}", f"gone{i}.png", ["positive", "neutral", "negative"][i % 3]) for i in range(5)]
    data = _write_manifest(tmp_path / "ds", rows)
    cache = tmp_path / "cache"
    capsys.readouterr()
    assert cli.main(_extract(data, cache, models, "--modality", "image")) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "nothing usable was written" in lines[0] and "5 rows" in lines[0]
    assert "most common failure: image: missing image file (5 of 5)" in lines[0]
    assert [r["id"] for r in _failures(cache)] == [f"p{i}" for i in range(5)]  # what it found is kept
    assert (cache / "posts" / cf.INDEX_NAME).is_file()
    # the same folder with its texts: something usable, a success
    assert cli.main(_extract(data, cache, models, "--modality", "both")) == 0


@pytest.mark.parametrize("value", ["@user1", "=HYPERLINK(\"x\")", "'=already quoted", "''@two", "-5", "-0.5", "+3",
                                   "-inf", "plain", "'just a quote", "", "\tTAB"])
def test_csv_cells_round_trip_exactly_through_the_projects_own_reader(value):
    # ids such as @user are written '@user for spreadsheets; the project's own readers of its CSV outputs
    # (the ablation tables read predictions.csv ids and match them with the index) must get @user back
    from mmcache.csvsafe import csv_cell, csv_value

    written = csv_cell(value)
    assert csv_value(written) == value
    assert not written.lstrip("'").startswith(("=", "+", "-", "@", "\t")) or written.startswith("'") or written in ("-5", "-0.5", "+3")


def test_predictions_csv_ids_are_spreadsheet_safe_and_read_back_unchanged():
    import numpy as np
    from mmcache.fuse.ablate.aggregate import _prediction_rows
    from mmcache.fuse.runs import predictions_csv
    from mmcache.fuse.targets import TargetSet

    target = TargetSet("sentiment", ("sentiment",), (("positive", "negative"),))
    text = predictions_csv(np.array(["@user1", "=2+2", "ok"], dtype=object), np.array([[0], [1], [0]]),
                           np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32), target)
    assert "\n'@user1," in text and "\n'=2+2," in text
    assert [r["id"] for r in _prediction_rows(text)] == ["@user1", "=2+2", "ok"]
