"""Helpers both stages use (neutral ground: stage two never imports stage-one internals).

Kept import-light: torch is imported inside :func:`resolve_device` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mmcache.errors import BadInputError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; ``"cpu"``; ``"cuda"`` / ``"cuda:N"`` (must be available)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BadInputError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise BadInputError(f"unsupported device {device!r}; use 'auto', 'cpu' or 'cuda'")
    return dev


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write via a temp file + rename (fsynced): a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def small_model_threads() -> int:
    """Default CPU threads for a small model (a fusion head): ``min(2, cores // 2)``, at least 1; fixed
    per machine (not load-dependent), so the same config gives the same numbers run after run.

    Measured on a 2-core VM shared with other jobs (self-attention on tokens, one epoch): 1 thread
    0.4 s vs 2 threads 2.6-5.9 s; with one more CPU-bound process: 1.0 s vs 12-15 s. Oversubscribed
    OpenMP threads spin, so on a busy machine more threads make a small model many times slower,
    while fewer threads cost at most their share of the speed-up on an idle one."""
    return max(1, min(2, cpu_cores() // 2))
