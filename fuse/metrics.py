"""Classification metrics (scikit-learn): accuracy, macro-F1, weighted-F1, per-class P/R/F1, confusion.

MVSA papers report weighted-F1, Memotion Task A reports macro-F1; both are always computed.
Macro-F1 averages over the classes PRESENT in the scored labels (``macro_f1_classes``): a test split
without a neutral post must not score a perfect classifier 0.667. This is the one definition every
score of the project uses (training's early stopping, the stacked trainer, tables, agreement subsets).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "METRIC_NAMES", "compute_metrics"]

METRICS = ("accuracy", "macro_f1", "weighted_f1")  # the scores every table shows, in this order
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1"}


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Scores of predictions ``y_pred`` against ``y_true`` (both (N,) int, indices into ``classes``).

    Returns a JSON-ready dict: ``n``, ``accuracy``, ``macro_f1``, ``weighted_f1`` (floats in [0, 1]),
    ``macro_f1_classes`` (the classes macro-F1 averages over: those with at least one post in
    ``y_true``, in ``classes`` order), ``per_class`` ({class: {precision, recall, f1, support}}) and
    ``confusion_matrix`` (C x C nested lists, rows = true class, columns = predicted, in ``classes``
    order). A class without a scored post is left out of macro-F1 (a warning is logged once per set of
    absent classes); its per-class row stays, support 0. An empty input gives n = 0 and None scores.
    """
    # sklearn costs ~0.8 s to import: deferred so commands that never score (cache info, extract,
    # an ablation's parent process) do not pay it
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(classes)))
    if y_true.size == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "weighted_f1": None, "macro_f1_classes": [], "per_class": {},
                "confusion_matrix": [[0] * len(classes) for _ in classes]}
    # One per-class pass; accuracy and the averaged F1s follow from it (this runs every epoch on the
    # validation split, and three more sklearn calls cost ~3 ms each time).
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    present = s > 0  # y_true is non-empty, so at least one class is present
    if not present.all():
        _warn_absent(tuple(c for c, here in zip(classes, present, strict=True) if not here), int(y_true.size))
    return {
        "n": int(y_true.size),
        "accuracy": float(np.trace(cm) / y_true.size),
        "macro_f1": float(f[present].mean()),
        "macro_f1_classes": [c for c, here in zip(classes, present, strict=True) if here],
        "weighted_f1": float(np.average(f, weights=s)) if s.sum() else 0.0,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }


_WARNED: set[tuple[str, ...]] = set()  # absent-class sets already reported (scoring runs every epoch)


def _warn_absent(absent: tuple[str, ...], n: int) -> None:
    if absent in _WARNED:
        return
    _WARNED.add(absent)
    logger.warning("no scored post of class %s (of %d posts): macro-F1 averages over the other classes only",
                   ", ".join(absent), n)
