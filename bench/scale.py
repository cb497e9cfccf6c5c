"""``bench --only scale``: past one machine's memory and disk (issue 23), measured side by side in one run.

Four measurements, each in its own module, then one projection:

1. lean caches (:mod:`bench.scale_fields`): a full cache against ``--fields cls,mean`` of the same data;
2. merging shards (:mod:`bench.scale_merge`): the virtual merge against ``--copy``;
3. self-balancing shards (:mod:`bench.scale_claim`): 2 gloo ranks under torchrun, one slowed 3x,
   fixed shards against claimed ones;
4. streamed training (:mod:`bench.scale_stream`): a tokens head on a cache that fits, in memory,
   against one over 3x its memory budget, streamed;
5. the *at scale* table: bytes for 1M and 10M posts per field set (exact, from the cache layout at
   bert-base / dinov2-base shapes) and hours, from rates measured on a GPU (the whole extract path and
   the forward alone, bench JSON kept in ``docs/``) scaled by this run's lean / full time ratio, and
   stage two's streamed read rate from (4).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: encoder shapes of the defaults a user with internet gets (bert-base-uncased, facebook/dinov2-base)
TEXT_SHAPE = {"hidden": 768, "tokens": 128}  # --text-max-length 128
IMAGE_SHAPE = {"hidden": 768, "tokens": 257}  # 224 px / patch 14 = 16 x 16 patches + CLS
FIELD_SETS = {"cls,mean,tokens (default)": ("cls", "mean", "tokens", "mask"), "cls,mean": ("cls", "mean"),
              "cls": ("cls",)}
POSTS = (1_000_000, 10_000_000)
GPU_JSON = Path(__file__).resolve().parent.parent / "docs" / "bench-gpu-h200.json"


def _gpu_rates(path: Path = GPU_JSON) -> dict[str, Any] | None:
    """Measured extraction rates (samples/s) of the base preset on a GPU: the best whole-path rate and
    the best forward-only rate per modality, or None when no GPU bench is kept."""
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    rows = raw["extraction"]["extraction"]["rows"]
    out: dict[str, Any] = {"gpu": raw["machine"].get("gpu"), "source": path.name}
    for m in ("text", "image"):
        mine = [r for r in rows if r["modality"] == m]
        out[m] = {"ours_sps": max(r["ours_sps"] for r in mine), "limit_sps": max(r["limit_sps"] for r in mine)}
    return out


def at_scale(fields: dict[str, Any] | None, stream: dict[str, Any] | None) -> dict[str, Any]:
    """Bytes and hours for :data:`POSTS` per field set (see the module docstring)."""
    from mmcache.cache.integrity import planned_bytes

    gpu = _gpu_rates()
    # modality -> lean / full extract seconds, measured in this run (1 when not measured)
    ratio = {m: fields[m]["ratio"]["seconds"] for m in ("text", "image")} if fields else {}
    rows = []
    for label, arrays in FIELD_SETS.items():
        # bytes a post takes on disk (the file's fixed ~1 MiB of metadata spread over a million rows)
        per_post = {m: planned_bytes(1_000_000, s["hidden"], s["tokens"], "float16", arrays=arrays) / 1e6
                    for m, s in (("text", TEXT_SHAPE), ("image", IMAGE_SHAPE))}
        lean = arrays != FIELD_SETS["cls,mean,tokens (default)"]
        row: dict[str, Any] = {"fields": label, "bytes_per_post": per_post}
        for n in POSTS:
            row[f"tb_{n}"] = n * sum(per_post.values()) / 1e12
            if gpu:
                secs = sum(n / gpu[m]["ours_sps"] * (ratio.get(m, 1.0) if lean else 1.0) for m in ("text", "image"))
                row[f"gpu_hours_{n}"] = secs / 3600
                row[f"gpu_limit_hours_{n}"] = sum(n / gpu[m]["limit_sps"] for m in ("text", "image")) / 3600
        rows.append(row)
    out: dict[str, Any] = {"rows": rows, "gpu": gpu, "lean_time_ratio": ratio}
    if stream and stream.get("read_gbps"):
        tok = sum(planned_bytes(1, s["hidden"], s["tokens"], "float16", arrays=("tokens", "mask"),
                                bookkeeping=False) for s in (TEXT_SHAPE, IMAGE_SHAPE))
        gbps = stream["read_gbps"]
        out["stream_epoch_hours"] = {n: n * tok / (gbps * 1e9) / 3600 for n in POSTS}
        out["stream_read_gbps"] = gbps
    return out


def format_at_scale(r: dict[str, Any]) -> list[str]:
    from mmcache.tables import format_table

    gpu = r.get("gpu")
    head = ["fields", "text KB/post", "image KB/post", "1M posts TB", "10M posts TB"]
    if gpu:
        head += ["1M: GPU-hours (path)", "10M: GPU-hours (path)", "10M: GPU-hours (forward alone)"]
    body = []
    for x in r["rows"]:
        line = [x["fields"], f"{x['bytes_per_post']['text'] / 1e3:.1f}", f"{x['bytes_per_post']['image'] / 1e3:.1f}",
                f"{x[f'tb_{POSTS[0]}']:.3f}", f"{x[f'tb_{POSTS[1]}']:.2f}"]
        if gpu:
            line += [f"{x[f'gpu_hours_{POSTS[0]}']:.1f}", f"{x[f'gpu_hours_{POSTS[1]}']:.1f}",
                     f"{x[f'gpu_limit_hours_{POSTS[1]}']:.1f}"]
        body.append(line)
    out = ["", "#### At scale: bert-base + dinov2-base, float16", "", *format_table(head, body).split("\n")]
    if gpu:
        out.append(f"hours: text + image on one {gpu['gpu']} at the rates measured in {gpu['source']} (whole path: "
                   f"text {gpu['text']['ours_sps']:.0f}/s, image {gpu['image']['ours_sps']:.0f}/s; forward alone: "
                   f"{gpu['text']['limit_sps']:.0f}/s, {gpu['image']['limit_sps']:.0f}/s); lean rows scaled by this "
                   "run's lean/full extract time; k GPUs with claimed shards: divide by k")
    if r.get("stream_epoch_hours"):
        h = r["stream_epoch_hours"]
        out.append(f"stage two, tokens of both modalities streamed at this run's {r['stream_read_gbps']:.2f} GB/s: "
                   f"{h[POSTS[0]]:.1f} h per epoch for 1M posts, {h[POSTS[1]]:.1f} h for 10M (verified reads alone, page cache)")
    return out


def bench_scale(work: Path) -> dict[str, Any]:
    """Run the four measurements and the projection; returns a JSON-ready dict."""
    from mmcache.bench.scale_claim import bench_claim
    from mmcache.bench.scale_fields import bench_fields
    from mmcache.bench.scale_merge import bench_merge
    from mmcache.bench.scale_stream import bench_stream

    work = Path(work)
    out: dict[str, Any] = {}
    for name, fn in (("fields", bench_fields), ("merge", bench_merge), ("claim", bench_claim),
                     ("stream", bench_stream)):
        t = time.perf_counter()
        log.info("bench scale: %s", name)
        out[name] = fn(work / name)
        out[name]["bench_seconds"] = time.perf_counter() - t
    out["stream"]["read_gbps"] = stream_read_gbps(work / "stream" / "cache" / "big")
    out["at_scale"] = at_scale(out["fields"], out["stream"])
    return out


def stream_read_gbps(dataset_dir: Path) -> float:
    """GB/s of one checksum-verified pass over the ``tokens`` of every feature file in ``dataset_dir``
    through the streamed path's block reader, in a shuffled block order (the files were just written: this
    is the page-cache rate, an upper bound for a cold disk)."""
    import numpy as np

    from mmcache import cache as cf
    from mmcache.cache.blocks import BlockReader

    total, t = 0, time.perf_counter()
    for path in cf.list_feature_files(dataset_dir):
        with BlockReader(path, "tokens") as r:
            step = r.block_rows
            for a in np.random.default_rng(0).permutation(np.arange(0, r.rows, step)):
                total += r.read(int(a), min(r.rows, int(a) + step)).nbytes
    return total / (time.perf_counter() - t) / 1e9


def format_scale(r: dict[str, Any]) -> list[str]:
    from mmcache.bench.scale_claim import format_claim
    from mmcache.bench.scale_fields import format_fields
    from mmcache.bench.scale_merge import format_merge
    from mmcache.bench.scale_stream import format_stream

    out = ["", "### Past one machine (issue 23)"]
    for title, key, fmt in (("Lean caches", "fields", format_fields), ("Merging 8 shards", "merge", format_merge),
                            ("Self-balancing shards", "claim", format_claim), ("Streamed training", "stream", format_stream)):
        out += ["", f"#### {title}", "", *fmt(r[key])]
    return out + format_at_scale(r["at_scale"])
