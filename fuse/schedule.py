"""How an ablation grid is packed onto the machine when runs are stacked (see :mod:`fuse.stack`).

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

import heapq
import logging
import time
from typing import Any

from mmcache.fuse.stack import can_stack, max_members, probe_step_seconds, stack_key, train_stack

logger = logging.getLogger(__name__)

__all__ = ["choose_cpu_layout", "execute_unit", "plan_units"]


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
    from mmcache.fuse import ablate

    if cores <= 1 or len(units) <= 1:
        return 1, max(1, cores), {"reason": "one core or one unit"}
    first = units[0][0].group
    probe = [u for u in units if u[0].group == first and len(u) > 1]
    if not probe:
        return min(cores, len(units)), 1, {"reason": "no stack to measure"}
    data = ablate._group_data(probe[0][0], probe[0][0].config.cache_dir)
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
    """Train one unit; one outcome dict per run (as :func:`fuse.ablate._execute` returns)."""
    from mmcache.fuse import ablate

    if len(unit) == 1:  # nothing to stack with: the one-model path (same numbers)
        return [ablate._execute(unit[0], allow_no_val)]
    t0 = time.perf_counter()
    try:
        data = ablate._group_data(unit[0], unit[0].config.cache_dir)
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
    from mmcache.fuse import ablate

    return {"name": run.name, "status": "failed", "seconds": time.perf_counter() - t0, "macro_f1": None,
            "error": ablate._record_failure(run, err)}
