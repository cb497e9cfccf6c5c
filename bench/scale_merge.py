"""Merging shards, virtual against copying (issue 23): seconds, extra disk, and read speed through each.

:func:`bench_merge` writes ``shards`` synthetic complete shard files with the real
:class:`~mmcache.cache.FeatureWriter` (random finite float16 values; a few hundred MB in all), copies
the folder, then in the same run merges one copy virtually (the default ``cache merge``: a small HDF5
file over the shards) and the other by copying (``cache merge --copy``, shards kept so both folders
end alike), and reads ``cls`` and ``tokens`` whole through each merged file (in turn, median of 5, no
checksum pass: the I/O path only). The files were just written, so reads come from the page cache for both.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

_BATCH = 64


def _write_shards(folder: Path, shards: int, rows_per_shard: int, hidden: int, tokens: int, seed: int) -> int:
    from mmcache import cache as cf

    rng = np.random.default_rng(seed)
    n = shards * rows_per_shard
    for i in range(shards):
        rows = np.arange(i * rows_per_shard, (i + 1) * rows_per_shard)
        path = cf.shard_path(folder.parent, folder.name, "text", "bench", i, shards)
        with cf.FeatureWriter.open(path, ids=[f"s{r}" for r in rows], rows=rows, index_fp="bench", modality="text",
                                   hidden_size=hidden, num_tokens=tokens, dtype="float16", config={"bench": 1},
                                   shard=(i, shards)) as w:
            for a in range(0, rows_per_shard, _BATCH):
                b = min(rows_per_shard, a + _BATCH)
                k = b - a
                w.write(np.arange(a, b), cls=rng.standard_normal((k, hidden), np.float32),
                        mean=rng.standard_normal((k, hidden), np.float32),
                        tokens=rng.standard_normal((k, tokens, hidden), np.float32),
                        mask=rng.random((k, tokens)) < 0.9)
            w.finalize()
    return n


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _read_seconds(path: Path, field: str) -> tuple[float, int]:
    """Seconds to read ``field`` whole through a freshly opened file (as stage two does), and its bytes."""
    from mmcache import cache as cf

    with cf.FeatureFile(path) as ff:
        t0 = time.perf_counter()
        arr = ff.load((field,), dtype=None, verify=False)[field]
        return time.perf_counter() - t0, arr.nbytes


def _read_gbps(paths: dict[str, Path], field: str, repeats: int) -> dict[str, float]:
    """GB/s per file, the files read in turn ``repeats`` times (median): a shared machine's load hits both."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    nbytes = 0
    for _ in range(repeats):
        for key, path in paths.items():
            seconds, nbytes = _read_seconds(path, field)
            times[key].append(seconds)
    return {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}


def _merge(folder: Path, shards: int, copy: bool) -> dict[str, Any]:
    from mmcache import cache as cf

    before = _folder_bytes(folder)
    t0 = time.perf_counter()
    res = cf.merge_shards(folder / "text--bench.h5", shards, copy=copy, keep_shards=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "extra_bytes": _folder_bytes(folder) - before, "file_bytes": res.path.stat().st_size,
            "virtual": res.virtual, "path": res.path}


def bench_merge(work: Path, shards: int = 8, rows_per_shard: int = 800, hidden: int = 384, tokens: int = 64,
                seed: int = 0, repeats: int = 5) -> dict[str, Any]:
    """Virtual and copying merge of the same ``shards`` shard files, in one run (see the module doc).

    Returns ``shards``, ``rows``, ``shard_bytes`` (all shard files) and per method (``virtual``,
    ``copy``): ``seconds``, ``extra_bytes`` (growth of the folder), ``file_bytes`` (the merged file),
    ``cls_gbps`` / ``tokens_gbps`` (whole-array read through a freshly opened merged file, median of
    ``repeats``, the two files read in turn). ``work`` is emptied first."""
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    virtual_dir, copy_dir = work / "virtual" / "d", work / "copy" / "d"
    n = _write_shards(virtual_dir, shards, rows_per_shard, hidden, tokens, seed)
    shutil.copytree(virtual_dir, copy_dir)
    out: dict[str, Any] = {"shards": shards, "rows": n, "hidden": hidden, "tokens": tokens,
                           "shard_bytes": _folder_bytes(virtual_dir)}
    out["virtual"] = _merge(virtual_dir, shards, copy=False)
    out["copy"] = _merge(copy_dir, shards, copy=True)
    for field in ("cls", "tokens"):
        speeds = _read_gbps({k: out[k]["path"] for k in ("virtual", "copy")}, field, repeats)
        for k, v in speeds.items():
            out[k][f"{field}_gbps"] = v
    for k in ("virtual", "copy"):
        out[k]["path"] = str(out[k]["path"])
    return out


def format_merge(result: dict[str, Any]) -> list[str]:
    """The result as table lines: one row per merge method."""
    from mmcache.tables import format_table, human_bytes

    rows = [[name, f"{r['seconds']:.3f}", human_bytes(r["extra_bytes"]), human_bytes(r["file_bytes"]),
             f"{r['cls_gbps']:.2f}", f"{r['tokens_gbps']:.2f}"]
            for name, r in (("virtual (default)", result["virtual"]), ("copy (--copy)", result["copy"]))]
    head = (f"merge of {result['shards']} shards, {result['rows']} rows (hidden {result['hidden']}, "
            f"{result['tokens']} tokens, float16), {human_bytes(result['shard_bytes'])} of shard files")
    table = format_table(["merge", "seconds", "extra disk", "merged file", "cls read GB/s", "tokens read GB/s"], rows)
    speed = result["copy"]["seconds"] / max(result["virtual"]["seconds"], 1e-9)
    return [head, *table.split("\n"), f"virtual merge {speed:.0f}x faster than the copy"]
