"""Reading feature files: :class:`FeatureFile`, what ``cache info`` shows of one file (:func:`describe`),
``failures.csv`` (:func:`write_failures_csv`) and the command that repairs a damaged file
(:func:`repair_command`).

Owns the reader side of the contract: arrays load whole (one contiguous read each) and, by default,
every done row is checked against its checksum while it is read (:mod:`mmcache.cache.integrity`).
Readers never take the folder's lock. h5py + numpy only, so stage two reads caches without torch.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmcache.cache.encoder import EncoderSpec
from mmcache.cache.h5io import attrs_dict, json_attr, open_h5, read_strs
from mmcache.cache.index import read_index
from mmcache.cache.integrity import CHECKSUM, Damage, field_groups, scan_file
from mmcache.cache.names import (
    FAILURES_NAME,
    FEATURE_FIELDS,
    FIELD_ARRAYS,
    FIELD_CHOICES,
    INDEX_NAME,
    OPTIONAL_FIELDS,
    list_feature_files,
)
from mmcache.cache.virtual import check_sources, virtual_info
from mmcache.csvsafe import csv_row
from mmcache.errors import BadInputError, CacheError

log = logging.getLogger(__name__)

class MissingFieldsError(CacheError, BadInputError):
    """A feature file lacks fields a request needs (a lean cache, ``extract --fields``), or holds them
    only for some rows (an interrupted add). The message names the command that adds them; exit 2
    (the call can be fixed), and a :class:`CacheError` for callers that handle cache problems."""


def repair_command(path: str | Path, provenance: dict[str, Any] | None = None, modality: str | None = None) -> str:
    """The extract call that recomputes a feature file's damaged rows (best effort from its provenance)."""
    return extract_command(path, provenance, modality) + " --repair"


def extract_command(path: str | Path, provenance: dict[str, Any] | None = None, modality: str | None = None,
                    config: dict[str, Any] | None = None) -> str:
    """The extract call that made a feature file (best effort from its provenance and ``config``),
    without the option that says what to do (``--repair``, ``--fields ...``)."""
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
        spec = EncoderSpec.from_provenance(modality, prov)
        parts.append(f"--modality {modality}" + (f" --{modality}-model {spec.model}" if spec.model else ""))
        if spec.layer not in (None, "last"):
            parts.append(f"--{modality}-layer {spec.layer}")
        if spec.name:  # the file's name comes from it: the same file is found again
            parts.append(f"--{modality}-name {spec.name}")
        parts += _value_options(modality, config or {})
    return " ".join(parts)


def _value_options(modality: str, config: dict[str, Any]) -> list[str]:
    """The options off their default that change a file's values (a command without them would be
    refused as "made with different settings"), from the file's config."""
    out = []
    if modality == "text" and config.get("max_length") not in (None, 128):
        out.append(f"--text-max-length {config['max_length']}")
    if modality == "image" and config.get("patch_pool") not in (None, 1):
        out.append(f"--patch-pool {config['patch_pool']}")
    if config.get("dtype") not in (None, "float16"):
        out.append(f"--dtype {config['dtype']}")
    return out


def damage_error(damage: Damage, provenance: dict[str, Any] | None, modality: str | None) -> CacheError:
    """The one message for damaged rows met while reading (whole arrays or streamed blocks): which rows,
    that they are never trained on, and the command that recomputes them."""
    path = damage.path
    return CacheError(f"{path}: {damage.describe()}. They are never used for training: recompute them with "
                      f"`{repair_command(path, provenance, modality)}` (or rerun the extract command that made the "
                      f"file); `python cli.py cache verify {path.parent}` lists every damaged row")


class FeatureFile:
    """Read access to one modality file. Arrays load whole (one contiguous read each), never per batch."""

    def __init__(self, path: str | Path, *, locking: bool | None = None) -> None:
        """``locking=False`` reads a file another process is writing (``cache info`` during a run);
        such a view may lag behind the writer, so only use it for progress displays."""
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"no feature cache at {self.path}")
        self._f = open_h5(self.path, "r", locking=locking)
        if self._f.attrs.get("format") != "mmcache-features":
            self._f.close()
            raise CacheError(f"{self.path} is not an mmcache feature file")
        check_sources(self._f, self.path)  # a virtual merge: its shards there and unchanged (else closes, raises)
        a = self._f.attrs
        self.modality: str = str(a["modality"])
        self.hidden_size: int = int(a["hidden_size"])
        self.num_tokens: int = int(a["num_tokens"])
        self.dtype: str = str(a["dtype"])
        self.complete: bool = bool(a["complete"])
        self.config: dict[str, Any] = json_attr(a, "config", {})
        self.provenance: dict[str, Any] = json_attr(a, "provenance", {})
        self.grid = json_attr(a, "grid")
        self.shard = json_attr(a, "shard")
        self.index_fingerprint: str = str(a["index_fingerprint"])

    @property
    def attrs(self) -> dict[str, Any]:
        return attrs_dict(self._f.attrs)

    @property
    def ids(self) -> np.ndarray:
        """(N,) object str."""
        return read_strs(self._f["id"])

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
        reasons = read_strs(self._f["failure"])
        done, valid = self.done, self.valid
        return [(i, r) for i, r, d, v in zip(self.ids, reasons, done, valid, strict=True) if d and not v]

    @property
    def fields(self) -> tuple[str, ...]:
        """The ``extract --fields`` the file stores (of cls, mean, tokens, proj): every array a field
        group holds (arrays a kill -9 left half-created, before their group existed, do not count)."""
        owned = {a for g in field_groups(self._f) for a in g.arrays if a in self._f}
        return tuple(k for k in FIELD_CHOICES if set(FIELD_ARRAYS[k]) <= owned)

    def fields_complete(self) -> dict[str, bool]:
        """Stored field -> whether every row of it is written: the first group's fields follow
        :attr:`complete`; fields added later are complete when their group's ``done.<k>`` is all True."""
        out = {}
        for i, g in enumerate(field_groups(self._f)):
            whole = self.complete if i == 0 else bool(self._f[g.done][...].all())
            out.update({k: whole for k in FIELD_CHOICES if FIELD_ARRAYS[k][0] in g.arrays})
        return {k: out[k] for k in self.fields}

    def add_fields_command(self, fields) -> str:
        """The extract call that adds ``fields`` to this file (computing only what it lacks)."""
        want = [k for k in FIELD_CHOICES if k in (*self.fields, *fields)]
        return f"{extract_command(self.path, self.provenance, self.modality, self.config)} --fields {','.join(want)}"

    def require_fields(self, arrays) -> None:
        """:class:`MissingFieldsError` unless every field holding ``arrays`` is stored and complete."""
        needed = [k for k in FIELD_CHOICES if set(FIELD_ARRAYS[k]) & set(arrays)]
        status = self.fields_complete()
        lacking = [k for k in needed if k not in status]
        partial = [k for k in needed if status.get(k) is False and k not in self._first_group_fields()]
        if not lacking and not partial:
            return
        have = ", ".join(self.fields) or "none"
        why = (f"has no {FIELD_ARRAYS[lacking[0]][0]!r} array (a lean cache: extract --fields)" if lacking else
               f"holds {', '.join(partial)} only for some rows (adding them was interrupted)")
        verb = "add" if lacking else "finish"
        raise MissingFieldsError(f"{self.path} {why}: it stores {have} but this needs {', '.join(needed)}; "
                                 f"{verb} them with `{self.add_fields_command(needed)}` (computes only what is "
                                 "missing, the stored fields are kept)")

    def _first_group_fields(self) -> tuple[str, ...]:
        g = field_groups(self._f)[0]
        return tuple(k for k in FIELD_CHOICES if FIELD_ARRAYS[k][0] in g.arrays)

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
        NaN/Inf only, with a warning.

        A field the file does not store (a lean cache) or holds only for some rows (an interrupted
        ``extract --fields`` add) raises :class:`MissingFieldsError` (a :class:`BadInputError`) naming
        what the file stores and the command that adds the rest."""
        for name in fields:
            if name not in FEATURE_FIELDS + OPTIONAL_FIELDS:
                raise BadInputError(f"unknown cache field {name!r}; expected one of "
                                    f"{', '.join(FEATURE_FIELDS + OPTIONAL_FIELDS)}")
        self.require_fields(fields)
        names = tuple(dict.fromkeys(fields))
        if verify:
            arrays, damage = scan_file(self._f, self.path, (*names, "valid"), keep=names)
            if not damage.verifiable:
                log.warning("%s has no checksums (written by an older version): only NaN/Inf can be detected; "
                            "rebuild it with `extract --force` to make it verifiable", self.path)
            if damage:
                raise damage_error(damage, self.provenance, self.modality)
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
            fields = tuple(a for g in field_groups(self._f) for a in g.arrays)
        return scan_file(self._f, self.path, tuple(fields))[1]

    def nbytes_on_disk(self) -> int:
        """Bytes of the file, and of its shards for a virtual merge (they hold its data)."""
        info = virtual_info(self._f)
        shards = sum((self.path.parent / r["file"]).stat().st_size for r in info["shards"]) if info else 0
        return self.path.stat().st_size + shards

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        small = tuple(k for k in ("cls", "mean", "mask") if k in f)
        damage = ff.verify((*small, "valid")) if verify else None
        spec = EncoderSpec.from_provenance(ff.modality, ff.provenance, ff.config)
        return {
            "path": str(path), "kind": "features", "modality": ff.modality,
            "model": spec.model, "name": spec.name,
            "complete": ff.complete, "samples": int(f["id"].shape[0]), "done": int(done.sum()),
            "valid": int(valid.sum()), "failed": int((done & ~valid).sum()),
            "arrays": {k: {"shape": list(f[k].shape), "dtype": str(f[k].dtype)}
                       for k in FEATURE_FIELDS + OPTIONAL_FIELDS if k in f},
            "fields": list(ff.fields), "fields_complete": ff.fields_complete(),
            "hidden_size": ff.hidden_size, "num_tokens": ff.num_tokens, "dtype": ff.dtype,
            "grid": ff.grid, "shard": ff.shard, "size_bytes": ff.nbytes_on_disk(),
            "index_fingerprint": ff.index_fingerprint,
            "config_fingerprint": attrs.get("config_fingerprint"),
            "created": attrs.get("created"), "updated": attrs.get("updated"),
            "last_run": json_attr(f.attrs, "last_run"),
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

