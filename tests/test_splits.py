"""Train / val / test assignment: seeded stratified split, split files (CSV and CLMLF JSON folders),
manifest splits."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from mmcache.extract.datasets import SENTIMENT3, Sample
from mmcache.extract.splits import SPLITS, UNASSIGNED, read_split_file, resolve_splits, stratified_split

from mmcache.errors import BadInputError

CLASS_SIZES = {0: 53, 1: 17, 2: 7}  # uneven, and none a multiple of 10


def _samples(sizes=None, split=None) -> list[Sample]:
    sizes = CLASS_SIZES if sizes is None else sizes
    out = []
    for label, n in sizes.items():
        for i in range(n):
            out.append(Sample(f"c{label}_{i:03d}", f"text {i}", None, label, SENTIMENT3[label], split=split))
    return out


def _expected_counts(n: int, ratios=(0.8, 0.1, 0.1)) -> list[int]:
    """Largest remainder, written independently: floor each share, then hand the leftover units to the
    largest fractional parts (ties: earlier split first)."""
    total = sum(ratios)
    shares = [r / total * n for r in ratios]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(3), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _per_class(samples, assignment) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for s in samples:
        out.setdefault(s.label, Counter())[assignment[s.id]] += 1
    return out


# --------------------------------------------------------------------------- stratified


def test_stratified_reproducible_and_covers_everything():
    samples = _samples()
    a = stratified_split(samples, seed=0)
    b = stratified_split(_samples(), seed=0)
    assert a.assignment == b.assignment
    assert set(a.assignment) == {s.id for s in samples}
    assert set(a.assignment.values()) == set(SPLITS)
    assert a.unknown_ids == [] and a.unassigned_ids == []
    assert a.source.startswith("stratified(seed=0")


def test_stratified_independent_of_sample_order():
    samples = _samples()
    base = stratified_split(samples, seed=7).assignment
    for k in range(3):
        shuffled = samples[:]
        random.Random(k).shuffle(shuffled)
        assert stratified_split(shuffled, seed=7).assignment == base
    assert stratified_split(samples[::-1], seed=7).assignment == base


def test_stratified_per_class_proportions():
    samples = _samples()
    res = stratified_split(samples, seed=0)
    per = _per_class(samples, res.assignment)
    for label, n in CLASS_SIZES.items():
        got = [per[label][s] for s in SPLITS]
        assert got == _expected_counts(n), (label, got)
        for k, r in zip(got, (0.8, 0.1, 0.1), strict=True):
            assert abs(k - r * n) <= 1
    # the 7-sample class: 5.6 / 0.7 / 0.7 -> 5 / 1 / 1
    assert [per[2][s] for s in SPLITS] == [5, 1, 1]
    assert res.counts() == {s: sum(per[c][s] for c in per) for s in SPLITS}


def test_stratified_different_seed_differs():
    samples = _samples()
    a = stratified_split(samples, seed=0).assignment
    b = stratified_split(samples, seed=1).assignment
    assert a != b
    # ... but the per-class counts do not depend on the seed
    assert _per_class(samples, a) == _per_class(samples, b)


@pytest.mark.parametrize("ratios", [(0.6, 0.2, 0.2), (0.7, 0.3, 0.0), (1, 0, 0), (3, 1, 1)])
def test_stratified_ratios(ratios):
    samples = _samples()
    res = resolve_splits(samples, ratios=ratios, seed=2)
    per = _per_class(samples, res.assignment)
    for label, n in CLASS_SIZES.items():
        assert [per[label][s] for s in SPLITS] == _expected_counts(n, ratios)
    for split, r in zip(SPLITS, ratios, strict=True):
        if r == 0:
            assert split not in res.assignment.values()


def test_stratified_ratios_are_normalised():
    samples = _samples()
    assert (stratified_split(samples, (8, 1, 1), seed=3).assignment
            == stratified_split(samples, (0.8, 0.1, 0.1), seed=3).assignment)


@pytest.mark.parametrize("ratios", [(0.8, 0.2), (0.8, -0.1, 0.3), (0, 0, 0), (0.5, 0.25, 0.25, 0.0)])
def test_stratified_bad_ratios(ratios):
    with pytest.raises(BadInputError, match="ratios"):
        stratified_split(_samples(), ratios, seed=0)


def test_stratified_tiny_classes():
    samples = _samples({0: 1, 1: 2, 2: 3})
    res = stratified_split(samples, seed=0)
    per = _per_class(samples, res.assignment)
    assert per[0] == Counter(train=1)
    assert sum(per[1].values()) == 2 and sum(per[2].values()) == 3


# --------------------------------------------------------------------------- split files


def test_split_csv(tmp_path):
    samples = _samples({0: 3, 1: 2})
    f = tmp_path / "split.csv"
    f.write_text("id,split\nc0_000,train\nc0_001,dev\nc0_002,TEST\nc1_000,valid\nghost,train\n")
    assert read_split_file(f) == {"c0_000": "train", "c0_001": "val", "c0_002": "test",
                                  "c1_000": "val", "ghost": "train"}
    res = resolve_splits(samples, split_file=f)
    assert res.assignment == {"c0_000": "train", "c0_001": "val", "c0_002": "test", "c1_000": "val",
                              "c1_001": UNASSIGNED}
    assert res.unknown_ids == ["ghost"]
    assert res.unassigned_ids == ["c1_001"]
    assert res.source == str(f)
    assert res.counts() == {"train": 1, "val": 2, "test": 1, UNASSIGNED: 1}


def test_split_csv_with_bom_and_crlf(tmp_path):
    f = tmp_path / "split.csv"
    f.write_bytes("\ufeffid,split\r\na,train\r\nb,test\r\n".encode())
    assert read_split_file(f) == {"a": "train", "b": "test"}


@pytest.mark.parametrize("name", ["holdout", "training", ""])
def test_split_csv_bad_split_name(tmp_path, name):
    f = tmp_path / "split.csv"
    f.write_text(f"id,split\na,train\nb,{name}\n")
    with pytest.raises(BadInputError, match="unknown split"):
        read_split_file(f)


@pytest.mark.parametrize("content", ["", "id,fold\na,train\n", "name,split\na,train\n"])
def test_split_csv_bad_header(tmp_path, content):
    f = tmp_path / "split.csv"
    f.write_text(content)
    with pytest.raises(BadInputError, match="id,split"):
        read_split_file(f)


def test_split_csv_short_row_is_bad_input(tmp_path):
    f = tmp_path / "split.csv"
    f.write_text("id,split\na,train\nb\n")
    with pytest.raises(BadInputError):
        read_split_file(f)


def test_split_file_missing(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        read_split_file(tmp_path / "nope.csv")


def _clmlf(folder: Path, parts: dict[str, list]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in parts.items():
        items = [{"id": sid, "text": f"tweet {sid}", "emotion_label": i % 3} for i, sid in enumerate(ids)]
        (folder / name).write_text(json.dumps(items), encoding="utf-8")
    return folder


def test_split_clmlf_folder(tmp_path):
    samples = [Sample(str(i), "t", None, 0, "positive") for i in (1, 2, 3, 4, 5, 6)]
    folder = _clmlf(tmp_path / "clmlf", {"train.json": ["1", 2, "3"], "dev.json": ["4"], "test.json": [5, "99"]})
    assert read_split_file(folder) == {"1": "train", "2": "train", "3": "train", "4": "val", "5": "test",
                                       "99": "test"}
    res = resolve_splits(samples, split_file=folder, seed=123)
    assert res.assignment == {"1": "train", "2": "train", "3": "train", "4": "val", "5": "test",
                              "6": UNASSIGNED}
    assert res.unknown_ids == ["99"]
    assert res.unassigned_ids == ["6"]


def test_split_clmlf_folder_partial_and_errors(tmp_path):
    only_test = _clmlf(tmp_path / "a", {"test.json": ["x"]})
    assert read_split_file(only_test) == {"x": "test"}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="dev.json"):
        read_split_file(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text("[{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        read_split_file(bad)
    (bad / "train.json").write_text('{"id": "1"}')
    with pytest.raises(BadInputError, match="list"):
        read_split_file(bad)


def test_split_file_wins_over_manifest_splits(tmp_path):
    samples = _samples({0: 2}, split="test")
    f = tmp_path / "s.csv"
    f.write_text("id,split\nc0_000,train\nc0_001,train\n")
    assert set(resolve_splits(samples, split_file=f).assignment.values()) == {"train"}


# --------------------------------------------------------------------------- manifest splits


def test_manifest_splits_used_when_all_samples_have_one():
    samples = _samples({0: 4, 1: 3})
    for i, s in enumerate(samples):
        s.split = SPLITS[i % 3]
    res = resolve_splits(samples)
    assert res.source == "manifest" and res.spec["kind"] == "manifest"
    assert res.assignment == {s.id: s.split for s in samples}
    # an explicit seed asks for the seeded split instead of the manifest's column
    seeded = resolve_splits(samples, seed=0)
    assert seeded.spec == {"kind": "seeded", "seed": 0, "ratios": [0.8, 0.1, 0.1]}
    assert seeded.assignment == stratified_split(samples, seed=0).assignment


def test_manifest_splits_ignored_when_some_missing():
    samples = _samples({0: 4, 1: 3})
    for s in samples[:-1]:
        s.split = "test"
    res = resolve_splits(samples, seed=0)
    assert res.source.startswith("stratified")
    assert res.assignment == stratified_split(samples, seed=0).assignment
