"""Uncertainty of the ablation tables: a hierarchical bootstrap over test posts AND seeds, paired
comparisons between rows, and the best / tied marks that follow from them.

Why: the spread over seeds alone (often 0.004-0.03) is smaller than the sampling noise of a test set of
a few hundred posts (a 95% half-width of ~0.03 at n = 450), so differences inside it were read as real.

Method (:func:`table_replicates`): replicate b draws the test posts with replacement (multinomial
counts, the same draw for every row of the table, so comparisons are paired) and each row's seeds with
replacement; the row's replicate is the mean over the drawn seeds of the metric on the drawn posts.
Every metric is computed from confusion counts, ``(B, S, C, C)`` per row in one matrix product, so
1000 replicates x dozens of rows take seconds. Intervals are percentile intervals (2.5%, 97.5%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from mmcache.fuse.bootstrap import scores_from_confusion
from mmcache.fuse.metrics import METRICS

from mmcache.errors import BadInputError

__all__ = ["DEFAULT_B", "DEFAULT_SEED", "RowPredictions", "interval", "mark_rows", "paired_delta", "point_scores",
           "post_weights", "replicate_scores", "seed_weights", "table_replicates"]

DEFAULT_B = 1000
DEFAULT_SEED = 0
LEVEL = 0.95


@dataclass
class RowPredictions:
    """One table row's test predictions over the table's test posts (n = the union of every row's).

    y_true: per target member, (n,) int64 class ids, -1 = not scored by this row (dropped, or label
    masked). y_pred: per member, (S, n) int64, one line per finished seed (a probe: S = 1).
    n_classes: per member."""

    y_true: list[np.ndarray]
    y_pred: list[np.ndarray]
    n_classes: list[int]

    @property
    def n_seeds(self) -> int:
        return int(self.y_pred[0].shape[0])

    @property
    def n_scored(self) -> int:
        """Test posts this row scored (a label for at least one member)."""
        return int(np.any(np.stack([t >= 0 for t in self.y_true]), axis=0).sum())


def post_weights(n: int, b: int = DEFAULT_B, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(b, n) float64: how often each test post is drawn in each replicate (a row sums to n)."""
    rng = np.random.default_rng([seed, 0, n])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)


def seed_weights(s: int, b: int = DEFAULT_B, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(b, s) float64: how often each seed is drawn in each replicate. Depends only on (s, b, seed): rows
    with the same number of seeds draw the same seeds (identical predictions give identical replicates)."""
    if s == 1:
        return np.ones((b, 1))
    rng = np.random.default_rng([seed, 1, s])
    return rng.multinomial(s, np.full(s, 1.0 / s), size=b).astype(np.float64)


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, c: int, w: np.ndarray) -> np.ndarray:
    """(B, S, C, C) weighted confusion counts (rows = true) for post weights ``w`` (B, n); posts with
    y_true < 0 count nowhere."""
    s, n = y_pred.shape
    ok = y_true >= 0
    cell = np.where(ok[None, :], np.clip(y_true, 0, None)[None, :] * c + y_pred, 0)  # (S, n)
    onehot = np.zeros((n, s * c * c))
    cols = cell + (np.arange(s) * c * c)[:, None]  # (S, n): column of each (seed, post)
    for j in range(s):  # S is small (the seeds); each line is one scatter
        onehot[np.flatnonzero(ok), cols[j, ok]] = 1.0
    return (w @ onehot).reshape(w.shape[0], s, c, c)


def replicate_scores(row: RowPredictions, pw: np.ndarray, sw: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric's (B,) replicates of ``row``: the mean over the drawn seeds (``sw`` (B, S)) of the
    metric on the drawn posts (``pw`` (B, n)); a task's metric is the mean over its members."""
    out = {k: np.zeros(pw.shape[0]) for k in METRICS}
    for y_true, y_pred, c in zip(row.y_true, row.y_pred, row.n_classes, strict=True):
        per_seed = scores_from_confusion(_confusion(y_true, y_pred, c, pw))  # each (B, S)
        for k in METRICS:
            out[k] += (per_seed[k] * sw).sum(1) / sw.sum(1) / len(row.y_true)
    return out


def point_scores(row: RowPredictions) -> dict[str, float]:
    """The metrics on the test posts as scored (every post once, every seed once): the table's means."""
    reps = replicate_scores(row, np.ones((1, row.y_true[0].shape[0])), np.ones((1, row.n_seeds)))
    return {k: float(v[0]) for k, v in reps.items()}


def interval(reps: np.ndarray, level: float = LEVEL) -> list[float]:
    """Percentile interval [lo, hi] of bootstrap replicates."""
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(reps, [tail, 100 - tail])
    return [float(lo), float(hi)]


def table_replicates(rows: list[RowPredictions | None], b: int = DEFAULT_B,
                     seed: int = DEFAULT_SEED) -> list[dict[str, np.ndarray] | None]:
    """Replicates of every row of one table (None where a row has no predictions), all on the SAME drawn
    test posts, so differences between rows are paired."""
    if b < 1:
        raise BadInputError(f"bootstrap replicates must be >= 1, got {b}")
    have = [r for r in rows if r is not None]
    if not have:
        return [None] * len(rows)
    pw = post_weights(have[0].y_true[0].shape[0], b, seed)
    return [None if r is None else replicate_scores(r, pw, seed_weights(r.n_seeds, b, seed)) for r in rows]


def paired_delta(a: dict[str, np.ndarray], base: dict[str, np.ndarray], metric: str,
                 point: float | None = None) -> dict[str, Any]:
    """Δ = a - base on ``metric``: the point difference (``point`` if given) and its paired 95% CI."""
    d = a[metric] - base[metric]
    return {"delta": float(np.median(d)) if point is None else point, "ci": interval(d)}


def mark_rows(rows: list[dict[str, Any]], reps: list[dict[str, np.ndarray] | None], metric: str) -> dict[str, Any]:
    """Set ``best_<metric>`` / ``tied_<metric>`` on ``rows`` (measured and probe rows with replicates).

    The top row by mean is marked best only when its paired CI against the runner-up excludes 0;
    otherwise it and every row whose CI against it includes 0 are marked tied. Rows without replicates
    are never marked. Returns what was decided (for the JSON)."""
    for r in rows:
        r[f"best_{metric}"], r[f"tied_{metric}"] = False, False
    cand = sorted((i for i, r in enumerate(rows) if reps[i] is not None and r[metric]["mean"] is not None),
                  key=lambda i: -rows[i][metric]["mean"])
    if not cand:
        return {"decision": "none", "why": "no row has test predictions"}
    top = cand[0]
    if len(cand) == 1:
        rows[top][f"best_{metric}"] = True
        return {"decision": "best", "row": top, "why": "the only row"}
    gap = paired_delta(reps[top], reps[cand[1]], metric,
                       rows[top][metric]["mean"] - rows[cand[1]][metric]["mean"])
    if gap["ci"][0] > 0:
        rows[top][f"best_{metric}"] = True
        return {"decision": "best", "row": top, "vs_runner_up": gap}
    rows[top][f"tied_{metric}"] = True
    for i in cand[1:]:
        ci = paired_delta(reps[i], reps[top], metric)["ci"]
        rows[i][f"tied_{metric}"] = ci[0] <= 0 <= ci[1]
    return {"decision": "tied", "row": top, "vs_runner_up": gap}
