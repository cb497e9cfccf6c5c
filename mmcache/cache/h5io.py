"""Low-level HDF5 access shared by the index, the feature writer and reader, and the shard merge.

Owns how the cache opens its files (an HDF5 lock conflict becomes :class:`~mmcache.cache.lock.CacheBusyError`
naming the writer), reads strings and attributes, and writes rows: a contiguous run as one hyperslab,
scattered rows as one read-modify-write of their span or run by run (:func:`write_rows`). h5py + numpy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcache.cache.lock import CacheBusyError, describe_holder, writer_of
from mmcache.errors import CacheError

log = logging.getLogger(__name__)


def read_strs(ds) -> np.ndarray:
    """(N,) object str: a string dataset decoded."""
    return np.asarray(ds.asstr()[...], dtype=object)


def attrs_dict(h5attrs) -> dict[str, Any]:
    """An HDF5 attribute set as a plain dict (bytes decoded)."""
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5attrs.items()}


def json_attr(attrs, key, default=None):
    """A JSON-valued attribute, decoded (``default`` when absent)."""
    raw = attrs.get(key)
    return default if raw is None else json.loads(raw)


def close_quietly(f) -> None:
    """Close ``f`` after another error without letting HDF5's close error hide that cause."""
    if f is None:
        return
    try:
        if f.id.valid:
            f.close()
    except (OSError, RuntimeError) as e:
        log.debug("closing %s after an error: %s", getattr(f, "filename", "?"), e)


def selection(rows: np.ndarray) -> slice | np.ndarray:
    # A contiguous run (the common case: batches in order) is one hyperslab write. Scattered rows
    # (length-sorted text batches) are written run by run in write_rows: h5py's fancy-index write
    # is ~35x slower than per-run slice writes (measured: 350 vs 12,000 rows/s of 128x768 float16).
    if rows[-1] - rows[0] + 1 == rows.size:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


# Scattered rows spanning at most this many bytes are written as one read-modify-write of the span
# (rows in between are rewritten with their own bytes, so even a torn write leaves them intact).
_SPAN_RMW_BYTES = 4 << 20


def write_rows(ds, rows: np.ndarray, sel, values: np.ndarray) -> None:
    """Write ``values`` (B, ...) into ``rows`` (B,) ascending of ``ds``; ``sel`` is :func:`selection` of ``rows``."""
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


def open_h5(path: Path, mode: str, locking: bool | None = None) -> h5py.File:
    """``h5py.File``; a lock conflict raises :class:`CacheBusyError`, any other failure :class:`CacheError`."""
    try:
        return h5py.File(path, mode) if locking is None else h5py.File(path, mode, locking=locking)
    except OSError as e:
        if "unable to lock file" in str(e).lower():  # HDF5's own lock: another process has it open
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


def fsync(path: Path) -> None:
    """Flush ``path`` (a file or folder) to disk, best effort: not every filesystem supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover -- e.g. directories on some platforms
        return
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover -- the data was written; only its durability is unconfirmed
        log.debug("fsync of %s not supported: %s", path, e)
    finally:
        os.close(fd)
