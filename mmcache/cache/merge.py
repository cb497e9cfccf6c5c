"""Merging shards: the shard files of a sharded run (``*.shard-<i>-of-<n>.h5``) combined into the normal
feature file. By default a *virtual* merge (:mod:`mmcache.cache.virtual`): a small file whose arrays are
HDF5 virtual datasets over the shards, written in O(metadata), the shards kept (they hold the data).
``copy=True`` (``cache merge --copy``): a verified copy, the shards removed afterwards.

Owns :func:`merge_shards` (one target), :func:`merge_paths` (what ``cache merge`` does), the grouping
of shard files into merges (:func:`shard_groups`, :func:`expected_shards`) and :class:`MergeResult`.
Holds the folder's write lock (:mod:`mmcache.cache.lock`) while merging. h5py + numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcache.cache.h5io import attrs_dict, fsync, json_attr, read_strs, selection, write_rows
from mmcache.cache.identity import CacheMismatchError, config_diff
from mmcache.cache.index import read_index
from mmcache.cache.integrity import check_free_space, disk_full_error, is_disk_full
from mmcache.cache.lock import folder_lock
from mmcache.cache.names import (
    INDEX_NAME,
    STR,
    list_feature_files,
    list_shard_files,
    parse_shard_name,
)
from mmcache.cache.reader import FeatureFile, write_failures_csv
from mmcache.cache.virtual import VIRTUAL_ATTR, Source, source_record, virtual_info, write_virtual
from mmcache.cache.writer import chunk_rows, early_dcpl
from mmcache.errors import BadInputError, CacheError

_MERGE_BLOCK_BYTES = 64 << 20  # rows copied per step: bounded memory for any cache size


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
    virtual: bool = False  # the merged file reads the shards in place (they must stay)


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
        attrs = attrs_dict(f.attrs)
        if attrs.get("format") != "mmcache-features":
            raise CacheError(f"{path} is not an mmcache feature file")
        shard = json_attr(f.attrs, "shard")
        if shard is not None and list(shard) != [i, n]:
            raise CacheError(f"{path} holds shard {shard[0]} of {shard[1]}, not {i} of {n} as its name says")
        done = f["done"][...]
        return _ShardMeta(path=path, index=i, attrs=attrs, rows=f["row"][...], ids=read_strs(f["id"]),
                          done=int(done.sum()), complete=bool(attrs.get("complete")) and bool(done.all()))


def _target_state(target: Path, cfg_fp: str, index_fp: str, arrays: tuple[str, ...] = ()) -> str:
    """'absent' | 'same' (complete, same settings and index, every one of the shards' ``arrays``) |
    'same-incomplete' (also: the shards gained arrays since, e.g. fields added to a lean cache: merged
    again) | 'other' | 'unreadable'."""
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
            if any(k not in f for k in arrays):
                return "same-incomplete"
            return "same" if bool(a.get("complete")) and bool(f["done"][...].all()) else "same-incomplete"
    except (OSError, KeyError):
        return "unreadable"


def _remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def merge_shards(target: str | Path, num_shards: int, *, keep_shards: bool = False, force: bool = False,
                 skip_if_merged: bool = False, copy: bool = False) -> MergeResult:
    """See :func:`_merge_shards`; holds the folder's write lock (:mod:`mmcache.cache.lock`) throughout."""
    try:
        with folder_lock(Path(target).parent):
            return _merge_shards(target, num_shards, keep_shards=keep_shards, force=force,
                                 skip_if_merged=skip_if_merged, copy=copy)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(Path(target), None, e) from None
        raise


def _merge_shards(target: str | Path, num_shards: int, *, keep_shards: bool = False, force: bool = False,
                  skip_if_merged: bool = False, copy: bool = False) -> MergeResult:
    """Combine the ``num_shards`` shard files of ``target`` into ``target``, the normal feature file.

    Default: a virtual merge (:func:`_write_virtual_merge`), O(metadata), the shards kept whatever
    ``keep_shards`` says (they hold the data; source names are relative, so the folder can be moved
    as a whole). ``copy``: a plain, verified copy (no links to the shards) as described below.

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
            diff = config_diff(json_attr(ref.attrs, "config", {}), json_attr(m.attrs, "config", {}))
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
        with h5py.File(ref.path, "r") as f0:
            arrays = _merge_fields(f0)
        state = _target_state(target, ref.attrs["config_fingerprint"], ref.attrs["index_fingerprint"], arrays)
    else:
        state = "absent"
        if target.exists() and index is not None:
            with FeatureFile(target) as ff:
                if ff.complete and ff.index_fingerprint == index.fingerprint:
                    state = "same"
    if state == "same" and (missing or skip_if_merged):
        virtual = _is_virtual(target)
        keep_shards = keep_shards or virtual  # a virtual merge reads them: never remove its shards
        if not keep_shards:
            _remove(present)
        with FeatureFile(target) as ff:
            valid, n_all = int(ff.valid.sum()), len(ff.ids)
        return MergeResult(path=target, num_shards=num_shards, shards=present, status="already merged",
                           num_samples=n_all, num_valid=valid, num_failed=n_all - valid,
                           removed_shards=bool(present) and not keep_shards, seconds=time.perf_counter() - t0,
                           virtual=virtual)
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

    tmp = target.with_name(f".{target.name}.merging-{os.getpid()}")
    for stale in target.parent.glob(f".{target.name}.merging-*"):
        stale.unlink(missing_ok=True)  # left by a merge that was killed
    try:
        if copy:
            _write_copy_merge(tmp, metas, n_total)
        else:
            _write_virtual_merge(tmp, metas, n_total)
        fsync(tmp)
        os.replace(tmp, target)
        fsync(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    failures_csv = write_failures_csv(target.parent)
    with FeatureFile(target) as ff:  # a virtual merge: also checks that every shard is the merged one
        valid = int(ff.valid.sum())
    remove = copy and not keep_shards
    if remove:
        _remove([m.path for m in metas])
    return MergeResult(path=target, num_shards=num_shards, shards=[m.path for m in metas], status="merged",
                       num_samples=n_total, num_valid=valid, num_failed=n_total - valid, removed_shards=remove,
                       failures_csv=failures_csv, seconds=time.perf_counter() - t0, virtual=not copy)


def _is_virtual(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return virtual_info(f) is not None


def _write_copy_merge(tmp: Path, metas: list[_ShardMeta], n_total: int) -> None:
    """``--copy``: every shard's rows copied into ``tmp``, verified against the shards, marked complete."""
    ids = np.empty(n_total, dtype=object)
    for m in metas:
        ids[m.rows] = m.ids
    check_free_space(tmp, sum(m.path.stat().st_size for m in metas))
    sums = _copy_shards(tmp, metas, ids, n_total)
    _verify_copy(tmp, metas, sums)
    with h5py.File(tmp, "r+") as f:
        f.attrs["complete"] = True
        f.flush()


def _write_virtual_merge(tmp: Path, metas: list[_ShardMeta], n_total: int) -> None:
    """The small virtual file at ``tmp`` (it must lie in the shards' folder: source names are relative):
    every dataset of the shards mapped (:func:`mmcache.cache.virtual.write_virtual`), the shards' file
    attributes plus ``merged_from`` and ``virtual``; checked by reading ``row`` and ``done`` through it."""
    sources = [Source(path=m.path, index=m.index, rows=m.rows) for m in metas]
    with h5py.File(tmp, "w") as out:
        copied = write_virtual(out, sources, n_total)
        for key, value in metas[0].attrs.items():
            if key != "last_run":
                out.attrs[key] = value
        out.attrs.update({
            "shard": json.dumps(None), "num_samples": n_total, "num_done": n_total,
            "num_valid": int(sum(int(np.count_nonzero(_read(m.path, "valid"))) for m in metas)),
            "created": min(str(m.attrs.get("created", "")) for m in metas),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), VIRTUAL_ATTR: True, "complete": True,
            "merged_from": json.dumps({"num_shards": len(metas), "virtual": True, "copied_bytes": copied,
                                       "shards": [source_record(m.path, m.index, m.rows, m.attrs) for m in metas],
                                       "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, default=str),
        })
        # a wrong mapping would show here: each row's index position and done bit, read through the file
        if not np.array_equal(out["row"][...], np.arange(n_total)) or not out["done"][...].all():
            raise CacheError(f"merge verification failed: the virtual file {tmp} does not map every row of the "
                             "shards in order; the shards are kept, try `cache merge --copy`")
        out.flush()


def _read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][...]


def _merge_fields(f) -> tuple[str, ...]:
    """Every row-aligned array of a feature file but ``id`` / ``row`` (written from the index), whatever
    it stores (a lean cache lacks ``tokens``; fields added later bring ``done.<k>`` / ``checksum.<k>``):
    the done bits last, so a copy is complete only once every value is in."""
    names = sorted(k for k, v in f.items() if isinstance(v, h5py.Dataset) and k not in ("id", "row"))
    return tuple(k for k in names if not k.startswith("done")) + tuple(k for k in names if k.startswith("done"))


def _create_like(out, f0, ids: np.ndarray, n_total: int) -> None:
    """The arrays of ``f0`` (a shard) in ``out`` for ``n_total`` rows: same dtypes, row shapes, chunk rows,
    fill values and attributes, storage allocated now (as the writer does: a later repair only rewrites
    raw bytes)."""
    out.create_dataset("id", data=np.asarray(ids, dtype=object), dtype=STR)
    out.create_dataset("row", data=np.arange(n_total, dtype=np.int64))
    for name in _merge_fields(f0):
        ds = f0[name]
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
        chunks = (chunk_rows(row_bytes, n_total), *ds.shape[1:])  # the writer's rule for n_total rows
        new = out.create_dataset(name, shape=(n_total, *ds.shape[1:]), dtype=ds.dtype, chunks=chunks,
                                 fillvalue=ds.fillvalue, dcpl=early_dcpl())
        for key, value in ds.attrs.items():
            new.attrs[key] = value


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
    sel = selection(rows)
    return ds[sel] if isinstance(sel, slice) else ds[rows]


def _copy_shards(tmp: Path, metas: list[_ShardMeta], ids: np.ndarray, n_total: int) -> dict[tuple[int, str], str]:
    """Write the merged file at ``tmp`` (complete=False); returns a sha256 per (shard, array) of the
    values copied, in target row order, for :func:`_verify_copy`."""
    ref = metas[0].attrs
    sums: dict[tuple[int, str], str] = {}
    with h5py.File(tmp, "w") as out:
        with h5py.File(metas[0].path, "r") as f0:
            layout = _merge_fields(f0)
            _create_like(out, f0, ids, n_total)
        runs = []
        for m in metas:
            with h5py.File(m.path, "r") as src:
                if _merge_fields(src) != layout:
                    raise CacheError(f"cannot merge: {m.path.name} stores other arrays ({', '.join(_merge_fields(src))}) "
                                     f"than {metas[0].path.name} ({', '.join(layout)}); extract them with the same "
                                     "--fields")
                for name in layout:
                    h = hashlib.sha256()
                    for sl, trows, order in _blocks(m, _block_rows(src[name])):
                        values = src[name][sl][order]
                        h.update(np.ascontiguousarray(values).tobytes())
                        write_rows(out[name], trows, selection(trows), values)
                    sums[(m.index, name)] = h.hexdigest()
                runs.append({"shard": m.index, "file": m.path.name, "rows": len(m.rows),
                             "last_run": json_attr(src.attrs, "last_run")})
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
            for name in _merge_fields(f):
                h = hashlib.sha256()
                for _sl, trows, _order in _blocks(m, _block_rows(f[name])):
                    h.update(np.ascontiguousarray(_read_target(f[name], trows)).tobytes())
                if h.hexdigest() != sums[(m.index, name)]:
                    raise CacheError(f"merge verification failed: {name} of {m.path.name} differs in the merged "
                                     f"copy {tmp}; the shards are kept, try the merge again")
        if not f["done"][...].all():
            raise CacheError(f"merge verification failed: {tmp} has rows not done")


def merge_paths(paths: list[str | Path], *, keep_shards: bool = False, force: bool = False,
                copy: bool = False) -> list[MergeResult]:
    """What ``cache merge`` does: every shard set found in ``paths`` (dataset folders and/or shard
    files) merged by :func:`merge_shards` (virtual unless ``copy``). A folder without shard files but with merged feature files
    is fine (nothing to do); one with neither is a :class:`CacheError`."""
    if not paths:
        raise BadInputError("name a dataset folder or shard files to merge")
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not list_shard_files(p) and not list_feature_files(p):
            raise CacheError(f"no shard files (*.shard-<i>-of-<n>.h5) and no feature files in {p}")
    return [merge_shards(target, n, keep_shards=keep_shards, force=force, copy=copy)
            for target, n in shard_groups(paths)]
