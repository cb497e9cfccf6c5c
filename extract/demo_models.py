"""Tiny local encoders for the demo: a BERT whose vocabulary knows every demo word, and a DINOv2.

Random weights (see :mod:`extract.tiny_models`), loaded through the same ``AutoModel`` path as real
checkpoints, so ``make demo`` runs stage one end to end offline in seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from mmcache.extract import tiny_models as tm
from mmcache.extract.datasets.demo import demo_words

log = logging.getLogger(__name__)

TEXT_NAME = "bert-demo"
IMAGE_NAME = "dinov2-demo"
DEMO_BERT = dict(hidden_size=32, num_layers=2, num_heads=2, seed=0)
DEMO_DINOV2 = dict(hidden_size=32, num_layers=2, num_heads=2, patch_size=8, image_size=64, seed=0)


def _ensure(folder: Path, kind: str, builder, kwargs: dict) -> Path:
    if tm.is_complete(folder, kind, tm.full_kwargs(builder, kwargs)):
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    builder(tmp, **kwargs)  # writes its completion marker last
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log.info("built demo model %s", folder)
    return folder


def ensure_demo_models(root: str | Path = "cache/models") -> tuple[Path, Path]:
    """Build (or reuse) ``root/bert-demo`` and ``root/dinov2-demo``; returns ``(text_dir, image_dir)``.

    Idempotent: a folder whose completion marker matches these settings is reused untouched; a
    missing, interrupted or outdated one is rebuilt in a temporary folder and moved into place."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    text_dir = _ensure(root / TEXT_NAME, "bert", tm.build_bert, {**DEMO_BERT, "vocab_words": demo_words()})
    image_dir = _ensure(root / IMAGE_NAME, "dinov2", tm.build_dinov2, dict(DEMO_DINOV2))
    return text_dir, image_dir
