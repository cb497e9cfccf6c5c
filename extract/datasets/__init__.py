"""Dataset readers behind a small registry (timm-style register / get / list).

Every module of this package registers its readers when imported, and the registry imports them all
(``pkgutil``) on first use, then the ``mmcache.datasets`` plugins (:mod:`mmcache.plugins`): adding a
reader is one module with a ``register_dataset(DatasetSpec(...))`` call, plus its contract-test fixture.

Every reader turns a dataset folder into a :class:`LoadResult`: the kept :class:`Sample` s, in a stable
order, plus a :class:`LoadReport` that accounts for every row it saw. Two kinds of problems:

* **dropped** samples never reach the cache (label conflict, duplicate id, unknown label, unsafe path);
* **flagged** samples are kept but carry a known defect (empty text, missing image, text decoded with a
  fallback encoding); stage one marks the broken modality missing instead of guessing.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.extract.textio import MAX_TEXT_CHARS, cap_text

from mmcache.errors import BadInputError
from mmcache.plugins import load_plugins

SENTIMENT3 = ("positive", "neutral", "negative")  # index = label id; matches the MVSA split files (0=pos)
MAX_EXAMPLES = 5  # ids kept per reason in a report, enough to go and look without flooding it
# Codes of a target label that is not a class (stored in the index's ``targets/<name>`` arrays).
MISSING = -1  # the sample has no value for the target (empty cell)
OUTSIDE = -2  # the value is not one of the target's declared classes
TARGET_REASONS = {MISSING: "missing", OUTSIDE: "outside_classes"}
# Options every reader takes (``-o name=value``), handled by :func:`load_dataset` itself.
COMMON_OPTIONS = {"max_text_chars": (int, MAX_TEXT_CHARS, "longest text kept, in characters; a longer one is cut "
                                                          "and flagged text_truncated")}


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


@dataclass(frozen=True)
class Target:
    """A label field a reader declares, with its classes in the order of the field's own scale.

    ``field`` None = the sample's main label (:attr:`Sample.label`, ``classes`` = the dataset's);
    otherwise the :attr:`Sample.extra` key holding the raw value, which ``mapping`` (pairs raw value ->
    class name; None = the value itself) turns into a class. Values are compared stripped and lowercased.
    A value that is empty codes as :data:`MISSING`, one that is no class as :data:`OUTSIDE`: never a class.
    """

    name: str
    classes: tuple[str, ...]
    field: str | None = None
    mapping: tuple[tuple[str, str], ...] | None = None
    description: str = ""

    def code(self, sample: Sample) -> int:
        """The class id of ``sample`` for this target, or MISSING / OUTSIDE."""
        if self.field is None:
            return int(sample.label)
        raw = sample.extra.get(self.field)
        value = "" if raw is None else str(raw).strip().lower()
        if not value:
            return MISSING
        if self.mapping is not None:
            value = dict(self.mapping).get(value, "")
        lowered = [c.lower() for c in self.classes]
        return lowered.index(value) if value in lowered else OUTSIDE


def degree_mapping(scale: tuple[str, ...], binary: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """``scale[0]`` -> ``binary[0]``, every other degree -> ``binary[1]`` (Memotion Task B: not vs any)."""
    return tuple((v, binary[0] if i == 0 else binary[1]) for i, v in enumerate(scale))


@dataclass
class LoadReport:
    rows_seen: int = 0
    dropped: Counter = field(default_factory=Counter)
    flagged: Counter = field(default_factory=Counter)
    decoded_with: Counter = field(default_factory=Counter)  # encoding -> number of text files
    examples: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # shown by inspect / extract (e.g. a class that looks like a typo)

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
            "warnings": list(self.warnings),
        }


@dataclass
class LoadResult:
    dataset: str
    root: Path
    classes: tuple[str, ...]
    samples: list[Sample]
    report: LoadReport
    options: dict[str, Any] = field(default_factory=dict)
    targets: tuple[Target, ...] = ()  # the first is the default (the main label); set by load_dataset if empty
    tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # named multi-target tasks -> members

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def target_codes(self) -> dict[str, list[int]]:
        """Per target, each sample's class id (or MISSING / OUTSIDE), in sample order."""
        return {t.name: [t.code(s) for s in self.samples] for t in self.targets}

    def target_counts(self) -> dict[str, dict[str, int]]:
        """Per target: samples per class, plus ``missing`` / ``outside_classes`` when any."""
        out = {}
        for t in self.targets:
            counts = Counter(t.code(s) for s in self.samples)
            row = {c: counts.get(i, 0) for i, c in enumerate(t.classes)}
            row.update({why: counts[code] for code, why in TARGET_REASONS.items() if counts.get(code)})
            out[t.name] = row
        return out


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    layout: str  # human-readable description of the expected files
    loader: Callable[..., LoadResult]
    options: dict[str, tuple[type, Any, str]] = field(default_factory=dict)  # name -> (type, default, help)
    default_dirs: tuple[str, ...] = ()  # tried in order when no --data-dir is given
    download: str = ""
    # Label fields a run can be trained on (``--target``); the first is the default (the main label).
    # A target with classes () takes the dataset's own (folder manifests: known only once read).
    targets: tuple[Target, ...] = ()
    tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # named multi-target tasks -> members
    # The reader writes its own data (a generator): its default folder need not exist beforehand.
    generates_data: bool = False
    # The data path may name a file (a manifest) as well as a folder.
    accepts_file: bool = False


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset {spec.name!r} registered twice")
    names = [t.name for t in spec.targets]
    if not names or spec.targets[0].field is not None or len(set(names)) != len(names):
        raise ValueError(f"dataset {spec.name!r}: needs unique targets, the first one the main label")
    for task, members in spec.tasks.items():
        if task in names or not set(members) <= set(names) or len(members) < 2:
            raise ValueError(f"dataset {spec.name!r}: task {task!r} must name >= 2 declared targets")
    _REGISTRY[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    """Names of every reader: the modules of this package and ``mmcache.datasets`` plugins, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    _discover()
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
        if Path(cand).exists() or spec.generates_data:
            return Path(cand)
    tried = ", ".join(spec.default_dirs) or "none"
    raise BadInputError(f"no --data-dir given for {spec.name!r} and no default folder exists (tried: {tried})")


def load_dataset(name: str, data_dir: str | Path | None = None, **options: Any) -> LoadResult:
    """Read dataset ``name`` from ``data_dir`` (or its default folder). Raises :class:`BadInputError` on
    an unknown dataset/option or a folder that does not have the expected layout.

    Every reader also takes :data:`COMMON_OPTIONS` (``max_text_chars``: a longer text is cut to it and
    the sample flagged ``text_truncated``)."""
    spec = get_dataset(name)
    max_chars = _max_text_chars(options.pop("max_text_chars", MAX_TEXT_CHARS))
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        known = ", ".join(sorted({*spec.options, *COMMON_OPTIONS}))
        raise BadInputError(f"dataset {name!r} has no option {unknown[0]!r} (options: {known})")
    resolved = {k: _coerce(k, t, options.get(k, default)) for k, (t, default, _h) in spec.options.items()}
    root = resolve_data_dir(spec, data_dir)
    if not (spec.generates_data or root.is_dir() or (spec.accepts_file and root.is_file())):
        raise BadInputError(f"data folder {str(root)!r} for dataset {name!r} does not exist")
    result = spec.loader(root, **resolved)
    _cap_texts(result, max_chars)
    # Stored with the reader's options (index provenance): a different cap is a different index.
    result.options = {**resolved, **({"max_text_chars": max_chars} if max_chars != MAX_TEXT_CHARS else {})}
    if not result.targets:
        result.targets = tuple(dataclasses.replace(t, classes=t.classes or tuple(result.classes)) for t in spec.targets)
    result.tasks = dict(result.tasks or spec.tasks)
    if not result.samples:
        raise BadInputError(f"dataset {name!r} at {str(root)!r}: no usable samples ({dict(result.report.dropped)})")
    return result


def _max_text_chars(value: Any) -> int:
    n = _coerce("max_text_chars", int, value)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadInputError(f"option max_text_chars={value!r} must be a positive integer")
    return n


def _cap_texts(result: LoadResult, max_chars: int) -> None:
    """Cut every text longer than ``max_chars`` (in place) and flag its sample ``text_truncated``."""
    for s in result.samples:
        s.text, cut = cap_text(s.text or "", max_chars)
        if cut:
            result.report.flag("text_truncated", s.id)


def replace_samples(result: LoadResult, samples: list[Sample]) -> LoadResult:
    return dataclasses.replace(result, samples=samples)


_DISCOVERED = False


def _discover() -> None:
    """Import every reader module of this package, then the plugins; once, on first registry use.

    Each module registers its readers at import (``register_dataset(DatasetSpec(...))``), so adding a
    reader is adding a module: there is no list of them to keep. Done lazily so that importing this
    package stays cheap."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True  # first: a reader module importing this package must not start a second round
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    load_plugins("mmcache.datasets")
