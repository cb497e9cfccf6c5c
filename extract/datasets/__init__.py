"""Dataset readers behind a small registry (timm-style register / get / list).

Every reader turns a dataset folder into a :class:`LoadResult`: the kept :class:`Sample` s, in a stable
order, plus a :class:`LoadReport` that accounts for every row it saw. Two kinds of problems:

* **dropped** samples never reach the cache (label conflict, duplicate id, unknown label, unsafe path);
* **flagged** samples are kept but carry a known defect (empty text, missing image, text decoded with a
  fallback encoding); stage one marks the broken modality missing instead of guessing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.errors import BadInputError

SENTIMENT3 = ("positive", "neutral", "negative")  # index = label id; matches the MVSA split files (0=pos)
MAX_EXAMPLES = 5  # ids kept per reason in a report, enough to go and look without flooding it


@dataclass
class Sample:
    """One image+text post. ``label`` indexes the dataset's ``classes``."""

    id: str
    text: str
    image_path: Path | None
    label: int
    label_name: str
    extra: dict[str, Any] = field(default_factory=dict)
    split: str | None = None  # only when the source itself assigns one (folder manifests)


@dataclass
class LoadReport:
    rows_seen: int = 0
    dropped: Counter = field(default_factory=Counter)
    flagged: Counter = field(default_factory=Counter)
    decoded_with: Counter = field(default_factory=Counter)  # encoding -> number of text files
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, sample_id: str) -> None:
        self.dropped[reason] += 1
        self._example(reason, sample_id)

    def flag(self, reason: str, sample_id: str) -> None:
        self.flagged[reason] += 1
        self._example(reason, sample_id)

    def _example(self, reason: str, sample_id: str) -> None:
        ids = self.examples.setdefault(reason, [])
        if len(ids) < MAX_EXAMPLES:
            ids.append(str(sample_id))

    @property
    def fallback_decodes(self) -> int:
        return sum(n for enc, n in self.decoded_with.items() if enc != "utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_seen": self.rows_seen,
            "dropped": dict(self.dropped),
            "flagged": dict(self.flagged),
            "decoded_with": dict(self.decoded_with),
            "examples": self.examples,
        }


@dataclass
class LoadResult:
    dataset: str
    root: Path
    classes: tuple[str, ...]
    samples: list[Sample]
    report: LoadReport
    options: dict[str, Any] = field(default_factory=dict)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    layout: str  # human-readable description of the expected files
    loader: Callable[..., LoadResult]
    options: dict[str, tuple[type, Any, str]] = field(default_factory=dict)  # name -> (type, default, help)
    default_dirs: tuple[str, ...] = ()  # tried in order when no --data-dir is given
    download: str = ""


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadInputError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_REGISTRY))}") from None


def _coerce(name: str, typ: type, value: Any) -> Any:
    if not isinstance(value, str) or typ is str:
        return value
    if typ is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise BadInputError(f"option {name}={value!r} is not a boolean (use true/false)")
    try:
        return typ(value)
    except ValueError:
        raise BadInputError(f"option {name}={value!r} is not a valid {typ.__name__}") from None


def resolve_data_dir(spec: DatasetSpec, data_dir: str | Path | None) -> Path:
    """The folder to read: ``data_dir`` if given, else the first existing default."""
    if data_dir is not None:
        return Path(data_dir)
    for cand in spec.default_dirs:
        if Path(cand).exists() or spec.name == "demo":
            return Path(cand)
    tried = ", ".join(spec.default_dirs) or "none"
    raise BadInputError(f"no --data-dir given for {spec.name!r} and no default folder exists (tried: {tried})")


def load_dataset(name: str, data_dir: str | Path | None = None, **options: Any) -> LoadResult:
    """Read dataset ``name`` from ``data_dir`` (or its default folder). Raises :class:`BadInputError` on
    an unknown dataset/option or a folder that does not have the expected layout."""
    spec = get_dataset(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        known = ", ".join(sorted(spec.options)) or "none"
        raise BadInputError(f"dataset {name!r} has no option {unknown[0]!r} (options: {known})")
    resolved = {k: _coerce(k, t, options.get(k, default)) for k, (t, default, _h) in spec.options.items()}
    root = resolve_data_dir(spec, data_dir)
    if spec.name != "demo" and not (root.is_dir() or (spec.name == "folder" and root.is_file())):
        raise BadInputError(f"data folder {str(root)!r} for dataset {name!r} does not exist")
    result = spec.loader(root, **resolved)
    result.options = resolved
    if not result.samples:
        raise BadInputError(f"dataset {name!r} at {str(root)!r}: no usable samples ({dict(result.report.dropped)})")
    return result


def replace_samples(result: LoadResult, samples: list[Sample]) -> LoadResult:
    return dataclasses.replace(result, samples=samples)


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    # Import for the side effect of registration; done lazily so importing this module is cheap.
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        from mmcache.extract.datasets import demo, folder, memotion, mvsa  # noqa: F401
