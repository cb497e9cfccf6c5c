"""Who is writing a cache folder: one explicit lock per ``cache/<dataset>/`` (owns ``.lock`` files).

A writer (``extract``, ``cache merge``) holds ``cache/<dataset>/.lock`` for as long as it writes. The
file says who holds it (JSON: pid, host, command, since) so a refusal can name the holder; the lock
itself is a ``flock`` on that file, which the kernel drops when the holder dies (``kill -9``
included), so a crashed writer never blocks the next run. A lock file whose holder is gone is
recovered automatically (logged). Where ``flock`` is not supported, the pid in the file decides
(alive on this host = held; another host's lock = held until its holder releases it).

Two kinds of holders:

* exclusive (an unsharded ``extract``, a merge): no other writer of the folder at all;
* shard (``--shard i/n`` job-array tasks, torchrun ranks): a *shared* flock on ``.lock`` plus an
  exclusive lock on ``.lock-<shard file name>``: shards of one run work side by side, two processes
  writing the same shard, or a shard run next to an unsharded one, are refused.

Re-entrant per process: a process that already holds a folder's lock (``run_extract`` around
``extract_shard``) takes it again for free. Readers never take a lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmcache.errors import BadInputError, CacheError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

try:  # pragma: no cover -- every POSIX system has it
    import fcntl
except ImportError:  # pragma: no cover -- Windows: the pid in the file decides
    fcntl = None  # type: ignore[assignment]


class CacheBusyError(CacheError, BadInputError):
    """Another live process writes this cache folder (the CLI exits 2: wait, or stop that process)."""


_HELD: dict[tuple[str, str], list[Any]] = {}  # (folder, kind) -> [count, fds]


def _info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names, or None (no file, empty, unreadable)."""
    try:
        raw = Path(path).read_text(encoding="utf-8").strip()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(h: dict[str, Any]) -> str:
    return (f"pid {h.get('pid')} on host {h.get('host')} since {h.get('since')} "
            f"(command: {h.get('command') or '?'})")


def _busy(folder: Path, holders: list[dict[str, Any]]) -> CacheBusyError:
    who = "; ".join(describe_holder(h) for h in holders) or "another process (holder unknown)"
    remote = any(h.get("host") != socket.gethostname() for h in holders)
    gone = (f"if that process is gone, delete {folder / LOCK_NAME}" if remote
            else "a lock left by a dead process is recovered automatically")
    return CacheBusyError(f"cache {folder} in use by {who}. Wait for it to finish or stop it; --force does not "
                          f"override a live lock ({gone})")


def _flock(fd: int, shared: bool) -> bool | None:
    """True: locked; False: held by someone else; None: flock unsupported here."""
    if fcntl is None:
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


def _holder_live(h: dict[str, Any] | None) -> bool:
    if not h:
        return False
    if h.get("host") != socket.gethostname():
        return True  # cannot check another machine's pids
    return int(h.get("pid", -1)) != os.getpid() and _alive(int(h.get("pid", -1)))


def _take(path: Path, shared: bool, folder: Path) -> int:
    """Open + lock ``path``; write our info unless shared. Returns the fd; raises CacheBusyError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        got = _flock(fd, shared)
        previous = read_holder(path)
        if got is False or (got is None and _holder_live(previous)):
            raise _busy(folder, _live_holders(folder, path, previous))
        if previous and previous.get("pid") != os.getpid():
            log.warning("recovered a stale cache lock %s left by %s (no longer running)", path,
                        describe_holder(previous))
        os.ftruncate(fd, 0)
        if not shared:
            os.pwrite(fd, json.dumps(_info()).encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


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
    if fcntl is None:  # pragma: no cover
        return _holder_live(read_holder(path))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        got = _flock(fd, shared=False)
        return got is False or (got is None and _holder_live(read_holder(path)))
    finally:
        os.close(fd)


def _release(path: Path, fd: int, owner: bool) -> None:
    try:
        if owner:
            os.ftruncate(fd, 0)  # an empty lock file means: nobody
    finally:
        os.close(fd)  # drops the flock


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
    main = folder / LOCK_NAME
    fds: list[tuple[Path, int, bool]] = []
    try:
        fds.append((main, _take(main, shared=bool(shard_file), folder=folder), not shard_file))
        if shard_file:
            p = folder / f"{LOCK_NAME}-{shard_file}"
            fds.append((p, _take(p, shared=False, folder=folder), True))
    except BaseException:
        for p, fd, owner in reversed(fds):
            _release(p, fd, owner)
        raise
    _HELD[key] = [1, fds]
    try:
        yield
    finally:
        del _HELD[key]
        for p, fd, owner in reversed(fds):
            _release(p, fd, owner)


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
