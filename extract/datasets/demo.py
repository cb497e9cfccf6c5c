"""A built-in, generated dataset for the demo and the tests (no download, deterministic from a seed).

Each post is one of four kinds (kept as the extra field ``group``):

* ``text``   (30%): the sentiment is in a cue word of the text; the image is a label-free scribble.
* ``image``  (30%): the sentiment is in the image (smiling / flat / frowning face); the text is filler.
* ``both``   (15%): both carry the same cue.
* ``combo``  (25%): only the combination tells: the text hopes for sun or rain, the image shows sun or
  rain; a wish that came true is positive, one that did not is negative. Neither half alone says which.

So a text-only model tops out near 0.3+0.15+0.3/3+0.25/2 ~ 0.68 accuracy, an image-only one likewise,
and a fusion model can reach ~1.0: the point of the demo is that fusion visibly wins.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from mmcache.extract.datasets import SENTIMENT3, DatasetSpec, LoadResult, Target, register_dataset
from mmcache.extract.datasets.folder import load_folder
from PIL import Image, ImageDraw

from mmcache.errors import BadInputError

GENERATOR_VERSION = 1
CUE_WORDS = {
    "positive": ("love", "great", "happy", "wonderful", "amazing", "best"),
    "neutral": ("okay", "fine", "average", "normal", "usual", "plain"),
    "negative": ("hate", "awful", "sad", "terrible", "worst", "angry"),
}
FILLER = ("the bus was on time", "we had lunch near the station", "posted from my phone",
          "the meeting moved to monday", "new photo from the trip", "read the report tonight",
          "the train left at nine", "my cat sat on the desk")
FACE_COLOR = {"positive": (250, 210, 40), "neutral": (150, 150, 150), "negative": (220, 40, 40)}
SIZE = 64


def _face(draw: ImageDraw.ImageDraw, rng: np.random.Generator, label: str) -> None:
    cx, cy = (int(v) for v in rng.integers(24, 40, size=2))
    r = int(rng.integers(16, 22))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=FACE_COLOR[label], outline=(0, 0, 0))
    draw.ellipse([cx - r // 2 - 2, cy - r // 3 - 2, cx - r // 2 + 2, cy - r // 3 + 2], fill=(0, 0, 0))
    draw.ellipse([cx + r // 2 - 2, cy - r // 3 - 2, cx + r // 2 + 2, cy - r // 3 + 2], fill=(0, 0, 0))
    box = [cx - r // 2, cy, cx + r // 2, cy + r // 2]
    if label == "positive":
        draw.arc(box, 20, 160, fill=(0, 0, 0), width=2)
    elif label == "negative":
        draw.arc([box[0], box[1] + r // 4, box[2], box[3] + r // 4], 200, 340, fill=(0, 0, 0), width=2)
    else:
        draw.line([box[0], cy + r // 3, box[2], cy + r // 3], fill=(0, 0, 0), width=2)


def _weather(draw: ImageDraw.ImageDraw, rng: np.random.Generator, sunny: bool) -> None:
    if sunny:
        draw.rectangle([0, 0, SIZE, SIZE], fill=(120, 190, 250))
        x, y = (int(v) for v in rng.integers(12, 52, size=2))
        draw.ellipse([x - 10, y - 10, x + 10, y + 10], fill=(255, 160, 0))
    else:
        draw.rectangle([0, 0, SIZE, SIZE], fill=(60, 60, 80))
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, 48, size=2))
            draw.ellipse([x, y // 3, x + 24, y // 3 + 12], fill=(110, 110, 120))
        for _ in range(12):
            x, y = (int(v) for v in rng.integers(0, SIZE, size=2))
            draw.line([x, y, x - 3, y + 8], fill=(80, 120, 255), width=1)


def _scribble(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    draw.rectangle([0, 0, SIZE, SIZE], fill=tuple(int(v) for v in rng.integers(180, 256, size=3)))
    for _ in range(4):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, SIZE, size=4))
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line([x0, y0, x1, y1], fill=col, width=int(rng.integers(1, 4)))


def generate_demo(out_dir: Path, n: int = 600, seed: int = 0) -> Path:
    """Write ``n`` posts (PNG images + ``manifest.csv``) into ``out_dir``; returns the manifest path.

    Reuses an existing folder made with the same ``n``, ``seed`` and generator version."""
    if n < 1:
        raise BadInputError(f"demo dataset needs n >= 1 posts, got {n}")
    out_dir = Path(out_dir)
    stamp = {"n": n, "seed": seed, "version": GENERATOR_VERSION}
    marker = out_dir / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out_dir / "manifest.csv"
    if out_dir.exists():
        shutil.rmtree(out_dir / "images", ignore_errors=True)
        marker.unlink(missing_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = rng.choice(["text", "image", "both", "combo"], size=n, p=[0.3, 0.3, 0.15, 0.25])
    rows = []
    for i, group in enumerate(groups):
        img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        filler = str(rng.choice(FILLER))
        if group == "combo":
            wish_sun, is_sun = bool(rng.integers(2)), bool(rng.integers(2))
            label = "positive" if wish_sun == is_sun else "negative"
            text = f"hoping for {'sun' if wish_sun else 'rain'} today, {filler}"
            _weather(draw, rng, is_sun)
        else:
            label = SENTIMENT3[int(rng.integers(3))]
            cue = str(rng.choice(CUE_WORDS[label]))
            text = f"{filler}, {cue}" if group in ("text", "both") else filler
            if group in ("image", "both"):
                _face(draw, rng, label)
            else:
                _scribble(draw, rng)
        name = f"images/demo_{i:04d}.png"
        img.save(out_dir / name)
        rows.append({"id": f"demo_{i:04d}", "text": text, "image": name, "label": label, "group": group})
    with open(out_dir / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    marker.write_text(json.dumps(stamp))  # written last: a half-generated folder is regenerated
    return out_dir / "manifest.csv"


def demo_words() -> list[str]:
    """Every word the demo texts use (so a tiny demo tokenizer can give each its own id)."""
    words = {w for ws in CUE_WORDS.values() for w in ws}
    words |= {w.strip(",") for f in FILLER for w in f.split()}
    words |= {"hoping", "for", "sun", "rain", "today"}
    return sorted(words)


def load_demo(root: Path, *, n: int = 600, seed: int = 0) -> LoadResult:
    generate_demo(root, n=n, seed=seed)
    result = load_folder(root, classes=",".join(SENTIMENT3))
    result.dataset = "demo"
    result.targets = ()  # the registry's (below), not the folder reader's
    return result


register_dataset(DatasetSpec(
    name="demo",
    description="built-in generated posts (sentiment in text, image, both, or only their combination)",
    layout="generated on first use into the data folder (default cache/demo/data)",
    loader=load_demo,
    options={"n": (int, 600, "number of posts"), "seed": (int, 0, "generator seed")},
    default_dirs=("cache/demo/data",), generates_data=True,
    targets=(Target("sentiment", SENTIMENT3, description="the post's sentiment"),),
))
