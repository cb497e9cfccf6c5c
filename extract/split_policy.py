"""The split is part of the data: which split an ``extract`` writes into the index.

Rule: the first ``extract`` of a dataset makes the split (a ``--split-file``, the manifest's own
``split`` column, else the seeded stratified split); every later ``extract`` that does not ask for a
split keeps the stored one exactly, and one that asks for a different split is refused unless
``--resplit`` (recorded in the index's split history). :func:`decide_split` applies it; it reads and
decides, it never writes.

Samples that are new since the split was stored (the dataset grew) go to split ``none`` (kept in the
cache, used by no split) with a warning: putting them anywhere would change the split; ``--resplit``
with the split you want includes them. Samples that left the dataset simply leave the split.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.extract.datasets import Sample
from mmcache.extract.splits import (
    UNASSIGNED,
    SplitResult,
    empty_split_warnings,
    manifest_split,
    resolve_splits,
)

from mmcache import cache as cf
from mmcache.errors import BadInputError

__all__ = ["SplitDecision", "decide_split", "format_moves"]


@dataclass
class SplitDecision:
    """What the index gets: ``assignment`` (id -> split) made by ``spec``; ``status`` is ``new`` (no
    index before), ``kept`` (stored split, nothing asked), ``same`` (asked for the stored split) or
    ``resplit`` (replaced, with ``moves``)."""

    assignment: dict[str, str]
    spec: dict[str, Any]
    status: str
    history: list[dict[str, Any]] = field(default_factory=list)
    moves: dict[str, int] = field(default_factory=dict)  # "train->test": n
    warnings: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return cf.split_spec_text(self.spec)


def format_moves(moves: dict[str, int]) -> str:
    """``{"train->test": 3, ...}`` -> ``"train->test 3, ..."`` (largest first)."""
    return ", ".join(f"{k} {n}" for k, n in sorted(moves.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _counts_text(assignment: dict[str, str]) -> str:
    c = Counter(assignment.values())
    text = "/".join(str(c.get(s, 0)) for s in cf.SPLIT_NAMES)
    return text + (f" (+{c[UNASSIGNED]} none)" if c.get(UNASSIGNED) else "")


def _file_warnings(result: SplitResult) -> list[str]:
    out = []
    if result.unknown_ids:
        out.append(f"split file: {len(result.unknown_ids)} ids are not in the data (e.g. "
                   f"{', '.join(result.unknown_ids[:3])})")
    if result.unassigned_ids:
        out.append(f"split file: {len(result.unassigned_ids)} samples are not in it and go to split 'none' "
                   f"(used by no split; e.g. {', '.join(result.unassigned_ids[:3])})")
    return out


def _requested(samples: list[Sample], stored: cf.SampleIndex | None, split_file, seed, resplit) -> SplitResult | None:
    """The split this extract asks for, or None (keep the stored one)."""
    if split_file is not None or seed is not None:
        return resolve_splits(samples, split_file=split_file, seed=seed)
    if stored is None:
        return resolve_splits(samples)
    own = manifest_split(samples)
    if own is not None and (resplit or stored.split_spec.get("kind") == "manifest"):
        return own  # the manifest's split column is a standing request: an edited column asks for a new split
    if resplit:
        raise BadInputError("--resplit needs the split to use: add --seed N or --split-file PATH")
    return None


def decide_split(samples: list[Sample], stored: cf.SampleIndex | None, *, split_file: str | Path | None = None,
                 seed: int | None = None, resplit: bool = False, index_path: str | Path = "index.h5") -> SplitDecision:
    """Apply the rule above. ``stored``: the existing index (None: first extract). Raises
    :class:`BadInputError` for a request that differs from the stored split without ``resplit``."""
    requested = _requested(samples, stored, split_file, seed, resplit)
    warnings = _file_warnings(requested) if requested is not None else []
    if stored is None:
        decision = SplitDecision(requested.assignment, requested.spec, "new", warnings=warnings)
        decision.warnings += empty_split_warnings(Counter(decision.assignment.values()))
        return decision
    old = dict(zip(map(str, stored.ids), map(str, stored.splits), strict=True))
    kept = {s.id: old.get(s.id, UNASSIGNED) for s in samples}
    ids = [s.id for s in samples]
    if requested is None:
        new = [i for i in ids if i not in old]
        if new:
            warnings.append(f"{len(new)} samples are new since the split was made ({', '.join(new[:3])}...): they "
                            "go to split 'none' (used by no split). To include them, re-split with --resplit and "
                            "--seed N or --split-file PATH")
        decision = SplitDecision(kept, stored.split_spec, "kept", history=stored.split_history, warnings=warnings)
    else:
        want = requested.assignment
        if cf.split_fingerprint(ids, [want[i] for i in ids]) == cf.split_fingerprint(ids, [kept[i] for i in ids]):
            spec = requested.spec if stored.split_spec.get("kind") == "unrecorded" else stored.split_spec
            decision = SplitDecision(kept, spec, "same", history=stored.split_history, warnings=warnings)
        else:
            moves = dict(Counter(f"{kept[i]}->{want[i]}" for i in ids if kept[i] != want[i]))
            decision = _resplit(stored, requested, kept, moves, resplit, index_path, warnings)
    decision.warnings += empty_split_warnings(Counter(decision.assignment.values()))
    return decision


def _resplit(stored: cf.SampleIndex, requested: SplitResult, kept: dict[str, str], moves: dict[str, int],
             resplit: bool, index_path, warnings: list[str]) -> SplitDecision:
    old_text, new_text = cf.split_spec_text(stored.split_spec), cf.split_spec_text(requested.spec)
    n = sum(moves.values())
    if not resplit:
        raise BadInputError(
            f"{index_path} has the split {old_text} (train/val/test {_counts_text(kept)}); this extract asks for "
            f"{new_text} (train/val/test {_counts_text(requested.assignment)}), which would move {n} samples "
            f"between splits ({format_moves(moves)}). Runs and tables made on the cache's split would no longer "
            "be comparable, and their test samples would mix with training ones. Leave out --seed / --split-file "
            "to keep the cache's split, or add --resplit to replace it (recorded in the index's split history)")
    ids = list(kept)
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": stored.split_spec,
             "from_fingerprint": cf.split_fingerprint(ids, [kept[i] for i in ids]),
             "to": requested.spec,
             "to_fingerprint": cf.split_fingerprint(ids, [requested.assignment[i] for i in ids]),
             "moved": moves}
    warnings = [*warnings, f"re-split {index_path}: {old_text} -> {new_text}; {n} samples moved ({format_moves(moves)}); "
                f"train/val/test {_counts_text(kept)} -> {_counts_text(requested.assignment)}. Runs made on the old "
                "split are stale: evaluate refuses them (unless --original-split or --current-split), ablate reruns "
                "them"]
    return SplitDecision(requested.assignment, requested.spec, "resplit", history=[*stored.split_history, entry],
                         moves=moves, warnings=warnings)


def preview_split(samples: list[Sample], stored: cf.SampleIndex | None, *, split_file: str | Path | None = None,
                  seed: int | None = None, index_path: str | Path = "index.h5") -> tuple[SplitResult, str | None]:
    """What ``inspect`` shows: the split an ``extract`` with these flags would write (the cache's, when
    it keeps it), and a note on the cache's split (None without a cache). Never raises for a request
    that differs from the cache's: the note says extract would refuse it without ``--resplit``."""
    if stored is None:
        return resolve_splits(samples, split_file=split_file, seed=seed), None
    have = (f"the cache {index_path} has the split {cf.split_spec_text(stored.split_spec)} "
            f"(fingerprint {stored.split_fingerprint})")
    try:
        d = decide_split(samples, stored, split_file=split_file, seed=seed, index_path=index_path)
    except BadInputError:
        return (resolve_splits(samples, split_file=split_file, seed=seed),
                f"{have}; extract with this split would be refused without --resplit")
    result = SplitResult(d.assignment, d.source, spec=d.spec,
                         unassigned_ids=sorted(i for i, s in d.assignment.items() if s == UNASSIGNED))
    return result, f"{have}; extract keeps it" + ("" if d.status == "kept" else " (the same split as asked for)")
