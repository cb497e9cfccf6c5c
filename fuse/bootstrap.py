"""Percentile bootstrap intervals of the headline metrics over test posts (neutral helper: analyze's
report uses it; the ablation tables' paired, seed-aware bootstrap in :mod:`fuse.ablate.stats` scores its
draws with the same :func:`scores_from_confusion`)."""

from __future__ import annotations

import numpy as np

__all__ = ["metric_intervals", "scores_from_confusion"]

B, LEVEL, SEED = 1000, 0.95, 0


def scores_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, macro-F1 and weighted-F1 from confusion counts (..., C, C) (rows = true); each (...,).

    Macro-F1 averages over the classes that occur (true or predicted): a class a bootstrap draw happens to
    miss entirely has no F1 (counting it 0 would pull a perfect predictor's interval down to 2/3). On a
    test set where every class occurs this equals :func:`fuse.metrics.compute_metrics`' macro-F1."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    support, predicted = conf.sum(-1), conf.sum(-2)
    total = np.maximum(support.sum(-1), 1)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    occurs = np.maximum((denom > 0).sum(-1), 1)
    return {"accuracy": tp.sum(-1) / total, "macro_f1": f1.sum(-1) / occurs,
            "weighted_f1": (f1 * support).sum(-1) / total}


def metric_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *, b: int = B, level: float = LEVEL,
                     seed: int = SEED) -> dict[str, list[float] | None]:
    """``{accuracy, macro_f1, weighted_f1: [lo, hi]}``: percentile intervals over ``b`` resamples of
    the posts (with replacement; ``y_true`` / ``y_pred`` (N,) int class indices). None where N = 0.
    Deterministic for a given ``seed``."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    n = y_true.size
    if n == 0:
        return {"accuracy": None, "macro_f1": None, "weighted_f1": None}
    w = np.random.default_rng([seed, n]).multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # (B, N)
    onehot = np.zeros((n, n_classes * n_classes))
    onehot[np.arange(n), y_true * n_classes + y_pred] = 1.0
    conf = (w @ onehot).reshape(b, n_classes, n_classes)  # each draw's confusion counts
    tail = (1 - level) / 2 * 100
    return {k: [float(x) for x in np.percentile(v, [tail, 100 - tail])] for k, v in scores_from_confusion(conf).items()}
