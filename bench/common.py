"""What every bench section shares: generated posts, median timing, device sync, machine facts, the
extract config of a bench run and the forward-only limits of an encoder (samples/s on ready batches)."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmcache.csvsafe import csv_dict

__all__ = ["extract_cfg", "image_limit", "machine_info", "make_dataset", "median_seconds", "sync", "text_limit"]


def make_dataset(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (320, 240)) -> Path:
    """``n`` posts as a `folder` dataset: JPEG photos-like images (smooth noise + shapes) and texts of
    8-60 common words. Reused when it already exists with the same parameters."""
    from mmcache.extract.tiny_models import DEFAULT_WORDS
    from PIL import Image, ImageDraw

    stamp = {"n": n, "seed": seed, "size": list(size), "v": 1}
    marker = root / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.asarray(DEFAULT_WORDS)
    rows = []
    for i in range(n):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
            draw.ellipse([x0, y0, x0 + 40, y0 + 40], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        name = f"images/b{i:05d}.jpg"
        img.save(root / name, quality=90)
        text = " ".join(rng.choice(words, size=int(rng.integers(8, 61))))
        rows.append({"id": f"b{i:05d}", "text": text, "image": name, "label": ("positive", "neutral", "negative")[i % 3]})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(csv_dict(r) for r in rows)
    marker.write_text(json.dumps(stamp))
    return root


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return info


def extract_cfg(cfg, data_dir: Path, cache_dir: Path, text_dir: Path, image_dir: Path, **kw):
    from mmcache.extract.extraction import ExtractConfig

    base = dict(dataset="folder", data_dir=str(data_dir), cache_dir=str(cache_dir), name="bench",
                text_model=str(text_dir), image_model=str(image_dir), device=cfg.device,
                precision=cfg.precision, num_workers=cfg.num_workers, progress=False, force=True)
    base.update(kw)
    return ExtractConfig(**base)


# ------------------------------------------------------------------------------------------ 1. extraction

def text_limit(enc, texts: list[str], bs: int, repeats: int) -> float:
    """Samples/s of ``enc.encode`` alone on pre-tokenized batches, cut exactly as ``extract`` cuts
    them (same length grouping), so the only difference from ours is everything around the forward."""
    from mmcache.extract.extraction import text_batches

    lengths = np.asarray([len(x) for x in enc.tokenizer(texts, truncation=True, max_length=enc.max_length)["input_ids"]])
    plan = text_batches(lengths, bs, window=64 * bs)
    batches = [enc.tokenize([texts[i] for i in rows]) for rows in plan]

    def run():
        for b in batches:
            enc.encode(b)
        sync(enc.device)

    return len(texts) / median_seconds(run, repeats)


def image_limit(enc, files: list[str], bs: int, repeats: int) -> float:
    """Samples/s of ``enc.encode`` alone on pre-decoded, pre-processed batches in memory."""
    from PIL import Image

    pixels = []
    for i in range(0, len(files), bs):
        imgs = [Image.open(p).convert("RGB") for p in files[i:i + bs]]
        pixels.append(enc.preprocess(imgs))

    def run():
        for px in pixels:
            enc.encode(px)
        sync(enc.device)

    return len(files) / median_seconds(run, repeats)


