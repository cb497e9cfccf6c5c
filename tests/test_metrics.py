"""compute_metrics: macro-F1 averages over the classes present in the scored labels (one definition for
training, stacking, tables and the agreement subsets)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from mmcache.fuse import metrics as mm
from mmcache.fuse.ablate.aggregate import _subset_scores
from mmcache.fuse.metrics import compute_metrics
from mmcache.fuse.targets import TargetSet, score_targets

CLASSES = ["negative", "neutral", "positive"]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    mm._WARNED.clear()
    yield
    mm._WARNED.clear()


def test_absent_class_is_not_counted_as_zero(caplog):
    """The reported fault: accuracy 1.0, weighted-F1 1.0, no neutral post -> macro-F1 was 0.667."""
    y = np.array([0, 2, 2, 0, 2])
    with caplog.at_level(logging.WARNING, logger="mmcache.fuse.metrics"):
        m = compute_metrics(y, y.copy(), CLASSES)
    assert m["accuracy"] == 1.0 and m["weighted_f1"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["macro_f1_classes"] == ["negative", "positive"]
    assert m["per_class"]["neutral"]["support"] == 0
    assert any("neutral" in r.getMessage() and "macro-F1" in r.getMessage() for r in caplog.records)


def test_warning_once_per_absent_set(caplog):
    y = np.array([0, 2])
    with caplog.at_level(logging.WARNING, logger="mmcache.fuse.metrics"):
        for _ in range(5):  # every epoch scores the validation split
            compute_metrics(y, y, CLASSES)
    assert sum("neutral" in r.getMessage() for r in caplog.records) == 1


def test_macro_over_present_matches_sklearn_with_labels():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y = rng.choice([0, 2, 3], size=60)  # class 1 never true, but predicted sometimes
    p = rng.integers(0, 4, size=60)
    m = compute_metrics(y, p, ["a", "b", "c", "d"])
    assert m["macro_f1_classes"] == ["a", "c", "d"]
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, labels=[0, 2, 3], average="macro", zero_division=0))
    # a predicted-only class still costs precision of the others, and keeps its own per-class row
    assert m["per_class"]["b"]["support"] == 0 and m["per_class"]["b"]["f1"] == 0.0


def test_all_classes_present_unchanged(caplog):
    from sklearn.metrics import f1_score

    y = np.array([0, 1, 2, 0, 1, 2, 1])
    p = np.array([0, 2, 2, 1, 1, 0, 1])
    with caplog.at_level(logging.WARNING, logger="mmcache.fuse.metrics"):
        m = compute_metrics(y, p, CLASSES)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["macro_f1_classes"] == CLASSES
    assert not caplog.records


def test_empty_input():
    m = compute_metrics(np.zeros(0, np.int64), np.zeros(0, np.int64), CLASSES)
    assert m["n"] == 0 and m["macro_f1"] is None and m["macro_f1_classes"] == []


def test_score_targets_and_subsets_use_the_same_definition():
    """Early stopping / stack / tables read score_targets; agreement subsets call compute_metrics."""
    y = np.array([0, 2, 2, 0])
    probs = np.eye(3)[y]  # perfect predictions
    target = TargetSet(name="label", members=("label",), classes=(tuple(CLASSES),))
    scored = score_targets(probs, y[:, None], target)
    assert scored["macro_f1"] == 1.0 and scored["macro_f1_classes"] == ["negative", "positive"]
    names = np.asarray([CLASSES[i] for i in y], dtype=object)
    assert _subset_scores(names, names)["macro_f1"] == 1.0
    pred = names.copy()
    pred[0] = "neutral"  # predicted but never true: lowers negative's recall, is not averaged itself
    sub = _subset_scores(names, pred)
    ref = compute_metrics(np.array([0, 2, 2, 0]), np.array([1, 2, 2, 0]), CLASSES)
    assert sub["macro_f1"] == pytest.approx(ref["macro_f1"]) == pytest.approx((2 / 3 + 1.0) / 2)
