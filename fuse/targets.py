"""Which label a run learns: one target, or a named multi-target task (Memotion ``task_b`` / ``task_c``).

Readers declare targets (label fields with class lists in the order of their scale); stage one stores
each as ``targets/<name>`` in the sample index (class ids, -1 = missing, -2 = outside the classes) and
the named tasks as the index attribute ``tasks``. This module is the reusable piece every stage-two
command goes through (train-fusion, evaluate, ablate, and anything that reads a run's ``config.json``):

* :func:`resolve_target` turns a ``--target`` name into a :class:`TargetSet` and an (N, T) label array;
* a multi-target head is any registry head built with ``num_classes = sum of the targets' classes``:
  the last linear layer of its classifier is then one linear classifier per target, stacked (rows
  ``offsets[t]:offsets[t+1]``) over the shared trunk. :func:`split_logits`, :func:`target_loss` and
  :func:`target_probs` work on those blocks; a single target is the one-block case, with the same
  numbers as a plain softmax head;
* :func:`score_targets` gives the metrics: for one target the usual dict; for a task one dict per
  target plus ``task_score`` = mean of the per-target macro-F1 (the SemEval-2020 Task 8 measure).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mmcache.fuse.metrics import compute_metrics
from torch import Tensor

from mmcache import cache as cf
from mmcache.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["MISSING", "OUTSIDE", "TargetSet", "available_targets", "check_trainable", "class_weights", "resolve_target",
           "score_targets", "split_logits", "target_loss", "target_probs", "target_report"]

MISSING, OUTSIDE = -1, -2  # codes in the index's target arrays (see extract.datasets)
LEGACY = "label"  # the only target of an index written before targets existed


@dataclass(frozen=True)
class TargetSet:
    """What a run predicts. ``name``: the ``--target`` given (a target or a task); ``members``: the
    targets, each with its ``classes``. One member = an ordinary single-target run."""

    name: str
    members: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]

    @property
    def multi(self) -> bool:
        return len(self.members) > 1

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.classes]

    @property
    def num_outputs(self) -> int:
        """Width of the head's logits: the sum of the members' class counts."""
        return sum(self.sizes)

    def to_dict(self) -> dict[str, list[str]]:
        """``{member: classes}`` in member order (JSON-ready; what a run records)."""
        return {m: list(c) for m, c in zip(self.members, self.classes, strict=True)}


def available_targets(index: cf.SampleIndex) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
    """(targets name -> classes, tasks name -> members, default target) of an index."""
    if not index.targets:
        return {LEGACY: list(index.classes)}, {}, LEGACY
    return dict(index.target_classes), index.tasks, index.default_target or next(iter(index.targets))


def _unknown(name: str, index: cf.SampleIndex) -> BadInputError:
    targets, tasks, default = available_targets(index)
    listed = ", ".join(f"{t}{' (default)' if t == default else ''}" for t in targets)
    msg = f"{index.dataset} has no target {name!r}; targets: {listed}"
    if tasks:
        msg += f"; tasks: {', '.join(f'{k} ({chr(43).join(v)})' for k, v in tasks.items())}"
    if not index.targets:
        msg += (". This cache's index predates targets: re-run the extract command that made it to add them "
                "(only the index is rewritten; the feature files stay valid and are not recomputed)")
    return BadInputError(msg)


def resolve_target(index: cf.SampleIndex, name: str | None = None) -> tuple[TargetSet, np.ndarray]:
    """The :class:`TargetSet` of ``name`` (None = the index's default target) and its labels:
    (N, T) int64, class ids or MISSING / OUTSIDE. Unknown name: :class:`BadInputError` listing them."""
    targets, tasks, default = available_targets(index)
    name = name or default
    if name in tasks:
        members = tuple(tasks[name])
    elif name in targets:
        members = (name,)
    else:
        raise _unknown(name, index)
    arrays = index.targets or {LEGACY: np.asarray(index.labels, dtype=np.int64)}
    labels = np.stack([np.asarray(arrays[m], dtype=np.int64) for m in members], axis=1)
    for j, m in enumerate(members):
        bad = (labels[:, j] >= len(targets[m])) | (labels[:, j] < OUTSIDE)
        labels[bad, j] = OUTSIDE  # a corrupt id is masked like any label outside the classes
    return TargetSet(name, members, tuple(tuple(targets[m]) for m in members)), labels


def target_report(target: TargetSet, labels: np.ndarray, splits: np.ndarray) -> dict[str, Any]:
    """Counts of masked labels per target, reason and split (JSON-ready), for train/val/test rows."""
    out: dict[str, Any] = {}
    for j, m in enumerate(target.members):
        per = {}
        for code, why in ((MISSING, "missing"), (OUTSIDE, "outside_classes")):
            hit = labels[:, j] == code
            counts = {s: int((hit & (splits == s)).sum()) for s in ("train", "val", "test")}
            if any(counts.values()):
                per[why] = counts
        if per:
            out[m] = per
    return out


def check_trainable(target: TargetSet, train_labels: np.ndarray) -> None:
    """:class:`BadInputError` when a member has fewer than 2 classes among the training labels (M, T)."""
    for j, m in enumerate(target.members):
        present = np.unique(train_labels[:, j][train_labels[:, j] >= 0])
        if present.size < 2:
            seen = ", ".join(target.classes[j][i] for i in present) or "none"
            raise BadInputError(f"target {m!r} has {present.size} class(es) in the training split ({seen}); "
                                f"a classifier needs at least 2")


# --------------------------------------------------------------------------------------------- heads

def split_logits(logits: Tensor, sizes: list[int]) -> list[Tensor]:
    """(B, sum C) -> one (B, C_t) block per target."""
    return list(torch.split(logits, sizes, dim=-1))


def target_loss(logits: Tensor, labels: Tensor, sizes: list[int], weights: list[Tensor | None] | None = None,
                label_smoothing: float = 0.0) -> Tensor:
    """Mean over targets of each target's cross-entropy on its labelled samples.

    logits (B, sum C) float32; labels (B, T) int64, < 0 = masked. A target with no labelled sample in the
    batch is left out of the mean. One target whose labels are all present: plain ``cross_entropy``.
    """
    weights = weights or [None] * len(sizes)
    if len(sizes) == 1:
        y = labels[:, 0]
        keep = y >= 0
        if not bool(keep.all()):
            logits, y = logits[keep], y[keep]
        return F.cross_entropy(logits, y, weight=weights[0], label_smoothing=label_smoothing)
    losses = []
    for j, block in enumerate(split_logits(logits, sizes)):
        keep = labels[:, j] >= 0
        if bool(keep.any()):
            losses.append(F.cross_entropy(block[keep], labels[keep, j], weight=weights[j],
                                          label_smoothing=label_smoothing))
    return torch.stack(losses).mean()


def class_weights(labels: Tensor, sizes: list[int]) -> list[Tensor]:
    """Inverse-frequency weights per target from training labels (M, T) (masked labels ignored)."""
    out = []
    for j, c in enumerate(sizes):
        y = labels[:, j]
        counts = torch.bincount(y[y >= 0], minlength=c).float()
        out.append(counts.sum() / (c * counts.clamp(min=1)))
    return out


def target_probs(logits: Tensor, sizes: list[int]) -> Tensor:
    """Per-target softmax: (B, sum C) -> (B, sum C), each block summing to 1."""
    if len(sizes) == 1:
        return logits.softmax(-1)
    return torch.cat([b.softmax(-1) for b in split_logits(logits, sizes)], dim=-1)


# --------------------------------------------------------------------------------------------- metrics

def _one(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:

    m = compute_metrics(y, probs.argmax(-1) if len(probs) else np.zeros(0, np.int64), classes)
    if len(probs):
        m["loss"] = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return m


def score_targets(probs: np.ndarray, labels: np.ndarray, target: TargetSet) -> dict[str, Any]:
    """Metrics of ``probs`` (n, sum C) against ``labels`` (n, T), masked labels left out per target.

    One target: :func:`fuse.metrics.compute_metrics`'s dict (+ ``loss``, ``target``). A task:
    ``task_score`` = mean per-target macro-F1 (also as ``macro_f1``, so tables and early stopping read
    one key), ``accuracy`` / ``weighted_f1`` / ``loss`` = per-target means, ``n`` = rows scored, and
    ``targets`` = {target: its own metrics dict (``n`` = its labelled rows)}.
    """
    offsets = np.cumsum([0, *target.sizes])
    per = {}
    for j, m in enumerate(target.members):
        keep = labels[:, j] >= 0
        block = probs[keep, offsets[j]:offsets[j + 1]] if len(probs) else np.zeros((0, target.sizes[j]))
        per[m] = _one(block, labels[keep, j], list(target.classes[j]))
    if not target.multi:
        return {**per[target.members[0]], "target": target.name}

    def mean(key: str) -> float | None:
        vals = [v[key] for v in per.values() if v.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    score = mean("macro_f1")
    return {"n": int(len(labels)), "target": target.name, "task_score": score, "macro_f1": score,
            "accuracy": mean("accuracy"), "weighted_f1": mean("weighted_f1"), "loss": mean("loss"),
            "targets": per}
