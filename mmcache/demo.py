"""`make demo`: both stages end to end on the built-in demo data with tiny local encoders (the facade:
it is the one place that runs stage one and stage two together, so it lives above both).

1. build (or reuse) a tiny random BERT whose vocabulary knows the demo words and a tiny DINOv2;
2. extract the generated demo posts into ``cache/demo/`` (the real extraction path: DataLoader
   workers, HDF5 cache, resume rules);
3. run the ablation grid (every head x cls/tokens x seeds) and return its table.

The demo data put the sentiment in the text, in the image, in both, or only in their combination
(see :mod:`extract.datasets.demo`), so fusion heads should beat both single-modality baselines.
Encoders are random, so absolute numbers mean nothing beyond this demo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.fuse.ablate import AblationConfig, AblationResult, run_ablation
from mmcache.fuse.train import TrainConfig

log = logging.getLogger(__name__)

# Small heads for tiny (32-d) features: the paper's dim 256 only slows the demo down, and a higher lr
# converges within the epoch budget on ~500 training posts.
DEMO_TRAINING = dict(dim=64, lr=1e-3, epochs=40, patience=10, batch_size=32)


@dataclass
class DemoConfig:
    cache_dir: str = "cache"
    runs_dir: str = "runs/demo"
    results_dir: str | None = None  # None: results/<runs folder name>, i.e. results/demo
    n: int = 600  # demo posts; 8:1:1 split
    seeds: int = 3
    features: list[str] = field(default_factory=lambda: ["mean", "tokens"])
    jobs: int = 0  # 0 = auto (processes on CPU)
    threads: int | None = None
    progress: bool | None = None
    plots: bool = True
    epochs: int | None = None  # override DEMO_TRAINING's (tests use a couple)


@dataclass
class DemoResult:
    extract: Any  # extract.extraction.ExtractSummary
    ablation: AblationResult


def run_demo(cfg: DemoConfig) -> DemoResult:
    from mmcache.cache import CacheMismatchError
    from mmcache.extract.demo_models import IMAGE_NAME, TEXT_NAME, ensure_demo_models
    from mmcache.extract.extraction import ExtractConfig, run_extract

    cache = Path(cfg.cache_dir)
    text_dir, image_dir = ensure_demo_models(cache / "models")
    ecfg = ExtractConfig(
        dataset="demo", data_dir=cache / "demo" / "data", options={"n": cfg.n}, cache_dir=cache,
        text_model=str(text_dir), image_model=str(image_dir), text_name=TEXT_NAME, image_name=IMAGE_NAME,
        device="cpu", precision="fp32",
        num_workers=1, progress=cfg.progress)
    try:
        summary = run_extract(ecfg)
    except CacheMismatchError as e:
        # The demo owns cache/demo: a cache from an older demo (other n, other tiny models) is rebuilt
        # rather than refused. User datasets never get this treatment.
        log.warning("rebuilding the demo cache: %s", e)
        ecfg.force = True
        summary = run_extract(ecfg)
    log.info("demo cache ready in %s (%d samples)", cache / "demo", summary.num_samples)
    ablation = run_ablation(AblationConfig(
        datasets=["demo"], features=list(cfg.features), seeds=cfg.seeds,
        base=TrainConfig(**{**DEMO_TRAINING, **({"epochs": cfg.epochs} if cfg.epochs else {})}, device="cpu"), cache_dir=str(cache), runs_dir=cfg.runs_dir,
        results_dir=cfg.results_dir, jobs=cfg.jobs, threads=cfg.threads, plots=cfg.plots))
    return DemoResult(summary, ablation)
