"""Reading a feature file's big array in row blocks aligned to its HDF5 chunking, each done row checked
against its checksum as it is read (stage two's streamed training: arrays larger than memory).

h5py + numpy only (the cache contract: stage two reads through this, never through stage one). A block is
a whole number of HDF5 chunks along the row axis, so every chunk is decompressed / read once per pass;
damage raises the same :class:`~mmcache.errors.CacheError` text style as ``FeatureFile.load``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from mmcache.cache.h5io import json_attr, open_h5
from mmcache.cache.integrity import Damage, damaged_rows, field_groups
from mmcache.cache.reader import damage_error
from mmcache.errors import CacheError

__all__ = ["BLOCK_BYTES", "BlockReader", "array_nbytes", "checksum_column"]

BLOCK_BYTES = 4 << 20  # rows per read: a few MiB (whole chunks), big enough for near-sequential disk speed


def field_group(f, field: str):
    """The :class:`~mmcache.cache.integrity.FieldGroup` that owns ``field`` (its done bits and checksum
    array): fields added to a lean cache later have their own (:func:`~mmcache.cache.integrity.field_groups`)."""
    groups = field_groups(f)
    return next((g for g in groups if field in g.arrays), groups[0])


def checksum_column(f, field: str) -> tuple[str, int] | None:
    """(checksum array name, column) of ``field`` in its field group, or None when the file has no
    checksums or none for that field."""
    g = field_group(f, field)
    if g.checksum is None or g.checksum not in f:
        return None
    order = json.loads(f[g.checksum].attrs.get("fields", "[]"))
    return (g.checksum, order.index(field)) if field in order else None


class BlockReader:
    """Row blocks of one array (``tokens`` (N, L, D), ``cls`` (N, D), ...) of one feature file.

    ``block_rows``: rows per block, a multiple of the array's chunk rows (about :data:`BLOCK_BYTES`).
    :meth:`read` is safe to call from a background thread (one lock per reader: h5py serialises anyway).
    """

    def __init__(self, path: str | Path, field: str, *, block_bytes: int = BLOCK_BYTES) -> None:
        self.path, self.field = Path(path), field
        self._f = open_h5(self.path, "r")
        if field not in self._f:
            self._f.close()
            raise CacheError(f"{self.path} has no {field!r} array; re-extract it with this project")
        ds = self._f[field]
        self.shape: tuple[int, ...] = tuple(ds.shape)
        self.dtype = ds.dtype
        self.row_bytes = int(ds.dtype.itemsize * np.prod(ds.shape[1:], dtype=np.int64))
        chunk = int(ds.chunks[0]) if ds.chunks else 1
        self.block_rows = min(max(1, self.shape[0]),
                              max(chunk, (block_bytes // max(self.row_bytes, 1)) // chunk * chunk))
        # rows done in the field's own group (an add still under way has rows not done yet)
        self._done = self._f[field_group(self._f, field).done][...]
        col = checksum_column(self._f, field)
        self._crc = None if col is None else self._f[col[0]][:, col[1]]
        self._lock = threading.Lock()
        self.provenance = json_attr(self._f.attrs, "provenance", {})
        self.modality = str(self._f.attrs.get("modality", ""))

    @property
    def rows(self) -> int:
        return self.shape[0]

    def block_of(self, row: int) -> tuple[int, int]:
        """The block [a, b) holding ``row``."""
        a = row // self.block_rows * self.block_rows
        return a, min(self.rows, a + self.block_rows)

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) in the stored dtype, (b - a, ...), every done row verified (checksum, else NaN/Inf)."""
        out = np.empty((b - a, *self.shape[1:]), dtype=self.dtype)
        with self._lock:
            self._f[self.field].read_direct(out, np.s_[a:b])
        bad = damaged_rows(out, self._done[a:b], None if self._crc is None else self._crc[a:b])
        if bad.size:
            ids = np.asarray(self._f["id"].asstr()[...], dtype=object)  # only on damage: names the rows
            raise damage_error(Damage(path=self.path, ids=ids, checked=(self.field,), verifiable=self._crc is not None,
                                      rows_by_field={self.field: a + bad}), self.provenance, self.modality)
        return out

    def close(self) -> None:
        with self._lock:
            if self._f.id.valid:
                self._f.close()

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def array_nbytes(path: str | Path, field: str) -> tuple[int, tuple[int, ...]]:
    """Bytes of array ``field`` of a feature file as stored, and its shape (without reading it);
    (0, ()) when the file has no such array (the loader then says what is wrong)."""
    with open_h5(Path(path), "r") as f:
        if field not in f:
            return 0, ()
        ds = f[field]
        return int(ds.dtype.itemsize * np.prod(ds.shape, dtype=np.int64)), tuple(ds.shape)
