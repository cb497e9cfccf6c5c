"""Executing an ablation grid: which runs to (re)train, how they are packed onto the machine and
trained in this process or in worker processes; a failing run is recorded, never the end of the grid.

How an ablation grid is packed onto the machine when runs are stacked (see :mod:`fuse.stack`).

* :func:`plan_units`: runs of one data group whose configs differ only in seed / lr / weight decay (and
  whose head can be stacked) become one *stack unit*; every other run is a unit of its own, trained by
  :func:`fuse.train.train` as before.
* :func:`choose_cpu_layout`: on a CPU, how many processes and which stacks to cut into parts. The thread
  count of a run is NOT a layout choice: it is ``--threads``, else the base config's, else
  :func:`~mmcache.common.small_model_threads` (fixed per machine), because float sums of small matmuls
  can differ in the last bits between thread counts and a run's numbers must depend on its key alone
  (not on how a grid, or what was left of it after a resume, was packed). Processes = cores // threads;
  a stack costing more than an even share of the measured step costs is cut into parts (members are
  independent, so cutting changes no number). On CUDA the grid runs in one process, stacks back to back.
* :func:`execute_unit`: train one unit in this process (a worker or the main one); never raises for a
  failing run. A stack larger than the free memory allows (:func:`fuse.stack.max_members`) is trained in
  consecutive chunks.
"""

from __future__ import annotations

import concurrent.futures as cfut
import contextlib
import dataclasses
import errno
import heapq
import logging
import multiprocessing
import os
import shutil
import signal
import time
from typing import Any

from mmcache.fuse import tracking
from mmcache.fuse.ablate.grid import GridRun, run_status
from mmcache.fuse.data import FusionData, load_data
from mmcache.fuse.runs import RunFolder
from mmcache.fuse.stack import can_stack, max_members, probe_step_seconds, stack_key, train_stack
from mmcache.fuse.train import train

from mmcache.common import cpu_cores, disk_full_error, resolve_device, small_model_threads
from mmcache.errors import BadInputError, DiskFullError, Interrupted, PipelineError
from mmcache.locks import FileLock, describe, holder, try_lock
from mmcache.progress import progress as reporter

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- execution

def _record_failure(run: GridRun, err: BaseException | str) -> str:
    msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    RunFolder(run.run_dir).write_error(run.name, msg, run.config.to_dict())
    return msg


# Per-process cache of the last group's data (a worker runs groups one after the other).
_DATA: dict[tuple, FusionData] = {}


def _group_data(run: GridRun, cache_dir: str) -> FusionData:
    if run.group not in _DATA:
        _DATA.clear()  # one group at a time: token features can be gigabytes
        _DATA[run.group] = load_data(run.dataset, modalities=run.encoder.modalities, features=run.features,
                                     cache_dir=cache_dir, text_cache=run.encoder.text, image_cache=run.encoder.image,
                                     max_memory=run.config.max_memory, streamed=run.config.streamed,
                                     shuffle_buffer=run.config.shuffle_buffer)
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
        return _failed(run, e, t0)


_STARTED = None  # in a worker: the queue that tells the parent which unit this pid works on


def _worker_init(threads: int, level: int, started=None, loggers=None) -> None:
    import torch

    global _STARTED
    _STARTED = started
    tracking.use(loggers)  # the parent's run loggers (--track): a spawned process starts with none

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


def run_lock_path(run: GridRun):
    """``<runs_dir>/<dataset>/.locks/<run name>.lock``: beside the run folders, since a run folder is
    removed and recreated by the process that trains it."""
    return run.run_dir.parent / ".locks" / f"{run.name}.lock"


def _claim(runs: list[GridRun], force: bool) -> tuple[list[GridRun], list[str], list[str], list[GridRun],
                                                      dict[str, FileLock]]:
    """(todo, reused, stale, held elsewhere, our locks). A run another live process holds is left alone
    (its folder is never read as failed nor removed); every other unfinished run is locked by this
    process, then its folder removed."""
    todo, reused, stale, elsewhere, locks = [], [], [], [], {}
    _room_for_fds(len(runs))
    for r in runs:
        if not force and run_status(r) == "finished":
            reused.append(r.name)
            continue
        lock = try_lock(run_lock_path(r))
        if lock is None:
            elsewhere.append(r)
            continue
        status = run_status(r)  # again under the lock: the other process may have just finished it
        if status == "finished" and not force:
            lock.release()
            reused.append(r.name)
            continue
        locks[r.name] = lock
        if status == "stale":
            stale.append(r.name)
            logger.warning("%s was made on another split of %s: stale, rerun", r.name, r.dataset)
        if r.run_dir.exists():
            shutil.rmtree(r.run_dir)
        todo.append(r)
    if elsewhere:
        logger.info("ablation: %d runs are being trained by another process (running elsewhere): left to it",
                    len(elsewhere))
    return todo, reused, stale, elsewhere, locks


def _room_for_fds(n: int) -> None:
    """Each claimed run holds an open lock file until its outcome: raise the soft limit on open files
    (often 1024) towards the hard one for big grids."""
    try:
        import resource
    except ImportError:  # pragma: no cover -- not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 512
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            logger.warning("a grid of %d runs may exceed the open-file limit (%d)", n, new)


def wait_for_elsewhere(runs: list[GridRun], timeout: float | None, heartbeat: float = 10.0) -> list[str]:
    """Wait until no other process holds a lock of ``runs`` (they finished, failed or died), with an
    info line every ``heartbeat`` seconds; returns the runs still held after ``timeout`` seconds."""
    t0 = last = time.monotonic()
    waiting = list(runs)
    while waiting:
        waiting = [r for r in waiting if holder(run_lock_path(r)) is not None]
        now = time.monotonic()
        if not waiting or (timeout is not None and now - t0 >= timeout):
            break
        if now - last >= heartbeat:
            last = now
            who = {describe(holder(run_lock_path(r))) for r in waiting[:5]}
            logger.info("waiting for %d runs running elsewhere (%s) before aggregating: %.0fs", len(waiting),
                        "; ".join(sorted(who)), now - t0)
        time.sleep(0.5)
    if waiting:
        logger.warning("%d runs still running elsewhere after %.0fs (--wait-timeout): the tables count them as "
                       "unfinished", len(waiting), time.monotonic() - t0)
    return [r.name for r in waiting]


def run_grid(runs: list[GridRun], *, jobs: int = 1, threads: int | None = None, force: bool = False,
             allow_no_val: bool = False, progress: bool | None = None, stack: bool = False) -> dict[str, Any]:
    """Train every run of ``runs`` that is not finished (all of them with ``force``).

    ``stack``: runs that differ only in seed / lr / weight decay train as one stacked model
    (:mod:`fuse.stack`, same run folders and numbers); ``jobs`` 0 with ``stack`` on a CPU measures whether
    how to pack the stacks onto processes (:func:`choose_cpu_layout`).
    Returns ``{"trained": [...], "reused": [...], "failed": {name: message}, "stale": [...], "elsewhere":
    [...], "seconds", "layout"}``. Each run to train is locked first (:func:`run_lock_path`); runs another
    live process holds are "elsewhere": not trained, not touched. Unfinished and stale folders (and
    finished ones with ``force``) are removed first.
    ``progress``: None = a bar on a terminal, else a line every 10 s (runs done / total, failed, rate,
    ETA); False = none. On Ctrl-C, raises :class:`~mmcache.errors.Interrupted` saying how many finished
    runs are kept; on a full disk, :class:`~mmcache.errors.DiskFullError` (no new run is started; the
    finished ones are kept, the one that did not fit is left unfinished).
    """
    if jobs < 0 or (jobs == 0 and not stack):
        raise BadInputError(f"--jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    todo, reused, stale, elsewhere, locks = _claim(runs, force)
    try:
        out = _run_claimed(runs, todo, reused, jobs, threads, allow_no_val, progress, stack, locks)
    finally:
        for lock in locks.values():
            lock.release()
    return {**out, "reused": reused, "stale": stale, "elsewhere": [r.name for r in elsewhere],
            "seconds": time.perf_counter() - t0}


def _run_claimed(runs, todo, reused, jobs, threads, allow_no_val, progress, stack, locks) -> dict[str, Any]:
    """Train the claimed ``todo`` runs (run_grid's body); each run's lock is released with its outcome."""
    # Group by group (each worker loads a group's data once), the slowest heads first within a group so
    # that no long run starts last while the other workers sit idle.
    group_order = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in todo))}
    todo.sort(key=lambda r: (group_order[r.group], _SLOW_FIRST.get(r.head, len(_SLOW_FIRST)), r.head, r.seed))
    layout = None
    # The thread count is part of how a run computes (see choose_cpu_layout), never a layout choice.
    threads = threads or small_model_threads()
    if jobs == 0:  # stacked, auto (a GPU never gets here: resolve_jobs gives it 1)
        jobs, layout = choose_cpu_layout(plan_units(todo, stack), cpu_cores(), threads)
        logger.info("ablation layout: %s", layout)
    todo = [dataclasses.replace(r, config=dataclasses.replace(r.config, threads=threads)) for r in todo]
    units = plan_units(todo, stack, (layout or {}).get("split"))
    jobs = min(jobs, len(units)) or 1
    layout = {**(layout or {}), "processes": jobs, "threads": threads, "units": len(units)}
    if todo:
        logger.info("ablation: %d runs to train (%d unit%s), %d finished runs reused; %d process%s x %d thread%s",
                    len(todo), len(units), "s" if len(units) > 1 else "", len(reused), jobs,
                    "es" if jobs > 1 else "", threads, "s" if threads > 1 else "")
    elif not locks:
        logger.info("ablation: no run to train here (%d finished, reused)", len(reused))
    outcomes: list[dict[str, Any]] = []
    bar = reporter(len(todo), "ablate", "run", enabled=progress if todo else False, heartbeat=True)

    def report(out: dict[str, Any]) -> None:
        outcomes.append(out)
        what = (f"test macro-F1 {out['macro_f1']:.4f}" if out["status"] == "finished" and out["macro_f1"] is not None
                else out["status"] if out["status"] == "finished" else
                f"UNFINISHED: {out['error']}" if out.get("disk_full") else f"FAILED: {out['error']}")
        logger.info("[%d/%d] %s: %s (%.1fs)", len(outcomes), len(todo), out["name"], what, out["seconds"])
        bar.update(1, failed=sum(o["status"] == "failed" for o in outcomes))
        lock = locks.pop(out["name"], None)
        if lock is not None:
            lock.release()

    def stop() -> bool:  # a full disk fails every later run the same way: start no more
        return any(o.get("disk_full") for o in outcomes)

    try:
        _train_all(units, jobs, threads, allow_no_val, report, stop)
    except KeyboardInterrupt:
        bar.close(finished=False)
        done = sum(run_status(r) == "finished" for r in runs)  # on disk: a worker may finish as we stop
        where = sorted({str(r.run_dir.parent) for r in runs})
        raise Interrupted(f"ablation stopped; kept {done} of {len(runs)} finished runs in {', '.join(where)} "
                          f"(the other {len(runs) - done}: not started, or marked unfinished)") from None
    bar.close()
    full = next((o for o in outcomes if o.get("disk_full")), None)
    if full is not None:
        kept = sum(run_status(r) == "finished" for r in runs)
        raise DiskFullError(f"{full['error']} (run {full['name']} left unfinished; {kept} of {len(runs)} runs "
                            f"finished and kept)")
    failed = {o["name"]: o["error"] for o in outcomes if o["status"] == "failed"}
    return {"trained": [o["name"] for o in outcomes if o["status"] == "finished"], "failed": failed,
            "layout": layout}


def _train_all(units: list[list[GridRun]], jobs: int, threads: int, allow_no_val: bool, report,
               stop=lambda: False) -> None:
    """Train the ``units`` (:func:`fuse.schedule.plan_units`) in this process (``jobs`` 1) or in ``jobs`` spawned
    workers; ``report`` gets each outcome; once ``stop()`` is true no further unit is started. On Ctrl-C
    the workers are terminated at once (they never see SIGINT themselves: a worker would otherwise
    finish, or start, runs after it) and KeyboardInterrupt propagates."""
    if jobs == 1:
        quiet = [logging.getLogger(n) for n in ("mmcache.fuse.train", "mmcache.fuse.data", "mmcache.fuse.stack")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        try:
            for unit in units:
                if stop():
                    break
                for out in execute_unit(unit, allow_no_val):
                    report(out)
        finally:
            for lg, lv in zip(quiet, levels, strict=True):
                lg.setLevel(lv)
            _DATA.clear()
        return
    _DATA.clear()  # the workers load their own
    left = dict(enumerate(units))
    while left and not stop():  # a round per pool: a worker killed breaks the pool, the rest goes on in a new one
        left = _pool_round(left, jobs, threads, allow_no_val, report, stop)


def _worker_unit(i: int, unit: list, allow_no_val: bool) -> list[dict[str, Any]]:
    """In a worker: say which unit this process works on (so a worker that dies can be named), then train it."""
    if _STARTED is not None:
        _STARTED.put((i, os.getpid()))  # SimpleQueue: written at once, not by a feeder thread a kill -9 would lose
    return execute_unit(unit, allow_no_val)


def _pool_round(units: dict[int, list[GridRun]], jobs: int, threads: int, allow_no_val: bool, report,
                stop) -> dict[int, list[GridRun]]:
    """Run ``units`` in one process pool; returns the units to run again in a new pool. When a worker
    dies (``kill -9``, the OOM killer) the pool breaks and its other workers are terminated by it: the
    dead worker's unit fails with how it died, the units the others were running (or never started)
    are returned."""
    ctx = multiprocessing.get_context("spawn")
    started = ctx.SimpleQueue()
    level = logging.getLogger().getEffectiveLevel()
    broken: list[int] = []
    with cfut.ProcessPoolExecutor(max_workers=min(jobs, len(units)), mp_context=ctx, initializer=_worker_init,
                                  initargs=(threads, level, started, tracking.portable())) as pool:
        with _sigint_blocked():  # the workers start (and stay) with SIGINT blocked; the parent stops them
            futures = {pool.submit(_worker_unit, i, u, allow_no_val): i for i, u in units.items()}
        procs = dict(getattr(pool, "_processes", None) or {})  # pid -> Process: exit codes once one dies
        try:
            for fut in cfut.as_completed(futures):
                i = futures[fut]
                if fut.cancelled():
                    continue
                try:
                    outs = fut.result()
                except cfut.process.BrokenProcessPool:
                    broken.append(i)
                    continue
                except Exception as e:  # noqa: BLE001 - e.g. an outcome that could not be pickled
                    outs = [_failed(r, f"worker process failed: {type(e).__name__}: {e}", time.perf_counter())
                            for r in units[i]]
                for out in outs:
                    report(out)
                if stop():
                    for f in futures:
                        f.cancel()  # not started yet: never will be
        except KeyboardInterrupt:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()  # SIGTERM: a run in progress stops now; its folder stays UNFINISHED
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if not broken:
        return {}
    return _after_break({i: units[i] for i in broken}, _drain(started), procs, report)


def _drain(started) -> list[tuple[int, int]]:
    out = []
    while not started.empty():
        out.append(started.get())
    return out


def _after_break(broken: dict[int, list[GridRun]], started: list[tuple[int, int]], procs: dict, report
                 ) -> dict[int, list[GridRun]]:
    """Blame the unit a dead worker was running; the other broken units go to the next round (their
    runs that did finish on disk are reported finished, the others' folders removed)."""
    current = {}  # pid -> the unit it started last
    for i, pid in started:
        current[pid] = i
    unit_pid = {i: pid for pid, i in current.items()}
    again: dict[int, list[GridRun]] = {}
    blamed = 0
    for i, unit in broken.items():
        code = procs[unit_pid[i]].exitcode if unit_pid.get(i) in procs else None
        if code is not None and code not in (0, -signal.SIGTERM):  # SIGTERM: the pool stopped it, not the fault
            why = (f"worker killed by signal {-code} ({'out of memory?' if -code == signal.SIGKILL else signal.Signals(-code).name})"
                   if code < 0 else f"worker exited with code {code}")
            logger.warning("%s while training %s; the other runs go on in a new pool", why, ", ".join(r.name for r in unit))
            for r in unit:
                report(_failed(r, why, time.perf_counter()))
            blamed += 1
            continue
        again[i] = unit
    if not blamed:  # nobody to blame (the worker's exit unknown): fail them rather than loop forever
        for unit in again.values():
            for r in unit:
                report(_failed(r, "worker process failed: BrokenProcessPool (worker died; cause unknown)",
                               time.perf_counter()))
        return {}
    for i, unit in list(again.items()):
        todo = []
        for r in unit:
            if run_status(r) == "finished":  # finished before the pool broke: kept, not retrained
                report({"name": r.name, "status": "finished", "seconds": 0.0, "error": None,
                        "macro_f1": ((RunFolder(r.run_dir).saved_metrics() or {}).get("test") or {}).get("macro_f1")})
                continue
            if r.run_dir.exists():
                shutil.rmtree(r.run_dir)  # stopped half-way by the pool: ours (we hold its lock), redone
            todo.append(r)
        if todo:
            again[i] = todo
        else:
            del again[i]
    return again


def worth_stacking(config) -> bool:
    """Whether stacking pays for this config's features on its device. Measured side by side (`make
    bench`, grid section, idle 2-core CPU): the stacked cls grid took 42.1 s vs 47.5 s one model per run,
    but the demo-sized tokens grid 23.1 s vs 15.4 s, so on a CPU token features train one model per
    run. On CUDA small heads are launch-bound and everything is stacked."""

    return config.features != "tokens" or resolve_device(config.device).type == "cuda"


def plan_units(runs: list, stack: bool, split: dict[str, int] | None = None) -> list[list]:
    """Group ``runs`` (GridRun, in dispatch order) into units: a list of runs trained together.
    ``split``: head -> parts, to cut that head's stacks into that many smaller ones (load balance)."""
    if not stack:
        return [[r] for r in runs]
    units: dict[tuple, list] = {}
    for r in runs:
        stackable = can_stack(r.config) and worth_stacking(r.config)
        key = (r.group, stack_key(r.config)) if stackable else (r.name,)
        units.setdefault(key, []).append(r)
    out = []
    for unit in units.values():
        parts = min(len(unit), (split or {}).get(unit[0].head, 1))
        size = -(-len(unit) // parts)
        out += [unit[i:i + size] for i in range(0, len(unit), size)]
    return out


def _makespan(costs: list[float], workers: int) -> float:
    """Longest-first greedy assignment of ``costs`` to ``workers``: the busiest worker's total."""
    loads = [0.0] * max(1, workers)
    for c in sorted(costs, reverse=True):
        heapq.heapreplace(loads, loads[0] + c)
    return max(loads)


def choose_cpu_layout(units: list[list], cores: int, threads: int = 1) -> tuple[int, dict[str, Any]]:
    """(processes, what was measured) for ``units`` on ``cores`` CPU cores, each run using ``threads``."""
    procs = max(1, cores // threads)
    if procs <= 1 or len(units) <= 1:
        return 1, {"reason": "one process fits or one unit", "split": {}}
    first = units[0][0].group
    probe = [u for u in units if u[0].group == first and len(u) > 1]
    if not probe:
        return min(procs, len(units)), {"reason": "no stack to measure", "split": {}}
    data = _group_data(probe[0][0], probe[0][0].config.cache_dir)
    costs = [probe_step_seconds([r.config for r in u], data, threads=threads) for u in probe]
    # A stack costing more than an even share of the total is cut into parts, or one big stack would
    # keep one process busy long after the others ran out of work.
    share = sum(costs) / procs
    split = {u[0].head: min(len(u), max(1, round(c / share))) for u, c in zip(probe, costs, strict=True) if c > share}
    parts = [c / split.get(u[0].head, 1) for u, c in zip(probe, costs, strict=True)
             for _ in range(split.get(u[0].head, 1))]
    return procs, {"unit_step_seconds": costs, "processes_estimate": _makespan(parts, procs), "split": split,
                   "choice": f"{procs} processes x {threads} thread{'s' if threads > 1 else ''}" + (
                       f", stacks of {', '.join(split)} cut in {', '.join(map(str, split.values()))}" if split else "")}


def execute_unit(unit: list, allow_no_val: bool = False) -> list[dict[str, Any]]:
    """Train one unit; one outcome dict per run (as :func:`_execute` returns)."""
    if len(unit) == 1:  # nothing to stack with: the one-model path (same numbers)
        return [_execute(unit[0], allow_no_val)]
    t0 = time.perf_counter()
    try:
        data = _group_data(unit[0], unit[0].config.cache_dir)
        size = max_members(unit[0].config, data)
    except Exception as e:  # noqa: BLE001 - every run of the unit fails, the grid goes on
        return [_failed(r, e, t0) for r in unit]
    out = []
    for start in range(0, len(unit), size):
        chunk = unit[start:start + size]
        t_chunk = time.perf_counter()
        try:
            results = train_stack([r.config for r in chunk], data, allow_no_val=allow_no_val)
        except Exception as e:  # noqa: BLE001
            logger.debug("stack of %s failed", [r.name for r in chunk], exc_info=True)
            out += [_failed(r, e, t_chunk) for r in chunk]
            continue
        seconds = (time.perf_counter() - t_chunk) / len(chunk)
        for r, res in zip(chunk, results, strict=True):
            if res.error is not None or res.run_dir != r.run_dir:
                out.append(_failed(r, res.error or f"run written to {res.run_dir}, expected {r.run_dir}", t_chunk))
                continue
            test = (res.metrics or {}).get("test") or {}
            out.append({"name": r.name, "status": "finished", "seconds": seconds, "macro_f1": test.get("macro_f1"),
                        "error": None})
    return out


def _failed(run, err: BaseException | str, t0: float) -> dict[str, Any]:
    """The outcome of a run that raised: ``failed`` (error.json written), or ``unfinished`` with
    ``disk_full`` set when its folder could not be written (nothing more is written there: the folder
    has no metrics.json, so it counts as unfinished and the next call redoes it)."""
    if not _is_disk_full(err):
        try:
            return {"name": run.name, "status": "failed", "seconds": time.perf_counter() - t0, "macro_f1": None,
                    "error": _record_failure(run, err)}
        except DiskFullError as e:  # error.json itself did not fit
            err = e
    if isinstance(err, DiskFullError):
        msg = err.message
    elif isinstance(err, OSError):
        msg = disk_full_error(run.run_dir, None, err).message
    else:  # a stacked member's error text: "DiskFullError: <message>; rerun ..."
        msg = str(err).removeprefix("DiskFullError: ").removesuffix(_RESUME)
    return {"name": run.name, "status": "unfinished", "seconds": time.perf_counter() - t0, "macro_f1": None,
            "error": msg, "disk_full": True}


_RESUME = "; rerun the same command to resume"


def _is_disk_full(err: BaseException | str) -> bool:
    if isinstance(err, str):
        return err.startswith("DiskFullError:")
    return isinstance(err, DiskFullError) or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT))
