"""Who is writing a cache folder: one explicit lock per ``cache/<dataset>/`` (owns ``.lock`` files).

A writer (``extract``, ``cache merge``) holds ``cache/<dataset>/.lock`` for as long as it writes. The
file says who holds it (JSON: pid, host, command, since) so a refusal can name the holder; the lock
itself is a ``flock`` on that file, which the kernel drops when the holder dies (``kill -9``
included), so a crashed writer never blocks the next run. A lock file whose holder is gone is
recovered automatically (logged). Where ``flock`` is not supported, the pid in the file decides
(alive on this host = held; another host's lock = held until its holder releases it). The mechanism
(open + flock + holder JSON + recovery) is the core's, :mod:`mmcache.locks`; this module adds what is
specific to cache folders: the lock file names, the shard kinds, re-entrancy and the refusal's wording.

Two kinds of holders:

* exclusive (an unsharded ``extract``, a merge): no other writer of the folder at all;
* shard (``--shard i/n`` job-array tasks, torchrun ranks): a *shared* flock on ``.lock`` plus an
  exclusive lock on ``.lock-<shard file name>``: shards of one run work side by side, two processes
  writing the same shard, or a shard run next to an unsharded one, are refused.

Re-entrant per process: a process that already holds a folder's lock (``run_extract`` around
``extract_shard``) takes it again for free. Readers never take a lock.
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmcache.errors import BadInputError, CacheError
from mmcache.locks import FileLock, acquire, describe, holder, read_holder

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

__all__ = ["LOCK_NAME", "CacheBusyError", "describe_holder", "folder_lock", "read_holder", "writer_of"]


class CacheBusyError(CacheError, BadInputError):
    """Another live process writes this cache folder (the CLI exits 2: wait, or stop that process)."""


_HELD: dict[tuple[str, str], list[Any]] = {}  # (folder, kind) -> [count, locks]


def describe_holder(h: dict[str, Any]) -> str:
    """``pid 123 on host x since ... (command: ...)`` for messages."""
    return describe(h, command=True)


def _busy(folder: Path, holders: list[dict[str, Any]]) -> CacheBusyError:
    who = "; ".join(describe_holder(h) for h in holders) or "another process (holder unknown)"
    remote = any(h.get("host") != socket.gethostname() for h in holders)
    gone = (f"if that process is gone, delete {folder / LOCK_NAME}" if remote
            else "a lock left by a dead process is recovered automatically")
    return CacheBusyError(f"cache {folder} in use by {who}. Wait for it to finish or stop it; --force does not "
                          f"override a live lock ({gone})")


def _take(path: Path, shared: bool, folder: Path) -> FileLock:
    """Lock ``path`` (shared: no holder written); raises CacheBusyError naming the live holders."""
    lock, previous = acquire(path, shared=shared)
    if lock is None:
        raise _busy(folder, _live_holders(folder, path, previous))
    if previous:
        log.warning("recovered a stale cache lock %s left by %s (no longer running)", path,
                    describe_holder(previous))
    return lock


def _live_holders(folder: Path, path: Path, previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Who holds ``path`` (the folder lock: also the shard runs holding it shared)."""
    found = [previous] if previous else []
    if path.name == LOCK_NAME:
        for p in sorted(folder.glob(LOCK_NAME + "-*")):
            h = read_holder(p)
            if h and _is_locked(p):
                found.append(h)
    return found


def _is_locked(path: Path) -> bool:
    try:
        return holder(path) is not None
    except OSError:
        return False


@contextmanager
def folder_lock(folder: str | Path, *, shard_file: str | None = None):
    """Hold the write lock of ``folder`` (a ``cache/<dataset>/`` folder) for the ``with`` block.

    ``shard_file``: the name of the shard file this process writes; then the folder lock is shared
    with the other shards' writers and the shard file gets its own exclusive lock.
    Raises :class:`CacheBusyError` naming the live holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = shard_file or ""
    key = (str(folder.resolve()), kind)
    if key in _HELD or (str(folder.resolve()), "") in _HELD:  # re-entrant (exclusive covers shards too)
        held = _HELD.get(key) or _HELD[(str(folder.resolve()), "")]
        held[0] += 1
        try:
            yield
        finally:
            held[0] -= 1
        return
    locks: list[FileLock] = []
    try:
        locks.append(_take(folder / LOCK_NAME, shared=bool(shard_file), folder=folder))
        if shard_file:
            locks.append(_take(folder / f"{LOCK_NAME}-{shard_file}", shared=False, folder=folder))
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        raise
    _HELD[key] = [1, locks]
    try:
        yield
    finally:
        del _HELD[key]
        for lock in reversed(locks):
            lock.release()


def writer_of(folder: str | Path) -> dict[str, Any] | None:
    """The live writer of ``folder`` (exclusive or shard), or None: for readers' error messages."""
    folder = Path(folder)
    main = folder / LOCK_NAME
    if not main.exists():
        return None
    if _is_locked(main):
        return read_holder(main) or next(iter(_live_holders(folder, main, None)), None) or {}
    for p in sorted(folder.glob(LOCK_NAME + "-*")):
        if _is_locked(p):
            return read_holder(p) or {}
    return None
