"""Helpers both stages use (neutral ground: stage two never imports stage-one internals).

Kept import-light: torch is imported inside :func:`resolve_device` only.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from mmcache.errors import BadInputError, DiskFullError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


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
    """Write via a temp file + rename (fsynced): a crash never leaves a half-written file.

    On any failure the temp file is removed and ``path`` keeps its old content; ENOSPC / EDQUOT
    becomes one :class:`~mmcache.errors.DiskFullError` naming the bytes needed and available."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = _write_temp(path, payload)
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def atomic_write_many(files: dict[Path, str | bytes]) -> None:
    """Write a set of files all-or-nothing: every file to a temp name first, then rename them all.

    Used for sets that must agree with each other (an ablation's ``.md`` / ``.csv`` / ``.json``): a
    failure while writing (disk full) removes the temps and leaves every old file as it was. The
    renames themselves need no space, so once the temps exist the set is replaced as a whole."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            payload = data.encode("utf-8") if isinstance(data, str) else data
            temps.append((_write_temp(Path(path), payload), Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            _discard(tmp)
        raise


def _write_temp(path: Path, payload: bytes) -> Path:
    """``payload`` written and fsynced to a temp file beside ``path``; its path. Nothing is left on failure."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as e:
        _discard(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(path, len(payload), e) from e
        raise
    return tmp


def _discard(tmp: Path) -> None:
    """Remove a temp file; a failure to do so is logged (the original error is the one to report)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("could not remove temp file %s: %s", tmp, e)


def disk_full_error(path: str | Path, needed: int | None, cause: BaseException | None = None) -> DiskFullError:
    """One clear :class:`DiskFullError` for ENOSPC while writing ``path`` (``needed`` bytes)."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes available"
    except OSError:
        free = "free space unknown"
    need = f"needs {needed:,} bytes, " if needed is not None else ""
    why = f" ({' '.join(str(cause).split())[:120]})" if cause is not None else ""
    return DiskFullError(f"disk full writing {path}: {need}{free} on that filesystem{why}. Finished work is kept; "
                         "free space")


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
