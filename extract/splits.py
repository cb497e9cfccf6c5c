"""Train / val / test assignment: stratified and seeded, or read from a split made elsewhere."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mmcache.extract.datasets import Sample
from mmcache.extract.textio import decode_bytes

from mmcache.errors import BadInputError

SPLITS = ("train", "val", "test")
UNASSIGNED = "none"  # a sample that a split file does not mention: kept in the cache, used by no split
_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}
SPLIT_JSON = {"train": "train.json", "val": "dev.json", "test": "test.json"}


@dataclass
class SplitResult:
    assignment: dict[str, str]  # sample id -> train / val / test / none
    source: str  # "stratified(seed=0, ratios=0.8/0.1/0.1)", "manifest", or the split file's path
    unknown_ids: list[str] = field(default_factory=list)  # in the split file, not in the data
    unassigned_ids: list[str] = field(default_factory=list)  # in the data, not in the split file
    # What made the split, as stored in the index (mmcache.cache.split_spec_text describes it):
    # {"kind": "seeded", "seed", "ratios"} | {"kind": "file", "path", "sha256"} | {"kind": "manifest", "sha256"}
    spec: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = Counter(self.assignment.values())
        return {s: c.get(s, 0) for s in (*SPLITS, UNASSIGNED) if s in SPLITS or c.get(s)}


def _largest_remainder(n: int, ratios: tuple[float, ...]) -> list[int]:
    raw = np.asarray(ratios, dtype=float) / sum(ratios) * n
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out), kind="stable")[: n - out.sum()]:
        out[i] += 1
    return out.tolist()


def stratified_split(samples: list[Sample], ratios=(0.8, 0.1, 0.1), seed: int = 0) -> SplitResult:
    """Per class, shuffle ids with ``seed`` and cut them by ``ratios``. Depends only on the ids, labels
    and seed (not on sample order), so it is reproducible across runs and machines."""
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise BadInputError(f"split ratios must be three non-negative numbers, got {ratios}")
    by_class: dict[int, list[str]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s.id)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        ids = [ids[i] for i in rng.permutation(len(ids))]
        start = 0
        for split, k in zip(SPLITS, _largest_remainder(len(ids), ratios), strict=True):
            assignment.update({sid: split for sid in ids[start:start + k]})
            start += k
    source = f"stratified(seed={seed}, ratios={'/'.join(f'{r:g}' for r in ratios)})"
    return SplitResult(assignment, source, spec={"kind": "seeded", "seed": int(seed),
                                                 "ratios": [float(r) for r in ratios]})


def assignment_sha256(assignment: dict[str, str]) -> str:
    """Content hash of an ``id -> split`` mapping (sorted ``id<TAB>split`` lines): the identity of a
    split file, whatever its layout (CSV, CLMLF folder), line endings or order."""
    h = hashlib.sha256()
    for sid in sorted(assignment):
        h.update(f"{sid}\t{assignment[sid]}\n".encode())
    return h.hexdigest()


def read_split_file(path: str | Path) -> dict[str, str]:
    """Read ``id -> split`` from a CSV ``id,split`` file or a folder of train/dev/test JSON lists (the
    CLMLF layout: ``[{"id": ...}, ...]``). ``dev``/``valid`` mean ``val``."""
    path = Path(path)
    out: dict[str, str] = {}
    if path.is_dir():
        found = False
        for split, name in SPLIT_JSON.items():
            f = path / name
            if not f.is_file():
                continue
            found = True
            try:
                items = json.loads(decode_bytes(f.read_bytes())[0])
            except json.JSONDecodeError as e:
                raise BadInputError(f"{f}: not valid JSON ({e.msg})") from None
            if not isinstance(items, list):
                raise BadInputError(f"{f}: expected a JSON list of objects with an 'id'")
            for item in items:
                sid = str(item["id"] if isinstance(item, dict) and "id" in item else item)
                out[sid] = split
        if not found:
            raise BadInputError(f"split folder {str(path)!r} has none of {', '.join(SPLIT_JSON.values())}")
        return out
    if not path.is_file():
        raise BadInputError(f"split file {str(path)!r} does not exist")
    rows = list(csv.DictReader(io.StringIO(decode_bytes(path.read_bytes())[0], newline="")))
    if not rows or "id" not in rows[0] or "split" not in rows[0]:
        raise BadInputError(f"{path}: expected a CSV with columns id,split")
    for n, row in enumerate(rows, 2):
        if row.get("id") is None or row.get("split") is None:
            raise BadInputError(f"{path}:{n}: expected two fields id,split")
        split = _ALIASES.get(row["split"].strip().lower(), row["split"].strip().lower())
        if split not in SPLITS:
            raise BadInputError(f"{path}: unknown split {row['split']!r} for id {row['id']!r}")
        out[row["id"].strip()] = split
    return out


def manifest_split(samples: list[Sample]) -> SplitResult | None:
    """The split a dataset gives itself (a folder manifest's ``split`` column), when every sample has one."""
    if not (samples and all(s.split for s in samples)):
        return None
    assignment = {s.id: s.split for s in samples}
    return SplitResult(assignment, "manifest", spec={"kind": "manifest", "sha256": assignment_sha256(assignment)})


def resolve_splits(samples: list[Sample], *, split_file: str | Path | None = None, seed: int | None = None,
                   ratios=(0.8, 0.1, 0.1)) -> SplitResult:
    """A split file wins; else splits the manifest gives for every sample (unless a ``seed`` is
    given); else a stratified split (seed 0 by default).

    A split file that names none of the samples is a :class:`BadInputError` (the wrong file or the
    wrong dataset: every sample would land in split ``none``)."""
    if split_file is not None:
        given = read_split_file(split_file)
        ids = {s.id for s in samples}
        assignment = {s.id: given.get(s.id, UNASSIGNED) for s in samples}
        if samples and not ids & set(given):
            example = ", ".join(sorted(given)[:3])
            raise BadInputError(f"split file {str(split_file)!r} matches none of the {len(ids)} sample ids "
                                f"(its ids look like {example or '(none)'}; the data's like "
                                f"{', '.join(sorted(ids)[:3])}): wrong file or wrong dataset?")
        return SplitResult(assignment, str(split_file),
                           unknown_ids=sorted(set(given) - ids),
                           unassigned_ids=sorted(ids - set(given)),
                           spec={"kind": "file", "path": str(split_file), "sha256": assignment_sha256(given)})
    if seed is None:
        own = manifest_split(samples)
        if own is not None:
            return own
    return stratified_split(samples, ratios, 0 if seed is None else seed)


def empty_split_warnings(counts: dict[str, int]) -> list[str]:
    """Human warnings for a split that leaves val or test (or train) empty."""
    out = []
    for split, what in (("train", "nothing can be trained"),
                        ("val", "training refuses it unless --allow-no-val (no early stopping, no model selection)"),
                        ("test", "no test numbers can be reported")):
        if not counts.get(split):
            out.append(f"the {split} split is empty: {what}")
    return out
