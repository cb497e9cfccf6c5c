"""Small exclusive locks on files: which process works on what (an ablation's runs, its results folder).

A lock is a ``flock`` on a lock file that also names its holder (JSON: pid, host, command, since). The
kernel drops the flock when the holder dies (``kill -9`` and the OOM killer included), so a lock of a
dead process is free again at once; its file, still naming the dead holder, is recovered (logged) by
the next taker. Lock files are never deleted (deleting a locked file races with its next taker).

Same model as the cache folder lock of stage one (``mmcache/cache/lock.py``), without its shard kinds
and cache wording. Every ``open`` of a lock file is its own holder: two claims of one file in one
process conflict too. Needs ``flock`` (POSIX); where it is missing, every claim succeeds (logged once).
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
except ImportError:  # pragma: no cover -- Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["FileLock", "describe", "holder", "locked", "try_lock", "wait_lock"]


@dataclass
class FileLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) frees it."""

    path: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
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
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_text(encoding="utf-8").strip()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def describe(h: dict[str, Any] | None) -> str:
    """``pid 123 on host x since ...`` for messages (``another process`` when unknown)."""
    if not h:
        return "another process"
    return f"pid {h.get('pid')} on host {h.get('host')} since {h.get('since')}"


def _flock(fd: int) -> bool:
    """True: locked now; False: someone else holds it."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def try_lock(path: str | Path) -> FileLock | None:
    """Claim ``path`` (created, with its folder) without waiting: the held lock, or None when a live
    process holds it. A file naming a dead holder is taken over (logged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd):
            os.close(fd)
            return None
        previous = _read(path)
        if previous and previous.get("pid") != os.getpid():
            logger.info("recovered lock %s left by %s (no longer running)", path, describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_info()).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return FileLock(path, fd)


def holder(path: str | Path) -> dict[str, Any] | None:
    """Who holds ``path`` now ({} when the holder did not say), or None when nobody does."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _flock(fd):  # free (our probe lock goes with the close)
            return None
        return _read(path) or {}
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
