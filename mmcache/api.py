"""The Python API: every command of the CLI as one function call (re-exported lazily by ``mmcache``).

>>> import mmcache
>>> summary = mmcache.extract("demo", cache_dir="cache", text_model="cache/models/bert-demo",
...                           image_model="cache/models/dinov2-demo", device="cpu")   # doctest: +SKIP
>>> run = mmcache.train_fusion(head="basic", dataset="demo", features="mean")         # doctest: +SKIP
>>> run.metrics["test"]["macro_f1"]                                                   # doctest: +SKIP
>>> mmcache.Predictor.from_run(run.run_dir).predict(texts=["I love sunny days"], images=["sun.png"])  # doctest: +SKIP

Library functions raise :class:`mmcache.errors.BadInputError` (the call must change) or
:class:`mmcache.errors.PipelineError` (a run-time failure); they never print or exit.

Each function imports the stage modules it calls when it is called: they pull torch and transformers
(2.4 s measured), and ``import mmcache``, ``cache info`` or ``--help`` must not pay for them (a test
checks that ``import mmcache`` loads no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CacheArrays", "ablate", "analyze", "bench", "cache_info", "datasets", "demo", "evaluate", "export_cache",
           "extract", "import_cache", "inspect", "load_cache", "merge_cache", "predict", "train_fusion",
           "verify_cache"]


def extract(dataset: str, *, keep_shards: bool = False, dist_backend: str = "auto",
            dist_timeout_s: float | None = None, engine: str = "local", ray_address: str | None = None,
            **options: Any):
    """Stage one: encode ``dataset`` into ``cache_dir/<dataset>/`` (any
    :class:`~mmcache.extract.extraction.ExtractConfig` field as a keyword: ``data_dir``, ``text_model``,
    ``image_model``, ``device``, ``batch_size``, ``dtype``, ...). Resumes, or is a no-op when up to date.
    ``shard`` may be ``"i/n"`` (or ``"i"`` with ``num_shards=n``) as on the command line. Under torchrun
    (``RANK`` / ``WORLD_SIZE`` set) each rank extracts its part and rank 0 merges them
    (``keep_shards``, ``dist_backend``, ``dist_timeout_s``: :mod:`mmcache.extract.distributed`).
    ``engine="ray"``: the shards run on a Ray cluster (``ray_address``, default a local one;
    :mod:`mmcache.extract.ray_engine`, the ``ray`` extra). Returns the
    :class:`~mmcache.extract.extraction.ExtractSummary` (rank 0: of the merged files)."""
    from mmcache.errors import BadInputError
    from mmcache.extract.distributed import DEFAULT_TIMEOUT_S, run_distributed_extract
    from mmcache.extract.extraction import ExtractConfig, parse_shard

    shard, num_shards = options.pop("shard", None), options.pop("num_shards", None)
    if shard is None or isinstance(shard, str):  # the command line's form; None -> (0, 1)
        shard = parse_shard(shard, num_shards)
    cfg = ExtractConfig(dataset=dataset, shard=tuple(shard), **options)
    if engine not in ("local", "ray"):
        raise BadInputError(f"--engine must be local or ray, got {engine!r}")
    if engine == "ray":
        from mmcache.extract.ray_engine import run_ray_extract

        return run_ray_extract(cfg, address=ray_address, keep_shards=keep_shards)
    if ray_address is not None:
        raise BadInputError("--ray-address needs --engine ray")
    return run_distributed_extract(cfg, keep_shards=keep_shards, backend=dist_backend,
                                   timeout_s=DEFAULT_TIMEOUT_S if dist_timeout_s is None else dist_timeout_s)


def train_fusion(config: str | Path | dict[str, Any] | None = None, *, progress: bool | None = False, data=None,
                 allow_no_val: bool = False, expected_split: dict[str, Any] | None = None, track=None,
                 **options: Any):
    """Stage two: train one head on a cache. ``config``: a JSON file or dict (e.g. a run's
    config.json); keyword options (any :class:`~mmcache.fuse.train.TrainConfig` field: ``head``,
    ``dataset``, ``features``, ``epochs``, ...) override it. ``allow_no_val`` / ``expected_split``: as
    :func:`mmcache.fuse.train.train`. ``track``: ``"auto"``, ``"tensorboard"``, ``"none"`` or a list of
    run-logger factories (:mod:`mmcache.fuse.tracking`); None keeps the process's choice (none unless set).
    Returns the :class:`~mmcache.fuse.train.TrainResult`: ``run_dir``, resolved ``config``, ``metrics``,
    ``history``."""
    from mmcache.fuse import tracking
    from mmcache.fuse.train import TrainConfig, train

    base = TrainConfig.from_json(config).to_dict() if isinstance(config, (str, Path)) else dict(config or {})
    with tracking.tracking(tracking.active() if track is None else track):
        return train(TrainConfig.from_dict({**base, **options}), data, progress=progress,
                     allow_no_val=allow_no_val, expected_split=expected_split)


def evaluate(run: str | Path, dataset: str | None = None, split: str = "test", *,
             cache_dir: str | Path | None = None, **options: Any):
    """Score a finished run again, on its own test split or another cached dataset
    (:func:`mmcache.fuse.evaluate.evaluate`, through :func:`mmcache.fuse.scoring.open_for_scoring`).
    ``cache_dir``: the cache root to read (default: the one the run recorded, as an absolute path).
    Returns an :class:`~mmcache.fuse.evaluate.EvalResult`."""
    from mmcache.fuse.evaluate import evaluate as _evaluate

    return _evaluate(run, dataset, split, cache_dir=cache_dir, **options)


def ablate(datasets: list[str] | None = None, *, base: str | Path | dict[str, Any] | None = None,
           overrides: dict[str, Any] | None = None, track=None, **options: Any):
    """A grid of heads x features x encoders x seeds (:class:`~mmcache.fuse.ablate.AblationConfig`
    fields as keywords: ``heads``, ``features``, ``seeds``, ``jobs``, ``cache_dir``, ``shard`` (``"i/n"``
    or ``(i, n)``), ...); ``base``: the training config every run starts from (a JSON file or dict),
    ``overrides``: TrainConfig fields that replace the base's; ``track``: as :func:`train_fusion` (each run
    logs into its own ``tb/``, so ``tensorboard --logdir <runs_dir>`` compares the grid). Returns the
    :class:`~mmcache.fuse.ablate.AblationResult` (``tables`` as written to ``results/ablation_<dataset>.*``)."""
    from mmcache.extract.extraction import parse_shard
    from mmcache.fuse import tracking
    from mmcache.fuse.ablate import AblationConfig, run_ablation
    from mmcache.fuse.train import TrainConfig

    start = TrainConfig.from_json(base).to_dict() if isinstance(base, (str, Path)) else dict(base or {})
    if isinstance(options.get("shard"), str):
        options["shard"] = parse_shard(options["shard"])
    config = TrainConfig.from_dict({**start, **(overrides or {})})
    with tracking.tracking(tracking.active() if track is None else track):
        return run_ablation(AblationConfig(datasets=datasets, base=config, **options))


def datasets() -> dict[str, Any]:
    """Every known dataset reader by name: its :class:`~mmcache.extract.datasets.DatasetSpec`
    (description, folder layout, options, default folders, download hint)."""
    from mmcache.extract.datasets import get_dataset, list_datasets

    return {name: get_dataset(name) for name in list_datasets()}


def inspect(dataset: str, *, data_dir: str | Path | None = None, options: dict[str, Any] | None = None,
            split_file: str | Path | None = None, seed: int | None = None,
            cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What a dataset holds before any extraction: counts per class and split, dropped samples by
    reason, decode fallbacks. ``cache_dir``: also compare with the split that cache root holds for the
    dataset (what ``extract`` would keep; key ``cache_split``). Returns the summary dict."""
    from mmcache import cache as cf
    from mmcache.extract.config import ExtractConfig
    from mmcache.extract.datasets import load_dataset
    from mmcache.extract.index_prep import cache_name
    from mmcache.extract.split_policy import preview_split
    from mmcache.extract.summary import summarize

    result = load_dataset(dataset, data_dir, **(options or {}))
    index_path = stored = None
    if cache_dir is not None:
        index_path = Path(cache_dir) / cache_name(ExtractConfig(dataset=dataset), Path(result.root)) / cf.INDEX_NAME
        stored = cf.read_index(index_path) if index_path.is_file() else None
    split, note = preview_split(result.samples, stored, split_file=split_file, seed=seed, index_path=index_path)
    summary = summarize(result, split)
    summary["cache_split"] = note
    return summary


def cache_info(path: str | Path = "cache") -> list[dict[str, Any]]:
    """Every cache file under ``path`` (a file, a dataset folder or the cache root): shapes, dtypes,
    size on disk, provenance, completeness, failure count."""
    from mmcache.cache.info import collect

    return collect(path)


def verify_cache(path: str | Path = "cache") -> list[dict[str, Any]]:
    """Read every feature file under ``path`` whole; each entry's ``status`` says ``ok``, ``damaged``
    (checksum mismatch, NaN/Inf) or ``unreadable``."""
    from mmcache.cache.info import verify

    return verify(path)


def merge_cache(paths: list[str | Path], *, keep_shards: bool = False, force: bool = False,
                copy: bool = False) -> list:
    """Combine the shard files of ``extract --shard i/n`` runs into the normal feature files
    (:func:`mmcache.cache.merge_paths`): virtual files over the shards (kept), or with ``copy`` verified
    copies (shards removed unless ``keep_shards``); returns one MergeResult per shard set."""
    from mmcache.cache import merge_paths

    return merge_paths(paths, keep_shards=keep_shards, force=force, copy=copy)


def bench(**options: Any) -> dict[str, Any]:
    """Measure both stages (:class:`~mmcache.bench.run.BenchConfig` fields as keywords; ``only``: a
    list of sections, ``extraction`` standing for extraction, cache_io, training and memory). Writes
    ``out_dir/results.json`` and ``results.md``; returns the results dict."""
    from mmcache.bench.run import BenchConfig, run_bench

    only = options.pop("only", None)
    cfg = BenchConfig(**options)
    if only:
        group = ("extraction", "cache_io", "training", "memory")
        cfg.sections = tuple(dict.fromkeys(s for n in only for s in (group if n == "extraction" else (n,))))
    return run_bench(cfg)


def demo(**options: Any):
    """Both stages end to end on the built-in demo data with tiny local encoders
    (:class:`~mmcache.demo.DemoConfig` fields as keywords). Returns the DemoResult."""
    from mmcache.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(**options))


@dataclass
class CacheArrays:
    """One dataset's cache as numpy. ``index``: ``id, label, split, text, image_path`` (N,) arrays
    plus the index's extra fields; ``features[modality][field]``: ``cls``/``mean`` (N, D), ``tokens``
    (N, L, D), ``mask`` (N, L) bool (True = real token); ``valid[modality]``: (N,) bool; ``info``:
    each file's config and provenance."""

    dataset: str
    classes: list[str]
    index: dict[str, np.ndarray]
    features: dict[str, dict[str, np.ndarray]]
    valid: dict[str, np.ndarray]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_cache(dataset: str | None = None, *, fields: tuple[str, ...] = ("cls",), cache_dir: str | Path = "cache",
               text_cache: str | Path | None = None, image_cache: str | Path | None = None,
               modalities: tuple[str, ...] = ("text", "image"), dtype: str | None = None) -> CacheArrays:
    """A cached dataset's arrays and sample index as numpy (``dataset`` None: the only one cached).
    ``fields``: any of ``cls``, ``mean``, ``tokens``, ``mask``. ``dtype`` None (the default) keeps the
    stored dtype (float16 for a default cache: half the memory of float32); ``dtype="float32"`` casts
    the float arrays (``mask`` stays bool)."""
    from mmcache import cache as cf
    from mmcache.fuse.data import find_cache, resolve_dataset

    dataset = resolve_dataset(cache_dir, dataset)
    idx = cf.read_index(Path(cache_dir) / dataset / cf.INDEX_NAME)
    index = {"id": idx.ids, "label": idx.labels, "split": idx.splits, "text": idx.texts,
             "image_path": idx.image_paths, **idx.extra}
    given = {"text": text_cache, "image": image_cache}
    feats, valid, info = {}, {}, {}
    for m in modalities:
        with cf.FeatureFile(find_cache(cache_dir, dataset, m, given[m])) as ff:
            feats[m], valid[m] = ff.load(fields, dtype=dtype), ff.valid
            info[m] = {"path": str(ff.path), "config": ff.config, "provenance": ff.provenance, "grid": ff.grid}
    return CacheArrays(dataset=dataset, classes=list(idx.classes), index=index, features=feats, valid=valid, info=info)


def export_cache(dataset: str | None = None, *, out: str | Path, format: str = "npy",
                 fields: tuple[str, ...] = ("cls", "mean"), cache_dir: str | Path = "cache",
                 text_cache: str | Path | None = None, image_cache: str | Path | None = None,
                 modalities: tuple[str, ...] | None = None):
    """Write a cached dataset's ids, labels, split and ``fields`` (``cls``, ``mean``, ``tokens``,
    ``mask``, ``proj``) per modality to the folder ``out`` as ``format`` ``npy`` (one .npy per array +
    metadata.json), ``parquet`` (one file per modality) or ``hf`` (a ``datasets.Dataset`` saved to disk),
    with every feature file's provenance in the metadata (:mod:`mmcache.cache.export`). ``modalities``
    None: each modality that has a feature file. parquet / hf need ``pip install mmcache[export]``.
    Returns an :class:`~mmcache.cache.export.ExportResult`."""
    from mmcache.cache.export import export_features
    from mmcache.errors import BadInputError, CacheError
    from mmcache.fuse.data import find_cache, resolve_dataset

    dataset = resolve_dataset(cache_dir, dataset)
    given = {"text": text_cache, "image": image_cache}
    files = {}
    for m in modalities or ("text", "image"):
        try:
            files[m] = find_cache(cache_dir, dataset, m, given[m])
        except CacheError:  # no file of this modality: exported only when asked for by name
            if modalities:
                raise
    if not files:
        raise BadInputError(f"no feature files in {Path(cache_dir) / dataset}/ to export")
    return export_features(Path(cache_dir) / dataset / "index.h5", files, out, fmt=format, fields=list(fields))


def import_cache(dataset: str, paths: list[str | Path], *, cache_dir: str | Path = "cache",
                 modality: str | None = None, name: str | None = None, force: bool = False) -> list:
    """Bring features made elsewhere into ``cache_dir/<dataset>/`` as feature files stage two trains on:
    ``paths`` are npy folders (``ids.npy`` + ``<modality>.<field>.npy``, an ``npy`` export's layout) or
    parquet files (an ``id`` column + feature columns). The ids must be in the dataset's sample index,
    unless there is none and the input is an mmcache export (then its ids, labels, split and classes
    become the index). Provenance records ``family: "imported"``: encoder identity cannot be checked.
    Returns one :class:`~mmcache.cache.export.ImportResult` per modality."""
    from mmcache.cache.export import import_features

    return import_features(cache_dir, dataset, list(paths), modality=modality, name=name, force=force)


def predict(run: str | Path, *, texts=None, images=None, manifest: str | Path | None = None,
            dataset: str | None = None, data_dir: str | Path | None = None, split: str | None = "test",
            options: dict[str, Any] | None = None, split_file: str | Path | None = None, seed: int = 0,
            ids=None, labels=None, device: str = "auto", calibrated: bool = False,
            cache_features: str | Path | None = None, batch_size: int = 32, num_workers: int | None = None,
            cache_dir: str | Path | None = None, text_model: str | Path | None = None,
            image_model: str | Path | None = None, verbose: bool = False):
    """Label posts with a finished run: parallel ``texts`` / ``images`` lists, a ``manifest`` (the
    ``folder`` format, label optional), or a ``dataset`` reader's ``split``. Returns a
    :class:`~mmcache.predict.PredictionResult` (rows, probabilities, metrics when labelled).

    The run's manifest is checked; with ``dataset`` (the run's own) its ``split.json`` decides the
    posts of ``split`` (:func:`mmcache.fuse.scoring.split_for_posts`). ``cache_dir``: where the run's
    cache index is (default: the run's recorded cache root). ``text_model`` / ``image_model``: the
    encoder folders when they moved; their weights must still be the recorded ones. Quiet
    (no transformers progress bars or warnings) unless ``verbose``."""
    from mmcache.errors import BadInputError
    from mmcache.fuse.runs import RunFolder
    from mmcache.fuse.scoring import split_for_posts
    from mmcache.posts import dataset_posts, posts_from_lists, read_manifest
    from mmcache.predict import Predictor

    modes = [texts is not None or images is not None, manifest is not None, dataset is not None]
    if sum(modes) != 1:
        raise BadInputError("give exactly one input: one post (--text/--image), --manifest FILE, or --dataset NAME")
    predictor = Predictor.from_run(run, device=device, calibrated=calibrated, text_model=text_model,
                                   image_model=image_model)
    name = "posts"
    if manifest is not None:
        posts, name = read_manifest(manifest), "manifest"
    elif dataset is not None:
        folder = RunFolder(run)
        run_split = split_for_posts(folder, dataset, split_file=split_file, cache_dir=cache_dir)
        run_index = _run_index(folder, cache_dir)
        posts, name = dataset_posts(dataset, data_dir, split, options=options, run_index=run_index,
                                    split_file=split_file, seed=seed, run_split=run_split,
                                    target=predictor.target, require_run_split=run_split is not None), dataset
    else:
        posts = posts_from_lists(texts, images, ids, labels)
    return predictor.predict_posts(posts, cache_features=cache_features, name=name, batch_size=batch_size,
                                   num_workers=num_workers, verbose=verbose)


def _run_index(folder, cache_dir: str | Path | None) -> Path | None:
    """The run's cache index: under ``cache_dir`` when given, else where the run recorded it."""
    from mmcache import cache as cf
    from mmcache.fuse.config import load_run_config

    prov = folder.provenance()
    if cache_dir is not None:
        return Path(cache_dir) / str(prov.get("dataset") or load_run_config(folder).dataset) / cf.INDEX_NAME
    path = (prov.get("index") or {}).get("path")
    return Path(path) if path else None


def analyze(run: str | Path, *, cache_dir: str | Path | None = None, split_choice: str | None = None,
            **options: Any):
    """Curves, calibration (temperature scaling fitted on val, stored in the run when it could be
    fitted), attention shares and the HTML report into ``<run>/analysis/``
    (:func:`mmcache.fuse.analyze.analyze_run`, through :func:`mmcache.fuse.scoring.open_for_scoring`).
    ``cache_dir``: the cache root (default: the run's recorded one); ``split_choice``: ``"original"`` /
    ``"current"`` after a re-split, as for :func:`evaluate`. Token strings for the text heat maps come
    from the run's recorded tokenizer when it can be loaded."""
    from mmcache.fuse.analyze import analyze_run
    from mmcache.predict import recorded_tokenizer

    options.setdefault("tokenize", recorded_tokenizer(run))
    return analyze_run(run, cache_dir=cache_dir, split_choice=split_choice, **options)
