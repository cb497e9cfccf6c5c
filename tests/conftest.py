"""Helpers shared by the test modules (one copy instead of one per module).

``run_cli(capsys, *argv)`` runs the command line in this process as a user would (``cli.main`` returns
the exit code instead of exiting) and returns ``(code, stdout, stderr)``; ``one_error_line(err)`` asserts
the house rule for a refused call (exactly one ``error:`` line, never a traceback) and returns it.
Test modules import them: ``from conftest import run_cli``.
"""

from __future__ import annotations

from mmcache import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``cli.main(argv)`` with captured output: (exit code, stdout, stderr); arguments may be Paths."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The one ``error:`` line of a refused call's stderr (transformers' own load bars aside)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ a small posts folder and tiny encoders
# Shared by the sharding tests (distributed, claim, virtual merge, ray): a `folder` dataset of ``n`` posts
# with images of ragged sizes and one row of each modality failing where a test wants it.

WORDS = "i love this great day but hate the awful rain so sad today with friends".split()


def write_posts(root, n: int, seed: int, *, empty_text: int | None = 9, missing_image: int | None = None,
                max_words: int = 25):
    """``root/manifest.csv`` + ``root/img/p<i>.png``: post ``empty_text`` has no text, post ``missing_image``
    names an image that does not exist (both fail in extraction); returns ``root``."""
    import csv

    import numpy as np
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = f"img/p{i:02d}.png"
        if i == missing_image:
            name = "img/missing.png"
        else:
            Image.fromarray(rng.integers(0, 256, size=(int(rng.integers(20, 50)), 30, 3), dtype=np.uint8)).save(root / name)
        text = "" if i == empty_text else " ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words))))
        rows.append({"id": f"p{i:02d}", "text": text, "image": name, "label": ["positive", "neutral", "negative"][i % 3]})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        w.writerows(rows)
    return root


def tiny_encoders(root, seed: int) -> dict:
    """``{"bert": folder, "dinov2": folder}``: 16-d random BERT and DINOv2 (32 px, patch 8) built locally."""
    from mmcache.extract import tiny_models as tm

    return {"bert": tm.build_bert(root / "bert", hidden_size=16, num_heads=2, seed=seed),
            "dinov2": tm.build_dinov2(root / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32,
                                      seed=seed + 1)}


def extract_args(data, models, cache, *extra, batch_size: int = 1, max_len: int = 16) -> list[str]:
    """``cli.py extract`` arguments for :func:`write_posts` data and :func:`tiny_encoders` models (float32, CPU,
    no workers, no progress bars), then ``extra``."""
    return ["extract", "--dataset", "folder", "--data-dir", str(data), "--cache-dir", str(cache),
            "--text-model", str(models["bert"]), "--image-model", str(models["dinov2"]),
            "--text-max-length", str(max_len), "--dtype", "float32", "--device", "cpu", "--batch-size", str(batch_size),
            "--num-workers", "0", "--no-progress", *extra]


def extract_cfg(data, models, cache, **kw):
    """The :class:`ExtractConfig` of :func:`extract_args` (batch size 1, text length 16), ``kw`` overriding."""
    from mmcache.extract.extraction import ExtractConfig

    base = dict(dataset="folder", data_dir=data, cache_dir=cache, text_model=str(models["bert"]),
                image_model=str(models["dinov2"]), text_max_length=16, dtype="float32", device="cpu", batch_size=1,
                num_workers=0, progress=False)
    return ExtractConfig(**{**base, **kw})
