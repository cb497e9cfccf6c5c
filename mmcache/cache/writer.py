"""Writing feature files: :class:`FeatureWriter` creates or resumes one modality file and writes rows.

Owns the feature file's layout on creation (arrays, chunking, attributes) and the crash-safety rule.
Feature datasets are created up front with their storage allocated at creation
(``H5D_ALLOC_TIME_EARLY``, no compression), so writing a batch only overwrites raw bytes and never
changes the file's metadata. A process killed mid-run (``kill -9`` included) leaves a file that opens
cleanly; rows are marked in ``done`` only after their values and their CRC-32 checksums
(:mod:`mmcache.cache.integrity`) were written and flushed, so a resumed run recomputes exactly the
rows that might be torn. Writers hold the folder's lock (:mod:`mmcache.cache.lock`). h5py + numpy.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcache.cache.h5io import close_quietly, json_attr, open_h5, read_strs, selection, write_rows
from mmcache.cache.identity import CacheMismatchError, encoder_difference, fingerprint
from mmcache.cache.integrity import (
    CHECKSUM,
    Damage,
    FieldGroup,
    check_free_space,
    disk_full_error,
    field_groups,
    is_disk_full,
    nonfinite_rows,
    planned_bytes,
    row_crc32,
    scan_file,
)
from mmcache.cache.names import (
    DTYPES,
    FIELD_ARRAYS,
    FIELD_CHOICES,
    FIELDS_ATTR,
    FORMAT_VERSION,
    REASON,
    REASON_BYTES,
    STR,
    field_arrays,
)
from mmcache.cache.virtual import check_sources
from mmcache.errors import BadInputError

log = logging.getLogger(__name__)

_FEATURE_ARRAYS = ("cls", "mean", "tokens", "mask", "proj")

# Target <= 256 KiB per chunk: small enough that a scattered row write (length-sorted text batches)
# rewrites little -- one bert-base token row (128 x 768 float16 = 192 KiB) is then one chunk, 6x faster
# to write scattered than 5-row 1 MiB chunks -- and still big enough for whole-array reads at memory
# speed (measured: 7.3 vs 8.5 GB/s for 1-row vs 5-row chunks).
_CHUNK_BYTES = 1 << 18


def early_dcpl() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def chunk_rows(row_bytes: int, n: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // max(row_bytes, 1)))


class FeatureWriter:
    """Creates or resumes one modality file and writes batches of rows into it.

    Rows are positions in the file (0..n-1); ``ids`` fixes their order. Use as a context manager.
    The arrays are written in field groups (:class:`~mmcache.cache.integrity.FieldGroup`): a row is
    written only into the groups where it is still to do, so adding fields to a finished file never
    rewrites the bytes of the fields it had.
    """

    def __init__(self, path: Path, f: h5py.File, up_to_date: bool) -> None:
        self.path, self._f = path, f
        #: write() / write_failures() of a row done in every group rewrite it (False: such rows are skipped)
        self.rewrite_done = True
        self._load_groups()
        self.up_to_date = up_to_date and not self.todo_mask().any()

    def _load_groups(self) -> None:
        self.groups: list[FieldGroup] = field_groups(self._f)
        self.has_checksums = self.groups[0].checksum is not None
        owned = {a for g in self.groups for a in g.arrays if a in self._f}
        #: the feature arrays the file stores (what :meth:`write` needs), in storage order
        self.arrays: tuple[str, ...] = tuple(a for a in _FEATURE_ARRAYS if a in owned)
        # (N,) bool per group: rows this run still writes into that group (not done, or retried)
        self._todo = [~self._f[g.done][...] for g in self.groups]

    @property
    def fields(self) -> tuple[str, ...]:
        """The ``--fields`` the file stores (cls, mean, tokens, proj)."""
        return tuple(k for k in FIELD_CHOICES if all(a in self.arrays for a in FIELD_ARRAYS[k]))

    @classmethod
    def open(cls, path: str | Path, *, ids: list[str], rows: np.ndarray | None = None, index_fp: str,
             modality: str, hidden_size: int, num_tokens: int, dtype: str = "float16",
             config: dict[str, Any], provenance: dict[str, Any] | None = None,
             grid: tuple[int, int] | None = None, force: bool = False,
             shard: tuple[int, int] | None = None, proj_size: int | None = None,
             fields: tuple[str, ...] | None = None) -> FeatureWriter:
        """Open ``path`` for writing, resuming when it holds the same ids and config.

        ``config`` is what determines the values (model, revision, max length, dtype, pooling, ...);
        its fingerprint must match an existing file's or :class:`CacheError` is raised, unless
        ``force``, which starts the file over. ``rows`` are the ids' positions in the sample index
        (default ``arange(n)``; a shard holds a subset). ``proj_size`` adds the optional ``proj``
        (N, P) array (joint-space embeddings of checkpoints with a projection). ``fields`` (of
        :data:`~mmcache.cache.names.FIELD_CHOICES`): what to store; None = everything (cls, mean,
        tokens, and proj with ``proj_size``) for a new file, what it stores for an existing one. Fields
        an existing file lacks are added to it (a new field group; nothing stored is rewritten).
        """
        path = Path(path)
        if dtype not in DTYPES:
            raise BadInputError(f"cache dtype must be float16 or float32, got {dtype!r}")
        cfg_fp = fingerprint(config)
        if path.exists() and not force:
            writer = cls._resume(path, ids, index_fp, config, cfg_fp)
            if fields is not None:
                writer._add_fields(fields, hidden_size, num_tokens, proj_size)
            return writer
        arrays = field_arrays(fields or ("cls", "mean", "tokens", *(("proj",) if proj_size else ())))
        path.parent.mkdir(parents=True, exist_ok=True)
        n = len(ids)
        needed = planned_bytes(n, hidden_size, num_tokens, dtype, arrays, proj_size or 0)
        check_free_space(path, needed)
        path.unlink(missing_ok=True)  # --force: rebuilt from scratch
        # Created under a temporary name and renamed once allocated: a creation that fails (disk
        # full, kill -9) never leaves a half-made file that would block the next run.
        for stale in path.parent.glob(f".{path.name}.creating-*"):
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        f = None
        try:
            f = h5py.File(tmp, "w")
            cls.create_arrays(f, n, ids, rows, hidden_size, num_tokens, dtype, proj_size=proj_size, arrays=arrays)
            f.attrs.update({
                "format": "mmcache-features", "format_version": FORMAT_VERSION, "modality": modality,
                "hidden_size": hidden_size, "num_tokens": num_tokens, "dtype": dtype,
                "grid": json.dumps(list(grid) if grid else None), "config": json.dumps(config, sort_keys=True, default=str),
                "config_fingerprint": cfg_fp, "index_fingerprint": index_fp, "num_samples": n,
                "provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
                "shard": json.dumps(list(shard) if shard else None),
                "complete": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                FIELDS_ATTR: json.dumps([k for k in FIELD_CHOICES if set(FIELD_ARRAYS[k]) <= set(arrays)]),
            })
            f.flush()
            os.replace(tmp, path)  # the open handle follows the file
        except BaseException as e:
            close_quietly(f)
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and is_disk_full(e):
                raise disk_full_error(path, needed, e) from None
            raise
        return cls(path, f, up_to_date=False)

    @classmethod
    def _resume(cls, path: Path, ids: list[str], index_fp: str, config: dict[str, Any], cfg_fp: str) -> FeatureWriter:
        """An existing file opened for writing; :class:`CacheMismatchError` when made differently."""
        f = open_h5(path, "r+")
        check_sources(f, path)  # a virtual merge writes into its shards: they must be the merged ones
        attrs = f.attrs
        problems = []
        if attrs.get("format") != "mmcache-features":
            problems.append("not an mmcache feature file")
        elif attrs.get("config_fingerprint") != cfg_fp and (
                diff := encoder_difference(json_attr(attrs, "config", {}), config)):
            problems.append(f"made with different settings ({diff})")
        elif attrs.get("index_fingerprint") != index_fp or list(read_strs(f["id"])) != list(ids):
            problems.append("made for a different sample index (ids, texts or image paths changed)")
        if problems:
            f.close()
            raise CacheMismatchError(f"{path} was {problems[0]}; refusing to touch it (pass --force to rebuild)")
        return cls(path, f, up_to_date=bool(attrs.get("complete")))

    def _add_fields(self, fields, hidden_size: int, num_tokens: int, proj_size: int | None) -> None:
        """Create the arrays of ``fields`` the file lacks as a new field group (storage allocated now,
        its done bits created last: a kill -9 before that leaves no group, and the next run starts
        the add over). Fields the file has beyond ``fields`` are kept."""
        extra = [k for k in self.fields if k not in fields]
        if extra:
            log.info("%s also stores %s: kept", self.path, ", ".join(extra))
        missing = tuple(a for a in field_arrays(fields) if a not in self.arrays)
        if not missing:
            return
        f, n, k = self._f, self._f["id"].shape[0], len(self.groups)
        dtype = str(f.attrs["dtype"])
        needed = planned_bytes(n, hidden_size, num_tokens, dtype, missing, proj_size or 0, bookkeeping=False)
        check_free_space(self.path, needed, replacing=False)
        log.info("%s: adding %s (computed for every row; the stored arrays are kept as they are)", self.path,
                 ", ".join(missing))
        try:
            for name in (*missing, f"{CHECKSUM}.{k}", f"done.{k}"):
                if name in f:  # left by an add that a kill -9 stopped before its group existed
                    del f[name]
            _create_features(f, n, hidden_size, num_tokens, dtype, missing, proj_size)
            _create_checksums(f, f"{CHECKSUM}.{k}", missing, n)
            f.flush()
            f.create_dataset(f"done.{k}", shape=(n,), dtype=bool, chunks=(chunk_rows(1, n),), fillvalue=False,
                             dcpl=early_dcpl())
            stored = [x for x in FIELD_CHOICES if set(FIELD_ARRAYS[x]) <= {*self.arrays, *missing}]
            f.attrs[FIELDS_ATTR] = json.dumps(stored)
            f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.path, needed, e) from None
            raise
        self._load_groups()
        self.up_to_date = False

    @staticmethod
    def create_arrays(f, n, ids, rows, d, length, dtype, checksums: bool = True, proj_size: int | None = None,
                      arrays: tuple[str, ...] | None = None) -> None:
        """Create the arrays of an ``n``-row file in the open ``f`` (storage allocated now; also used by
        the shard merge). ``d`` hidden size, ``length`` tokens per row, ``dtype`` float16 / float32;
        ``arrays``: the feature arrays (default cls, mean, tokens, mask, and proj with ``proj_size``)."""
        if arrays is None:
            arrays = ("cls", "mean", "tokens", "mask", *(("proj",) if proj_size else ()))
        f.create_dataset("id", data=np.asarray(ids, dtype=object), dtype=STR)
        f.create_dataset("row", data=np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64))
        dcpl = early_dcpl
        f.create_dataset("done", shape=(n,), dtype=bool, chunks=(chunk_rows(1, n),), fillvalue=False, dcpl=dcpl())
        f.create_dataset("valid", shape=(n,), dtype=bool, chunks=(chunk_rows(1, n),), fillvalue=False, dcpl=dcpl())
        f.create_dataset("failure", shape=(n,), dtype=REASON, chunks=(chunk_rows(REASON_BYTES, n),), dcpl=dcpl())
        _create_features(f, n, d, length, dtype, arrays, proj_size)
        if checksums:
            # valid before proj: the column order of files written before lean caches (shard merges copy columns)
            order = (*(a for a in arrays if a != "proj"), "valid", *(("proj",) if "proj" in arrays else ()))
            _create_checksums(f, CHECKSUM, order, n)

    # -- state
    def todo_mask(self, retry_failed: bool = False) -> np.ndarray:
        """(N,) bool: rows still to write in some field group. ``retry_failed``: recorded failures
        are written again too (in every group)."""
        if retry_failed:
            failed = self.failed_rows()
            for todo in self._todo:
                todo[failed] = True
        return np.logical_or.reduce(self._todo)

    def pending_rows(self) -> np.ndarray:
        """(P,) int64 rows not yet done in every field group, ascending."""
        return np.flatnonzero(~self.done_mask())

    def done_mask(self) -> np.ndarray:
        """(N,) bool: rows written (features or a failure) in every field group."""
        return np.logical_and.reduce([self._f[g.done][...] for g in self.groups])

    def failed_rows(self) -> np.ndarray:
        """(F,) int64 rows done but not valid (recorded failures), ascending."""
        return np.flatnonzero(self._f["done"][...] & ~self._f["valid"][...])

    # -- writes
    def write(self, rows: np.ndarray, *, cls: np.ndarray, mean: np.ndarray, tokens: np.ndarray | None = None,
              mask: np.ndarray | None = None, proj: np.ndarray | None = None) -> None:
        """Write one batch. ``rows`` (B,) ascending file rows; ``cls``/``mean`` (B, D); ``tokens``
        (B, T, D) with T <= num_tokens (right-padded with zeros here); ``mask`` (B, T) bool, True = real;
        ``proj`` (B, P). Exactly the arrays the file stores are needed (tokens + mask only when it
        stores tokens, proj only when it has one). Rows are written only into the field groups where
        they are still to do. Values first, flush, then the done bits: a crash in between only costs
        a recompute."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be strictly ascending")
        given = {"cls": cls, "mean": mean, "tokens": tokens, "mask": mask, "proj": proj}
        if wrong := [k for k in _FEATURE_ARRAYS if (given[k] is not None) != (k in self.arrays) and k in self.arrays]:
            raise ValueError(f"{self.path}: {', '.join(wrong)} missing: the file stores {', '.join(self.arrays)}")
        values = {k: self._fit(k, np.asarray(given[k]), rows.size) for k in self.arrays}
        if any(nonfinite_rows(v).any() for k, v in values.items() if k != "mask"):
            raise ValueError("non-finite features: record such rows with write_failures, never as values")
        values["valid"] = np.ones(rows.size, dtype=bool)
        self._write_groups(rows, values, np.zeros(rows.size, dtype=REASON))

    def _fit(self, name: str, value: np.ndarray, b: int) -> np.ndarray:
        """One array of a batch checked against the file's shape, cast, tokens/mask right-padded."""
        ds = self._f[name]
        want = ds.shape[1:]
        ok = value.shape[0] == b and value.ndim == len(ds.shape)
        if name in ("tokens", "mask"):
            ok = ok and value.shape[1] <= want[0] and value.shape[2:] == want[1:]
        else:
            ok = ok and value.shape[1:] == want
        if not ok:
            raise ValueError(f"batch {name} {value.shape} does not fit {b} rows of {want}")
        if name not in ("tokens", "mask"):
            return np.ascontiguousarray(value, dtype=ds.dtype)
        out = np.zeros((b, *want), dtype=ds.dtype)
        out[:, :value.shape[1]] = value
        return out

    def _write_groups(self, rows: np.ndarray, values: dict[str, np.ndarray], reasons: np.ndarray) -> None:
        """Per field group, the rows still to do there (and rows done everywhere, with
        :attr:`rewrite_done`): values and their checksums, flush, then the done bits (a crash in
        between: recomputed). A row pending in some group is never rewritten in the groups where it
        is done: adding fields leaves the stored ones untouched."""
        f = self._f
        # a row finished in every group is written again only when asked for (rewrite_done): extraction
        # turns that off, so recomputing a batch for its other rows never tears a finished row
        again = ~np.logical_or.reduce([todo[rows] for todo in self._todo]) & self.rewrite_done
        for g, todo in zip(self.groups, self._todo, strict=True):
            m = todo[rows] | again
            if not m.any():
                continue
            r = rows[m]
            sel = selection(r)
            vals = {name: values[name][m] for name in g.arrays}
            for name, arr in vals.items():
                write_rows(f[name], r, sel, arr)
            if g.done == "done":
                write_rows(f["failure"], r, sel, reasons[m])
            if g.checksum is not None:
                write_rows(f[g.checksum], r, sel, np.stack([row_crc32(vals[name]) for name in g.arrays], axis=1))
            f.flush()
            write_rows(f[g.done], r, sel, np.ones(r.size, dtype=bool))
            f.flush()
            todo[r] = False

    def write_failures(self, rows: np.ndarray, reasons: list[str]) -> None:
        """Mark ``rows`` done but not valid, with a reason each; their feature rows stay zero."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        order = np.argsort(rows)
        rows = rows[order]
        raw = np.asarray([_reason_bytes(reasons[i]) for i in order], dtype=REASON)
        f = self._f
        self._invalidate(rows, raw)
        # feature rows are zeroed: a row recomputed after damage holds no stale bytes
        values = {name: np.zeros((rows.size, *f[name].shape[1:]), dtype=f[name].dtype) for name in self.arrays}
        values["valid"] = np.zeros(rows.size, dtype=bool)
        self._write_groups(rows, values, raw)

    def _invalidate(self, rows: np.ndarray, reasons: np.ndarray) -> None:
        """Rows done and valid in the first group that fail while fields are added (e.g. an image
        deleted since): ``valid`` becomes False (and its checksum follows), so no head uses a row whose
        added fields are zeros. A crash in between is a checksum mismatch: the row is recomputed."""
        f = self._f
        later = np.logical_or.reduce([todo[rows] for todo in self._todo[1:]]) if len(self._todo) > 1 else False
        # only rows written in a later group now: a done row that is merely in a recomputed batch stays as it is
        hit = later & ~self._todo[0][rows] & f["done"][rows] & f["valid"][rows]
        if not hit.any():
            return
        r = rows[hit]
        sel = selection(r)
        write_rows(f["valid"], r, sel, np.zeros(r.size, dtype=bool))
        write_rows(f["failure"], r, sel, reasons[hit])
        g = self.groups[0]
        if g.checksum is not None:
            crcs = f[g.checksum][r]
            crcs[:, g.arrays.index("valid")] = row_crc32(np.zeros(r.size, dtype=bool))
            write_rows(f[g.checksum], r, sel, crcs)
        f.flush()
        log.warning("%s: %d rows failed while fields were added; they are no longer valid", self.path, r.size)

    def verify(self) -> Damage:
        """Check every done row of every array (see :func:`scan_file`)."""
        return scan_file(self._f, self.path, tuple(a for g in self.groups for a in g.arrays))[1]

    def mark_not_done(self, rows: np.ndarray, arrays=None) -> None:
        """Clear the done bits of ``rows`` (damaged rows) in the field groups holding ``arrays``
        (default: every group): the next write recomputes them there."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not rows.size:
            return
        for g, todo in zip(self.groups, self._todo, strict=True):
            if arrays is None or set(arrays) & set(g.arrays):
                write_rows(self._f[g.done], rows, selection(rows), np.zeros(rows.size, dtype=bool))
                todo[rows] = True
                if g.done == "done":
                    self._f.attrs["complete"] = False
        self._f.flush()
        self.up_to_date = False

    def mark_damaged(self, damage: Damage) -> None:
        """:meth:`mark_not_done` of every damaged row, in the groups of its damaged arrays only."""
        for name, rows in damage.rows_by_field.items():
            self.mark_not_done(rows, (name,))

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> bool:
        """Mark the file complete if every row of its first field group is done (the attribute older
        readers know); returns whether every group is."""
        f = self._f
        done = f["done"][...]
        for key, value in (extra_attrs or {}).items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
        f.attrs["num_done"] = int(done.sum())
        f.attrs["num_valid"] = int(f["valid"][...].sum())
        f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["complete"] = bool(done.all())
        f.flush()
        self.up_to_date = bool(self.done_mask().all())
        return self.up_to_date

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            close_quietly(self._f)  # e.g. disk full: HDF5's own close error must not hide the cause


def _create_features(f, n: int, d: int, length: int, dtype: str, arrays, proj_size: int | None) -> None:
    """The feature ``arrays`` of an ``n``-row file, storage allocated now (a write only fills bytes)."""
    item = np.dtype(dtype).itemsize
    shapes = {"cls": (d,), "mean": (d,), "tokens": (length, d), "mask": (length,), "proj": (proj_size or 0,)}
    for name in arrays:
        shape = shapes[name]
        kind = bool if name == "mask" else dtype
        row_bytes = int(np.prod(shape)) * (1 if name == "mask" else item)
        extra = {"fillvalue": False} if name == "mask" else {}
        f.create_dataset(name, shape=(n, *shape), dtype=kind, chunks=(chunk_rows(row_bytes, n), *shape),
                         dcpl=early_dcpl(), **extra)


def _create_checksums(f, name: str, arrays, n: int) -> None:
    k = len(arrays)
    f.create_dataset(name, shape=(n, k), dtype=np.uint32, chunks=(chunk_rows(4 * k, n), k), dcpl=early_dcpl())
    f[name].attrs["fields"] = json.dumps(list(arrays))
    f[name].attrs["algorithm"] = "crc32 (zlib) of each row's stored bytes"


def _reason_bytes(reason: str) -> bytes:
    raw = (reason or "failed").encode("utf-8")[:REASON_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")  # never cut a character in half

