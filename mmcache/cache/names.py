"""Names of the cache contract: format version, file names, field names, dtypes and where each file lies.

Owns everything that says *what* is on disk and *where*, without opening a file (stdlib + h5py string
dtypes only). Layout, one folder per dataset::

    cache/<dataset>/index.h5                     sample index: ids, labels, splits, texts, extra fields
    cache/<dataset>/text--<model-slug>.h5        one file per modality and encoder
    cache/<dataset>/image--<model-slug>.h5
    cache/<dataset>/failures.csv                 every failed sample of every modality file, with a reason
    cache/<dataset>/text--<slug>.shard-<i>-of-<n>.h5   shard i of n of a sharded run (see shard_path);
                                                        merge_shards maps a full set into text--<slug>.h5
                                                        (HDF5 virtual datasets; a copy with copy=True)

The schema is a public contract, documented in docs/cache-format.md; bump
:data:`FORMAT_VERSION` on any incompatible change.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py

from mmcache.errors import BadInputError

FORMAT_VERSION = 1
INDEX_NAME = "index.h5"
FAILURES_NAME = "failures.csv"
MODALITIES = ("text", "image")
FEATURE_FIELDS = ("cls", "mean", "tokens", "mask")
OPTIONAL_FIELDS = ("proj",)  # (N, P) joint-space embedding, only from checkpoints with a projection (CLIP)
# What `extract --fields` may ask for, and the arrays each one stores (``tokens`` brings its ``mask``).
FIELD_CHOICES = ("cls", "mean", "tokens", "proj")
FIELD_ARRAYS = {"cls": ("cls",), "mean": ("mean",), "tokens": ("tokens", "mask"), "proj": ("proj",)}
FIELDS_ATTR = "fields"  # file attribute: JSON list of the FIELD_CHOICES the file stores (absent: every one it has)
DTYPES = ("float16", "float32")  # storage dtypes of cls / mean / tokens
STR = h5py.string_dtype("utf-8")
# Failure reasons are fixed-length so that writing one touches only preallocated raw bytes (variable-
# length strings live in HDF5's global heap, i.e. metadata, which a kill -9 could leave half-written).
REASON_BYTES = 160
REASON = h5py.string_dtype("utf-8", REASON_BYTES)


# --------------------------------------------------------------------------------------------- names

def parse_fields(spec) -> tuple[str, ...] | None:
    """``"cls,mean"`` or ``["cls", "mean"]`` -> ``("cls", "mean")`` in :data:`FIELD_CHOICES` order;
    None / ``""`` / ``"all"`` -> None (everything the encoder gives). Unknown names: :class:`BadInputError`."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items or items == ["all"]:
        return None
    bad = [s for s in items if s not in FIELD_CHOICES]
    if bad:
        raise BadInputError(f"--fields: unknown field(s) {', '.join(map(repr, bad))}; expected a comma list of "
                            f"{', '.join(FIELD_CHOICES)} (tokens brings its mask)")
    return tuple(k for k in FIELD_CHOICES if k in items)


def field_arrays(fields) -> tuple[str, ...]:
    """The arrays that store ``fields`` (:data:`FIELD_CHOICES`), in storage order."""
    return tuple(a for k in FIELD_CHOICES if k in fields for a in FIELD_ARRAYS[k])


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


def list_feature_files(dataset_dir: str | Path) -> list[Path]:
    """Modality files of one dataset folder (shard files excluded), sorted."""
    d = Path(dataset_dir)
    return sorted(p for p in d.glob("*--*.h5") if p.name.split("--")[0] in MODALITIES and ".shard" not in p.name)


def list_shard_files(dataset_dir: str | Path) -> list[Path]:
    """Shard files (``*.shard-<i>-of-<n>.h5``) of one dataset folder, sorted."""
    d = Path(dataset_dir)
    return sorted(p for p in d.glob("*--*.shard-*-of-*.h5") if p.name.split("--")[0] in MODALITIES)


SHARD_NAME = re.compile(r"^(?P<base>(?:text|image)--.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.h5$")


def parse_shard_name(path: str | Path) -> tuple[Path, int, int] | None:
    """``.../text--m.shard-1-of-4.h5`` -> ``(.../text--m.h5, 1, 4)``; None for other names."""
    p = Path(path)
    m = SHARD_NAME.match(p.name)
    if not m:
        return None
    return p.with_name(m["base"] + ".h5"), int(m["i"]), int(m["n"])

