"""Locks on files: which process works on what (an ablation's runs and results folder here; the cache
folder lock of stage one, ``mmcache/cache/lock.py``, is built on the same primitives).

A lock is a ``flock`` on a lock file that also names its holder (JSON: pid, host, command, since). The
kernel drops the flock when the holder dies (``kill -9`` and the OOM killer included), so a lock of a
dead process is free again at once; its file, still naming the dead holder, is recovered (logged) by
the next taker. Lock files are never deleted (deleting a locked file races with its next taker).

Every ``open`` of a lock file is its own holder: two claims of one file in one process conflict too.
Where ``flock`` is not supported, the pid in the file decides (alive on this host = held; another
host's lock = held until its holder releases it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover -- Windows: the pid in the file decides
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["FileLock", "acquire", "describe", "flock", "holder", "holder_live", "locked", "read_holder",
           "try_lock", "wait_lock"]


@dataclass
class FileLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) frees it. ``owner``: this holder
    wrote the file (an exclusive lock), so releasing it clears the file."""

    path: Path
    fd: int | None
    owner: bool = True

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.owner:
                os.ftruncate(fd, 0)  # an empty lock file means: nobody
        except OSError as e:  # the flock goes with the close below either way
            logger.debug("could not clear lock file %s: %s", self.path, e)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The holder a lock file names, or None (no file, empty, unreadable); whether it still holds the
    lock is :func:`holder`'s question."""
    try:
        raw = Path(path).read_text(encoding="utf-8").strip()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def describe(h: dict[str, Any] | None, *, command: bool = False) -> str:
    """``pid 123 on host x since ...`` (``command``: plus `` (command: ...)``) for messages;
    ``another process`` when the holder is unknown."""
    if not h:
        return "another process"
    who = f"pid {h.get('pid')} on host {h.get('host')} since {h.get('since')}"
    return f"{who} (command: {h.get('command') or '?'})" if command else who


def flock(fd: int, *, shared: bool = False) -> bool | None:
    """Lock ``fd`` without waiting. True: locked now; False: someone else holds it; None: ``flock`` is
    not supported here (then the pid in the file decides: :func:`holder_live`)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_live(h: dict[str, Any] | None) -> bool:
    """Whether holder ``h`` (another process) still runs: the fallback where ``flock`` is unsupported."""
    if not h:
        return False
    if h.get("host") != socket.gethostname():
        return True  # cannot check another machine's pids
    return int(h.get("pid", -1)) != os.getpid() and _alive(int(h.get("pid", -1)))


def acquire(path: str | Path, *, shared: bool = False) -> tuple[FileLock | None, dict[str, Any] | None]:
    """The mechanism under every lock: open ``path`` (created; its folder must exist), flock it without
    waiting and, unless ``shared``, write our holder JSON into it.

    Returns ``(lock, stale)``: ``stale`` is the dead holder the file still named (now recovered; the
    caller logs it in its own words) or None; or ``(None, holder)`` when a live process holds it
    (``holder``: what the file says, None when unknown)."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        got = flock(fd, shared=shared)
        previous = read_holder(path)
        busy = got is False or (got is None and holder_live(previous))
        if not busy:
            os.ftruncate(fd, 0)
            if not shared:
                os.pwrite(fd, json.dumps(_info()).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    if busy:
        os.close(fd)
        return None, previous
    stale = previous if previous and previous.get("pid") != os.getpid() else None
    return FileLock(path, fd, owner=not shared), stale


def try_lock(path: str | Path) -> FileLock | None:
    """Claim ``path`` (created, with its folder) without waiting: the held lock, or None when a live
    process holds it. A file naming a dead holder is taken over (logged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, stale = acquire(path)
    if lock is not None and stale:
        logger.info("recovered lock %s left by %s (no longer running)", path, describe(stale))
    return lock


def holder(path: str | Path) -> dict[str, Any] | None:
    """Who holds ``path`` now ({} when the holder did not say), or None when nobody does."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        got = flock(fd)  # when free, our probe lock goes with the close
        h = read_holder(path)
        return (h or {}) if got is False or (got is None and holder_live(h)) else None
    finally:
        os.close(fd)


def wait_lock(path: str | Path, *, timeout: float | None = None, poll: float = 0.5, heartbeat: float = 10.0,
              what: str = "", on_wait: Callable[[dict[str, Any], float], None] | None = None) -> FileLock | None:
    """Claim ``path``, waiting while another process holds it; None after ``timeout`` seconds.
    Every ``heartbeat`` seconds of waiting, ``on_wait(holder, waited)`` is called (default: an info line)."""
    t0 = last = time.monotonic()
    while True:
        lock = try_lock(path)
        if lock is not None:
            return lock
        now = time.monotonic()
        if timeout is not None and now - t0 >= timeout:
            return None
        if now - last >= heartbeat:
            last = now
            h = holder(path) or {}
            if on_wait is not None:
                on_wait(h, now - t0)
            else:
                logger.info("waiting for %s held by %s (%.0fs)", what or path, describe(h), now - t0)
        time.sleep(poll)


@contextlib.contextmanager
def locked(path: str | Path, *, timeout: float | None = None, what: str = "",
           busy: Callable[[dict[str, Any] | None], BaseException] | None = None) -> Iterator[FileLock]:
    """Hold ``path`` for the ``with`` block (waiting up to ``timeout``; then ``busy(holder)`` is raised,
    default a TimeoutError)."""
    lock = wait_lock(path, timeout=timeout, what=what)
    if lock is None:
        h = holder(path)
        raise busy(h) if busy else TimeoutError(f"{what or path} still held by {describe(h)}")
    with lock:
        yield lock
