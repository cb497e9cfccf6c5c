"""mmcache: extract multimodal features once into an HDF5 cache, train fusion heads on it in seconds.

Installed, this is the only top-level name: stage one is :mod:`mmcache.extract`, stage two
:mod:`mmcache.fuse`, the benchmark :mod:`mmcache.bench`, the command line :mod:`mmcache.cli`.

The Python API (:mod:`mmcache.api`, imported on first use so ``import mmcache`` stays fast)::

    mmcache.extract(dataset, **options)          # stage one -> ExtractSummary
    mmcache.train_fusion(head=..., dataset=...)  # stage two -> TrainResult (run_dir, metrics)
    mmcache.evaluate(run), mmcache.ablate(...), mmcache.analyze(run)
    mmcache.load_cache(dataset)                  # arrays + sample index as numpy (stored dtype)
    mmcache.Predictor.from_run(run).predict(texts=[...], images=[...])
    mmcache.inspect / datasets / cache_info / verify_cache / merge_cache / export_cache / import_cache,
    mmcache.bench, mmcache.demo: every other command, one call each; mmcache.EncoderSpec: an encoder's record

The cache contract is :mod:`mmcache.cache` (h5py + numpy, never torch).
"""

from pathlib import Path as _Path

# In a source checkout the stage packages sit beside this folder (the repository layout keeps
# `extract/` and `fuse/` at the top); pyproject maps them under `mmcache.` when installed.
_here = _Path(__file__).resolve().parent
if not (_here / "extract").is_dir() and (_here.parent / "extract" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)

__version__ = "0.1.0"

_API = {**{name: "mmcache.api" for name in (
            "train_fusion", "evaluate", "ablate", "analyze", "load_cache", "predict", "CacheArrays", "datasets",
            "inspect", "cache_info", "verify_cache", "merge_cache", "export_cache", "import_cache", "bench", "demo")},
        "Predictor": "mmcache.predict", "PredictionResult": "mmcache.predict", "EncoderSpec": "mmcache.cache",
        "BadInputError": "mmcache.errors", "PipelineError": "mmcache.errors", "CacheError": "mmcache.errors"}
__all__ = sorted([*_API, "extract"])


def __getattr__(name: str):
    """Lazy API: torch, transformers and h5py load on first use of a function, not on import."""
    import importlib

    if name == "extract":  # the stage-one package, callable as the API's extract (see extract/__init__.py)
        return importlib.import_module("mmcache.extract")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mmcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
