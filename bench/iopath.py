"""``bench --only io``: extraction's input/output path against its own ceilings, with near-free encoders.

With a 1-layer, 32-d encoder (but the real 224-px image processor and 128-token max length) the forward
costs almost nothing, so ``extract``'s rate shows how fast the path around it is. Measured side by side
in one run, per repeat (the median of the ratios is reported; the machine may be shared):

* image: ``extract --modality image`` against the *decode ceiling* -- PIL open + RGB + resize + crop +
  normalise of the same files in a process pool over all cores (full decode, no draft: the fixed
  reference); also the rate of the path's own decode (``ImageRows``, JPEG draft + fast preprocessing)
  in the same pool;
* text: ``extract --modality text`` against the fast tokenizer alone on the same texts (batched, its
  own Rust thread pool over all cores);
* output: bytes of the feature file per second of the extract loop against the disk's own write rate
  (a file of the same size written in 4 MiB blocks, then fsync); the limit used for efficiency is the
  lower of the forward-only rate and the disk rate (as samples/s).

Data: the MVSA-Single sample (``../shared/data/mvsa_single_sample``) when present, else generated JPEGs
of a similar size (600 x 450), said so in the output.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: near-free encoders: 1 layer, 32-d, but the real 224-px processor and 128-token texts
IO_BERT = dict(hidden_size=32, num_layers=1, num_heads=2)
IO_DINOV2 = dict(hidden_size=32, num_layers=1, num_heads=2, patch_size=14, image_size=224, resize_shortest_edge=256)
#: torch threads of the extract runs: the near-free forward needs no parallelism, and a 2-thread OpenMP
#: team on a shared 2-core machine waits on descheduled workers (measured: 200-290 texts/s at torch's
#: default vs ~2,400 at 1 thread), which would measure the machine's load, not the path
IO_THREADS = 1
_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32) * 255
_STD = np.asarray([0.229, 0.224, 0.225], np.float32) * 255


def find_mvsa_sample(start: Path | None = None) -> Path | None:
    """``<ancestor>/shared/data/mvsa_single_sample`` of the repository (a worktree may sit deeper), or None."""
    here = (start or Path(__file__)).resolve()
    for anc in here.parents:
        cand = anc / "shared" / "data" / "mvsa_single_sample"
        if cand.is_dir():
            return cand
    return None


def _reference_decode(path: str) -> int:
    """The fixed decode reference: full JPEG decode, RGB, bicubic shortest edge 256, crop 224, normalise."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        a = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32)
    return int(((a - _MEAN) / _STD).transpose(2, 0, 1).size)


_ROWS = None  # the ImageRows of a pool worker (set by the fork)


def _ours_decode(i: int) -> int:
    _row, px, _why = _ROWS[i]
    return 0 if px is None else int(px.numel())


def _pool_rate(fn, items, processes: int) -> float:
    ctx = mp.get_context("fork")
    with ctx.Pool(processes) as pool:
        list(pool.imap_unordered(fn, items[: 4 * processes], chunksize=1))  # warm the workers
        t0 = time.perf_counter()
        list(pool.imap_unordered(fn, items, chunksize=8))
        return len(items) / (time.perf_counter() - t0)


def _disk_write_bps(folder: Path, nbytes: int) -> float:
    """The disk's own sequential write rate: ``nbytes`` in 4 MiB blocks, then fsync."""
    block = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8).tobytes()
    path = folder / "disk_rate.bin"
    nbytes = max(nbytes, 16 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(0, nbytes, len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    secs = time.perf_counter() - t0
    path.unlink()
    return nbytes / secs


def _generated(root: Path, n: int, seed: int) -> Path:
    from mmcache.bench.common import make_dataset

    return make_dataset(root, n, seed, (600, 450))


def _forward_rate(enc, modality: str, items: list, bs: int) -> float:
    """Forward-only samples/s on ready batches, with the extract runs' torch threads (CPU)."""
    import torch
    from mmcache.bench.common import image_limit, text_limit

    old = torch.get_num_threads()
    if enc.device.type == "cpu":
        torch.set_num_threads(IO_THREADS)
    try:
        return (text_limit if modality == "text" else image_limit)(enc, items[: 8 * bs], bs, 1)
    finally:
        torch.set_num_threads(old)


def bench_io(cfg, work: Path, tmp: Path) -> dict[str, Any]:
    """The ``io`` section: per modality and repeat, extract vs decode/tokenize ceiling and vs disk."""
    from mmcache.bench.common import extract_cfg
    from mmcache.extract.datasets import load_dataset
    from mmcache.extract.encoders import load_image_encoder, load_text_encoder
    from mmcache.extract.extraction import run_extract
    from mmcache.extract.tiny_models import build_bert, build_dinov2, full_kwargs, is_complete

    models = {}
    for kind, builder, kw in (("bert", build_bert, IO_BERT), ("dinov2", build_dinov2, IO_DINOV2)):
        folder = work / "models" / f"{kind}-io"
        if not is_complete(folder, kind, full_kwargs(builder, kw)):
            builder(folder, **kw)
        models[kind] = folder
    mvsa = find_mvsa_sample()
    if mvsa is not None:
        dataset, data_dir, source = "mvsa_single", mvsa, f"MVSA-Single sample ({mvsa})"
    else:
        dataset, data_dir = "folder", _generated(work / "io_data", 1000, cfg.seed)
        source = "generated 600x450 JPEGs (MVSA-Single sample absent)"
    ds = load_dataset(dataset, data_dir)
    texts = [s.text for s in ds.samples]
    files = [str(s.image_path) for s in ds.samples if s.image_path]
    cores = os.cpu_count() or 1
    text_enc = load_text_encoder(str(models["bert"]), device=cfg.device, max_length=128)
    image_enc = load_image_encoder(str(models["dinov2"]), device=cfg.device)
    rows: list[dict[str, Any]] = []
    for rep in range(cfg.repeats):
        for modality, enc in (("image", image_enc), ("text", text_enc)):
            items = files if modality == "image" else texts
            ceiling, ours_decode = _ceiling(modality, enc, items, cores)
            ecfg = extract_cfg(cfg, data_dir, tmp / "io_cache", models["bert"], models["dinov2"], modality=modality,
                                batch_size=32, dataset=dataset, num_workers="auto", threads=IO_THREADS)
            s = run_extract(ecfg).modalities[0]
            loop_s = (s.encoded + s.failed) / s.samples_per_s if s.samples_per_s else float("nan")
            out_bps = s.size_bytes / loop_s
            disk_bps = _disk_write_bps(tmp, s.size_bytes)
            forward = _forward_rate(enc, modality, items, 32)
            disk_sps = disk_bps / (s.size_bytes / s.total)
            limit = min(forward, disk_sps)
            row = {"repeat": rep, "modality": modality, "samples": s.total, "extract_sps": s.samples_per_s,
                   "ceiling_sps": ceiling, "ours_decode_sps": ours_decode, "ratio": s.samples_per_s / ceiling,
                   "write_mbps": out_bps / 1e6, "disk_mbps": disk_bps / 1e6, "forward_sps": forward,
                   "limit_sps": limit, "limit_by": "forward" if forward <= disk_sps else "disk",
                   "efficiency": s.samples_per_s / limit}
            rows.append(row)
            log.info("io %s repeat %d: extract %.0f/s, ceiling %.0f/s (ratio %.2f)", modality, rep,
                     s.samples_per_s, ceiling, row["ratio"])
    summary = []
    for modality in ("image", "text"):
        mine = [r for r in rows if r["modality"] == modality]
        med = {k: statistics.median(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], float)}
        summary.append({"modality": modality, **med, "limit_by": mine[0]["limit_by"], "repeats": len(mine)})
    return {"data": source, "cores": cores, "rows": rows, "summary": summary, "torch_threads": IO_THREADS,
            "load": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _ceiling(modality: str, enc, items: list, cores: int) -> tuple[float, float | None]:
    """(reference ceiling, the path's own decode rate or None) in samples/s on all cores."""
    if modality == "text":
        t0 = time.perf_counter()
        for i in range(0, len(items), 1024):  # big batches: the Rust tokenizer's own thread pool
            enc.tokenizer(items[i:i + 1024], truncation=True, max_length=enc.max_length, padding=False,
                          return_attention_mask=False, return_token_type_ids=False)
        return len(items) / (time.perf_counter() - t0), None
    global _ROWS
    from mmcache.extract.batches import ImageRows
    from mmcache.extract.images import DEFAULT_MAX_PIXELS

    _ROWS = ImageRows(items, enc.preprocessor, DEFAULT_MAX_PIXELS, None)
    try:
        ours = _pool_rate(_ours_decode, list(range(len(items))), cores)
    finally:
        _ROWS = None
    return _pool_rate(_reference_decode, items, cores), ours


def format_io(r: dict[str, Any]) -> list[str]:
    from mmcache.tables import format_table

    load = r.get("load")
    out = ["", "### io: extraction's input/output path (near-free encoders, median of repeats)", "",
           f"data: {r['data']}; {r['cores']} cores; extract with --num-workers auto --threads {r.get('torch_threads')}; load average {', '.join(f'{x:.2f}' for x in load) if load else '-'}", ""]
    rows = []
    for s in r["summary"]:
        ceil = "decode (PIL, all cores)" if s["modality"] == "image" else "tokenizer (fast, all cores)"
        rows.append([s["modality"], f"{s['extract_sps']:.0f}", f"{s['ceiling_sps']:.0f} {ceil}",
                     f"{s['ratio']:.2f}", "-" if s.get("ours_decode_sps") is None else f"{s['ours_decode_sps']:.0f}",
                     f"{s['write_mbps']:.1f}", f"{s['disk_mbps']:.0f}", f"{s['forward_sps']:.0f}",
                     f"{s['limit_sps']:.0f} ({s['limit_by']})", f"{s['efficiency']:.2f}"])
    out.append(format_table(["modality", "extract /s", "ceiling /s", "extract/ceiling", "path's decode /s",
                             "written MB/s", "disk MB/s", "forward /s", "limit /s", "efficiency"], rows))
    return out


__all__ = ["bench_io", "find_mvsa_sample", "format_io"]
