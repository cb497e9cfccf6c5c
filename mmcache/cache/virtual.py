"""Virtual merges: a merged feature file whose row-aligned arrays are HDF5 virtual datasets over the
shard files (``cache merge`` without ``--copy``), written in O(metadata); the shards stay where they are
and hold the data.

Owns the mapping (:func:`write_virtual`), the guard every reader and writer passes through
(:func:`check_sources`) and what ``cache info`` shows of such a file (:func:`virtual_info`).

* Source file names are stored *relative* (the shard's bare file name): HDF5 resolves a relative
  source name against the folder of the virtual file (after ``HDF5_VDS_PREFIX`` when that is set), so
  moving or copying the whole cache folder keeps the file working.
* HDF5 returns the fill value for a source it cannot open, silently. :func:`check_sources` therefore
  checks, on every open, that each shard is there, opens, is not shorter than when merged, and is the
  same shard (position, settings, sample index, creation time and row count as recorded in
  ``merged_from``); anything else is one :class:`CacheError` naming the shard and the commands that
  rebuild it.
* Writes through a virtual dataset go into the shard files (HDF5 opens sources with the virtual
  file's access mode), so ``extract --repair`` of a merged file recomputes damaged rows in the shards.
* Variable-length datasets (``id``) cannot be virtual: they are copied (their bytes per row are small).

h5py + numpy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcache.errors import CacheError

VIRTUAL_ATTR = "virtual"  # file attribute: True on a virtual merge
MAX_RUNS = 4096  # per-run mappings of one shard beyond this: refuse (use --copy)


@dataclass
class Source:
    """One shard of a virtual merge: ``rows`` (k,) int64 are its rows' positions in the merged file."""

    path: Path
    index: int
    rows: np.ndarray


def runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(shard position, target row, length) of each maximal run of consecutive ascending ``rows``."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(a), int(rows[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def _dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _is_vlen(dtype: np.dtype) -> bool:
    """Variable-length types (vlen strings, ragged arrays): HDF5 cannot map them virtually."""
    info = h5py.check_string_dtype(dtype)
    return (info is not None and info.length is None) or h5py.check_vlen_dtype(dtype) is not None


def write_virtual(out: h5py.File, sources: list[Source], n_total: int) -> int:
    """Create in ``out`` every dataset of the shard files, as a virtual dataset of ``n_total`` rows
    mapping each shard's rows (first dim) into ``out``; variable-length ones are copied. Returns the
    bytes copied (the variable-length data). Raises :class:`CacheError` for datasets that are not
    row-aligned or differ between shards, and for shards scattered into too many runs."""
    with h5py.File(sources[0].path, "r") as f0:
        layout = {name: (f0[name].shape[1:], f0[name].dtype, dict(f0[name].attrs)) for name in _dataset_names(f0)}
    plans = [(s, runs(s.rows)) for s in sources]
    for s, r in plans:
        if len(r) > MAX_RUNS:
            raise CacheError(f"{s.path.name} holds {s.rows.size} rows scattered in {len(r)} runs; a virtual merge "
                             f"maps at most {MAX_RUNS} runs per shard: use `cache merge --copy`")
    copied = 0
    for name, (tail, dtype, attrs) in layout.items():
        if _is_vlen(dtype):
            copied += _copy_vlen(out, name, dtype, sources, n_total)
        else:
            vl = h5py.VirtualLayout(shape=(n_total, *tail), dtype=dtype)
            for s, r in plans:
                _check_aligned(s, name, tail, dtype)
                src = h5py.VirtualSource(s.path.name, name, shape=(s.rows.size, *tail), dtype=dtype)
                for a, t, k in r:
                    vl[t:t + k] = src[a:a + k]
            out.create_virtual_dataset(name, vl)
        for key, value in attrs.items():
            out[name].attrs[key] = value
    return copied


def _check_aligned(s: Source, name: str, tail: tuple, dtype: np.dtype) -> None:
    with h5py.File(s.path, "r") as f:
        ds = f.get(name)
        if ds is None or ds.shape != (s.rows.size, *tail) or ds.dtype != dtype:
            got = "no such array" if ds is None else f"{ds.shape} {ds.dtype}"
            raise CacheError(f"cannot merge {s.path.name}: its {name!r} is {got}, expected {(s.rows.size, *tail)} "
                             f"{dtype} (one row per sample, like the other shards)")


def _copy_vlen(out: h5py.File, name: str, dtype: np.dtype, sources: list[Source], n_total: int) -> int:
    values = np.empty(n_total, dtype=object)
    for s in sources:
        with h5py.File(s.path, "r") as f:
            ds = f[name]
            part = ds.asstr()[...] if h5py.check_string_dtype(dtype) is not None else ds[...]
            if len(part) != s.rows.size:
                raise CacheError(f"cannot merge {s.path.name}: its {name!r} has {len(part)} rows, not {s.rows.size}")
            values[s.rows] = list(part)
    out.create_dataset(name, data=values, dtype=dtype)
    return int(out[name].id.get_storage_size()) + sum(len(str(v).encode()) for v in values)


def source_record(path: Path, index: int, rows: np.ndarray, attrs: dict[str, Any]) -> dict[str, Any]:
    """What ``merged_from`` keeps of one shard: enough for :func:`check_sources` to know it again."""
    return {"shard": index, "file": path.name, "rows": int(rows.size), "bytes": path.stat().st_size,
            "first_row": int(rows.min()) if rows.size else 0, "last_row": int(rows.max()) if rows.size else -1,
            "config_fingerprint": attrs.get("config_fingerprint"), "index_fingerprint": attrs.get("index_fingerprint"),
            "created": attrs.get("created"), "last_run": json.loads(attrs["last_run"]) if attrs.get("last_run") else None}


def virtual_info(f: h5py.File) -> dict[str, Any] | None:
    """``merged_from`` of a virtual merge (num_shards, shards: [source_record ...]); None for other files."""
    if not bool(f.attrs.get(VIRTUAL_ATTR, False)):
        return None
    return json.loads(f.attrs["merged_from"])


def check_sources(h5file: h5py.File, path: str | Path) -> None:
    """Check that every shard of the virtual merge ``h5file`` (open, at ``path``) is there and is the
    shard that was merged; a no-op for other files. On a problem, closes ``h5file`` and raises one
    :class:`CacheError` naming the shard and the commands that rebuild it (the caller's open fails)."""
    info = virtual_info(h5file)
    if info is None:
        return
    path = Path(path)
    for rec in info["shards"]:
        problem = _source_problem(path.parent / rec["file"], rec, int(info["num_shards"]))
        if problem:
            rebuild = _rebuild_command(path, h5file, rec["shard"], int(info["num_shards"]))
            h5file.close()
            raise CacheError(f"{path} is a virtual merge of {info['num_shards']} shard files and shard {rec['shard']} "
                             f"({rec['file']}) {problem}. Its rows cannot be read: rebuild that shard with "
                             f"`{rebuild}`, then `python cli.py cache merge {path.parent}` (or delete {path.name} and "
                             "rerun extract)")


def _source_problem(src: Path, rec: dict[str, Any], n: int) -> str | None:
    """Why ``src`` is not the shard ``rec`` recorded (None when it is)."""
    if not src.is_file():
        return "is missing"
    size = src.stat().st_size
    if size < int(rec["bytes"]):
        return f"is truncated ({size:,} bytes, {int(rec['bytes']):,} when merged)"
    try:
        with h5py.File(src, "r") as f:
            a = f.attrs
            shard = json.loads(a["shard"]) if a.get("shard") is not None else None
            got = {"shard": shard, "config_fingerprint": a.get("config_fingerprint"),
                   "index_fingerprint": a.get("index_fingerprint"), "created": a.get("created"),
                   "rows": int(f["row"].shape[0]) if "row" in f else None}
    except (OSError, KeyError, ValueError) as e:
        return f"cannot be opened ({' '.join(str(e).split())[:160]})"
    want = {"shard": [rec["shard"], n], "config_fingerprint": rec["config_fingerprint"],
            "index_fingerprint": rec["index_fingerprint"], "created": rec["created"], "rows": rec["rows"]}
    changed = [k for k in want if _plain(got[k]) != _plain(want[k])]
    if changed:
        return f"was replaced by another file since the merge ({', '.join(changed)} differ)"
    return None


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return list(v) if isinstance(v, (tuple, np.ndarray)) else v


def _rebuild_command(path: Path, f: h5py.File, shard: int, n: int) -> str:
    """The extract call that rebuilds shard ``shard`` of ``n`` of the virtual merge ``f`` at ``path``."""
    from mmcache.cache.reader import repair_command  # reader imports this module

    prov = json.loads(f.attrs.get("provenance", "{}"))
    modality = f.attrs.get("modality")
    cmd = repair_command(path, prov, str(modality) if modality is not None else None)
    return cmd.removesuffix(" --repair") + f" --shard {shard}/{n} --force"
