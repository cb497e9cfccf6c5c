"""The benchmark behind `make bench` / `python cli.py bench`.

Every figure is a rate or a ratio measured side by side in the same process and run (median of
``repeats``), so machine noise mostly cancels:

1. extraction per modality and both: the encoder's forward pass alone on ready-made batches (the
   limit), our full ``extract`` path (decode, preprocess, tokenize, forward, HDF5 write) and a naive
   one-sample-at-a-time loop through the same model; efficiency = ours / limit, speedup = ours / naive;
2. cache I/O: loading a cache array vs reading the same bytes with numpy from a plain ``.npy`` file,
   and bytes on disk per sample for each dtype / patch-pool choice;
3. stage two: seconds per epoch and per run for each head and features mode, against one epoch with
   the frozen encoders in the loop (measured, then extrapolated to the same number of epochs);
4. peak RSS of extraction at two dataset sizes (it must stay flat) and of training, in child processes.

Models are random-initialised BERT / DINOv2 of the preset's shapes, built locally (no downloads).
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.bench.common import (
    extract_cfg,
    image_limit,
    machine_info,
    make_dataset,
    median_seconds,
    sync,
    text_limit,
)

from mmcache.errors import BadInputError

log = logging.getLogger(__name__)
BENCH_DIR = Path(__file__).resolve().parent
SECTIONS = ("extraction", "cache_io", "training", "memory", "grid", "io", "scale")


@dataclass
class BenchConfig:
    preset: str = "small"
    samples: int = 256
    device: str = "auto"
    precision: str = "auto"
    batch_sizes: tuple[int, ...] = (8, 32)
    repeats: int = 3
    num_workers: int = 2
    naive_samples: int = 32
    epochs: int = 5
    heads: tuple[str, ...] | None = None  # None: every registered head
    memory: bool = True
    work_dir: str = "cache/bench"
    out_dir: str = str(BENCH_DIR)
    seed: int = 0
    image_size: tuple[int, int] = (320, 240)  # generated JPEGs are resized by the processor, like real ones
    sections: tuple[str, ...] = ("extraction", "cache_io", "training", "memory", "grid")
    grid_samples: int = 4500  # the grid section's synthetic cache (768-d text and image)
    grid_tokens_large: bool = False  # also the tokens grid on that cache (~25 min one model per run on a 2-core CPU)

    def validate(self) -> None:
        from mmcache.extract.tiny_models import PRESETS

        if self.preset not in PRESETS:
            raise BadInputError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.samples < 16:
            raise BadInputError("--samples must be at least 16")
        if self.repeats < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BadInputError("--repeats and --batch-sizes must be positive")
        bad = set(self.sections) - set(SECTIONS)
        if bad or not self.sections:
            raise BadInputError(f"unknown bench section(s) {', '.join(sorted(bad)) or '(none)'}; known: {', '.join(SECTIONS)}")


# ------------------------------------------------------------------------------------------ helpers

def _naive(enc, items: list[str], modality: str) -> float:
    """Samples/s of a notebook-style loop: one sample at a time through the same model, results
    appended to a list (no batching, no workers, no file writes)."""
    from PIL import Image

    out = []
    t0 = time.perf_counter()
    for item in items:
        if modality == "text":
            out.append(enc.encode(enc.tokenize([item]))["cls"].numpy())
        else:
            out.append(enc.encode(enc.preprocess([Image.open(item).convert("RGB")]))["cls"].numpy())
    sync(enc.device)
    return len(items) / (time.perf_counter() - t0)


def bench_extraction(cfg: BenchConfig, data_dir: Path, text_dir: Path, image_dir: Path, tmp: Path) -> dict[str, Any]:
    from mmcache.extract.datasets import load_dataset
    from mmcache.extract.encoders import load_image_encoder, load_text_encoder
    from mmcache.extract.extraction import run_extract

    ds = load_dataset("folder", data_dir)
    texts = [s.text for s in ds.samples]
    files = [str(s.image_path) for s in ds.samples]
    text_enc = load_text_encoder(str(text_dir), device=cfg.device, precision=cfg.precision)
    image_enc = load_image_encoder(str(image_dir), device=cfg.device, precision=cfg.precision)
    results: dict[str, Any] = {"rows": [], "samples": len(texts)}
    best: dict[str, dict[str, float]] = {}
    for modality, enc, items in (("text", text_enc, texts), ("image", image_enc, files)):
        naive = _naive(enc, items[: cfg.naive_samples], modality)
        for bs in cfg.batch_sizes:
            limit = (text_limit if modality == "text" else image_limit)(enc, items, bs, cfg.repeats)
            ours_runs = []
            for _ in range(cfg.repeats):
                s = run_extract(extract_cfg(cfg, data_dir, tmp / "cache", text_dir, image_dir,
                                             modality=modality, batch_size=bs))
                ours_runs.append(s.modalities[0].samples_per_s)
            ours = statistics.median(ours_runs)
            row = {"modality": modality, "batch_size": bs, "limit_sps": limit, "ours_sps": ours,
                   "naive_sps": naive, "efficiency": ours / limit, "speedup_vs_naive": ours / naive}
            results["rows"].append(row)
            log.info("extract %s bs=%d: limit %.1f/s ours %.1f/s naive %.1f/s", modality, bs, limit, ours, naive)
            if modality not in best or row["efficiency"] > best[modality]["efficiency"]:
                best[modality] = row
    # Both modalities in one command, at each modality's best batch size.
    bs_t, bs_i = best["text"]["batch_size"], best["image"]["batch_size"]
    s = run_extract(extract_cfg(cfg, data_dir, tmp / "cache", text_dir, image_dir, modality="both",
                                 text_batch_size=bs_t, image_batch_size=bs_i))
    rate = {m.modality: m.samples_per_s for m in s.modalities}
    combine = lambda a, b: 1.0 / (1.0 / a + 1.0 / b)  # noqa: E731  (samples/s of doing both, one after the other)
    ours_both = combine(rate["text"], rate["image"])
    limit_both = combine(best["text"]["limit_sps"], best["image"]["limit_sps"])
    naive_both = combine(best["text"]["naive_sps"], best["image"]["naive_sps"])
    results["rows"].append({"modality": "both", "batch_size": f"{bs_t}/{bs_i}", "limit_sps": limit_both,
                            "ours_sps": ours_both, "naive_sps": naive_both, "efficiency": ours_both / limit_both,
                            "speedup_vs_naive": ours_both / naive_both})
    results["best"] = {m: r["batch_size"] for m, r in best.items()}
    results["limit_both_sps"] = limit_both
    del text_enc, image_enc
    return results


# ------------------------------------------------------------------------------------------ 2. cache I/O

def bench_cache_io(cfg: BenchConfig, data_dir: Path, text_dir: Path, image_dir: Path, tmp: Path) -> dict[str, Any]:
    from mmcache.extract.extraction import run_extract

    from mmcache import cache as cf

    folder = tmp / "cache" / "bench"
    image_file = next(p for p in cf.list_feature_files(folder) if p.name.startswith("image--"))
    with cf.FeatureFile(image_file) as ff:
        arr = ff.load(("tokens",), dtype=None)["tokens"]
    raw = tmp / "tokens.npy"
    np.save(raw, arr)
    nbytes = arr.nbytes

    def load_cache(verify=True):
        with cf.FeatureFile(image_file) as ff:
            ff.load(("tokens",), dtype=None, verify=verify)

    t_cache = median_seconds(load_cache, cfg.repeats)  # with per-row checksum verification (the default)
    t_plain = median_seconds(lambda: load_cache(verify=False), cfg.repeats)
    t_numpy = median_seconds(lambda: np.load(raw), cfg.repeats)
    io = {"array": f"image tokens {tuple(arr.shape)} {arr.dtype}", "bytes": nbytes,
          "cache_gbps": nbytes / t_cache / 1e9, "cache_unverified_gbps": nbytes / t_plain / 1e9,
          "numpy_gbps": nbytes / t_numpy / 1e9, "cache_vs_numpy": t_numpy / t_cache}
    # Bytes on disk per sample for each storage choice, on a subset (file size / samples).
    sizes = []
    sub = min(cfg.samples, 32)
    sub_dir = tmp / "subset"
    make_dataset(sub_dir, sub, cfg.seed, cfg.image_size)
    for modality, dtype, pool in (("text", "float16", 1), ("text", "float32", 1), ("image", "float16", 1),
                                  ("image", "float32", 1), ("image", "float16", 2), ("image", "float16", 4)):
        s = run_extract(extract_cfg(cfg, sub_dir, tmp / "sizes", text_dir, image_dir, modality=modality,
                                     dtype=dtype, patch_pool=pool, batch_size=32))
        with cf.FeatureFile(s.modalities[0].path) as ff:
            tokens = ff.num_tokens
        sizes.append({"modality": modality, "dtype": dtype, "patch_pool": pool if modality == "image" else None,
                      "tokens": tokens, "bytes_per_sample": s.modalities[0].size_bytes / sub})
    io["sizes"] = sizes
    return io


# ------------------------------------------------------------------------------------------ 3. training

def _encoders_in_loop_epoch(cfg: BenchConfig, data_dir: Path, text_dir: Path, image_dir: Path, head_name: str,
                            features: str) -> tuple[float, int]:
    """Seconds of ONE training epoch with the frozen encoders in the loop (decode, preprocess,
    tokenize, forward both encoders, then the head's forward/backward), on the train split."""
    import torch
    from mmcache.extract.datasets import load_dataset
    from mmcache.extract.encoders import load_image_encoder, load_text_encoder
    from mmcache.extract.splits import resolve_splits
    from mmcache.fuse.heads import create_head
    from PIL import Image

    ds = load_dataset("folder", data_dir)
    split = resolve_splits(ds.samples, seed=cfg.seed).assignment
    train = [s for s in ds.samples if split[s.id] == "train"]
    te = load_text_encoder(str(text_dir), device=cfg.device, precision=cfg.precision)
    ie = load_image_encoder(str(image_dir), device=cfg.device, precision=cfg.precision)
    head = create_head(head_name, text_dim=te.hidden_size, image_dim=ie.hidden_size, num_classes=3).to(te.device)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-4)
    bs = 32
    t0 = time.perf_counter()
    for i in range(0, len(train), bs):
        batch = train[i:i + bs]
        t = te.encode(te.tokenize([s.text for s in batch]))
        im = ie.encode(ie.preprocess([Image.open(s.image_path).convert("RGB") for s in batch]))

        def seq(out):
            if features == "tokens":
                return out["tokens"].to(te.device), out["mask"].to(te.device)
            v = out[features].to(te.device).unsqueeze(1)
            return v, torch.ones(v.shape[:2], dtype=torch.bool, device=te.device)

        (xt, mt), (xi, mi) = seq(t), seq(im)
        y = torch.tensor([s.label for s in batch], device=te.device)
        loss = torch.nn.functional.cross_entropy(head(xt, mt, xi, mi), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(te.device)
    return time.perf_counter() - t0, len(train)


def bench_training(cfg: BenchConfig, data_dir: Path, text_dir: Path, image_dir: Path, tmp: Path) -> dict[str, Any]:
    from mmcache.fuse.data import load_data
    from mmcache.fuse.heads import list_heads
    from mmcache.fuse.train import TrainConfig, train

    heads = list(cfg.heads or list_heads())
    rows = []
    for features in ("cls", "tokens"):
        data = load_data("bench", modalities=("text", "image"), features=features, cache_dir=tmp / "cache",
                         device=cfg.device)
        for head in heads:
            tc = TrainConfig(head=head, dataset="bench", features=features, epochs=cfg.epochs, patience=0,
                             seed=cfg.seed, device=cfg.device, cache_dir=str(tmp / "cache"),
                             runs_dir=str(tmp / "runs"), modalities=["text", "image"])
            t0 = time.perf_counter()
            res = train(tc, data)
            total = time.perf_counter() - t0
            epoch_s = statistics.median(h["seconds"] for h in res.history)
            rows.append({"head": head, "features": features, "epochs": len(res.history),
                         "epoch_s": epoch_s, "run_s": total})
            log.info("train %s/%s: %.3fs/epoch, %.2fs/run", head, features, epoch_s, total)
    # The same training with the encoders in the loop: one epoch measured, extrapolated to the same
    # number of epochs as the cached run (the head's own cost is inside both).
    loop = {}
    for features in ("cls", "tokens"):
        ref = next(r for r in rows if r["features"] == features and r["head"] == ("dual_attention" if "dual_attention" in heads else heads[0]))
        epoch_s, n_train = _encoders_in_loop_epoch(cfg, data_dir, text_dir, image_dir, ref["head"], features)
        loop[features] = {"head": ref["head"], "epoch_s": epoch_s, "train_samples": n_train,
                          "extrapolated_run_s": epoch_s * ref["epochs"], "cached_run_s": ref["run_s"],
                          "cache_speedup": epoch_s * ref["epochs"] / ref["run_s"]}
    return {"rows": rows, "encoders_in_loop": loop}


# ------------------------------------------------------------------------------------------ 4. memory

def _child_peak_rss(kind: str, args: dict[str, Any]) -> float:
    """Peak RSS (MiB) of a fresh child process doing one job, its DataLoader workers included."""
    cmd = [sys.executable, "-m", "mmcache.bench.child", kind, json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCH_DIR.parent, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {kind} failed: {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"])


def bench_memory(cfg: BenchConfig, text_dir: Path, image_dir: Path, tmp: Path) -> dict[str, Any]:
    small, large = cfg.samples // 2, cfg.samples
    out = {}
    for n in (small, large):
        d = make_dataset(tmp / f"mem{n}", n, cfg.seed + 1, cfg.image_size)
        args = {"data_dir": str(d), "cache_dir": str(tmp / f"memcache{n}"), "text_model": str(text_dir),
                "image_model": str(image_dir), "device": cfg.device, "num_workers": cfg.num_workers,
                "precision": cfg.precision}
        out[f"extract_{n}"] = _child_peak_rss("extract", args)
    out["extract_growth"] = out[f"extract_{large}"] / out[f"extract_{small}"]
    out["train_tokens_mib"] = _child_peak_rss("train", {"cache_dir": str(tmp / "cache"), "device": cfg.device,
                                                        "features": "tokens", "epochs": 2})
    out["sizes"] = [small, large]
    return out


# ------------------------------------------------------------------------------------------ report

def _f(x, nd=1):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def format_report(r: dict[str, Any]) -> str:

    m = r["machine"]
    out = [f"## bench: preset {r['config']['preset']}, {r['config']['samples']} samples, device {m['device']}",
           f"machine: {m.get('gpu') or m.get('cpu')}, {m['cpu_count']} CPUs, torch {m['torch']} "
           f"({m['torch_threads']} threads), {m['platform']}"]
    if r.get("extraction"):
        out += _format_stages(r)
    if r.get("io"):
        from mmcache.bench.iopath import format_io

        out += format_io(r["io"])
    if r.get("grid"):
        from mmcache.bench.grid import format_grid

        out += format_grid(r["grid"])
    if r.get("scale"):
        from mmcache.bench.scale import format_scale

        out += format_scale(r["scale"])
    out += ["", f"total bench time: {r['seconds']:.0f} s"]
    return "\n".join(out)


def _format_stages(r: dict[str, Any]) -> list[str]:
    from mmcache.tables import format_table

    out = ["", "### 1. Extraction (samples/s)", ""]
    out.append(format_table(["modality", "batch", "limit (forward only)", "ours (extract)", "naive (1 by 1)",
                             "efficiency", "speedup vs naive"],
                            [[x["modality"], x["batch_size"], _f(x["limit_sps"]), _f(x["ours_sps"]), _f(x["naive_sps"]),
                              _f(x["efficiency"], 2), _f(x["speedup_vs_naive"], 1)] for x in r["extraction"]["rows"]]))
    io = r["cache_io"]
    out += ["", "### 2. Cache I/O", "",
            f"load {io['array']} ({io['bytes'] / 1e6:.1f} MB): cache {io['cache_gbps']:.2f} GB/s verified "
            f"({io.get('cache_unverified_gbps', float('nan')):.2f} without checksums) vs numpy .npy "
            f"{io['numpy_gbps']:.2f} GB/s (cache/numpy speed {io['cache_vs_numpy']:.2f})", "",
            format_table(["modality", "dtype", "patch pool", "tokens", "KB/sample on disk"],
                         [[s["modality"], s["dtype"], _f(s["patch_pool"]), s["tokens"], _f(s["bytes_per_sample"] / 1024)]
                          for s in io["sizes"]])]
    tr = r["training"]
    out += ["", "### 3. Stage two (train-fusion on the cache)", "",
            format_table(["head", "features", "epochs", "s/epoch", "s/run"],
                         [[x["head"], x["features"], x["epochs"], _f(x["epoch_s"], 3), _f(x["run_s"], 2)] for x in tr["rows"]]),
            "", format_table(["features", "head", "encoders-in-loop s/epoch", "extrapolated s/run", "cached s/run", "cache speedup"],
                             [[f, x["head"], _f(x["epoch_s"], 2), _f(x["extrapolated_run_s"], 1), _f(x["cached_run_s"], 2),
                               _f(x["cache_speedup"], 1) + "x"] for f, x in tr["encoders_in_loop"].items()])]
    if r.get("memory"):
        mem = r["memory"]
        a, b = mem["sizes"]
        out += ["", "### 4. Peak RSS (MiB, child process incl. workers)", "",
                format_table(["job", "peak RSS MiB"],
                             [[f"extract both, {a} samples", _f(mem[f"extract_{a}"])],
                              [f"extract both, {b} samples", _f(mem[f"extract_{b}"])],
                              ["growth (larger / smaller)", _f(mem["extract_growth"], 2)],
                              ["train-fusion tokens (all heads' data)", _f(mem["train_tokens_mib"])]])]
    return out


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every section; write ``results.json`` and ``results.md`` into ``cfg.out_dir``."""

    from mmcache.extract.tiny_models import build_preset

    from mmcache.common import resolve_device

    cfg.validate()
    cfg.device = device = resolve_device(cfg.device).type  # "auto" -> cuda or cpu; a missing GPU is an error
    t0 = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = [s for s in ("extraction", "cache_io", "training", "memory") if s in cfg.sections]
    if stages:  # sections 2-4 read the cache section 1 writes
        text_dir, image_dir = build_preset(cfg.preset, work / "models")
        data_dir = make_dataset(work / f"data{cfg.samples}", cfg.samples, cfg.seed, cfg.image_size)
    with tempfile.TemporaryDirectory(dir=work, prefix="run") as t:
        tmp = Path(t)
        result: dict[str, Any] = {"config": asdict(cfg), "machine": machine_info(device)}
        if stages:
            result["extraction"] = bench_extraction(cfg, data_dir, text_dir, image_dir, tmp)
            result["cache_io"] = bench_cache_io(cfg, data_dir, text_dir, image_dir, tmp)
            result["training"] = bench_training(cfg, data_dir, text_dir, image_dir, tmp)
            result["memory"] = bench_memory(cfg, text_dir, image_dir, tmp) if cfg.memory else None
        if "io" in cfg.sections:  # 5. the input/output path alone, with near-free encoders
            from mmcache.bench.iopath import bench_io

            result["io"] = bench_io(cfg, work, tmp)
        if "grid" in cfg.sections:
            from mmcache.bench.grid import bench_grid

            result["grid"] = bench_grid(tmp, device, samples=cfg.grid_samples, tokens_large=cfg.grid_tokens_large,
                                        heads=list(cfg.heads) if cfg.heads else None,
                                        partial=Path(cfg.out_dir) / "grid_partial.json")
        if "scale" in cfg.sections:  # past one machine's memory and disk (lean, merge, claim, stream)
            from mmcache.bench.scale import bench_scale

            result["scale"] = bench_scale(tmp / "scale")
    result["seconds"] = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(format_report(result) + "\n")
    return result


__all__ = ["BenchConfig", "format_report", "make_dataset", "run_bench"]
