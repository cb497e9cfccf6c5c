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

``jobs`` > 1 runs configs in that many spawned worker processes, each loading a group's data once (runs are dispatched group by group; a worker keeps the last
group it loaded); every run computes with ``threads`` torch threads (``--threads``, else the base
config's, else :func:`~mmcache.common.small_model_threads`: fixed per machine, never chosen from the
layout, since the thread count can change the last bits of a run's numbers). ``jobs`` = 1 runs them one after the other in this process (also the path for one
GPU). A run that raises is recorded as failed (``error.json`` in its folder, the message in the results
JSON) and the grid goes on.

Two processes on one runs folder (two ``ablate`` calls, or shards sharing a grid) never train one run
twice: each run is claimed with a lock (``<runs_dir>/<dataset>/.locks/<run name>.lock``, see
:mod:`mmcache.locks`; a dead holder's lock is free at once) before its folder is removed and trained.
A run another live process holds is counted as *running elsewhere*, never written to, and waited for
(an info line every 10 s, up to ``wait_timeout``) before the tables are computed. The results folder
is locked (``<results_dir>/.lock``) while its tables are computed and written, as one set (a disk
full leaves the old set unchanged). A worker process that dies (``kill -9``, the OOM killer) fails
only the run(s) it was training ("worker killed by signal 9 (out of memory?)"); the pool is rebuilt and
the rest of the grid goes on.

``shard`` = (i, n) runs only configs i, i+n, i+2n, ... of the sorted grid (machines, job arrays);
aggregation always covers the whole grid and reads whatever runs have finished, so the last shard to
end (or ``aggregate_only``) writes the complete tables.

Aggregation (:func:`aggregate`): one row per (head, features, encoder): accuracy, macro-F1 and
weighted-F1 on the test split as mean and sample standard deviation (ddof=1) over the finished seeds
(std is None with one seed, shown as ``-``), finished / failed seed counts, parameter count, mean
training seconds, each metric's 95% bootstrap interval over test posts and seeds, n scored / dropped and a
paired Δ against a baseline row (:mod:`fuse.ablate.stats`); linear-probe rows (:mod:`fuse.ablate.probe`)
are the default baseline. The top row is marked best only when its paired interval against the
runner-up excludes 0, else the rows tied with it are marked tied. MVSA caches (index field
``labels_agree``) get the same metrics on the test posts whose text and image labels agree and on those
where they disagree. A reference row holds the paper's reported figures (as published, with the test
set they were scored on) where it has one for the dataset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.fuse.ablate.aggregate import REPORTED, REPORTED_LABEL, aggregate, mean_std
from mmcache.fuse.ablate.best import analyze_best
from mmcache.fuse.ablate.execute import resolve_jobs, run_grid, run_lock_path, wait_for_elsewhere
from mmcache.fuse.ablate.grid import (
    DEFAULT_FEATURES,
    DEFAULT_SEEDS,
    GridRun,
    expand_grid,
    run_key,
    run_status,
    shard_runs,
)
from mmcache.fuse.ablate.tables import format_tables, write_results
from mmcache.fuse.config import TrainConfig
from mmcache.fuse.data import require_features
from mmcache.fuse.heads import head_uses
from mmcache.fuse.metrics import METRICS

from mmcache.errors import BadInputError, PipelineError
from mmcache.locks import describe, locked

__all__ = ["DEFAULT_FEATURES", "METRICS", "REPORTED", "REPORTED_LABEL", "AblationConfig", "AblationResult", "GridRun", "aggregate",
           "default_results_dir", "expand_grid", "format_ablation", "format_tables", "mean_std", "run_ablation",
           "run_grid", "run_key", "run_lock_path", "run_status", "shard_runs", "wait_for_elsewhere", "write_results"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- API

@dataclass
class AblationConfig:
    """What :func:`run_ablation` runs. ``base``: the TrainConfig every run starts from (default:
    train-fusion's defaults). ``jobs`` 1: in this process; ``threads`` None: the base config's, else small_model_threads().
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
    wait_timeout: float | None = 24 * 3600.0  # seconds to wait for runs another process trains (None: no limit)
    probe: bool = True  # linear-probe rows (fuse/ablate/probe.py); predictions cached in <results>/probe/
    baseline: str | None = None  # head every row's paired Δ is against (None: the best probe of its features)
    bootstrap: int = 1000  # replicates of the intervals over test posts and seeds (fuse/ablate/stats.py)


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
    elsewhere: list[str] = field(default_factory=list)  # runs another process was training: left to it, waited for
    still_running: list[str] = field(default_factory=list)  # of those, still held after wait_timeout


def run_ablation(config: AblationConfig) -> AblationResult:
    """Expand the grid, train this shard's unfinished runs, aggregate every finished run of the grid and
    write the result files."""
    t0 = time.perf_counter()
    if config.bootstrap < 1:  # checked before any training: aggregation would fail after it
        raise BadInputError(f"bootstrap replicates must be >= 1, got {config.bootstrap}")
    skipped: list[dict[str, Any]] = []
    runs = expand_grid(config.base, datasets=config.datasets, heads=config.heads, features=config.features,
                       seeds=config.seeds, cache_dir=config.cache_dir, runs_dir=config.runs_dir, skipped=skipped,
                       targets=config.targets, lrs=config.lrs, dims=config.dims, dropouts=config.dropouts)
    selected = shard_runs(runs, config.shard)
    if not config.aggregate_only:  # a features mode a (lean) cache lacks: refused before anything trains
        for key in {(r.config.cache_dir, r.dataset, tuple(sorted(r.config.modalities or head_uses(r.head))), r.features,
                     r.encoder.text, r.encoder.image) for r in selected}:
            require_features(key[0], key[1], key[2], key[3], {"text": key[4], "image": key[5]})
    if config.aggregate_only:
        done = {"trained": [], "reused": [], "failed": {}, "stale": [], "elsewhere": []}
    else:
        jobs = resolve_jobs(config.jobs, config.base.device)
        if config.stack and config.jobs == 0 and jobs > 1:
            jobs = 0  # CPU: run_grid packs the stacks onto processes from measured step costs
        done = run_grid(selected, jobs=jobs, threads=config.threads or config.base.threads, force=config.force,
                        allow_no_val=config.allow_no_val, stack=config.stack)
    elsewhere = [r for r in selected if r.name in set(done["elsewhere"])]
    still = wait_for_elsewhere(elsewhere, config.wait_timeout) if elsewhere else []
    results_dir = Path(config.results_dir or default_results_dir(config.runs_dir))
    # One writer of a results folder at a time, and the tables computed under the lock: the last
    # process to write them has seen every run the earlier one had.
    with locked(results_dir / ".lock", timeout=config.wait_timeout, what=f"results folder {results_dir}",
                busy=lambda h: PipelineError(f"results folder {results_dir} still in use by {describe(h)} after "
                                             f"{config.wait_timeout:.0f}s; rerun with --aggregate-only later")):
        tables = aggregate(runs, skipped, probe=config.probe, probe_dir=results_dir / "probe",
                           baseline=config.baseline, bootstrap=config.bootstrap)
        if config.analyze:
            for table in tables.values():
                table["analysis"] = analyze_best(table)
        files = write_results(tables, results_dir, plots=config.plots)
    return AblationResult(runs=runs, selected=selected, trained=done["trained"], reused=done["reused"],
                          failed=done["failed"], tables=tables, files=files, seconds=time.perf_counter() - t0,
                          stale=done["stale"], layout=done.get("layout"), elsewhere=done["elsewhere"],
                          still_running=still)


def format_ablation(result: AblationResult) -> str:
    """Tables plus a closing line: what was trained, reused, failed, and where the files are."""
    shard = "" if len(result.selected) == len(result.runs) else f" (this shard: {len(result.selected)})"
    lines = [format_tables(result.tables), "",
             f"{len(result.runs)} runs in the grid{shard}: {len(result.trained)} trained, {len(result.reused)} "
             f"reused, {len(result.failed)} failed"
             + (f", {len(result.elsewhere)} running elsewhere (another process; waited for"
                + (f", {len(result.still_running)} still running" if result.still_running else "") + ")"
                if result.elsewhere else "")
             + f", in {result.seconds:.1f}s"
             + (f" ({len(result.stale)} of them rerun: made on another split)" if result.stale else "")]
    for dataset, paths in result.files.items():
        lines.append(f"{dataset}: {', '.join(str(p) for p in paths)}")
    return "\n".join(lines)
