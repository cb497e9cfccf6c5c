"""Executing an ablation grid: which runs to (re)train, how they are packed onto the machine and
trained in this process or in worker processes; a failing run is recorded, never the end of the grid.

How an ablation grid is packed onto the machine when runs are stacked (see :mod:`fuse.stack`).

* :func:`plan_units`: runs of one data group whose configs differ only in seed / lr / weight decay (and
  whose head can be stacked) become one *stack unit*; every other run is a unit of its own, trained by
  :func:`fuse.train.train` as before.
* :func:`choose_cpu_layout`: on a CPU, one process with every core's threads per stack, or one single-
  threaded process per core running stacks side by side? Measured, not guessed: one stacked step of each
  unit of the first group at 1 thread (the unit costs), and the costliest unit again at all cores (the
  thread speed-up); threads win when sum(costs) / speed-up <= the makespan of the costs spread over the
  cores (longest first). On CUDA the grid runs in one process, stacks back to back.
* :func:`execute_unit`: train one unit in this process (a worker or the main one); never raises for a
  failing run. A stack larger than the free memory allows (:func:`fuse.stack.max_members`) is trained in
  consecutive chunks.
"""

from __future__ import annotations

import concurrent.futures as cfut
import contextlib
import dataclasses
import heapq
import logging
import multiprocessing
import shutil
import signal
import time
from typing import Any

from mmcache.fuse.ablate.grid import GridRun, run_status
from mmcache.fuse.data import FusionData, load_data
from mmcache.fuse.runs import RunFolder
from mmcache.fuse.stack import can_stack, max_members, probe_step_seconds, stack_key, train_stack
from mmcache.fuse.train import train

from mmcache.common import cpu_cores
from mmcache.errors import BadInputError, Interrupted, PipelineError
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




def worth_stacking(config) -> bool:
    """Whether stacking pays for this config's features on its device. Measured side by side (`make
    bench`, grid section, idle 2-core CPU): the stacked cls grid took 42.1 s vs 47.5 s one model per run,
    but the demo-sized tokens grid 23.1 s vs 15.4 s, so on a CPU token features train one model per
    run. On CUDA small heads are launch-bound and everything is stacked."""
    from mmcache.common import resolve_device

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


def choose_cpu_layout(units: list[list], cores: int) -> tuple[int, int, dict[str, Any]]:
    """(processes, threads per process, what was measured) for ``units`` on ``cores`` CPU cores."""
    if cores <= 1 or len(units) <= 1:
        return 1, max(1, cores), {"reason": "one core or one unit"}
    first = units[0][0].group
    probe = [u for u in units if u[0].group == first and len(u) > 1]
    if not probe:
        return min(cores, len(units)), 1, {"reason": "no stack to measure"}
    data = _group_data(probe[0][0], probe[0][0].config.cache_dir)
    costs = [probe_step_seconds([r.config for r in u], data, threads=1) for u in probe]
    heavy = probe[max(range(len(probe)), key=costs.__getitem__)]
    t_all = probe_step_seconds([r.config for r in heavy], data, threads=cores)
    speedup = max(costs) / t_all
    threads_time = sum(costs) / speedup
    # Processes: a stack costing more than an even share of the total is cut into parts (members are
    # independent), or one big stack would keep one core busy long after the others ran out of work.
    share = sum(costs) / cores
    split = {u[0].head: min(len(u), max(1, round(c / share))) for u, c in zip(probe, costs, strict=True) if c > share}
    parts = [c / split.get(u[0].head, 1) for u, c in zip(probe, costs, strict=True)
             for _ in range(split.get(u[0].head, 1))]
    procs_time = _makespan(parts, cores)
    info = {"unit_step_seconds_1_thread": costs, "thread_speedup": speedup, "threads_estimate": threads_time,
            "processes_estimate": procs_time, "split": split}
    if threads_time <= procs_time:
        return 1, cores, {**info, "split": {}, "choice": f"1 process x {cores} threads"}
    return cores, 1, {**info, "choice": f"{cores} processes x 1 thread" + (
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
        return {"name": run.name, "status": "failed", "seconds": time.perf_counter() - t0, "macro_f1": None,
            "error": _record_failure(run, err)}
