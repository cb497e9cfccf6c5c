"""One lock mechanism (mmcache/locks.py) under both lock users: the ablation's run locks and the cache
folder lock (mmcache/cache/lock.py) write and read one holder format, refuse each other's live holders,
share the pid fallback where ``flock`` is unsupported, and the cache lock builds on the core, never the
other way round."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import mmcache.locks as locks
from mmcache.cache.lock import LOCK_NAME, CacheBusyError, folder_lock, writer_of

REPO = Path(__file__).resolve().parents[1]


def _mmcache_imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        mods |= {n for n in names if n.split(".")[0] == "mmcache"}
    return mods


def test_the_cache_lock_imports_the_core_and_the_core_imports_no_mmcache_module():
    assert "mmcache.locks" in _mmcache_imports(REPO / "mmcache" / "cache" / "lock.py")
    assert _mmcache_imports(REPO / "mmcache" / "locks.py") == set()  # so no cycle can pass through it


def test_a_cache_folder_lock_holder_is_read_by_the_core(tmp_path):
    with folder_lock(tmp_path):
        h = locks.holder(tmp_path / LOCK_NAME)
        assert h is not None and h["pid"] == os.getpid() and h["host"] == socket.gethostname()
        assert set(h) == {"pid", "host", "command", "since"}
    assert locks.holder(tmp_path / LOCK_NAME) is None  # released: free again


def test_a_shard_holder_is_read_by_the_core(tmp_path):
    with folder_lock(tmp_path, shard_file="shard-0-of-2.h5"):
        assert locks.holder(tmp_path / LOCK_NAME) == {}  # held shared: no single holder named
        assert locks.holder(tmp_path / f"{LOCK_NAME}-shard-0-of-2.h5")["pid"] == os.getpid()


def test_a_core_lock_is_a_live_writer_for_the_cache(tmp_path):
    with locks.try_lock(tmp_path / LOCK_NAME) as lock:
        assert lock is not None
        assert writer_of(tmp_path)["pid"] == os.getpid()
        # another open of the file is another holder, even in this process: the cache lock refuses
        with pytest.raises(CacheBusyError, match=f"in use by pid {os.getpid()} on host "), folder_lock(tmp_path):
            pass
    assert writer_of(tmp_path) is None
    with folder_lock(tmp_path):  # free again once the core lock is released
        assert locks.try_lock(tmp_path / LOCK_NAME) is None


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_without_flock_the_pid_in_the_file_decides_for_both_users(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(locks, "fcntl", None)  # a platform / file system without flock
    path = tmp_path / LOCK_NAME
    live = {"pid": os.getppid(), "host": socket.gethostname(), "command": "other", "since": "now"}
    path.write_text(json.dumps(live), encoding="utf-8")
    assert locks.try_lock(path) is None and locks.holder(path) == live
    with pytest.raises(CacheBusyError, match=f"pid {os.getppid()} .*command: other"), folder_lock(tmp_path):
        pass
    path.write_text(json.dumps({**live, "pid": _dead_pid()}), encoding="utf-8")
    with caplog.at_level("INFO"), locks.try_lock(path) as lock:
        assert lock is not None and locks.read_holder(path)["pid"] == os.getpid()
    assert "recovered lock" in caplog.text
    assert locks.read_holder(path) is None  # released: the file says nobody
