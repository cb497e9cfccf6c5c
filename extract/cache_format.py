"""The on-disk cache format: the one module that writes and reads it.

Imports only h5py and numpy (plus the stdlib) so stage two and other tools can read caches without
loading torch or transformers. The schema is a public contract, documented in the README
("Cache format"); bump :data:`FORMAT_VERSION` on any incompatible change.

Layout, one folder per dataset::

    cache/<dataset>/index.h5                     sample index: ids, labels, splits, texts, extra fields
    cache/<dataset>/text--<model-slug>.h5        one file per modality and encoder
    cache/<dataset>/image--<model-slug>.h5
    cache/<dataset>/failures.csv                 every failed sample of every modality file, with a reason
    cache/<dataset>/text--<slug>.shard-<i>-of-<n>.h5   shard i of n of a sharded run (see shard_path);
                                                        merge_shards copies a full set into text--<slug>.h5

Crash safety: feature datasets are created up front with their storage allocated at creation
(``H5D_ALLOC_TIME_EARLY``, no compression), so writing a batch only overwrites raw bytes and never
changes the file's metadata. A process killed mid-run (``kill -9`` included) leaves a file that opens
cleanly; rows are marked in ``done`` only after their values were written and flushed, so a resumed run
recomputes exactly the rows that might be torn.

Integrity: each row's CRC-32 per array goes into ``checksum`` with its values, before ``done``; reads
verify it (:mod:`extract.cache_integrity`). Writers hold the folder's lock (:mod:`extract.cache_lock`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from mmcache.extract.cache_integrity import (  # noqa: F401 -- part of this module's API
    CHECKSUM,
    CHECKSUM_FIELDS,
    Damage,
    _nonfinite_rows,
    check_free_space,
    disk_full_error,
    is_disk_full,
    planned_bytes,
    row_crc32,
    scan_file,
)

from mmcache.csvsafe import csv_row
from mmcache.errors import BadInputError, CacheError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_NAME = "index.h5"
FAILURES_NAME = "failures.csv"
MODALITIES = ("text", "image")
FEATURE_FIELDS = ("cls", "mean", "tokens", "mask")
OPTIONAL_FIELDS = ("proj",)  # (N, P) joint-space embedding, only from checkpoints with a projection (CLIP)
DTYPES = ("float16", "float32")  # storage dtypes of cls / mean / tokens
STR = h5py.string_dtype("utf-8")
# Failure reasons are fixed-length so that writing one touches only preallocated raw bytes (variable-
# length strings live in HDF5's global heap, i.e. metadata, which a kill -9 could leave half-written).
REASON_BYTES = 160
REASON = h5py.string_dtype("utf-8", REASON_BYTES)
# Target <= 256 KiB per chunk: small enough that a scattered row write (length-sorted text batches)
# rewrites little -- one bert-base token row (128 x 768 float16 = 192 KiB) is then one chunk, 6x faster
# to write scattered than 5-row 1 MiB chunks -- and still big enough for whole-array reads at memory
# speed (measured: 7.3 vs 8.5 GB/s for 1-row vs 5-row chunks).
_CHUNK_BYTES = 1 << 18


class CacheMismatchError(CacheError, BadInputError):
    """An existing cache file made with other settings or for another sample index. Also a
    :class:`BadInputError`, so the CLI exits 2: the user must decide (``--force`` rebuilds)."""


# --------------------------------------------------------------------------------------------- names

def model_slug(model: str) -> str:
    """File-name form of a model id: ``facebook/dinov2-base`` -> ``facebook--dinov2-base``; a local
    folder -> its last component (provenance keeps the full path). Files written since encoders have
    readable names use :func:`name_slug` of that name instead; this one still finds older files."""
    p = Path(model)
    name = p.name if (p.is_absolute() or model.startswith(".") or p.exists()) else model
    return name_slug(name)


def name_slug(name: str) -> str:
    """File-name form of an encoder's readable name: ``owner/name`` -> ``owner--name``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-") or "model"


def feature_path(cache_dir: str | Path, dataset: str, modality: str, model: str, *, slug: str | None = None) -> Path:
    """``<cache_dir>/<dataset>/<modality>--<slug>.h5``; ``slug`` defaults to :func:`model_slug` of ``model``."""
    if modality not in MODALITIES:
        raise BadInputError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    return Path(cache_dir) / dataset / f"{modality}--{slug or model_slug(model)}.h5"


def shard_path(cache_dir: str | Path, dataset: str, modality: str, model: str, shard_index: int,
               num_shards: int, *, slug: str | None = None) -> Path:
    """``<modality>--<slug>.shard-<i>-of-<n>.h5``: the file shard ``i`` of ``n`` writes (one shard of
    one is the normal :func:`feature_path` file, not a shard file)."""
    if not (0 <= shard_index < num_shards):
        raise BadInputError(f"shard {shard_index} of {num_shards} does not exist (0 <= shard < num_shards)")
    if num_shards == 1:
        return feature_path(cache_dir, dataset, modality, model, slug=slug)
    base = feature_path(cache_dir, dataset, modality, model, slug=slug)
    return base.with_name(f"{base.stem}.shard-{shard_index}-of-{num_shards}.h5")


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


def _strs(ds) -> np.ndarray:
    return np.asarray(ds.asstr()[...], dtype=object)


def _attrs(h5attrs) -> dict[str, Any]:
    """An HDF5 attribute set as a plain dict (bytes decoded)."""
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5attrs.items()}


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
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


def _json_attr(attrs, key, default=None):
    raw = attrs.get(key)
    return default if raw is None else json.loads(raw)


# --------------------------------------------------------------------------------------------- index

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
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no sample index at {path}")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != "mmcache-index":
                raise CacheError(f"{path} is not an mmcache sample index")
            return SampleIndex(
                dataset=str(f.attrs["dataset"]), classes=json.loads(f.attrs["classes"]),
                ids=_strs(f["id"]), labels=f["label"][...], splits=_strs(f["split"]), texts=_strs(f["text"]),
                image_paths=_strs(f["image_path"]),
                extra={k: (_strs(d) if d.dtype.kind == "O" else d[...]) for k, d in f["extra"].items()},
                attrs=_attrs(f.attrs),
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


# --------------------------------------------------------------------------------------------- features

def _early_dcpl() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _chunk_rows(row_bytes: int, n: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // max(row_bytes, 1)))


class FeatureWriter:
    """Creates or resumes one modality file and writes batches of rows into it.

    Rows are positions in the file (0..n-1); ``ids`` fixes their order. Use as a context manager.
    """

    def __init__(self, path: Path, f: h5py.File, up_to_date: bool) -> None:
        self.path, self._f, self.up_to_date = path, f, up_to_date
        self.has_checksums = CHECKSUM in f
        self.fields = CHECKSUM_FIELDS + tuple(k for k in OPTIONAL_FIELDS if k in f)  # checksummed arrays

    @classmethod
    def open(cls, path: str | Path, *, ids: list[str], rows: np.ndarray | None = None, index_fp: str,
             modality: str, hidden_size: int, num_tokens: int, dtype: str = "float16",
             config: dict[str, Any], provenance: dict[str, Any] | None = None,
             grid: tuple[int, int] | None = None, force: bool = False,
             shard: tuple[int, int] | None = None, proj_size: int | None = None) -> FeatureWriter:
        """Open ``path`` for writing, resuming when it holds the same ids and config.

        ``config`` is what determines the values (model, revision, max length, dtype, pooling, ...);
        its fingerprint must match an existing file's or :class:`CacheError` is raised, unless
        ``force``, which starts the file over. ``rows`` are the ids' positions in the sample index
        (default ``arange(n)``; a shard holds a subset). ``proj_size`` adds the optional ``proj``
        (N, P) array (joint-space embeddings of checkpoints with a projection).
        """
        path = Path(path)
        if dtype not in DTYPES:
            raise BadInputError(f"cache dtype must be float16 or float32, got {dtype!r}")
        cfg_fp = fingerprint(config)
        if path.exists() and not force:
            f = _open_h5(path, "r+")
            attrs = f.attrs
            problems = []
            if attrs.get("format") != "mmcache-features":
                problems.append("not an mmcache feature file")
            elif attrs.get("config_fingerprint") != cfg_fp and (
                    diff := encoder_difference(_json_attr(attrs, "config", {}), config)):
                problems.append(f"made with different settings ({diff})")
            elif attrs.get("index_fingerprint") != index_fp or list(_strs(f["id"])) != list(ids):
                problems.append("made for a different sample index (ids, texts or image paths changed)")
            if problems:
                f.close()
                raise CacheMismatchError(f"{path} was {problems[0]}; refusing to touch it (pass --force to rebuild)")
            return cls(path, f, up_to_date=bool(attrs.get("complete")))
        path.parent.mkdir(parents=True, exist_ok=True)
        n = len(ids)
        check_free_space(path, planned_bytes(n, hidden_size, num_tokens, dtype))
        path.unlink(missing_ok=True)  # --force: rebuilt from scratch
        # Created under a temporary name and renamed once allocated: a creation that fails (disk
        # full, kill -9) never leaves a half-made file that would block the next run.
        for stale in path.parent.glob(f".{path.name}.creating-*"):
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        f = None
        try:
            f = h5py.File(tmp, "w")
            cls._create(f, n, ids, rows, hidden_size, num_tokens, dtype, proj_size=proj_size)
            f.attrs.update({
                "format": "mmcache-features", "format_version": FORMAT_VERSION, "modality": modality,
                "hidden_size": hidden_size, "num_tokens": num_tokens, "dtype": dtype,
                "grid": json.dumps(list(grid) if grid else None), "config": json.dumps(config, sort_keys=True, default=str),
                "config_fingerprint": cfg_fp, "index_fingerprint": index_fp, "num_samples": n,
                "provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
                "shard": json.dumps(list(shard) if shard else None),
                "complete": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            f.flush()
            os.replace(tmp, path)  # the open handle follows the file
        except BaseException as e:
            _close_quietly(f)
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and is_disk_full(e):
                raise disk_full_error(path, planned_bytes(n, hidden_size, num_tokens, dtype), e) from None
            raise
        return cls(path, f, up_to_date=False)

    @staticmethod
    def _create(f, n, ids, rows, d, length, dtype, checksums: bool = True, proj_size: int | None = None) -> None:
        item = np.dtype(dtype).itemsize
        f.create_dataset("id", data=np.asarray(ids, dtype=object), dtype=STR)
        f.create_dataset("row", data=np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64))
        dcpl = _early_dcpl
        f.create_dataset("done", shape=(n,), dtype=bool, chunks=(_chunk_rows(1, n),), fillvalue=False, dcpl=dcpl())
        f.create_dataset("valid", shape=(n,), dtype=bool, chunks=(_chunk_rows(1, n),), fillvalue=False, dcpl=dcpl())
        f.create_dataset("failure", shape=(n,), dtype=REASON, chunks=(_chunk_rows(REASON_BYTES, n),), dcpl=dcpl())
        for name in ("cls", "mean"):
            f.create_dataset(name, shape=(n, d), dtype=dtype, chunks=(_chunk_rows(d * item, n), d), dcpl=dcpl())
        f.create_dataset("tokens", shape=(n, length, d), dtype=dtype,
                         chunks=(_chunk_rows(length * d * item, n), length, d), dcpl=dcpl())
        f.create_dataset("mask", shape=(n, length), dtype=bool, chunks=(_chunk_rows(length, n), length),
                         fillvalue=False, dcpl=dcpl())
        if proj_size:
            f.create_dataset("proj", shape=(n, proj_size), dtype=dtype,
                             chunks=(_chunk_rows(proj_size * item, n), proj_size), dcpl=dcpl())
        if checksums:
            fields = CHECKSUM_FIELDS + (("proj",) if proj_size else ())
            k = len(fields)
            f.create_dataset(CHECKSUM, shape=(n, k), dtype=np.uint32, chunks=(_chunk_rows(4 * k, n), k), dcpl=dcpl())
            f[CHECKSUM].attrs["fields"] = json.dumps(list(fields))
            f[CHECKSUM].attrs["algorithm"] = "crc32 (zlib) of each row's stored bytes"

    # -- state
    def pending_rows(self) -> np.ndarray:
        """(P,) int64 rows not yet done, ascending."""
        return np.flatnonzero(~self._f["done"][...])

    def done_mask(self) -> np.ndarray:
        """(N,) bool: rows written (features or a failure)."""
        return self._f["done"][...]

    def failed_rows(self) -> np.ndarray:
        """(F,) int64 rows done but not valid (recorded failures), ascending."""
        return np.flatnonzero(self._f["done"][...] & ~self._f["valid"][...])

    # -- writes
    def write(self, rows: np.ndarray, *, cls: np.ndarray, mean: np.ndarray, tokens: np.ndarray,
              mask: np.ndarray, proj: np.ndarray | None = None) -> None:
        """Write one batch. ``rows`` (B,) ascending file rows; ``cls``/``mean`` (B, D); ``tokens``
        (B, T, D) with T <= num_tokens (right-padded with zeros here); ``mask`` (B, T) bool, True = real;
        ``proj`` (B, P), required exactly when the file has a ``proj`` array.
        Values first, flush, then the done bits: a crash in between only costs a recompute."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be strictly ascending")
        f = self._f
        dtype = f["cls"].dtype
        length, d = f["tokens"].shape[1:]
        b, t = mask.shape
        if tokens.shape != (b, t, d) or cls.shape != (b, d) or mean.shape != (b, d) or b != rows.size:
            raise ValueError(f"batch shapes {cls.shape} {mean.shape} {tokens.shape} {mask.shape} do not fit "
                             f"{rows.size} rows of (L={length}, D={d})")
        if t > length:
            raise ValueError(f"{t} tokens do not fit the file's {length}")
        if any(_nonfinite_rows(np.asarray(x)).any() for x in (cls, mean, tokens, *([] if proj is None else [proj]))):
            raise ValueError("non-finite features: record such rows with write_failures, never as values")
        tok = np.zeros((b, length, d), dtype=dtype)
        tok[:, :t] = tokens
        msk = np.zeros((b, length), dtype=bool)
        msk[:, :t] = mask
        sel = _selection(rows)
        if ("proj" in f) != (proj is not None):
            raise ValueError(f"{self.path}: proj given {proj is not None}, but the file has a proj array: {'proj' in f}")
        values = {"cls": np.ascontiguousarray(cls, dtype=dtype), "mean": np.ascontiguousarray(mean, dtype=dtype),
                  "tokens": tok, "mask": msk, "valid": np.ones(b, dtype=bool)}
        if proj is not None:
            values["proj"] = np.ascontiguousarray(proj, dtype=dtype)
        self._write_values(rows, sel, values, np.zeros(b, dtype=REASON))

    def _write_values(self, rows: np.ndarray, sel, values: dict[str, np.ndarray], reasons: np.ndarray) -> None:
        """Values and their checksums, flush, then the done bits (a crash in between: recomputed)."""
        f = self._f
        for name, arr in values.items():
            _write_rows(f[name], rows, sel, arr)
        _write_rows(f["failure"], rows, sel, reasons)
        if self.has_checksums:
            crcs = np.stack([row_crc32(values[name]) for name in self.fields], axis=1)
            _write_rows(f[CHECKSUM], rows, sel, crcs)
        f.flush()
        _write_rows(f["done"], rows, sel, np.ones(rows.size, dtype=bool))
        f.flush()

    def write_failures(self, rows: np.ndarray, reasons: list[str]) -> None:
        """Mark ``rows`` done but not valid, with a reason each; their feature rows stay zero."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        order = np.argsort(rows)
        rows = rows[order]
        reasons = [reasons[i] for i in order]
        f = self._f
        sel = _selection(rows)
        # feature rows are zeroed: a row recomputed after damage holds no stale bytes
        values = {name: np.zeros((rows.size, *f[name].shape[1:]), dtype=f[name].dtype)
                  for name in self.fields}
        self._write_values(rows, sel, values, np.asarray([_reason_bytes(r) for r in reasons], dtype=REASON))

    def verify(self) -> Damage:
        """Check every done row of every array (see :func:`scan_file`)."""
        return scan_file(self._f, self.path, self.fields)[1]

    def mark_not_done(self, rows: np.ndarray) -> None:
        """Clear the done bits of ``rows`` (damaged rows): the next write recomputes them."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size:
            _write_rows(self._f["done"], rows, _selection(rows), np.zeros(rows.size, dtype=bool))
            self._f.attrs["complete"] = False
            self._f.flush()
            self.up_to_date = False

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> bool:
        """Mark the file complete if every row is done; returns whether it is."""
        f = self._f
        done = f["done"][...]
        for key, value in (extra_attrs or {}).items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
        f.attrs["num_done"] = int(done.sum())
        f.attrs["num_valid"] = int(f["valid"][...].sum())
        f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        complete = bool(done.all())
        f.attrs["complete"] = complete
        f.flush()
        self.up_to_date = complete
        return complete

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            _close_quietly(self._f)  # e.g. disk full: HDF5's own close error must not hide the cause


def _close_quietly(f) -> None:
    if f is None:
        return
    try:
        if f.id.valid:
            f.close()
    except (OSError, RuntimeError) as e:
        log.debug("closing %s after an error: %s", getattr(f, "filename", "?"), e)


def _selection(rows: np.ndarray) -> slice | np.ndarray:
    # A contiguous run (the common case: batches in order) is one hyperslab write. Scattered rows
    # (length-sorted text batches) are written run by run in _write_rows: h5py's fancy-index write
    # is ~35x slower than per-run slice writes (measured: 350 vs 12,000 rows/s of 128x768 float16).
    if rows[-1] - rows[0] + 1 == rows.size:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _reason_bytes(reason: str) -> bytes:
    raw = (reason or "failed").encode("utf-8")[:REASON_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")  # never cut a character in half


# Scattered rows spanning at most this many bytes are written as one read-modify-write of the span
# (rows in between are rewritten with their own bytes, so even a torn write leaves them intact).
_SPAN_RMW_BYTES = 4 << 20


def _write_rows(ds, rows: np.ndarray, sel, values: np.ndarray) -> None:
    if isinstance(sel, slice):
        ds[sel] = values
        return
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if (hi - lo) * ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)) <= _SPAN_RMW_BYTES:
        buf = ds[lo:hi]
        buf[rows - lo] = values
        ds[lo:hi] = buf
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [rows.size]]), strict=True):
        start = int(rows[a])
        ds[start:start + int(b - a)] = values[a:b]


def _open_h5(path: Path, mode: str, locking: bool | None = None) -> h5py.File:
    try:
        return h5py.File(path, mode) if locking is None else h5py.File(path, mode, locking=locking)
    except OSError as e:
        if "unable to lock file" in str(e).lower():  # HDF5's own lock: another process has it open
            from mmcache.extract.cache_lock import CacheBusyError, describe_holder, writer_of

            holder = writer_of(Path(path).parent)
            if holder is not None and holder.get("pid") == os.getpid():
                holder = None  # we are the writer: the other process is a reader
            if holder is not None:
                who = describe_holder(holder) if holder else "another process"
                raise CacheBusyError(f"{path} is being written by {who}; wait for that run to finish (files of "
                                     "other modalities that are complete can be read meanwhile)") from None
            raise CacheBusyError(f"{path} is open in another process (HDF5 file lock: {' '.join(str(e).split())}); "
                                 "wait for it to finish (no other extract writes this cache folder: it is a "
                                 "reader or another program); --force would not help") from None
        raise CacheError(f"cannot open cache file {path}: {e}. If it is damaged, rerun the extract command with "
                         "--repair (rebuilds only this file; --force rebuilds every modality)") from None


def repair_command(path: str | Path, provenance: dict[str, Any] | None = None, modality: str | None = None) -> str:
    """The extract call that recomputes a feature file's damaged rows (best effort from its provenance)."""
    path = Path(path)
    prov = provenance or {}
    folder = path.parent
    parts = ["python cli.py extract"]
    dataset = prov.get("dataset") or folder.name
    parts.append(f"--dataset {dataset}")
    try:
        root = read_index(folder / INDEX_NAME).attrs.get("root") if (folder / INDEX_NAME).exists() else None
    except CacheError:
        root = None
    if root and dataset != "demo":
        parts.append(f"--data-dir {root}")
    parts.append(f"--cache-dir {folder.parent}")
    if folder.name != dataset:
        parts.append(f"--name {folder.name}")
    if modality:
        model = prov.get("model_id") or prov.get("resolved_path")
        parts.append(f"--modality {modality}" + (f" --{modality}-model {model}" if model else ""))
        if prov.get("layer") not in (None, "last"):
            parts.append(f"--{modality}-layer {prov['layer']}")
        if prov.get("name"):  # the file's name comes from it: the same file is found again
            parts.append(f"--{modality}-name {prov['name']}")
    return " ".join(parts) + " --repair"


# --------------------------------------------------------------------------------------------- reading

class FeatureFile:
    """Read access to one modality file. Arrays load whole (one contiguous read each), never per batch."""

    def __init__(self, path: str | Path, *, locking: bool | None = None) -> None:
        """``locking=False`` reads a file another process is writing (``cache info`` during a run);
        such a view may lag behind the writer, so only use it for progress displays."""
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"no feature cache at {self.path}")
        self._f = _open_h5(self.path, "r", locking=locking)
        if self._f.attrs.get("format") != "mmcache-features":
            self._f.close()
            raise CacheError(f"{self.path} is not an mmcache feature file")
        a = self._f.attrs
        self.modality: str = str(a["modality"])
        self.hidden_size: int = int(a["hidden_size"])
        self.num_tokens: int = int(a["num_tokens"])
        self.dtype: str = str(a["dtype"])
        self.complete: bool = bool(a["complete"])
        self.config: dict[str, Any] = _json_attr(a, "config", {})
        self.provenance: dict[str, Any] = _json_attr(a, "provenance", {})
        self.grid = _json_attr(a, "grid")
        self.shard = _json_attr(a, "shard")
        self.index_fingerprint: str = str(a["index_fingerprint"])

    @property
    def attrs(self) -> dict[str, Any]:
        return _attrs(self._f.attrs)

    @property
    def ids(self) -> np.ndarray:
        """(N,) object str."""
        return _strs(self._f["id"])

    @property
    def rows(self) -> np.ndarray:
        """(N,) int64 positions in the sample index."""
        return self._f["row"][...]

    @property
    def done(self) -> np.ndarray:
        """(N,) bool."""
        return self._f["done"][...]

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: features present (done and not failed)."""
        return self._f["valid"][...]

    def failures(self) -> list[tuple[str, str]]:
        """(id, reason) for each failed row."""
        reasons = _strs(self._f["failure"])
        done, valid = self.done, self.valid
        return [(i, r) for i, r, d, v in zip(self.ids, reasons, done, valid, strict=True) if d and not v]

    @property
    def has_checksums(self) -> bool:
        """False for files written before per-row checksums existed (they cannot be verified)."""
        return CHECKSUM in self._f

    def load(self, fields=("cls",), dtype: str | None = "float32", verify: bool = True) -> dict[str, np.ndarray]:
        """Read whole arrays: ``cls``/``mean`` (N, D), ``tokens`` (N, L, D), ``mask`` (N, L) bool, and
        ``proj`` (N, P) where the file has it. Float arrays are cast to ``dtype`` (None keeps the stored
        float16/float32).

        ``verify`` (default): every done row of the arrays read (and ``valid``) is checked against its
        checksum and for NaN/Inf while it is read; damage raises :class:`CacheError` naming the rows and
        the command that recomputes them. A file without checksums (older version) is checked for
        NaN/Inf only, with a warning."""
        for name in fields:
            if name not in FEATURE_FIELDS + OPTIONAL_FIELDS:
                raise BadInputError(f"unknown cache field {name!r}; expected one of "
                                    f"{', '.join(FEATURE_FIELDS + OPTIONAL_FIELDS)}")
            if name not in self._f:  # a file written by another tool may lack an array
                raise CacheError(f"{self.path} has no {name!r} array; re-extract it with this project")
        names = tuple(dict.fromkeys(fields))
        if verify:
            arrays, damage = scan_file(self._f, self.path, (*names, "valid"), keep=names)
            if not damage.verifiable:
                log.warning("%s has no checksums (written by an older version): only NaN/Inf can be detected; "
                            "rebuild it with `extract --force` to make it verifiable", self.path)
            if damage:
                raise CacheError(f"{self.path}: {damage.describe()}. They are never used for training: recompute "
                                 f"them with `{repair_command(self.path, self.provenance, self.modality)}` (or "
                                 "rerun the extract command that made the file); `python cli.py cache verify "
                                 f"{self.path.parent}` lists every damaged row")
        else:
            arrays = {}
            for name in names:
                ds = self._f[name]
                arrays[name] = np.empty(ds.shape, dtype=ds.dtype)
                ds.read_direct(arrays[name])
        return {name: arrays[name] if (dtype is None or name == "mask") else arrays[name].astype(dtype, copy=False)
                for name in fields}

    def verify(self, fields=None) -> Damage:
        """Check every done row of ``fields`` (default: all arrays) without keeping them."""
        if fields is None:
            fields = CHECKSUM_FIELDS + tuple(k for k in OPTIONAL_FIELDS if k in self._f)
        return scan_file(self._f, self.path, tuple(fields))[1]

    def nbytes_on_disk(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_feature_files(dataset_dir: str | Path) -> list[Path]:
    """Modality files of one dataset folder (shard files excluded), sorted."""
    d = Path(dataset_dir)
    return sorted(p for p in d.glob("*--*.h5") if p.name.split("--")[0] in MODALITIES and ".shard" not in p.name)


def list_shard_files(dataset_dir: str | Path) -> list[Path]:
    """Shard files (``*.shard-<i>-of-<n>.h5``) of one dataset folder, sorted."""
    d = Path(dataset_dir)
    return sorted(p for p in d.glob("*--*.shard-*-of-*.h5") if p.name.split("--")[0] in MODALITIES)


def describe(path: str | Path, *, locking: bool | None = None, verify: bool = True) -> dict[str, Any]:
    """Everything `cache info` shows about one file (index or features). ``verify``: check the
    small arrays (cls, mean, mask, valid; not tokens) against their checksums: ``damaged_rows``."""
    path = Path(path)
    if path.name == INDEX_NAME:
        idx = read_index(path)
        info = idx.split_info()
        return {"path": str(path), "kind": "index", "dataset": idx.dataset, "samples": len(idx),
                "classes": idx.classes, "splits": info["counts"], "split_source": info["source"],
                "split_spec": info["spec"], "split_fingerprint": info["fingerprint"],
                "split_history": idx.split_history, "fingerprint": idx.fingerprint,
                "size_bytes": path.stat().st_size}
    with FeatureFile(path, locking=locking) as ff:
        f = ff._f
        done, valid, attrs = ff.done, ff.valid, ff.attrs  # each read once (cache info lists many files)
        damage = ff.verify(("cls", "mean", "mask", "valid")) if verify else None
        return {
            "path": str(path), "kind": "features", "modality": ff.modality,
            "model": ff.provenance.get("model_id") or ff.config.get("model"), "name": ff.provenance.get("name"),
            "complete": ff.complete, "samples": int(f["id"].shape[0]), "done": int(done.sum()),
            "valid": int(valid.sum()), "failed": int((done & ~valid).sum()),
            "arrays": {k: {"shape": list(f[k].shape), "dtype": str(f[k].dtype)}
                       for k in FEATURE_FIELDS + OPTIONAL_FIELDS if k in f},
            "hidden_size": ff.hidden_size, "num_tokens": ff.num_tokens, "dtype": ff.dtype,
            "grid": ff.grid, "shard": ff.shard, "size_bytes": ff.nbytes_on_disk(),
            "index_fingerprint": ff.index_fingerprint,
            "config_fingerprint": attrs.get("config_fingerprint"),
            "created": attrs.get("created"), "updated": attrs.get("updated"),
            "last_run": _json_attr(f.attrs, "last_run"),
            "config": ff.config, "provenance": ff.provenance, "checksums": ff.has_checksums,
            "damaged_rows": None if damage is None else int(damage.rows.size),
        }


def write_failures_csv(dataset_dir: str | Path) -> Path:
    """(Re)write ``failures.csv`` from every modality file in the folder: modality, file, id, reason."""
    d = Path(dataset_dir)
    out = d / FAILURES_NAME
    tmp = out.with_suffix(".csv.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["modality", "file", "id", "reason"])
            for p in list_feature_files(d):
                with FeatureFile(p) as ff:
                    for sid, reason in ff.failures():
                        w.writerow(csv_row([ff.modality, p.name, sid, reason]))  # ids and reasons are data
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------- merging shards

_SHARD_NAME = re.compile(r"^(?P<base>(?:text|image)--.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.h5$")
_MERGE_BLOCK_BYTES = 64 << 20  # rows copied per step: bounded memory for any cache size
_MERGE_FIELDS = ("cls", "mean", "tokens", "mask", "valid", "failure")  # then "done", last


@dataclass
class MergeResult:
    """One merged (or already merged) feature file."""

    path: Path  # the merged file: the normal, unsharded feature file
    num_shards: int
    shards: list[Path]  # the shard files it was made from (or that were found, when already merged)
    status: str  # "merged" | "already merged"
    num_samples: int = 0
    num_valid: int = 0
    num_failed: int = 0
    removed_shards: bool = False
    failures_csv: Path | None = None
    seconds: float = 0.0


def parse_shard_name(path: str | Path) -> tuple[Path, int, int] | None:
    """``.../text--m.shard-1-of-4.h5`` -> ``(.../text--m.h5, 1, 4)``; None for other names."""
    p = Path(path)
    m = _SHARD_NAME.match(p.name)
    if not m:
        return None
    return p.with_name(m["base"] + ".h5"), int(m["i"]), int(m["n"])


def expected_shards(target: str | Path, num_shards: int) -> list[Path]:
    """The ``num_shards`` shard file names whose merge is ``target`` (a normal feature file path)."""
    t = Path(target)
    return [t.with_name(f"{t.stem}.shard-{i}-of-{num_shards}.h5") for i in range(num_shards)]


def shard_groups(paths: list[str | Path]) -> list[tuple[Path, int]]:
    """Group dataset folders and/or shard files into ``(target, num_shards)`` merges, sorted.

    A folder contributes every shard set in it. Two shard sets of different ``n`` for one target are
    refused (:class:`BadInputError`): merge one set by naming its files, after deleting the other."""
    found: dict[Path, set[int]] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = list_shard_files(p)
        elif p.is_file() or parse_shard_name(p):
            files = [p]
        else:
            raise BadInputError(f"no such file or folder: {p}")
        for f in files:
            parsed = parse_shard_name(f)
            if parsed is None:
                raise BadInputError(f"{f} is not a shard file (<modality>--<model>.shard-<i>-of-<n>.h5)")
            target, _i, n = parsed
            found.setdefault(target, set()).add(n)
    out = []
    for target, ns in sorted(found.items()):
        if len(ns) > 1:
            sets = " and ".join(f"{n} ({target.stem}.shard-*-of-{n}.h5)" for n in sorted(ns))
            raise BadInputError(f"{target.parent} holds shards of {target.name} split {sets} ways; pass the files "
                                "of one set (and delete the other)")
        out.append((target, ns.pop()))
    return out


@dataclass
class _ShardMeta:
    path: Path
    index: int
    attrs: dict[str, Any]
    rows: np.ndarray
    ids: np.ndarray
    done: int
    complete: bool


def _read_shard_meta(path: Path, i: int, n: int) -> _ShardMeta:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"cannot open shard {i} of {n} ({path}): {e}. Is an extract of it still running? "
                         f"If the file is damaged, rerun that shard with --force") from None
    with f:
        attrs = _attrs(f.attrs)
        if attrs.get("format") != "mmcache-features":
            raise CacheError(f"{path} is not an mmcache feature file")
        shard = _json_attr(f.attrs, "shard")
        if shard is not None and list(shard) != [i, n]:
            raise CacheError(f"{path} holds shard {shard[0]} of {shard[1]}, not {i} of {n} as its name says")
        done = f["done"][...]
        return _ShardMeta(path=path, index=i, attrs=attrs, rows=f["row"][...], ids=_strs(f["id"]),
                          done=int(done.sum()), complete=bool(attrs.get("complete")) and bool(done.all()))


def _target_state(target: Path, cfg_fp: str, index_fp: str) -> str:
    """'absent' | 'same' (complete, same settings and index) | 'same-incomplete' | 'other' | 'unreadable'."""
    if not target.exists():
        return "absent"
    try:
        with h5py.File(target, "r") as f:
            a = f.attrs
            if a.get("format") != "mmcache-features":
                return "other"
            same = a.get("config_fingerprint") == cfg_fp and a.get("index_fingerprint") == index_fp
            if not same:
                return "other"
            return "same" if bool(a.get("complete")) and bool(f["done"][...].all()) else "same-incomplete"
    except (OSError, KeyError):
        return "unreadable"


def _remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def merge_shards(target: str | Path, num_shards: int, *, keep_shards: bool = False, force: bool = False,
                 skip_if_merged: bool = False) -> MergeResult:
    """See :func:`_merge_shards`; holds the folder's write lock (:mod:`extract.cache_lock`) throughout."""
    from mmcache.extract.cache_lock import folder_lock

    try:
        with folder_lock(Path(target).parent):
            return _merge_shards(target, num_shards, keep_shards=keep_shards, force=force,
                                 skip_if_merged=skip_if_merged)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(Path(target), None, e) from None
        raise


def _merge_shards(target: str | Path, num_shards: int, *, keep_shards: bool = False, force: bool = False,
                  skip_if_merged: bool = False) -> MergeResult:
    """Combine the ``num_shards`` shard files of ``target`` into ``target``, the normal single-process
    feature file (a plain copy: no links to the shards, so the folder can be moved).

    Validates before writing anything: every shard present (:class:`CacheError` naming the missing
    ones), same ``config_fingerprint`` and ``index_fingerprint`` (:class:`CacheMismatchError`), each
    complete (:class:`CacheError` naming the shard to rerun), ids matching the folder's ``index.h5``,
    rows disjoint and covering the index. Writes a hidden temporary file, verifies it against the
    shards (checksums of every copied array), then ``os.replace``\\ s it into place, rewrites
    ``failures.csv`` and, unless ``keep_shards``, deletes the shard files.

    An existing ``target`` made with other settings is refused unless ``force``. When shards are
    missing but ``target`` is already complete with the same settings (shards deleted by an earlier
    merge), or ``skip_if_merged`` and it is complete, nothing is copied: status ``"already merged"``.
    """
    t0 = time.perf_counter()
    target = Path(target)
    if num_shards < 2:
        raise BadInputError(f"a merge needs at least 2 shards, got {num_shards}")
    files = expected_shards(target, num_shards)
    present = [p for p in files if p.exists()]
    metas = [_read_shard_meta(p, files.index(p), num_shards) for p in present]
    ref = metas[0] if metas else None

    # same settings, same index: checked first, a mismatch is the most basic refusal
    for m in metas[1:]:
        if m.attrs.get("config_fingerprint") != ref.attrs.get("config_fingerprint"):
            diff = _config_diff(_json_attr(ref.attrs, "config", {}), _json_attr(m.attrs, "config", {}))
            raise CacheMismatchError(
                f"refusing to merge: {m.path.name} was made with different settings than {ref.path.name} "
                f"({diff}). Rerun that shard with the same settings as the others "
                "(--force rebuilds it)")
        if m.attrs.get("index_fingerprint") != ref.attrs.get("index_fingerprint"):
            raise CacheMismatchError(
                f"refusing to merge: {m.path.name} and {ref.path.name} were made for different sample indexes "
                "(ids, texts or image paths changed between runs). Rerun the stale shards with --force")
    index_path = target.parent / INDEX_NAME
    index = read_index(index_path) if index_path.exists() else None
    if ref is not None and index is not None and ref.attrs.get("index_fingerprint") != index.fingerprint:
        raise CacheMismatchError(
            f"refusing to merge: the shards of {target.name} were made for another sample index than "
            f"{index_path} (ids, texts or image paths changed since). Rerun them with --force")

    missing = [p for p in files if not p.exists()]
    if ref is not None:
        state = _target_state(target, ref.attrs["config_fingerprint"], ref.attrs["index_fingerprint"])
    else:
        state = "absent"
        if target.exists() and index is not None:
            with FeatureFile(target) as ff:
                if ff.complete and ff.index_fingerprint == index.fingerprint:
                    state = "same"
    if state == "same" and (missing or skip_if_merged):
        if not keep_shards:
            _remove(present)
        with FeatureFile(target) as ff:
            valid, n_all = int(ff.valid.sum()), len(ff.ids)
        return MergeResult(path=target, num_shards=num_shards, shards=present, status="already merged",
                           num_samples=n_all, num_valid=valid, num_failed=n_all - valid,
                           removed_shards=bool(present) and not keep_shards, seconds=time.perf_counter() - t0)
    if missing:
        which = ", ".join(f"shard {files.index(p)} ({p.name})" for p in missing)
        raise CacheError(f"cannot merge {target.name}: {len(missing)} of {num_shards} shards missing: {which}. "
                         f"Run `extract --shard i/{num_shards}` with the same settings for each, then merge again")
    incomplete = [m for m in metas if not m.complete]
    if incomplete:
        which = "; ".join(f"shard {m.index} ({m.path.name}): {m.done} of {len(m.rows)} rows done" for m in incomplete)
        rerun = ", ".join(f"--shard {m.index}/{num_shards}" for m in incomplete)
        raise CacheError(f"cannot merge {target.name}: incomplete shards: {which}. Finish them by rerunning extract "
                         f"with the same settings and {rerun} (or the same torchrun launch), then merge again")

    # rows: disjoint, covering 0..N-1, ids as in the index
    n_total = len(index) if index is not None else int(sum(len(m.rows) for m in metas))
    owner = np.full(n_total, -1, dtype=np.int64)
    for m in metas:
        if m.rows.size and (m.rows.min() < 0 or m.rows.max() >= n_total):
            raise CacheError(f"{m.path.name} has rows outside the {n_total} samples of the index")
        hit = owner[m.rows]
        if (hit >= 0).any() or len(np.unique(m.rows)) != len(m.rows):
            other = int(hit[hit >= 0][0]) if (hit >= 0).any() else m.index
            raise CacheError(f"cannot merge {target.name}: shards {other} and {m.index} overlap (they hold the "
                             "same rows); were they made with different shard counts?")
        owner[m.rows] = m.index
        if index is not None and list(m.ids) != list(index.ids[m.rows]):
            raise CacheMismatchError(f"refusing to merge: the ids of {m.path.name} do not match {index_path}")
    if (owner < 0).any():
        gap = np.flatnonzero(owner < 0)
        raise CacheError(f"cannot merge {target.name}: {gap.size} rows of the index are in no shard "
                         f"(first: row {int(gap[0])})")
    if state in ("other", "unreadable") and not force:
        what = "was made with other settings or for another index" if state == "other" else "cannot be read"
        raise CacheMismatchError(f"{target} exists and {what}; refusing to replace it with the merge "
                                 "(pass --force to replace it)")

    ids = np.empty(n_total, dtype=object)
    for m in metas:
        ids[m.rows] = m.ids
    tmp = target.with_name(f".{target.name}.merging-{os.getpid()}")
    for stale in target.parent.glob(f".{target.name}.merging-*"):
        stale.unlink(missing_ok=True)  # left by a merge that was killed
    try:
        check_free_space(tmp, sum(m.path.stat().st_size for m in metas))
        sums = _copy_shards(tmp, metas, ids, n_total)
        _verify_copy(tmp, metas, sums)
        with h5py.File(tmp, "r+") as f:
            f.attrs["complete"] = True
            f.flush()
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    failures_csv = write_failures_csv(target.parent)
    with FeatureFile(target) as ff:
        valid = int(ff.valid.sum())
    if not keep_shards:
        _remove([m.path for m in metas])
    return MergeResult(path=target, num_shards=num_shards, shards=[m.path for m in metas], status="merged",
                       num_samples=n_total, num_valid=valid, num_failed=n_total - valid,
                       removed_shards=not keep_shards, failures_csv=failures_csv, seconds=time.perf_counter() - t0)


def _merge_fields(f) -> tuple[str, ...]:
    return _MERGE_FIELDS + tuple(k for k in OPTIONAL_FIELDS if k in f)


def _block_rows(ds) -> int:
    row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
    return max(1, _MERGE_BLOCK_BYTES // max(row_bytes, 1))


def _blocks(m: _ShardMeta, step: int):
    """(shard positions slice, ascending target rows, order into the slice) per block of a shard."""
    for a in range(0, len(m.rows), step):
        b = min(a + step, len(m.rows))
        trows = m.rows[a:b]
        order = np.argsort(trows, kind="stable")
        yield slice(a, b), trows[order], order


def _read_target(ds, rows: np.ndarray) -> np.ndarray:
    sel = _selection(rows)
    return ds[sel] if isinstance(sel, slice) else ds[rows]


def _copy_shards(tmp: Path, metas: list[_ShardMeta], ids: np.ndarray, n_total: int) -> dict[tuple[int, str], str]:
    """Write the merged file at ``tmp`` (complete=False); returns a sha256 per (shard, array) of the
    values copied, in target row order, for :func:`_verify_copy`."""
    ref = metas[0].attrs
    sums: dict[tuple[int, str], str] = {}
    with h5py.File(tmp, "w") as out:
        with h5py.File(metas[0].path, "r") as f0:
            d, length = f0["tokens"].shape[2], f0["tokens"].shape[1]
            proj_size = f0["proj"].shape[1] if "proj" in f0 else None
        with_crc = all(_has_checksums(m.path) for m in metas)
        FeatureWriter._create(out, n_total, list(ids), None, d, length, str(ref["dtype"]), checksums=with_crc,
                              proj_size=proj_size)
        runs = []
        for m in metas:
            with h5py.File(m.path, "r") as src:
                for name in (*_merge_fields(src), *([CHECKSUM] if with_crc else []), "done"):
                    h = hashlib.sha256()
                    for sl, trows, order in _blocks(m, _block_rows(src[name])):
                        values = src[name][sl][order]
                        h.update(np.ascontiguousarray(values).tobytes())
                        _write_rows(out[name], trows, _selection(trows), values)
                    sums[(m.index, name)] = h.hexdigest()
                runs.append({"shard": m.index, "file": m.path.name, "rows": len(m.rows),
                             "last_run": _json_attr(src.attrs, "last_run")})
        for key, value in ref.items():
            if key not in ("last_run",):
                out.attrs[key] = value
        done = out["done"][...]
        out.attrs.update({
            "shard": json.dumps(None), "num_samples": n_total, "num_done": int(done.sum()),
            "num_valid": int(out["valid"][...].sum()), "complete": False,
            "created": min(str(m.attrs.get("created", "")) for m in metas),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "merged_from": json.dumps({"num_shards": len(metas), "shards": runs,
                                       "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, default=str),
        })
        out.flush()
    return sums


def _verify_copy(tmp: Path, metas: list[_ShardMeta], sums: dict[tuple[int, str], str]) -> None:
    """Re-read the written file and compare every copied array with the shards' checksums."""
    with h5py.File(tmp, "r") as f:
        for m in metas:
            for name in (*_merge_fields(f), *([CHECKSUM] if CHECKSUM in f else []), "done"):
                h = hashlib.sha256()
                for _sl, trows, _order in _blocks(m, _block_rows(f[name])):
                    h.update(np.ascontiguousarray(_read_target(f[name], trows)).tobytes())
                if h.hexdigest() != sums[(m.index, name)]:
                    raise CacheError(f"merge verification failed: {name} of {m.path.name} differs in the merged "
                                     f"copy {tmp}; the shards are kept, try the merge again")
        if not f["done"][...].all():
            raise CacheError(f"merge verification failed: {tmp} has rows not done")


def _has_checksums(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return CHECKSUM in f


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover -- e.g. directories on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def merge_paths(paths: list[str | Path], *, keep_shards: bool = False, force: bool = False) -> list[MergeResult]:
    """What ``cache merge`` does: every shard set found in ``paths`` (dataset folders and/or shard
    files) merged by :func:`merge_shards`. A folder without shard files but with merged feature files
    is fine (nothing to do); one with neither is a :class:`CacheError`."""
    if not paths:
        raise BadInputError("name a dataset folder or shard files to merge")
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not list_shard_files(p) and not list_feature_files(p):
            raise CacheError(f"no shard files (*.shard-<i>-of-<n>.h5) and no feature files in {p}")
    return [merge_shards(target, n, keep_shards=keep_shards, force=force) for target, n in shard_groups(paths)]
