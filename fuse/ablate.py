"""Batch ablations: every head x features x encoder x seed on every cached dataset, tables at the end.

The grid (:func:`expand_grid`): datasets (default: every folder of ``cache_dir`` with a sample index)
x heads (default: all registered) x features (default ``cls``, ``tokens``) x seeds (default 0..4) x
encoders (each combination of a complete text feature file and a complete image feature file of the
dataset; with one file per modality this axis has one value). Each cell is a
:class:`fuse.train.TrainConfig`; its **key** is a short hash of that config (without ``runs_dir``,
``run_name``, ``device``, ``threads`` and ``cache_dir``; feature files by name) plus a fingerprint of
the data it reads (sample index ids, labels, splits and classes; each feature file's settings). The
run folder is ``<runs_dir>/<dataset>/<head>-<features>-<text slug>+<image slug>-s<seed>-<key>``, so:

* a finished run (``metrics.json`` present and its ``config.json`` matching) is reused, never retrained;
* a folder without ``metrics.json`` (interrupted, or failed last time) is removed and the run redone;
* re-extracting or re-splitting a cache changes the key: the old runs are simply not part of the grid;
* ``force`` reruns everything in the grid (or in this shard of it).

Every head of one (dataset, encoder, features) group trains on the same samples: the group's data is
loaded once with BOTH modalities (a sample missing either is dropped for every head) and handed to
:func:`fuse.train.train`; HDF5 is never re-read per run.

``jobs`` > 1 runs configs in that many spawned worker processes, each with ``cores // jobs`` torch
threads, each loading a group's data once (runs are dispatched group by group; a worker keeps the last
group it loaded). ``jobs`` = 1 runs them one after the other in this process (also the path for one
GPU). A run that raises is recorded as failed (``error.json`` in its folder, the message in the results
JSON) and the grid goes on.

``shard`` = (i, n) runs only configs i, i+n, i+2n, ... of the sorted grid (machines, job arrays);
aggregation always covers the whole grid and reads whatever runs have finished, so the last shard to
end (or ``aggregate_only``) writes the complete tables.

Aggregation (:func:`aggregate`): one row per (head, features, encoder): accuracy, macro-F1 and
weighted-F1 on the test split as mean and sample standard deviation (ddof=1) over the finished seeds
(std is None with one seed, shown as ``-``), finished / failed seed counts, parameter count, mean
training seconds. The best mean per metric is marked (ties: all of them). MVSA caches (index field
``labels_agree``) get the same metrics on the test posts whose text and image labels agree and on those
where they disagree. A reference row holds the paper's reported figures where it has one for the dataset.
"""

from __future__ import annotations

import concurrent.futures as cfut
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import shutil
import signal
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.extract import cache_format as cf
from mmcache.fuse.data import FEATURES, FusionData, extract_command, list_cached_datasets, load_data
from mmcache.fuse.heads import head_uses, list_heads
from mmcache.fuse.runs import ERROR_FILE, FINISHED_MARKER, is_finished, read_json, read_split
from mmcache.fuse.targets import available_targets, resolve_target
from mmcache.fuse.train import TrainConfig, train

from mmcache.common import atomic_write, cpu_cores
from mmcache.errors import BadInputError, CacheError, Interrupted, MissingCacheError, PipelineError
from mmcache.progress import progress as reporter

logger = logging.getLogger(__name__)

__all__ = ["AblationConfig", "AblationResult", "GridRun", "METRICS", "REPORTED", "aggregate", "expand_grid",
           "default_results_dir", "format_ablation", "format_tables", "mean_std", "run_ablation", "run_grid", "run_status",
           "write_results"]

DEFAULT_FEATURES = ("cls", "tokens")
DEFAULT_SEEDS = 5
METRICS = ("accuracy", "macro_f1", "weighted_f1")
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1"}
KEY_EXCLUDED = ("runs_dir", "run_name", "device", "threads", "cache_dir")
MODALITIES = ("text", "image")
REPORTED_LABEL = "reported (paper), not measured"
SEMEVAL = "SemEval-2020 Task 8 overview (Sharma et al. 2020), best system"

# Published figures, shown as reference rows, never marked best: dataset -> target (None = the dataset's
# default target) -> rows. The paper's own (arXiv 2503.07943) and the SemEval-2020 Task 8 best systems
# (macro-F1; Task B and C: mean of the per-target macro-F1, as our task score).
REPORTED: dict[str, dict[str | None, list[dict[str, Any]]]] = {
    "memotion": {
        None: [{"head": "dual_attention", "macro_f1": 0.3552, "note": "Memotion 7k Task A, dual attention"},
               {"head": None, "macro_f1": 0.35, "note": "Memotion 7k Task A", "source": SEMEVAL}],
        "task_b": [{"head": None, "macro_f1": 0.51, "note": "Memotion 7k Task B", "source": SEMEVAL}],
        "task_c": [{"head": None, "macro_f1": 0.32, "note": "Memotion 7k Task C", "source": SEMEVAL}],
    },
    "mvsa_single": {None: [{"head": None, "accuracy": 0.73, "note": "MVSA-Single, accuracy about 0.73"}]},
}


# --------------------------------------------------------------------------------------------- grid

@dataclass(frozen=True)
class Encoder:
    """One (text file, image file) pair of a dataset: a value of the encoder axis."""

    text: str | None  # feature file paths; None: the dataset has no complete file of that modality
    image: str | None

    @staticmethod
    def slug(path: str | None) -> str:
        if path is None:
            return "none"
        name = Path(path).name
        return name.split("--", 1)[1][:-3] if name.endswith(".h5") and "--" in name else name

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]

    @property
    def label(self) -> str:
        """Readable: the encoders' names as extraction wrote them into the file names
        (``text--owner--name.h5`` -> ``owner/name``), any family mixed with any other."""
        return f"{self.slug(self.text).replace('--', '/')} + {self.slug(self.image).replace('--', '/')}"

    @property
    def tag(self) -> str:
        return f"{self.slug(self.text)}+{self.slug(self.image)}"


@dataclass
class GridRun:
    """One cell of the grid: its config, key and run folder."""

    dataset: str
    head: str
    features: str
    encoder: Encoder
    seed: int
    config: TrainConfig  # dataset, head, features, seed, modalities, cache files set; run_name = folder name
    key: str
    run_dir: Path
    split_fingerprint: str | None = None  # the cache's split: a finished run made on another one is stale
    target: str | None = None  # the target / task (resolved name); its table is per (dataset, target)
    default_target: str | None = None  # the dataset's default target (runs on it keep their old keys)
    variant: str = ""  # values of the --dims / --dropouts axes ("dim 128, dropout 0.1"); "" without them

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def group(self) -> tuple[str, str, str, str]:
        """Runs with one group share their data: (dataset, features, text file, image file)."""
        return (self.dataset, self.features, self.encoder.text, self.encoder.image)

    @property
    def row_key(self) -> tuple[str, str, str, str]:
        """One table row: (head, features, encoder, variant); the --lrs values of a row are a choice."""
        return (self.head, self.features, self.encoder.label, self.variant)

    @property
    def table(self) -> str:
        """Name of the table this run belongs to: the dataset, or ``<dataset>-<target>`` off the default."""
        return self.dataset if self.target in (None, self.default_target) else f"{self.dataset}-{self.target}"

    def sort_key(self) -> tuple:
        return (self.dataset, self.target or "", self.encoder.label, self.features, self.head, self.variant,
                self.config.lr, self.seed)


def _comparable(config: TrainConfig | dict[str, Any], default_target: str | None = None) -> dict[str, Any]:
    """The config fields that determine a run's numbers, feature files by name. The target is left out
    when it is the dataset's default (so runs from before targets existed keep their keys)."""
    d = dict(config.to_dict() if isinstance(config, TrainConfig) else config)
    for k in KEY_EXCLUDED:
        d.pop(k, None)
    if d.get("target") in (None, default_target):
        d.pop("target", None)
    for m in MODALITIES:
        if d.get(f"{m}_cache"):
            d[f"{m}_cache"] = Path(d[f"{m}_cache"]).name
    if d.get("modalities"):
        d["modalities"] = sorted(d["modalities"])
    return d


def run_key(config: TrainConfig, data_fingerprint: str, default_target: str | None = None) -> str:
    """10 hex of SHA-256 over the comparable config and the data fingerprint."""
    payload = json.dumps({"config": _comparable(config, default_target), "data": data_fingerprint}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:10]


def _index_fingerprint(index: cf.SampleIndex) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([index.fingerprint, list(index.classes)]).encode("utf-8"))
    h.update(np.asarray(index.labels, dtype=np.int64).tobytes())
    h.update("\n".join(map(str, index.splits)).encode("utf-8"))
    return h.hexdigest()[:16]


def _grid_targets(index: cf.SampleIndex, names: list[str] | None) -> tuple[dict[str, str], str]:
    """({target: label fingerprint}, default target) of ``index``. The default target's labels are
    ``label`` (already in the index fingerprint): fingerprint ""; unknown names: BadInputError."""
    default = available_targets(index)[2]
    out = {}
    for name in dict.fromkeys(names or [default]):
        target, labels = resolve_target(index, name)
        out[target.name] = "" if target.name == default else hashlib.sha256(
            json.dumps(target.to_dict()).encode("utf-8") + labels.tobytes()).hexdigest()[:16]
    return out, default


def _encoders(cache_dir: Path, dataset: str, explicit: bool) -> tuple[list[Encoder], dict[str, str]]:
    """Every (text, image) pair of complete feature files, and each file's settings fingerprint."""
    folder = cache_dir / dataset
    files: dict[str, list[str]] = {m: [] for m in MODALITIES}
    fps: dict[str, str] = {}
    for p in cf.list_feature_files(folder):
        try:
            with cf.FeatureFile(p) as ff:
                complete, modality, provenance = ff.complete, ff.modality, ff.provenance
                fps[str(p)] = f"{ff.attrs.get('config_fingerprint')}/{ff.index_fingerprint}"
        except CacheError as e:
            logger.warning("%s: skipped (%s)", p, e)
            continue
        if not complete:
            logger.warning("%s is unfinished: left out of the ablation; resume it with %s", p,
                           extract_command(dataset, provenance))
            continue
        files.setdefault(modality, []).append(str(p))
    if not any(files.get(m) for m in MODALITIES):
        msg = (f"{dataset}: no complete feature file in {folder}/; create them with {extract_command(dataset)}")
        if explicit:
            raise MissingCacheError(msg)
        logger.warning("%s; skipped", msg)
        return [], fps
    # a dataset with one modality only: the heads that need only that one run (the others are skipped)
    texts, images = sorted(files["text"]) or [None], sorted(files["image"]) or [None]
    return [Encoder(t, i) for t, i in product(texts, images)], fps


def _skip_reason(head: str, enc: Encoder, dataset: str) -> str | None:
    missing = sorted(head_uses(head) - set(enc.modalities))
    if not missing:
        return None
    return (f"needs {' and '.join(missing)} features; {dataset} has no complete {' or '.join(missing)} feature file "
            f"(create it with {extract_command(dataset)})")


def expand_grid(base: TrainConfig | None = None, *, datasets: list[str] | None = None, heads: list[str] | None = None,
                features: list[str] | tuple[str, ...] = DEFAULT_FEATURES, seeds: list[int] | int = DEFAULT_SEEDS,
                cache_dir: str | Path = "cache", runs_dir: str | Path = "runs/ablate",
                skipped: list[dict[str, Any]] | None = None, targets: list[str] | None = None,
                lrs: list[float] | None = None, dims: list[int] | None = None,
                dropouts: list[float] | None = None) -> list[GridRun]:
    """Every run of the grid, sorted by (dataset, target, encoder, features, head, variant, lr, seed).

    A dataset with features of one modality only gets the heads that need only that modality; each
    head left out is appended to ``skipped`` (``{"dataset", "head", "reason"}``) when given.

    ``base``: the training config every run starts from (default: train-fusion's defaults); its
    dataset, head, features, seed, modalities, cache files, cache/runs dirs and run name are replaced
    by the grid's. ``seeds``: a count n (seeds 0..n-1) or a list. ``targets``: targets / tasks of each
    dataset's index (None: its default). Unknown heads / features / targets are :class:`BadInputError`; a
    named dataset without a complete cache is :class:`CacheError`.
    ``lrs``: learning rates to choose from on validation (one row per head, see :func:`aggregate`);
    ``dims`` / ``dropouts``: plain axes (a row each). None = the base's value, and run names stay as
    without the axis.
    """
    base = base or TrainConfig()
    cache_dir = Path(cache_dir)
    if base.head not in list_heads():  # a --config naming a head that does not exist is a typo, not a default
        raise BadInputError(f"the base config names unknown head {base.head!r}; known heads: {', '.join(list_heads())}")
    if base.features not in FEATURES:
        raise BadInputError(f"the base config names unknown features {base.features!r}; expected one of "
                            f"{', '.join(FEATURES)}")
    heads = list(dict.fromkeys(heads)) if heads else list_heads()
    unknown = [h for h in heads if h not in list_heads()]
    if unknown:
        raise BadInputError(f"unknown head(s) {', '.join(unknown)}; known heads: {', '.join(list_heads())}")
    features = list(dict.fromkeys(features))
    bad = [f for f in features if f not in FEATURES]
    if bad or not features:
        raise BadInputError(f"unknown features {', '.join(bad) or '(none)'}; expected some of {', '.join(FEATURES)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(dict.fromkeys(int(s) for s in seeds))
    if not seed_list:
        raise BadInputError("no seeds: give at least one (--seeds 1)")
    axes = [_axis("lrs", lrs, base.lr, "lr"), _axis("dims", dims, base.dim, "d"), _axis("dropouts", dropouts, base.dropout, "p")]
    cached = list_cached_datasets(cache_dir)
    explicit = bool(datasets)
    if explicit:
        names = list(dict.fromkeys(datasets))
        missing = [d for d in names if d not in cached]
        if missing:
            have = f" (cached: {', '.join(cached)})" if cached else ""
            raise MissingCacheError(f"no cache for dataset(s) {', '.join(missing)} in {cache_dir}/{have}; create it with "
                             f"{extract_command(missing[0])}")
    else:
        names = cached
        if not names:
            raise MissingCacheError(f"no dataset cache in {cache_dir}/; create one with {extract_command('<name>')}")

    runs: list[GridRun] = []
    skips: list[dict[str, Any]] = []
    for dataset in names:
        index = cf.read_index(cache_dir / dataset / cf.INDEX_NAME)
        index_fp, split_fp = _index_fingerprint(index), index.split_fingerprint
        target_fps, default = _grid_targets(index, targets)
        encoders, file_fps = _encoders(cache_dir, dataset, explicit)
        for enc in encoders:
            for head in heads:
                reason = _skip_reason(head, enc, dataset)
                if reason and not any(x["dataset"] == dataset and x["head"] == head for x in skips):
                    skips.append({"dataset": dataset, "head": head, "reason": reason})
        for target, enc, feat, head, seed, lr, dim, dropout in product(target_fps, encoders, features, heads,
                                                                        seed_list, *(a[0] for a in axes)):
            if _skip_reason(head, enc, dataset):
                continue
            cfg = dataclasses.replace(base, dataset=dataset, head=head, features=feat, seed=seed,
                                      modalities=enc.modalities, text_cache=enc.text, image_cache=enc.image,
                                      cache_dir=str(cache_dir), run_name=None, target=target, lr=lr, dim=dim,
                                      dropout=dropout)
            cfg.validate()
            data_fp = "|".join([index_fp, *(file_fps[getattr(enc, m)] for m in enc.modalities)]) + (
                f"|{target_fps[target]}" if target_fps[target] else "")
            key = run_key(cfg, data_fp, default)
            tag = "" if target == default else f"{target}-"
            tags = "".join(f"-{t}{v:g}" for (_, given, t), v in zip(axes, (lr, dim, dropout), strict=True) if given)
            name = f"{head}-{feat}-{tag}{enc.tag}{tags}-s{seed}-{key}"
            run_dir = Path(runs_dir) / dataset / name
            cfg = dataclasses.replace(cfg, runs_dir=str(run_dir.parent), run_name=name)
            variant = ", ".join(f"{what} {v:g}" for what, (_, given, _t), v in
                                zip(("dim", "dropout"), axes[1:], (dim, dropout), strict=True) if given)
            runs.append(GridRun(dataset=dataset, head=head, features=feat, encoder=enc, seed=seed, config=cfg,
                                key=key, run_dir=run_dir, split_fingerprint=split_fp, target=target,
                                default_target=default, variant=variant))
    if skipped is not None:
        skipped.extend(skips)
    if not runs:
        why = "; ".join(f"{x['dataset']}: {x['head']} {x['reason']}" for x in skips[:3])
        raise MissingCacheError(f"nothing to run in {cache_dir}/" + (f" ({why})" if why else ": no complete feature files"))
    runs.sort(key=GridRun.sort_key)
    return runs


def _axis(name: str, values: list | None, default: Any, tag: str) -> tuple[list, bool, str]:
    """(values, given, name tag) of an optional sweep axis; bad values are :class:`BadInputError`."""
    if not values:
        return [default], False, tag
    values = list(dict.fromkeys(values))
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in values):
        raise BadInputError(f"--{name}: expected non-negative numbers, got {values}")
    return values, True, tag


def shard_runs(runs: list[GridRun], shard: tuple[int, int] | None) -> list[GridRun]:
    """Configs i, i+n, i+2n, ... of the sorted grid for shard (i, n)."""
    if shard is None:
        return list(runs)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise BadInputError(f"--shard {i}/{n}: need 0 <= i < n")
    return list(runs[i::n])


# --------------------------------------------------------------------------------------------- run status

def run_status(run: GridRun) -> str:
    """``finished`` (metrics.json and a matching config.json), ``stale`` (finished, but its split.json
    is not the cache's split: rerun), ``failed`` (error.json, no metrics), ``unfinished`` (a folder
    without either, e.g. marked UNFINISHED by Ctrl-C, or a finished run whose config differs) or
    ``missing``."""
    d = run.run_dir
    if not d.is_dir():
        return "missing"
    if is_finished(d):
        saved = read_json(d / "config.json")
        if not (isinstance(saved, dict) and (_comparable(saved, run.default_target)
                                             == _comparable(run.config, run.default_target))):
            return "unfinished"
        rec = read_split(d)  # None: made before runs recorded their split; the key (it hashes the split) vouches
        if run.split_fingerprint and rec is not None and rec["fingerprint"] != run.split_fingerprint:
            return "stale"
        return "finished"
    if (d / ERROR_FILE).is_file():
        return "failed"
    return "unfinished"


def _record_failure(run: GridRun, err: BaseException | str) -> str:
    msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if not (run.run_dir / "config.json").is_file():
        atomic_write(run.run_dir / "config.json", json.dumps(run.config.to_dict(), indent=2) + "\n")
    atomic_write(run.run_dir / ERROR_FILE, json.dumps({"run": run.name, "error": msg}, indent=2) + "\n")
    return msg


# --------------------------------------------------------------------------------------------- execution

# Per-process cache of the last group's data (a worker runs groups one after the other).
_DATA: dict[tuple, FusionData] = {}


def _group_data(run: GridRun, cache_dir: str) -> FusionData:
    if run.group not in _DATA:
        _DATA.clear()  # one group at a time: token features can be gigabytes
        _DATA[run.group] = load_data(run.dataset, modalities=run.encoder.modalities, features=run.features,
                                     cache_dir=cache_dir, text_cache=run.encoder.text, image_cache=run.encoder.image)
    return _DATA[run.group]


def _execute(run: GridRun, allow_no_val: bool = False) -> dict[str, Any]:
    """Train one run; never raises for a failing run (returns status failed and the message)."""
    t0 = time.perf_counter()
    try:
        data = _group_data(run, run.config.cache_dir)
        result = train(run.config, data=data, allow_no_val=allow_no_val)
        if result.run_dir != run.run_dir:  # train never reuses a folder; ours was removed before
            raise PipelineError(f"run written to {result.run_dir}, expected {run.run_dir}")
        test = result.metrics.get("test") or {}
        return {"name": run.name, "status": "finished", "seconds": time.perf_counter() - t0,
                "macro_f1": test.get("macro_f1"), "error": None}
    except Exception as e:  # noqa: BLE001 - a failing run is a table entry, not the end of the grid
        logger.debug("run %s failed", run.name, exc_info=True)
        msg = _record_failure(run, e)
        return {"name": run.name, "status": "failed", "seconds": time.perf_counter() - t0, "macro_f1": None,
                "error": msg}


def _worker_init(threads: int, level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmcache.fuse.train").setLevel(max(level, logging.WARNING))
    logging.getLogger("mmcache.fuse.data").setLevel(max(level, logging.WARNING))
    logging.getLogger("mmcache.fuse.stack").setLevel(max(level, logging.WARNING))


_SLOW_FIRST = {"self_attention": 0, "dual_attention": 1, "basic": 2}  # measured order of cost per run


def resolve_jobs(jobs: int, device: str = "auto") -> int:
    """``jobs`` 0 = auto: one in-process worker on a GPU (runs share it one after the other), else one
    process per core up to 4 (small heads scale across processes far better than across threads)."""
    if jobs < 0:
        raise BadInputError(f"--jobs must be >= 0, got {jobs}")
    if jobs:
        return jobs
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu else min(cpu_cores(), 4)


@contextlib.contextmanager
def _sigint_blocked():
    """Block SIGINT in this thread while worker processes are started: they inherit the mask (through
    spawn's exec too), so Ctrl-C on the process group reaches only the parent, which terminates them.
    A Ctrl-C meanwhile is delivered when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run_grid(runs: list[GridRun], *, jobs: int = 1, threads: int | None = None, force: bool = False,
             allow_no_val: bool = False, progress: bool | None = None, stack: bool = False) -> dict[str, Any]:
    """Train every run of ``runs`` that is not finished (all of them with ``force``).

    ``stack``: runs that differ only in seed / lr / weight decay train as one stacked model
    (:mod:`fuse.stack`, same run folders and numbers); ``jobs`` 0 with ``stack`` on a CPU measures whether
    threads or processes are faster (:func:`fuse.schedule.choose_cpu_layout`).
    Returns ``{"trained": [...], "reused": [...], "failed": {name: message}, "stale": [...], "seconds",
    "layout"}``. Unfinished and stale folders (and finished ones with ``force``) are removed first.
    ``progress``: None = a bar on a terminal, else a line every 10 s (runs done / total, failed, rate,
    ETA); False = none. On Ctrl-C, raises :class:`~mmcache.errors.Interrupted` saying how many finished
    runs are kept.
    """
    from mmcache.fuse.schedule import choose_cpu_layout, plan_units

    if jobs < 0 or (jobs == 0 and not stack):
        raise BadInputError(f"--jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    todo, reused, stale = [], [], []
    for r in runs:
        status = run_status(r)
        if status == "finished" and not force:
            reused.append(r.name)
            continue
        if status == "stale":
            stale.append(r.name)
            logger.warning("%s was made on another split of %s: stale, rerun", r.name, r.dataset)
        if r.run_dir.exists():
            shutil.rmtree(r.run_dir)
        todo.append(r)
    # Group by group (each worker loads a group's data once), the slowest heads first within a group so
    # that no long run starts last while the other workers sit idle.
    group_order = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in todo))}
    todo.sort(key=lambda r: (group_order[r.group], _SLOW_FIRST.get(r.head, len(_SLOW_FIRST)), r.head, r.seed))
    layout = None
    if jobs == 0:  # stacked, auto: measured (a GPU never gets here: resolve_jobs gives it 1)
        jobs, auto_threads, layout = choose_cpu_layout(plan_units(todo, stack), cpu_cores())
        threads = threads or auto_threads
        logger.info("ablation layout: %s", layout)
    threads = threads or max(1, cpu_cores() // jobs)
    todo = [dataclasses.replace(r, config=dataclasses.replace(r.config, threads=threads)) for r in todo]
    units = plan_units(todo, stack, (layout or {}).get("split"))
    jobs = min(jobs, len(units)) or 1
    layout = {**(layout or {}), "processes": jobs, "threads": threads, "units": len(units)}
    if todo:
        logger.info("ablation: %d runs to train (%d unit%s), %d finished runs reused; %d process%s x %d thread%s",
                    len(todo), len(units), "s" if len(units) > 1 else "", len(reused), jobs,
                    "es" if jobs > 1 else "", threads, "s" if threads > 1 else "")
    else:
        logger.info("ablation: all %d runs already finished", len(reused))
    outcomes: list[dict[str, Any]] = []
    bar = reporter(len(todo), "ablate", "run", enabled=progress if todo else False, heartbeat=True)

    def report(out: dict[str, Any]) -> None:
        outcomes.append(out)
        what = (f"test macro-F1 {out['macro_f1']:.4f}" if out["status"] == "finished" and out["macro_f1"] is not None
                else out["status"] if out["status"] == "finished" else f"FAILED: {out['error']}")
        logger.info("[%d/%d] %s: %s (%.1fs)", len(outcomes), len(todo), out["name"], what, out["seconds"])
        bar.update(1, failed=sum(o["status"] == "failed" for o in outcomes))

    try:
        _train_all(units, jobs, threads, allow_no_val, report)
    except KeyboardInterrupt:
        bar.close(finished=False)
        done = sum(run_status(r) == "finished" for r in runs)  # on disk: a worker may finish as we stop
        where = sorted({str(r.run_dir.parent) for r in runs})
        raise Interrupted(f"ablation stopped; kept {done} of {len(runs)} finished runs in {', '.join(where)} "
                          f"(the other {len(runs) - done}: not started, or marked unfinished)") from None
    bar.close()
    failed = {o["name"]: o["error"] for o in outcomes if o["status"] == "failed"}
    return {"trained": [o["name"] for o in outcomes if o["status"] == "finished"], "reused": reused,
            "failed": failed, "stale": stale, "seconds": time.perf_counter() - t0, "layout": layout}


def _train_all(units: list[list[GridRun]], jobs: int, threads: int, allow_no_val: bool, report) -> None:
    """Train the ``units`` (:func:`fuse.schedule.plan_units`) in this process (``jobs`` 1) or in ``jobs`` spawned workers; ``report`` gets each
    outcome. On Ctrl-C the workers are terminated at once (they never see SIGINT themselves: a worker
    would otherwise finish, or start, runs after it) and KeyboardInterrupt propagates."""
    from mmcache.fuse.schedule import execute_unit

    if jobs == 1:
        quiet = [logging.getLogger(n) for n in ("mmcache.fuse.train", "mmcache.fuse.data", "mmcache.fuse.stack")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        try:
            for unit in units:
                for out in execute_unit(unit, allow_no_val):
                    report(out)
        finally:
            for lg, lv in zip(quiet, levels, strict=True):
                lg.setLevel(lv)
            _DATA.clear()
    elif units:
        _DATA.clear()  # the workers load their own
        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        with cfut.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                      initargs=(threads, level)) as pool:
            with _sigint_blocked():  # the workers start (and stay) with SIGINT blocked; the parent stops them
                futures = {pool.submit(execute_unit, u, allow_no_val): u for u in units}
            try:
                for fut in cfut.as_completed(futures):
                    try:
                        for out in fut.result():
                            report(out)
                    except Exception as e:  # noqa: BLE001 - a worker died (killed, out of memory)
                        for r in futures[fut]:
                            report({"name": r.name, "status": "failed", "seconds": 0.0, "macro_f1": None,
                                    "error": _record_failure(r, f"worker process failed: {type(e).__name__}: {e}")})
            except KeyboardInterrupt:
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()  # SIGTERM: a run in progress stops now; its folder stays UNFINISHED
                pool.shutdown(wait=False, cancel_futures=True)
                raise


# --------------------------------------------------------------------------------------------- aggregation

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); std None for one value, both None for none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    mean = sum(v) / len(v)
    if len(v) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))


def _subset_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | None]:
    """Scores on a subset of the test posts; macro-F1 averages over the classes present in it (true or
    predicted), so a class the subset lacks does not count as F1 0."""
    if y_true.size == 0:
        return {m: None for m in METRICS}
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0))}


def _agreement_scores(run_dir: Path, agree: dict[str, bool]) -> dict[str, dict[str, Any]] | None:
    """Test metrics of one run on the posts whose text and image labels agree / disagree."""
    text = (run_dir / "predictions.csv").read_text(encoding="utf-8") if (run_dir / "predictions.csv").is_file() else None
    if text is None:
        return None
    rows = list(csv.DictReader(io.StringIO(text)))
    out = {}
    for part, want in (("agree", True), ("disagree", False)):
        sel = [r for r in rows if agree.get(r["id"]) is want]
        y_true = np.asarray([r["true"] for r in sel], dtype=object)
        y_pred = np.asarray([r["predicted"] for r in sel], dtype=object)
        out[part] = {"n": len(sel), **_subset_scores(y_true, y_pred)}
    return out


def _summary(values: list[float | None]) -> dict[str, float | None]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _mark_best(rows: list[dict[str, Any]], path: tuple[str, ...], flag: str) -> None:
    def get(r):
        v = r
        for p in path:
            v = (v or {}).get(p)
        return v

    values = [get(r) for r in rows]
    best = max((v for v in values if v is not None), default=None)
    for r, v in zip(rows, values, strict=True):
        r[flag] = best is not None and v is not None and math.isclose(v, best, rel_tol=0, abs_tol=1e-12)


def _choose_lr(recs: list[dict[str, Any]]) -> tuple[float | None, dict[str, float | None] | None, list[dict[str, Any]]]:
    """With several learning rates in one row: the one with the best mean validation macro-F1 over its
    finished seeds (dinov2 linear-eval style); test is then reported for its runs only. Returns (lr, {lr:
    mean val macro-F1} or None with one lr, the chosen lr's records)."""
    lrs = list(dict.fromkeys(x["lr"] for x in recs))
    if len(lrs) == 1:
        return lrs[0], None, recs
    val = {lr: mean_std([x.get("val_macro_f1") for x in recs if x["lr"] == lr and x["status"] == "finished"])[0]
           for lr in lrs}
    scored = [lr for lr in lrs if val[lr] is not None]
    best = max(scored, key=lambda lr: val[lr]) if scored else lrs[0]
    return best, {f"{lr:g}": v for lr, v in val.items()}, [x for x in recs if x["lr"] == best]


def _stale_elsewhere(druns: list[GridRun], split_fp: str) -> list[str]:
    """Finished run folders beside the grid's (same ``runs_dir/<dataset>/``) made on another split of
    the dataset: left out of the table, named so nobody mistakes them for current results."""
    names = {r.name for r in druns}
    out = []
    for folder in sorted({r.run_dir.parent for r in druns}):
        for d in sorted(folder.iterdir()) if folder.is_dir() else []:
            if d.name in names or not (d / FINISHED_MARKER).is_file():
                continue
            rec = read_split(d)
            if rec is not None and rec["fingerprint"] != split_fp:
                out.append(d.name)
    return out


def aggregate(runs: list[GridRun], skipped: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per (dataset, target): the table (rows, reference rows, per-run records, MVSA agreement split, the
    split it was computed on, heads skipped for a missing modality, runs made on another split), keyed
    ``<dataset>`` for the default target, else ``<dataset>-<target>``."""
    tables: dict[str, dict[str, Any]] = {}
    by_table: dict[str, list[GridRun]] = {}
    for r in runs:
        by_table.setdefault(r.table, []).append(r)
    for table_name, druns in by_table.items():
        dataset = druns[0].dataset
        index_path = Path(druns[0].config.cache_dir) / dataset / cf.INDEX_NAME
        index = cf.read_index(index_path)
        target, _labels = resolve_target(index, druns[0].target)
        agree = None
        if "labels_agree" in index.extra:
            agree = {str(i): bool(int(a)) for i, a in zip(index.ids, index.extra["labels_agree"], strict=True)}
        records, groups = [], {}
        for r in druns:
            status = run_status(r)
            rec: dict[str, Any] = {"run": r.name, "run_dir": str(r.run_dir), "key": r.key, "head": r.head,
                                   "features": r.features, "encoder": r.encoder.label, "seed": r.seed,
                                   "lr": r.config.lr, "variant": r.variant, "status": status, "error": None}
            if status == "finished":
                m = read_json(r.run_dir / FINISHED_MARKER) or {}
                test = m.get("test") or {}
                rec.update({k: test.get(k) for k in METRICS}, n_test=test.get("n"), seconds=m.get("seconds"),
                           num_parameters=(m.get("model") or {}).get("num_parameters"), best_epoch=m.get("best_epoch"),
                           epochs_run=m.get("epochs_run"), confusion_matrix=test.get("confusion_matrix"),
                           per_class_recall={c: v.get("recall") for c, v in (test.get("per_class") or {}).items()})
                if test.get("targets"):
                    rec["targets"] = {t: v.get("macro_f1") for t, v in test["targets"].items()}
                rec["val_macro_f1"] = (m.get("val") or {}).get("macro_f1")
                if agree is not None:
                    rec["agreement"] = _agreement_scores(r.run_dir, agree)
            elif status == "failed":
                rec["error"] = (read_json(r.run_dir / ERROR_FILE) or {}).get("error", "unknown error")
            records.append(rec)
            groups.setdefault(r.row_key, []).append(rec)
        rows, chosen = [], {}
        for (head, feat, enc, variant), all_recs in groups.items():
            lr, lr_choice, recs = _choose_lr(all_recs)
            chosen[(head, feat, enc, variant)] = recs
            done = [x for x in recs if x["status"] == "finished"]
            row: dict[str, Any] = {
                "kind": "measured", "head": head, "features": feat, "encoder": enc, "variant": variant,
                "lr": lr, "lr_choice": lr_choice, "seeds_total": len(recs), "seeds_finished": len(done),
                "seeds_failed": sum(x["status"] == "failed" for x in recs),
                "num_parameters": next((x["num_parameters"] for x in done if x.get("num_parameters") is not None), None),
                "train_seconds_mean": mean_std([x.get("seconds") for x in done])[0],
            }
            for k in METRICS:
                row[k] = _summary([x.get(k) for x in done])
            if target.multi:
                row["targets"] = {t: _summary([(x.get("targets") or {}).get(t) for x in done]) for t in target.members}
            else:  # the lowest per-class recall (mean over seeds): near 0 = a class the head never predicts
                recalls = [min(v for v in x["per_class_recall"].values() if v is not None)
                           for x in done if x.get("per_class_recall")]
                row["min_recall"] = _summary(recalls)
            if agree is not None:
                for part in ("agree", "disagree"):
                    parts = [x["agreement"][part] for x in done if x.get("agreement")]
                    row[part] = {"n": parts[0]["n"] if parts else 0,
                                 **{k: _summary([p[k] for p in parts]) for k in METRICS}}
            rows.append(row)
        for k in METRICS:
            _mark_best(rows, (k, "mean"), f"best_{k}")
            if agree is not None:
                for part in ("agree", "disagree"):
                    _mark_best(rows, (part, k, "mean"), f"best_{part}_{k}")
        default = druns[0].target in (None, druns[0].default_target)
        references = [{"kind": "reported", "label": REPORTED_LABEL, "head": rep.get("head"), "note": rep["note"],
                       "source": rep.get("source", "paper (arXiv 2503.07943)"), **{k: rep.get(k) for k in METRICS}}
                      for rep in REPORTED.get(dataset, {}).get(None if default else target.name, [])]
        best = max((row for row in rows if row["macro_f1"]["mean"] is not None),
                   key=lambda row: row["macro_f1"]["mean"], default=None)
        confusion = None
        if best is not None:
            mats = [np.asarray(x["confusion_matrix"]) for x in
                    chosen[(best["head"], best["features"], best["encoder"], best["variant"])]
                    if x["status"] == "finished" and x.get("confusion_matrix")]
            if mats:
                confusion = {"head": best["head"], "features": best["features"], "encoder": best["encoder"],
                             "seeds": len(mats), "how": f"summed over its {len(mats)} finished seed(s), test split",
                             "matrix": np.sum(mats, axis=0).tolist()}
        encoders = sorted({r.encoder.label for r in druns})
        split = index.split_info()
        tables[table_name] = {
            "split": {"source": split["source"], "fingerprint": split["fingerprint"], "counts": split["counts"]},
            "skipped": [x for x in skipped or [] if x["dataset"] == dataset],
            "stale_runs": _stale_elsewhere(druns, split["fingerprint"]),
            "name": table_name, "dataset": dataset, "target": target.name, "targets": target.to_dict(),
            "classes": list(target.classes[0]), "encoders": encoders,
            "heads": list(dict.fromkeys(r.head for r in druns)),
            "features": list(dict.fromkeys(r.features for r in druns)),
            "seeds": sorted({r.seed for r in druns}),
            "counts": {s: sum(x["status"] == s for x in records)
                       for s in ("finished", "failed", "unfinished", "missing", "stale")},
            "rows": rows, "reference": references[0] if references else None, "references": references,
            "confusion": confusion, "runs": records,
            "mvsa_agreement": agree is not None,
            "notes": {"metrics": "test split; mean and sample standard deviation (ddof=1) over finished seeds; "
                                 "std null when only one seed finished",
                      "best": "best_<metric> marks the highest mean per column (ties: all); the reference row never",
                      "agreement": "agree/disagree: test posts whose text and image labels (index field labels_agree) "
                                   "agree / disagree; macro-F1 over the classes present in the subset"},
        }
    return tables


# --------------------------------------------------------------------------------------------- output

def _cell(s: dict[str, float | None], best: bool, style: str) -> str:
    """``mean ± std`` (4 decimals; std ``-`` for one seed); best: bold in markdown, ``*`` in the terminal."""
    if s["mean"] is None:
        return "-"
    std = "-" if s["std"] is None else f"{s['std']:.4f}"
    text = f"{s['mean']:.4f} ± {std}"
    if best:
        text = f"**{text}**" if style == "md" else f"{text} *"
    return text


def _seeds_cell(row: dict[str, Any]) -> str:
    text = f"{row['seeds_finished']}/{row['seeds_total']}"
    return text + (f" ({row['seeds_failed']} failed)" if row["seeds_failed"] else "")


def _table_rows(table: dict[str, Any], style: str) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Headers and rows of the main table and (MVSA) of the agreement table."""
    show_enc = len(table["encoders"]) > 1
    show_var, show_lr = _sweeps(table)
    lead = (["head", "features"] + (["encoder"] if show_enc else []) + (["variant"] if show_var else [])
            + (["lr (best on val)"] if show_lr else []))

    def lead_cells(r):
        return ([r["head"], r["features"]] + ([r["encoder"]] if show_enc else []) + ([r.get("variant") or "-"] if show_var
                else []) + ([_lr_cell(r)] if show_lr else []))

    members = list(table.get("targets") or {}) if len(table.get("targets") or {}) > 1 else []
    names = [METRIC_NAMES[k] for k in METRICS]
    if members:  # a task: macro-F1 is the task score; each target's macro-F1 follows
        names[METRICS.index("macro_f1")] = "task score (mean macro-F1)"
    extra_heads = [f"{m} macro-F1" for m in members] or (["min class recall"] if table["rows"] and
                                                        "min_recall" in table["rows"][0] else [])
    headers = lead + ["seeds", *names, *extra_heads, "parameters", "train s"]
    rows = []
    for r in table["rows"]:
        extra = ([_cell(r["targets"][m], False, style) for m in members] if members else
                 [_cell(r["min_recall"], False, style)] if extra_heads else [])
        rows.append(lead_cells(r) + [
            _seeds_cell(r), *(_cell(r[k], r[f"best_{k}"], style) for k in METRICS), *extra,
            "-" if r["num_parameters"] is None else f"{r['num_parameters']:,}",
            "-" if r["train_seconds_mean"] is None else f"{r['train_seconds_mean']:.1f}"])
    for ref in table.get("references") or ([table["reference"]] if table.get("reference") else []):
        source = "" if ref.get("source", "").startswith("paper") or not ref.get("source") else f" ({ref['source']})"
        name = f"{ref['head'] or 'best model'}{source}: {REPORTED_LABEL}"
        rows.append([name] + ["-"] * (len(lead) - 1) + ["-", *(
            "-" if ref.get(k) is None else f"{ref[k]:.4f}" for k in METRICS), *("-" for _ in extra_heads), "-", "-"])
    a_headers: list[str] = []
    a_rows: list[list[str]] = []
    if table.get("mvsa_agreement"):
        a_headers = lead + [f"{part} {what}" for part in ("agree", "disagree")
                            for what in ("n", *(METRIC_NAMES[k] for k in METRICS))]
        for r in table["rows"]:
            cells = lead_cells(r)
            for part in ("agree", "disagree"):
                cells.append(str(r[part]["n"]))
                cells += [_cell(r[part][k], r[f"best_{part}_{k}"], style) for k in METRICS]
            a_rows.append(cells)
    return headers, rows, a_headers, a_rows


def _sweeps(table: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the table has a --dims/--dropouts variant column and a --lrs choice column."""
    return (any(r.get("variant") for r in table["rows"]), any(r.get("lr_choice") for r in table["rows"]))


def _lr_cell(r: dict[str, Any]) -> str:
    """The chosen lr and, in brackets, every lr's mean validation macro-F1."""
    if not r.get("lr_choice"):
        return "-" if r.get("lr") is None else f"{r['lr']:g}"
    vals = ", ".join(f"{lr}: {'-' if v is None else f'{v:.3f}'}" for lr, v in r["lr_choice"].items())
    return f"{r['lr']:g} (val F1 {vals})"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [headers, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _failures(table: dict[str, Any], limit: int = 10) -> list[str]:
    failed = [x for x in table["runs"] if x["status"] == "failed"]
    lines = [f"{x['run']}: {x['error']}" for x in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more (see the results JSON)")
    return lines


def _heading(table: dict[str, Any]) -> str:
    c = table["counts"]
    enc = table["encoders"][0] if len(table["encoders"]) == 1 else f"{len(table['encoders'])} encoder pairs"
    target = table.get("target")
    what = table["dataset"] + (f", target {target}" if target else "")
    members = table.get("targets") or {}
    if len(members) > 1:
        what += f" ({', '.join(members)})"
    text = (f"{what}: {len(table['rows'])} configs x {len(table['seeds'])} seeds, encoders {enc}; "
            f"{c['finished']} runs finished")
    if c["failed"]:
        text += f", {c['failed']} failed"
    if c["unfinished"]:
        text += f", {c['unfinished']} unfinished (interrupted or running)"
    if c["missing"]:
        text += f", {c['missing']} not run yet"
    if c.get("stale"):
        text += f", {c['stale']} stale (made on another split)"
    return text


def _split_lines(table: dict[str, Any]) -> list[str]:
    """The split the table was computed on, heads skipped, runs made on other splits."""
    sp = table.get("split") or {}
    counts = sp.get("counts") or {}
    out = [f"split: {sp.get('source')} (fingerprint {sp.get('fingerprint')}; train/val/test "
           f"{'/'.join(str(counts.get(s, 0)) for s in ('train', 'val', 'test'))})"]
    out += [f"skipped {x['head']}: {x['reason']}" for x in table.get("skipped") or []]
    stale = table.get("stale_runs") or []
    if stale:
        out.append(f"left out: {len(stale)} finished runs made on another split of {table['dataset']} "
                   f"(e.g. {', '.join(stale[:2])})")
    return out


NOTE = ("test split; mean ± sample std (ddof=1) over the finished seeds, '-' when one seed finished; "
        "best mean per column marked")


def format_tables(tables: dict[str, dict[str, Any]]) -> str:
    """The terminal version of every dataset's table (best marked with ``*``)."""
    from mmcache.extract.summary import format_table

    out = []
    for table in tables.values():
        headers, rows, a_headers, a_rows = _table_rows(table, "text")
        out += [_heading(table), *_split_lines(table), format_table(headers, rows)]
        if a_rows:
            out += ["", "text and image labels agree vs disagree (test posts):", format_table(a_headers, a_rows)]
        failures = _failures(table)
        if failures:
            out += ["", "failed runs:", *(f"  {f}" for f in failures)]
        out.append("")
    out.append(f"({NOTE} with *)")
    return "\n".join(out)


def _markdown(table: dict[str, Any]) -> str:
    headers, rows, a_headers, a_rows = _table_rows(table, "md")
    title = table["dataset"] + (f", target {table['target']}" if table.get("target") else "")
    out = [f"# Ablation: {title}", "", _heading(table) + ".", "",
           *(f"- {line[0].upper()}{line[1:]}." for line in _split_lines(table)), "",
           f"Test split; mean ± sample standard deviation (ddof=1) over the finished seeds "
           f"({', '.join(map(str, table['seeds']))}); `-` = only one seed finished. Best mean per column in "
           f"**bold**. Reference rows hold published figures, not measured here."
           + (" Each row trained every learning rate of `--lrs`; the one with the best mean validation macro-F1 "
              "is chosen (its column lists each lr's), and test is reported for it only." if _sweeps(table)[1] else ""),
           "", _md_table(headers, rows)]
    if len(table.get("targets") or {}) > 1:
        out += ["", "Task score = mean of the per-target macro-F1 (the SemEval-2020 Task 8 measure); accuracy and "
                    "weighted-F1 are per-target means."]
    if a_rows:
        out += ["", "## Text and image labels agree vs disagree", "",
                "The same metrics on the test posts whose text and image labels agree (`labels_agree`) and on "
                "those where they disagree; macro-F1 averages over the classes present in each subset.", "",
                _md_table(a_headers, a_rows)]
    if table.get("confusion"):
        c = table["confusion"]
        out += ["", f"## Confusion matrix of the best config ({c['head']}, {c['features']}, {c['encoder']}: "
                    f"best mean macro-F1)", "", f"Rows = true class, columns = predicted; {c['how']}.", "",
                _md_table(["true \\ predicted", *table["classes"]],
                          [[cls, *map(str, row)] for cls, row in zip(table["classes"], c["matrix"], strict=True)])]
    if table.get("analysis"):
        from mmcache.fuse.analyze import markdown_section

        out += ["", *markdown_section(table["analysis"])]
    failures = _failures(table)
    if failures:
        out += ["", "## Failed runs", "", *(f"- `{f}`" for f in failures)]
    return "\n".join(out) + "\n"


def _csv(table: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["dataset", "target", "kind", "head", "features", "encoder", "seeds_finished", "seeds_failed", "seeds_total"]
    for k in METRICS:
        head += [f"{k}_mean", f"{k}_std", f"best_{k}"]
    head += ["num_parameters", "train_seconds_mean"]
    members = list(table.get("targets") or {}) if len(table.get("targets") or {}) > 1 else []
    per = [(m, ("targets", m)) for m in members] or ([("min_recall", ("min_recall",))]
                                                     if table["rows"] and "min_recall" in table["rows"][0] else [])
    for name, _path in per:
        head += [f"{name}{'_macro_f1' if members else ''}_mean", f"{name}{'_macro_f1' if members else ''}_std"]
    show_var, show_lr = _sweeps(table)
    head += (["variant"] if show_var else []) + (["lr", "lr_val_macro_f1"] if show_lr else [])
    parts = ("agree", "disagree") if table.get("mvsa_agreement") else ()
    for part in parts:
        head.append(f"{part}_n")
        for k in METRICS:
            head += [f"{part}_{k}_mean", f"{part}_{k}_std", f"best_{part}_{k}"]
    w.writerow(head)

    def num(v):
        return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)

    for r in table["rows"]:
        line = [table["dataset"], table.get("target") or "", "measured", r["head"], r["features"], r["encoder"],
                r["seeds_finished"],
                r["seeds_failed"], r["seeds_total"]]
        for k in METRICS:
            line += [num(r[k]["mean"]), num(r[k]["std"]), r[f"best_{k}"]]
        line += [num(r["num_parameters"]), num(r["train_seconds_mean"])]
        for _name, path in per:
            cell = r[path[0]] if len(path) == 1 else r[path[0]][path[1]]
            line += [num(cell["mean"]), num(cell["std"])]
        line += ([r.get("variant") or ""] if show_var else []) + (
            [num(r["lr"]), json.dumps(r["lr_choice"])] if show_lr else [])
        for part in parts:
            line.append(r[part]["n"])
            for k in METRICS:
                line += [num(r[part][k]["mean"]), num(r[part][k]["std"]), r[f"best_{part}_{k}"]]
        w.writerow(line)
    for ref in table.get("references") or ([table["reference"]] if table.get("reference") else []):
        line = [table["dataset"], table.get("target") or "", "reported", ref["head"] or "", "",
                f"{REPORTED_LABEL}: {ref.get('source') or 'paper'}", "", "", ""]
        for k in METRICS:
            line += [num(ref.get(k)), "", False]
        line += ["", ""] + ["", ""] * len(per) + [""] * (show_var + 2 * show_lr)
        for _ in parts:
            line += [""] + ["", "", False] * len(METRICS)
        w.writerow(line)
    return buf.getvalue()


def write_results(tables: dict[str, dict[str, Any]], results_dir: str | Path, *, plots: bool = True) -> dict[str, list[Path]]:
    """``results/ablation_<dataset>.md|.csv|.json`` (+ ``.png`` and ``_confusion.png`` when matplotlib is
    installed and ``plots``); returns the paths per dataset."""
    results_dir = Path(results_dir)
    written: dict[str, list[Path]] = {}
    for dataset, table in tables.items():
        stem = results_dir / f"ablation_{table.get('name', dataset)}"
        paths = [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".json")]
        atomic_write(paths[0], _markdown(table))
        atomic_write(paths[1], _csv(table))
        atomic_write(paths[2], json.dumps(table, indent=2, default=str) + "\n")
        if plots:
            from mmcache.fuse.plots import plot_table

            paths += plot_table(table, results_dir)
        written[dataset] = paths
    return written


# --------------------------------------------------------------------------------------------- API

@dataclass
class AblationConfig:
    """What :func:`run_ablation` runs. ``base``: the TrainConfig every run starts from (default:
    train-fusion's defaults). ``jobs`` 1: in this process; ``threads`` None: cores // jobs.
    ``results_dir`` None: :func:`default_results_dir` of ``runs_dir``."""

    datasets: list[str] | None = None
    heads: list[str] | None = None
    features: list[str] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    seeds: list[int] | int = DEFAULT_SEEDS
    targets: list[str] | None = None  # targets / tasks (None: each dataset's default); one table each
    base: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: str = "cache"
    runs_dir: str = "runs/ablate"
    results_dir: str | None = None  # None: default_results_dir(runs_dir)
    jobs: int = 1
    threads: int | None = None
    shard: tuple[int, int] | None = None
    force: bool = False
    aggregate_only: bool = False
    plots: bool = True
    allow_no_val: bool = False  # train datasets without a validation split (else those runs fail)
    analyze: bool = True  # analyse the best config's first seed (fuse.analyze) into its run and the markdown
    stack: bool = True  # train seeds / lrs of a config as one stacked model (fuse/stack.py)
    lrs: list[float] | None = None  # learning rates chosen between on validation
    dims: list[int] | None = None
    dropouts: list[float] | None = None


def default_results_dir(runs_dir: str | Path) -> Path:
    """``results/<name of the runs folder>``: tables of different runs folders never overwrite each other
    (``runs/ablate`` -> ``results/ablate``, the demo's ``runs/demo`` -> ``results/demo``)."""
    return Path("results") / (Path(runs_dir).resolve().name or "runs")


@dataclass
class AblationResult:
    runs: list[GridRun]  # the whole grid
    selected: list[GridRun]  # this shard's part
    trained: list[str]
    reused: list[str]
    failed: dict[str, str]  # run name -> message (this call's failures)
    tables: dict[str, dict[str, Any]]
    files: dict[str, list[Path]]
    seconds: float
    stale: list[str] = field(default_factory=list)  # runs made on another split of the cache: rerun by this call
    layout: dict[str, Any] | None = None  # processes x threads (and what was measured to choose them)


def run_ablation(config: AblationConfig) -> AblationResult:
    """Expand the grid, train this shard's unfinished runs, aggregate every finished run of the grid and
    write the result files."""
    t0 = time.perf_counter()
    skipped: list[dict[str, Any]] = []
    runs = expand_grid(config.base, datasets=config.datasets, heads=config.heads, features=config.features,
                       seeds=config.seeds, cache_dir=config.cache_dir, runs_dir=config.runs_dir, skipped=skipped,
                       targets=config.targets, lrs=config.lrs, dims=config.dims, dropouts=config.dropouts)
    selected = shard_runs(runs, config.shard)
    if config.aggregate_only:
        done = {"trained": [], "reused": [], "failed": {}, "stale": []}
    else:
        jobs = resolve_jobs(config.jobs, config.base.device)
        if config.stack and config.jobs == 0 and config.threads is None and jobs > 1:
            jobs = 0  # CPU: threads vs processes measured by run_grid
        done = run_grid(selected, jobs=jobs, threads=config.threads, force=config.force,
                        allow_no_val=config.allow_no_val, stack=config.stack)
    tables = aggregate(runs, skipped)
    if config.analyze:
        from mmcache.fuse.analyze import analyze_best

        for table in tables.values():
            table["analysis"] = analyze_best(table)
    files = write_results(tables, config.results_dir or default_results_dir(config.runs_dir), plots=config.plots)
    return AblationResult(runs=runs, selected=selected, trained=done["trained"], reused=done["reused"],
                          failed=done["failed"], tables=tables, files=files, seconds=time.perf_counter() - t0,
                          stale=done["stale"], layout=done.get("layout"))


def format_ablation(result: AblationResult) -> str:
    """Tables plus a closing line: what was trained, reused, failed, and where the files are."""
    shard = "" if len(result.selected) == len(result.runs) else f" (this shard: {len(result.selected)})"
    lines = [format_tables(result.tables), "",
             f"{len(result.runs)} runs in the grid{shard}: {len(result.trained)} trained, {len(result.reused)} "
             f"reused, {len(result.failed)} failed, in {result.seconds:.1f}s"
             + (f" ({len(result.stale)} of them rerun: made on another split)" if result.stale else "")]
    for dataset, paths in result.files.items():
        lines.append(f"{dataset}: {', '.join(str(p) for p in paths)}")
    return "\n".join(lines)
