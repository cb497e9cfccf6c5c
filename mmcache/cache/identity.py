"""Identity in the cache contract: what makes two indexes, splits or encoder configs the same.

Owns the fingerprints (config dicts, the sample index, the split), the split descriptions, and the
identity rule of encoders, :func:`encoder_difference`, which both stages apply: stage one to decide
whether a file may be resumed, stage two whether two caches hold the same encoder's features. Also
:class:`CacheMismatchError`, what a failed identity check raises. Stdlib + numpy only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from mmcache.errors import BadInputError, CacheError


class CacheMismatchError(CacheError, BadInputError):
    """An existing cache file made with other settings or for another sample index. Also a
    :class:`BadInputError`, so the CLI exits 2: the user must decide (``--force`` rebuilds)."""


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (config dicts, id lists)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def index_fingerprint(ids: list[str], texts: list[str], image_paths: list[str]) -> str:
    """Identity of what gets encoded, in order. Labels and splits are left out on purpose: re-labelling
    or re-splitting must not invalidate features."""
    h = hashlib.sha256()
    for sid, text, img in zip(ids, texts, image_paths, strict=True):
        h.update(f"{sid}\x00{text}\x00{img}\x01".encode())
    return h.hexdigest()[:16]


SPLIT_NAMES = ("train", "val", "test")
UNRECORDED_SPLIT = {"kind": "unrecorded"}  # an index written before split sources were stored


def split_fingerprint(ids, splits) -> str:
    """16 hex of SHA-256 over the sorted id lists of train, val and test: the identity of a split,
    independent of row order and of how it was made (ids in split ``none`` are left out)."""
    ids, splits = np.asarray(ids, dtype=object), np.asarray(splits, dtype=object)
    h = hashlib.sha256()
    for name in SPLIT_NAMES:
        h.update(f"[{name}]\n".encode())
        for sid in sorted(map(str, ids[splits == name])):
            h.update(f"{sid}\n".encode())
    return h.hexdigest()[:16]


def split_counts(splits) -> dict[str, int]:
    """Samples per split: train, val, test always, ``none`` when there are any."""
    splits = np.asarray(splits, dtype=object)
    out = {s: int((splits == s).sum()) for s in SPLIT_NAMES}
    rest = int((~np.isin(splits, SPLIT_NAMES)).sum())
    return {**out, "none": rest} if rest else out


def split_spec_text(spec: dict[str, Any] | None) -> str:
    """One line naming what made a split: ``seeded (seed 0, 0.8/0.1/0.1)``, ``file splits/x (sha256
    1a2b3c4d5e6f)``, ``manifest split column``, ``unrecorded (...)``."""
    spec = spec or UNRECORDED_SPLIT
    kind = spec.get("kind")
    if kind == "seeded":
        ratios = "/".join(f"{r:g}" for r in spec.get("ratios") or ())
        return f"seeded (seed {spec.get('seed')}, {ratios})"
    if kind == "file":
        return f"file {spec.get('path')} (sha256 {str(spec.get('sha256'))[:12]})"
    if kind == "manifest":
        return f"manifest split column (sha256 {str(spec.get('sha256'))[:12]})"
    if kind == "unrecorded":
        legacy = f": {spec['description']}" if spec.get("description") else ""
        return f"unrecorded (index written before split sources were stored{legacy})"
    details = ", ".join(f"{k} {v}" for k, v in sorted(spec.items()) if k != "kind")
    return f"{kind} ({details})" if details else str(kind)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The config keys whose values differ, for "made with different settings (...)" messages."""
    return ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))) or "config"


# ------------------------------------------------------------------------------------- encoder identity

#: How values are stored / computed numerically, not which encoder: compared only when resuming a file.
STORAGE_KEYS = ("dtype", "precision", "format_version")
#: Config keys added after files were first written, with the value a file without them means.
CONFIG_DEFAULTS: dict[str, Any] = {"layer": "last", "proj_size": None}


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def encoder_difference(old: dict[str, Any], new: dict[str, Any], *, storage: bool = True) -> str:
    """What makes two feature-file configs (``FeatureFile.config``) describe different encoder outputs,
    as ``"key old vs new; ..."``; ``""`` when they are the same encoder.

    The identity rule (both stages): an encoder is what determines its outputs -- the weights
    (``weights_sha256`` of a local folder; hub id ``model`` + resolved ``commit_hash`` of a hub model),
    tokenizer / processor settings, pooling, layer, max length, patch grid. Paths are hints: two local
    folders with byte-identical weights are the same encoder (a symlink, a copy), and one folder whose
    weights were replaced is not. ``storage=False`` also ignores :data:`STORAGE_KEYS` (stage two: a
    float32 cache of the same encoder is the same encoder)."""
    skip = set() if storage else set(STORAGE_KEYS)
    if old.get("weights_sha256") and new.get("weights_sha256"):
        skip.add("model")  # local folders: the weights decide; the path is a hint
    if old.get("commit_hash") and new.get("commit_hash"):
        skip.add("revision")  # hub: the resolved commit decides; a branch or tag name is a hint
    diffs = []
    for k in sorted((set(old) | set(new)) - skip):
        a, b = old.get(k, CONFIG_DEFAULTS.get(k)), new.get(k, CONFIG_DEFAULTS.get(k))
        if a != b:
            diffs.append(f"{k} {_short(a)} vs {_short(b)}")
    return "; ".join(diffs)

