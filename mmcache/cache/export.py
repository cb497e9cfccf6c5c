"""Features out of the cache and into it: :func:`export_features` writes a dataset's ids, labels, split
and chosen feature arrays as numpy files, parquet or a Hugging Face ``datasets.Dataset``;
:func:`import_features` brings features made elsewhere (npy or parquet, with ids) into a feature file
stage two can train on.

Export layouts (``out`` is a folder; provenance of every feature file goes with it):

* ``npy``: ``ids.npy`` (N,) str, ``labels.npy`` (N,) int64, ``split.npy`` (N,) str and per modality
  ``<modality>.<field>.npy`` plus ``<modality>.valid.npy`` (N,) bool; ``metadata.json`` holds
  classes, fields, shapes and each file's config and provenance. No pickles: ``np.load`` reads them.
* ``parquet``: ``<modality>.parquet`` per modality (pyarrow): columns ``id``, ``label``, ``split``,
  ``valid`` and one fixed-size list column per field (``tokens`` flattened to L*D values, ``mask`` L
  values; the shapes are in the metadata); the metadata JSON under the schema metadata key ``mmcache``.
* ``hf``: one ``datasets.Dataset`` saved to disk (``load_from_disk(out)``) with ``id``, ``label``,
  ``split`` and ``<modality>_<field>`` / ``<modality>_valid`` columns; the metadata JSON in its
  ``info.description`` and in ``metadata.json`` beside it.

Import (:func:`import_features`) reads ids and arrays per modality from an npy folder (the export's
layout; ``metadata.json`` optional), a parquet file (columns ``id`` and any of ``cls``, ``mean``,
``tokens``, ``mask``, ``valid``) or a saved ``datasets.Dataset`` (the hf export's columns), matches the ids against the dataset's sample index (or, when there is
none and the input carries labels, split and classes -- an mmcache export does -- writes one) and
writes the rows through :class:`~mmcache.cache.writer.FeatureWriter` (checksums, done bits). Index rows
the input lacks, rows marked not valid and rows with NaN/Inf are recorded as failures, so the file is
complete and stage two drops them. The provenance says ``family: "imported"``, where the features came
from (paths, sha256) and that the encoder's identity cannot be checked: stage two trains and
evaluates on such a file, but nothing can re-encode new posts for it (``predict`` refuses, naming why).

pyarrow and datasets are optional (``pip install mmcache[export]``); h5py + numpy otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcache.cache.encoder import EncoderSpec
from mmcache.cache.index import SampleIndex, read_index, write_index
from mmcache.cache.lock import folder_lock
from mmcache.cache.names import FEATURE_FIELDS, INDEX_NAME, OPTIONAL_FIELDS, feature_path, name_slug
from mmcache.cache.reader import FeatureFile, write_failures_csv
from mmcache.cache.writer import FeatureWriter
from mmcache.errors import BadInputError

__all__ = ["EXPORT_FORMATS", "IMPORTED_FAMILY", "ExportResult", "ImportResult", "export_features",
           "import_features", "imported_encoder_error"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("npy", "parquet", "hf")
EXPORT_FIELDS = FEATURE_FIELDS + OPTIONAL_FIELDS  # cls, mean, tokens, mask, proj
IMPORTED_FAMILY = "imported"
METADATA_NAME = "metadata.json"
_EXTRA = "pip install mmcache[export]"


def _optional(module: str, fmt: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInputError(f"format {fmt!r} needs the {module.split('.')[0]} package: {_EXTRA} "
                            f"(or pip install {module.split('.')[0]})") from None


def imported_encoder_error(modality: str, provenance: dict[str, Any] | None) -> str | None:
    """The message for code that must rebuild the encoder of a feature file (``predict``): None unless the
    file was imported, whose encoder mmcache never saw and cannot verify."""
    if (provenance or {}).get("family") != IMPORTED_FAMILY:
        return None
    src = ", ".join((provenance or {}).get("imported_from") or []) or "outside files"
    return (f"the {modality} features were imported ({src}): the encoder that made them is not known to mmcache, "
            "so new posts cannot be encoded for this run; encode them with that encoder yourself and import them "
            "(`cache import`), or train on features `extract` made")


# --------------------------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    out: Path
    format: str
    files: list[Path]
    num_samples: int
    modalities: list[str]
    fields: list[str]


def _index_arrays(idx: SampleIndex) -> dict[str, np.ndarray]:
    return {"id": np.asarray(idx.ids, dtype=str), "label": np.asarray(idx.labels, dtype=np.int64),
            "split": np.asarray(idx.splits, dtype=str)}


def _file_arrays(path: Path, idx: SampleIndex, fields: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One feature file's ``fields`` and ``valid`` in index row order (stored dtype), and its metadata."""
    with FeatureFile(path) as ff:
        if list(map(str, ff.ids)) != list(map(str, idx.ids[ff.rows])):
            raise BadInputError(f"{path} does not belong to the sample index {idx.dataset}: ids differ")
        arrays = ff.load(tuple(fields), dtype=None)
        n, rows = len(idx), ff.rows
        out = {}
        for name, arr in {**arrays, "valid": ff.valid}.items():
            full = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)  # rows a shard lacks: zero and not valid
            full[rows] = arr
            out[name] = full
        meta = {"path": str(path), "dtype": ff.dtype, "hidden_size": ff.hidden_size, "num_tokens": ff.num_tokens,
                "grid": ff.grid, "config": ff.config, "provenance": ff.provenance,
                "shapes": {k: list(v.shape[1:]) for k, v in out.items()}}
    return out, meta


def export_features(index_path: str | Path, files: dict[str, Path], out: str | Path, *, fmt: str,
                    fields: list[str]) -> ExportResult:
    """Write the dataset of ``index_path`` with the ``fields`` of ``files`` (modality -> feature file)
    to the folder ``out`` in ``fmt`` (:data:`EXPORT_FORMATS`; layouts in the module docstring)."""
    if fmt not in EXPORT_FORMATS:
        raise BadInputError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    bad = [f for f in fields if f not in EXPORT_FIELDS]
    if bad or not fields:
        raise BadInputError(f"unknown field(s) {', '.join(bad) or '(none)'}; expected some of {', '.join(EXPORT_FIELDS)}")
    if fmt != "npy":  # before any reading: a missing package is bad input, not a half-written folder
        _optional("pyarrow", fmt)
        if fmt == "hf":
            _optional("datasets", fmt)
    idx = read_index(index_path)
    base = _index_arrays(idx)
    per_mod: dict[str, dict[str, np.ndarray]] = {}
    meta = {"format": "mmcache-export", "format_version": 1, "dataset": idx.dataset, "classes": list(idx.classes),
            "index_fingerprint": idx.fingerprint, "split": idx.split_info(), "fields": list(fields),
            "num_samples": len(idx), "modalities": {}}
    for modality, path in files.items():
        per_mod[modality], meta["modalities"][modality] = _file_arrays(Path(path), idx, fields)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = {"npy": _write_npy, "parquet": _write_parquet, "hf": _write_hf}[fmt]
    written = writer(out, base, per_mod, meta)
    return ExportResult(out=out, format=fmt, files=written, num_samples=len(idx), modalities=list(files),
                        fields=list(fields))


def _write_meta(path: Path, meta: dict[str, Any]) -> Path:
    path.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _write_npy(out: Path, base: dict, per_mod: dict, meta: dict) -> list[Path]:
    written = []
    for name, arr in {"ids": base["id"], "labels": base["label"], "split": base["split"]}.items():
        np.save(out / f"{name}.npy", arr, allow_pickle=False)
        written.append(out / f"{name}.npy")
    for modality, arrays in per_mod.items():
        for name, arr in arrays.items():
            np.save(out / f"{modality}.{name}.npy", arr, allow_pickle=False)
            written.append(out / f"{modality}.{name}.npy")
    return [*written, _write_meta(out / METADATA_NAME, meta)]


def _arrow_columns(arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, Any]:
    """Feature arrays as arrow columns: (N,) as is, (N, ...) as fixed-size lists of the flattened row."""
    import pyarrow as pa

    cols = {}
    for name, arr in arrays.items():
        if arr.ndim == 1:
            cols[prefix + name] = pa.array(arr)
        else:
            width = int(np.prod(arr.shape[1:]))
            flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
            cols[prefix + name] = pa.FixedSizeListArray.from_arrays(flat, width)
    return cols


def _base_columns(base: dict) -> dict[str, Any]:
    import pyarrow as pa

    return {"id": pa.array(base["id"].tolist(), pa.string()), "label": pa.array(base["label"]),
            "split": pa.array(base["split"].tolist(), pa.string())}


def _write_parquet(out: Path, base: dict, per_mod: dict, meta: dict) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = []
    for modality, arrays in per_mod.items():
        table = pa.table({**_base_columns(base), **_arrow_columns(arrays)})
        mod_meta = {**meta, "modality": modality, "modalities": {modality: meta["modalities"][modality]}}
        table = table.replace_schema_metadata({"mmcache": json.dumps(mod_meta, default=str)})
        pq.write_table(table, out / f"{modality}.parquet")
        written.append(out / f"{modality}.parquet")
    return written


def _write_hf(out: Path, base: dict, per_mod: dict, meta: dict) -> list[Path]:
    import datasets
    import pyarrow as pa

    cols = _base_columns(base)
    for modality, arrays in per_mod.items():
        cols.update(_arrow_columns(arrays, prefix=f"{modality}_"))
    ds = datasets.Dataset(pa.table(cols))
    ds.info.description = json.dumps(meta, default=str)
    ds.save_to_disk(str(out))
    return [out, _write_meta(out / METADATA_NAME, meta)]


# --------------------------------------------------------------------------------------------- import

@dataclass
class Source:
    """One modality's features as read from outside: ids (N,) str, arrays by field, where they came from."""

    modality: str
    ids: np.ndarray
    arrays: dict[str, np.ndarray]
    files: list[Path]
    fmt: str
    meta: dict[str, Any] = field(default_factory=dict)  # an mmcache export's metadata (else empty)
    labels: np.ndarray | None = None
    splits: np.ndarray | None = None


@dataclass
class ImportResult:
    path: Path
    modality: str
    status: str  # "written" | "up to date"
    num_samples: int
    imported: int  # index rows with features from the input
    missing: int  # index rows the input has no (valid) features for: recorded as failures
    index_status: str  # "existing" | "written"


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        for q in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if q.is_file():
                h.update(q.name.encode())
                with open(q, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()


def _read_npy_folder(folder: Path, modality: str | None) -> list[Source]:
    """Sources of an npy folder: ``ids.npy`` and ``<modality>.<field>.npy`` files."""
    if not (folder / "ids.npy").is_file():
        raise BadInputError(f"{folder}: an npy import folder needs ids.npy and <modality>.<field>.npy files "
                            "(e.g. text.cls.npy)")
    meta = json.loads((folder / METADATA_NAME).read_text(encoding="utf-8")) if (folder / METADATA_NAME).is_file() else {}
    ids = np.load(folder / "ids.npy", allow_pickle=False).astype(str)
    labels = np.load(folder / "labels.npy", allow_pickle=False) if (folder / "labels.npy").is_file() else None
    splits = np.load(folder / "split.npy", allow_pickle=False).astype(str) if (folder / "split.npy").is_file() else None
    found = sorted({p.name.split(".")[0] for p in folder.glob("*.*.npy")} & {"text", "image"})
    wanted = [m for m in found if modality in (None, m)]
    if not wanted:
        raise BadInputError(f"{folder}: no {modality or 'text or image'} feature files (<modality>.<field>.npy)")
    out = []
    for m in wanted:
        arrays = {p.name.split(".")[1]: np.load(p, allow_pickle=False) for p in sorted(folder.glob(f"{m}.*.npy"))}
        files = [folder / "ids.npy", *sorted(folder.glob(f"{m}.*.npy"))]
        out.append(Source(m, ids, arrays, files, "npy", meta, labels, splits))
    return out


def _read_parquet(path: Path, modality: str | None) -> Source:
    pq = _optional("pyarrow.parquet", "parquet")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(b"mmcache")
    meta = json.loads(raw) if raw else {}
    m = modality or meta.get("modality") or path.stem.split(".")[0]
    if m not in ("text", "image"):
        raise BadInputError(f"{path}: which modality? name the file text.parquet / image.parquet or pass --modality")
    if "id" not in table.column_names:
        raise BadInputError(f"{path} has no id column (columns: {', '.join(table.column_names)})")
    shapes = (meta.get("modalities") or {}).get(m, {}).get("shapes", {})
    arrays = {}
    for name in (*EXPORT_FIELDS, "valid"):
        if name in table.column_names:
            arrays[name] = _column_array(table.column(name), shapes.get(name), path, name)
    labels = np.asarray(table.column("label").to_numpy(), np.int64) if "label" in table.column_names else None
    splits = np.asarray(table.column("split").to_pylist(), dtype=str) if "split" in table.column_names else None
    ids = np.asarray(table.column("id").to_pylist(), dtype=str)
    return Source(m, ids, arrays, [path], "parquet", meta, labels, splits)


def _column_array(col, shape: list[int] | None, path: Path, name: str) -> np.ndarray:
    """An arrow column as numpy: scalars (N,), (fixed-size) lists (N, W) reshaped to ``shape`` if known."""
    import pyarrow as pa

    col = col.combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_fixed_size_list(col.type) \
            and not pa.types.is_large_list(col.type):
        return col.to_numpy(zero_copy_only=False)
    rows = col.to_pylist() if not pa.types.is_fixed_size_list(col.type) else None
    if rows is not None:  # variable lists: every row must have the same length
        if len({len(r) for r in rows}) > 1:
            raise BadInputError(f"{path}: column {name!r} has rows of different lengths")
        flat = np.asarray(rows)
    else:
        flat = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return flat.reshape(len(col), *shape) if shape else flat


def _read_hf(folder: Path, modality: str | None) -> list[Source]:
    """Sources of a ``datasets.Dataset`` saved to disk with ``<modality>_<field>`` columns (an hf export)."""
    datasets = _optional("datasets", "hf")
    table = datasets.load_from_disk(str(folder)).data.table
    meta = json.loads((folder / METADATA_NAME).read_text(encoding="utf-8")) if (folder / METADATA_NAME).is_file() else {}
    cols = table.column_names
    if "id" not in cols:
        raise BadInputError(f"{folder}: the dataset has no id column (columns: {', '.join(cols)})")
    ids = np.asarray(table.column("id").to_pylist(), dtype=str)
    labels = np.asarray(table.column("label").to_numpy(), np.int64) if "label" in cols else None
    splits = np.asarray(table.column("split").to_pylist(), dtype=str) if "split" in cols else None
    out = []
    for m in ("text", "image"):
        names = [c for c in cols if c.startswith(f"{m}_") and c[len(m) + 1:] in (*EXPORT_FIELDS, "valid")]
        if not names or modality not in (None, m):
            continue
        shapes = (meta.get("modalities") or {}).get(m, {}).get("shapes", {})
        arrays = {c[len(m) + 1:]: _column_array(table.column(c), shapes.get(c[len(m) + 1:]), folder, c) for c in names}
        out.append(Source(m, ids, arrays, [folder], "hf", meta, labels, splits))
    if not out:
        raise BadInputError(f"{folder}: no {modality or 'text_ or image_'} feature columns (e.g. text_cls)")
    return out


def read_sources(paths: list[str | Path], modality: str | None = None) -> list[Source]:
    """The modalities found in ``paths`` (npy folders and parquet files), one Source each."""
    out: list[Source] = []
    for p in map(Path, paths):
        if p.is_dir() and (p / "ids.npy").is_file():
            out += _read_npy_folder(p, modality)
        elif p.is_dir() and (p / "dataset_info.json").is_file():  # datasets' save_to_disk layout
            out += _read_hf(p, modality)
        elif p.is_file() and p.suffix.lower() == ".parquet":
            out.append(_read_parquet(p, modality))
        elif p.is_dir() and list(p.glob("*.parquet")):
            out += [_read_parquet(q, None if modality is None else modality) for q in sorted(p.glob("*.parquet"))
                    if modality in (None, q.stem)]
        elif not p.exists():
            raise BadInputError(f"--from {p}: no such file or folder")
        else:
            raise BadInputError(f"--from {p}: expected a .parquet file, an npy folder (ids.npy, text.cls.npy, ...) "
                                "or a saved Hugging Face dataset")
    mods = [s.modality for s in out]
    if len(mods) != len(set(mods)):
        raise BadInputError(f"--from gives {', '.join(mods)}: one input per modality")
    if not out:
        raise BadInputError(f"nothing to import from {', '.join(map(str, paths))}")
    return out


def _ensure_index(folder: Path, dataset: str, sources: list[Source]) -> tuple[SampleIndex, str]:
    """The dataset's sample index; written from the input when there is none and it carries labels,
    split and classes (an mmcache export does). Texts and image paths are unknown: empty."""
    path = folder / INDEX_NAME
    if path.is_file():
        return read_index(path), "existing"
    src = next((s for s in sources if s.labels is not None and s.splits is not None and s.meta.get("classes")), None)
    if src is None:
        raise BadInputError(f"no sample index at {path}: import needs the dataset's index for the ids (run `extract` "
                            "for it once, e.g. with --modality text), or an mmcache export that carries labels, "
                            "split and classes")
    n = len(src.ids)
    write_index(path, dataset=dataset, classes=list(src.meta["classes"]), ids=src.ids.tolist(),
                labels=src.labels.astype(np.int64).tolist(), splits=src.splits.tolist(), texts=[""] * n,
                image_paths=[""] * n, attrs={"imported_from": [str(p) for p in src.files]},
                split_spec={"kind": "imported", "from": str(src.files[0]),
                            "original": (src.meta.get("split") or {}).get("spec")})
    return read_index(path), "written"


def _rows_of(source: Source, idx: SampleIndex) -> np.ndarray:
    """(M,) int64 index rows of the source's ids; unknown or repeated ids are bad input."""
    ids = list(map(str, source.ids))
    if len(set(ids)) != len(ids):
        raise BadInputError(f"{source.files[0]}: ids are not unique")
    where = {str(s): i for i, s in enumerate(idx.ids)}
    unknown = [s for s in ids if s not in where]
    if unknown:
        raise BadInputError(f"{len(unknown)} id(s) of {source.files[0]} are not in the sample index of "
                            f"{idx.dataset}: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return np.asarray([where[s] for s in ids], dtype=np.int64)


def _complete_fields(source: Source) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """cls (M, D), mean (M, D), tokens (M, L, D), mask (M, L) bool and proj where given; the ones the
    input lacks are derived from the others, and each derivation is named (recorded in provenance)."""
    a = {k: np.asarray(v) for k, v in source.arrays.items()}
    if not any(k in a for k in ("cls", "mean", "tokens")):
        raise BadInputError(f"{source.files[0]}: no features to import for {source.modality} (need cls, mean or tokens)")
    derived = {}
    if "tokens" in a and "mask" not in a:
        a["mask"], derived["mask"] = np.ones(a["tokens"].shape[:2], dtype=bool), "all tokens real"
    if "tokens" in a:
        m = a["mask"].astype(bool)
        if "cls" not in a:
            a["cls"], derived["cls"] = a["tokens"][:, 0], "token 0"
        if "mean" not in a:
            summed = (a["tokens"].astype(np.float32) * m[..., None]).sum(1)
            a["mean"], derived["mean"] = summed / np.maximum(m.sum(1, keepdims=True), 1), "masked mean of tokens"
    else:
        a.setdefault("cls", a.get("mean"))
        a.setdefault("mean", a["cls"])
        derived.update({k: f"copy of {'mean' if k == 'cls' else 'cls'}" for k in ("cls", "mean") if k not in source.arrays})
        a["tokens"], a["mask"] = a["cls"][:, None, :], np.ones((len(a["cls"]), 1), dtype=bool)
        derived["tokens"] = "cls as one token (no token features were imported)"
    a["mask"] = a["mask"].astype(bool)
    d = a["cls"].shape[-1]
    if a["mean"].shape[-1] != d or a["tokens"].shape[-1] != d or a["cls"].ndim != 2:
        raise BadInputError(f"{source.files[0]}: {source.modality} feature widths disagree "
                            f"(cls {a['cls'].shape}, mean {a['mean'].shape}, tokens {a['tokens'].shape})")
    return a, derived


def _default_name(source: Source) -> str:
    info = (source.meta.get("modalities") or {}).get(source.modality)
    if not info:
        return "imported"
    spec = EncoderSpec.from_provenance(source.modality, info.get("provenance"), info.get("config"))
    return f"imported/{spec.display_name}"


def import_features(cache_dir: str | Path, dataset: str, paths: list[str | Path], *, modality: str | None = None,
                    name: str | None = None, force: bool = False) -> list[ImportResult]:
    """Write the features in ``paths`` (npy folders / parquet files, see the module docstring) into
    ``cache_dir/<dataset>/<modality>--<name>.h5``, one file per modality found. ``name``: what files and
    tables call the features (default ``imported/<the exported encoder's name>``, else ``imported``).
    An existing file from the same inputs is left as it is ("up to date"); any other existing file is
    refused unless ``force``."""

    sources = read_sources(paths, modality)
    folder = Path(cache_dir) / dataset
    results = []
    with folder_lock(folder):
        idx, index_status = _ensure_index(folder, dataset, sources)
        for source in sources:
            results.append(_import_one(folder, idx, source, name or _default_name(source), force, index_status))
        write_failures_csv(folder)
    return results


def _existing_is_same(path: Path, sha: str, force: bool) -> bool:
    """True when ``path`` already holds a complete import of the same inputs; refuses any other file."""
    if force or not path.exists():
        return False
    with FeatureFile(path) as ff:
        same = ff.provenance.get("source_sha256") == sha and ff.complete
    if not same:
        raise BadInputError(f"{path} exists (made by extract or imported from other files); pass --force to "
                            "replace it, or --name to import under another name")
    return True


def _records(source: Source, arrays: dict[str, np.ndarray], derived: dict[str, str], name: str, dataset: str,
             sha: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The imported file's ``config`` (what its identity is compared on: the name, family, widths) and
    ``provenance`` (where the features came from, what was derived, the exporter's own records)."""
    dtype = "float16" if arrays["cls"].dtype == np.float16 else "float32"
    n_tok, d = arrays["tokens"].shape[1:]
    proj = arrays.get("proj")
    config = {"model": f"imported:{name}", "family": IMPORTED_FAMILY, "dtype": dtype, "hidden_size": int(d),
              "num_tokens": int(n_tok), **({"proj_size": int(proj.shape[1])} if proj is not None else {})}
    origin = (source.meta.get("modalities") or {}).get(source.modality) or {}
    provenance = {"family": IMPORTED_FAMILY, "name": name, "dataset": dataset, "source_format": source.fmt,
                  "imported_from": [str(p.resolve()) for p in source.files], "source_sha256": sha,
                  "identity": "not verifiable: features imported from outside mmcache; the encoder that made "
                              "them was not loaded, so its weights cannot be checked", "derived": derived,
                  "origin": {k: origin.get(k) for k in ("path", "config", "provenance")} if origin else None}
    return config, provenance


def _import_one(folder: Path, idx: SampleIndex, source: Source, name: str, force: bool,
                index_status: str) -> ImportResult:
    arrays, derived = _complete_fields(source)
    rows = _rows_of(source, idx)
    path = feature_path(folder.parent, folder.name, source.modality, name, slug=name_slug(name))
    sha = _sha256(source.files)
    if _existing_is_same(path, sha, force):
        with FeatureFile(path) as ff:
            ok = int(ff.valid.sum())
        return ImportResult(path, source.modality, "up to date", len(idx), ok, len(idx) - ok, index_status)
    config, provenance = _records(source, arrays, derived, name, idx.dataset, sha)
    dtype, (n_tok, d), proj = config["dtype"], arrays["tokens"].shape[1:], arrays.get("proj")
    valid = np.ones(len(rows), dtype=bool) if "valid" not in arrays else np.asarray(arrays["valid"], bool)
    finite = np.ones(len(rows), dtype=bool)  # a NaN/Inf row is a failure, never stored as values
    for key in ("cls", "mean", "tokens", "proj"):
        if key in arrays:
            finite &= np.isfinite(arrays[key].astype(np.float32)).reshape(len(rows), -1).all(1)
    ok = valid & finite
    with FeatureWriter.open(path, ids=list(map(str, idx.ids)), index_fp=idx.fingerprint, modality=source.modality,
                            hidden_size=int(d), num_tokens=int(n_tok), dtype=dtype, config=config,
                            provenance=provenance, force=True, proj_size=None if proj is None else int(proj.shape[1])) as w:
        order = np.argsort(rows[ok])
        good, take = rows[ok][order], np.flatnonzero(ok)[order]
        for lo in range(0, len(good), 1024):  # bounded memory per write; each batch flushed before its done bits
            sel = take[lo:lo + 1024]
            w.write(good[lo:lo + 1024], cls=arrays["cls"][sel], mean=arrays["mean"][sel], tokens=arrays["tokens"][sel],
                    mask=arrays["mask"][sel], proj=None if proj is None else proj[sel])
        bad_rows = rows[~ok]
        reasons = ["imported: marked not valid" if not v else "imported: non-finite values" for v in valid[~ok]]
        w.write_failures(bad_rows, reasons)
        absent = np.setdiff1d(np.arange(len(idx)), rows)
        w.write_failures(absent, ["imported: id not in the imported file"] * len(absent))
        w.finalize({"last_run": {"command": "cache import", "imported_from": provenance["imported_from"]}})
    log.info("imported %d %s rows into %s (%d index rows without features)", int(ok.sum()), source.modality, path,
             len(idx) - int(ok.sum()))
    return ImportResult(path, source.modality, "written", len(idx), int(ok.sum()), len(idx) - int(ok.sum()),
                        index_status)
