"""The sample index (``index.h5``): which samples a cache holds, in row order, with labels, splits,
texts, extra fields and named targets.

Owns :class:`SampleIndex` and its atomic writer / reader. The index's fingerprint
(:func:`~mmcache.cache.identity.index_fingerprint`) ties feature files to it. h5py + numpy.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcache.cache.h5io import attrs_dict, read_strs
from mmcache.cache.identity import (
    SPLIT_NAMES,
    UNRECORDED_SPLIT,
    index_fingerprint,
    split_counts,
    split_fingerprint,
    split_spec_text,
)
from mmcache.cache.names import FORMAT_VERSION, STR
from mmcache.errors import CacheError


@dataclass
class SampleIndex:
    """The samples of one dataset, in cache row order. Arrays are length N."""

    dataset: str
    classes: list[str]
    ids: np.ndarray  # (N,) object str
    labels: np.ndarray  # (N,) int64, index into classes
    splits: np.ndarray  # (N,) object str: train / val / test / none
    texts: np.ndarray  # (N,) object str
    image_paths: np.ndarray  # (N,) object str
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) int64 or object str each
    attrs: dict[str, Any] = field(default_factory=dict)
    # Label fields a run can be trained on: name -> (N,) int64 class ids, -1 missing, -2 outside the classes;
    # empty for an index written before targets existed (then only ``label`` is available).
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    target_classes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def split_spec(self) -> dict[str, Any]:
        """What made the split (``split_spec`` attribute). An index written before it was stored gives
        ``{"kind": "unrecorded", "description": <its split_source>}``: its current split counts as the
        recorded one and is kept like any other."""
        raw = self.attrs.get("split_spec")
        if raw:
            return json.loads(raw)
        legacy = self.attrs.get("split_source")
        return {**UNRECORDED_SPLIT, **({"description": str(legacy)} if legacy else {})}

    @property
    def split_fingerprint(self) -> str:
        """:func:`split_fingerprint` of the stored split (computed for indexes that predate the attribute)."""
        return str(self.attrs.get("split_fingerprint") or split_fingerprint(self.ids, self.splits))

    @property
    def split_history(self) -> list[dict[str, Any]]:
        """Every ``extract --resplit`` that replaced this index's split, oldest first."""
        raw = self.attrs.get("split_history")
        return json.loads(raw) if raw else []

    def split_ids(self) -> dict[str, list[str]]:
        """Sample ids of train, val and test, in index order."""
        return {s: [str(i) for i in self.ids[self.splits == s]] for s in SPLIT_NAMES}

    def split_info(self) -> dict[str, Any]:
        """JSON-ready: spec, its one-line description, fingerprint and counts per split."""
        spec = self.split_spec
        return {"spec": spec, "source": split_spec_text(spec), "fingerprint": self.split_fingerprint,
                "counts": split_counts(self.splits)}

    @property
    def default_target(self) -> str | None:
        """The target ``label`` holds (None for an index without targets)."""
        return self.attrs.get("default_target")

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Named multi-target tasks: name -> member targets."""
        return json.loads(self.attrs.get("tasks") or "{}")

    def __len__(self) -> int:
        return len(self.ids)


def write_index(path: str | Path, *, dataset: str, classes: list[str], ids: list[str], labels: list[int],
                splits: list[str], texts: list[str], image_paths: list[str],
                extra: dict[str, list] | None = None, attrs: dict[str, Any] | None = None,
                split_spec: dict[str, Any] | None = None, split_history: list[dict[str, Any]] | None = None,
                targets: dict[str, tuple[list[str], list[int]]] | None = None) -> str:
    """Write (atomically: temp file + rename) the sample index; returns its fingerprint.

    ``split_spec``: what made ``splits`` (see :func:`split_spec_text`; None: unrecorded), stored with
    the split's :func:`split_fingerprint`; ``split_history``: the re-splits so far.
    ``targets``: name -> (classes, (N,) class ids with -1 = missing, -2 = outside the classes), stored as
    ``targets/<name>`` int64 with a ``classes`` attribute (JSON list). Not part of the fingerprint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    if len(set(ids)) != n:
        raise CacheError(f"{path}: sample ids are not unique")
    fp = index_fingerprint(list(ids), list(texts), list(image_paths))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("id", data=np.asarray(ids, dtype=object), dtype=STR)
        f.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("split", data=np.asarray(splits, dtype=object), dtype=STR)
        f.create_dataset("text", data=np.asarray(texts, dtype=object), dtype=STR)
        f.create_dataset("image_path", data=np.asarray(image_paths, dtype=object), dtype=STR)
        g = f.create_group("extra")
        for key, values in (extra or {}).items():
            if len(values) != n:
                raise CacheError(f"extra field {key!r} has {len(values)} values for {n} samples")
            if all(isinstance(v, (int, np.integer, bool)) for v in values):
                g.create_dataset(key, data=np.asarray(values, dtype=np.int64))
            else:
                g.create_dataset(key, data=np.asarray(["" if v is None else str(v) for v in values], dtype=object), dtype=STR)
        tg = f.create_group("targets")
        tg.attrs["order"] = json.dumps(list(targets or {}))  # HDF5 lists members by name; keep the declared order
        for key, (target_classes, codes) in (targets or {}).items():
            if len(codes) != n:
                raise CacheError(f"target {key!r} has {len(codes)} labels for {n} samples")
            tg.create_dataset(key, data=np.asarray(codes, dtype=np.int64)).attrs["classes"] = json.dumps(list(target_classes))
        f.attrs.update({"format": "mmcache-index", "format_version": FORMAT_VERSION, "dataset": dataset,
                        "classes": json.dumps(list(classes)), "fingerprint": fp, "num_samples": n,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for key, value in (attrs or {}).items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
        f.attrs.update({"split_spec": json.dumps(split_spec or UNRECORDED_SPLIT, sort_keys=True),
                        "split_fingerprint": split_fingerprint(ids, splits),
                        "split_history": json.dumps(split_history or [], default=str)})
    os.replace(tmp, path)
    return fp


def read_index(path: str | Path) -> SampleIndex:
    """The sample index at ``path``; :class:`CacheError` when it is missing, not an index or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no sample index at {path}")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != "mmcache-index":
                raise CacheError(f"{path} is not an mmcache sample index")
            return SampleIndex(
                dataset=str(f.attrs["dataset"]), classes=json.loads(f.attrs["classes"]),
                ids=read_strs(f["id"]), labels=f["label"][...], splits=read_strs(f["split"]), texts=read_strs(f["text"]),
                image_paths=read_strs(f["image_path"]),
                extra={k: (read_strs(d) if d.dtype.kind == "O" else d[...]) for k, d in f["extra"].items()},
                attrs=attrs_dict(f.attrs),
                targets={k: f["targets"][k][...] for k in _target_order(f)},
                target_classes={k: json.loads(f["targets"][k].attrs["classes"]) for k in _target_order(f)},
            )
    except OSError as e:
        raise CacheError(f"cannot read sample index {path}: {e}") from None


def _target_order(f: h5py.File) -> list[str]:
    if "targets" not in f:
        return []
    order = json.loads(f["targets"].attrs.get("order", "[]"))
    return [k for k in order if k in f["targets"]] + sorted(k for k in f["targets"] if k not in order)

