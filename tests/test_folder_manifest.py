"""Folder manifests never turn malformed input into labels (issue: short / long rows, typo'd labels,
empty ids, odd headers, symlink loops): each case injected, with the outcome asserted."""

from __future__ import annotations

import codecs
import os
from pathlib import Path

import pytest
from mmcache.extract.datasets import SENTIMENT3, load_dataset
from mmcache.extract.images import ImageFailure, load_image
from PIL import Image

from mmcache import cli
from mmcache.errors import BadInputError

GOOD = ["a,alpha,,positive", "b,beta,,neutral", "c,gamma,,negative"]


def _manifest(tmp_path: Path, lines: list[str], header: str = "id,text,image,label", name: str = "manifest.csv",
              encoding: str = "utf-8", bom: bytes = b"") -> Path:
    root = tmp_path / "ds"
    root.mkdir(exist_ok=True)
    (root / name).write_bytes(bom + ("\n".join([header, *lines]) + "\n").encode(encoding))
    return root


def _ids(res) -> list[str]:
    return [s.id for s in res.samples]


def test_short_and_long_rows_are_dropped_as_malformed(tmp_path):
    root = _manifest(tmp_path, [*GOOD, "d,delta,,positive,EXTRA", "e,epsilon", "f,,,neutral"])
    res = load_dataset("folder", root)
    assert _ids(res) == ["a", "b", "c", "f"]  # f: empty text is a flag, not a malformed row
    assert dict(res.report.dropped) == {"malformed_row": 2}
    assert res.classes == SENTIMENT3  # no "None" class from the short row
    assert res.report.rows_seen == 6


def test_empty_id_is_dropped_never_renamed(tmp_path):
    # a generated id "row4" would have collided with the real id below
    root = _manifest(tmp_path, [*GOOD, " ,nameless,,positive", "row4,real,,neutral"])
    res = load_dataset("folder", root)
    assert _ids(res) == ["a", "b", "c", "row4"]
    assert res.report.dropped == {"malformed_row": 1} and res.report.examples["malformed_row"] == ["<line 5>"]


def test_undeclared_label_with_classes_option_is_unknown_label(tmp_path):
    root = _manifest(tmp_path, [*GOOD, "d,delta,,postive"])
    res = load_dataset("folder", root, classes="positive,neutral,negative")
    assert _ids(res) == ["a", "b", "c"] and res.report.dropped == {"unknown_label": 1}
    assert res.report.warnings == []


def test_typo_label_without_classes_is_loud_and_keeps_the_triple_ids(tmp_path, capsys):
    rows = [f"{i},t,,{lbl}" for i, lbl in enumerate(["positive", "neutral", "negative"] * 40)]
    root = _manifest(tmp_path, [*rows, "x,typo,,postive"])
    res = load_dataset("folder", root)
    assert res.classes == ("positive", "neutral", "negative", "postive")  # the triple keeps ids 0, 1, 2
    assert len(res.report.warnings) == 1 and "near-duplicate: postive (1)" in res.report.warnings[0]
    assert cli.main(["inspect", "-d", "folder", "--data-dir", str(root)]) == 0
    assert "WARNING: label: classes derived from the data" in capsys.readouterr().out


def test_named_labels_without_the_triple_are_sorted_and_rare_ones_reported(tmp_path):
    rows = [f"{i},t,,{lbl}" for i, lbl in enumerate(["cat", "dog"] * 30)]
    res = load_dataset("folder", _manifest(tmp_path, [*rows, "z,t,,cta", "y,t,,bird"]))
    assert res.classes == ("bird", "cat", "cta", "dog") and "near-duplicate: bird (1), cta (1)" in res.report.warnings[0]
    small = load_dataset("folder", _manifest(tmp_path, ["a,t,,cat", "b,t,,dog", "c,t,,fish"]))
    assert small.classes == ("cat", "dog", "fish") and small.report.warnings == []  # balanced: nothing to report


@pytest.mark.parametrize(("header", "sep"), [("ID, Text ,IMAGE,Label", ","), ("id;text;image;label", ";"),
                                             ("id\ttext\timage\tlabel", "\t")])
def test_header_case_spaces_and_separator_variants(tmp_path, header, sep):
    root = _manifest(tmp_path, [r.replace(",", sep) for r in GOOD], header=header)
    res = load_dataset("folder", root)
    assert _ids(res) == ["a", "b", "c"] and [s.text for s in res.samples] == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_with_bom_is_decoded(tmp_path, codec):
    bom = codecs.BOM_UTF16_LE if codec.endswith("le") else codecs.BOM_UTF16_BE
    res = load_dataset("folder", _manifest(tmp_path, GOOD, encoding=codec, bom=bom))
    assert _ids(res) == ["a", "b", "c"] and res.report.decoded_with == {"utf-16": 1}


def test_utf16_without_bom_is_an_error(tmp_path):
    with pytest.raises(BadInputError, match="NUL bytes"):
        load_dataset("folder", _manifest(tmp_path, GOOD, encoding="utf-16-le"))


@pytest.mark.parametrize("header", ["id,text,picture,label", "sample|text|image|label"])
def test_wrong_header_lists_found_and_needed_columns(tmp_path, header, capsys):
    root = _manifest(tmp_path, GOOD, header=header)
    with pytest.raises(BadInputError, match="must name the columns id, text, image, label") as e:
        load_dataset("folder", root)
    assert "'picture'" in str(e.value) or "'sample|text|image|label'" in str(e.value)
    assert cli.main(["inspect", "-d", "folder", "--data-dir", str(root)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_jsonl_line_without_a_required_key_is_malformed(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "manifest.jsonl").write_text('{"id": "a", "text": "x", "image": "", "label": "positive"}\n'
                                         '{"id": "b", "text": "y", "image": ""}\n'
                                         '{"ID": "c", "Text": "z", "Image": "", "Label": "negative"}\n')
    res = load_dataset("folder", root)
    assert _ids(res) == ["a", "c"] and res.report.dropped == {"malformed_row": 1}


def test_symlink_loop_image_is_a_recorded_failure(tmp_path):
    root = _manifest(tmp_path, [*GOOD[:2], "c,gamma,loop/a.png,negative"])
    (root / "loop").mkdir()
    os.symlink("b.png", root / "loop" / "a.png")
    os.symlink("a.png", root / "loop" / "b.png")
    Image.new("RGB", (4, 4)).save(root / "ok.png")
    res = load_dataset("folder", root)
    c = res.samples[-1]
    assert c.id == "c" and res.report.flagged == {"missing_image": 3}
    with pytest.raises(ImageFailure, match="symlink loop"):
        load_image(c.image_path)
