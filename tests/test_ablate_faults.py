"""Faults of `ablate` (and the writers it shares with `train-fusion` and `analyze`), each injected for real:

* two `ablate` processes on one runs / results folder (real subprocesses): the second trains nothing the
  first holds, never writes into its runs, waits for them, and both tables end correct;
* a stale run lock of a dead process is recovered;
* a worker killed with signal 9 mid-grid: only its run fails ("worker killed by signal 9 (out of
  memory?)"), the pool is rebuilt and every other run finishes;
* disk full (ENOSPC injected into atomic_write's file writes) in `train-fusion`, `ablate` and `analyze`:
  one `error:` line and exit 1 (a DiskFullError from the library), no temp file left, the old table set
  unchanged, finished runs kept, and a plain rerun equal to a clean run.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mmcache.fuse.ablate as ab
import pytest
from mmcache.fuse.ablate import execute
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig

from mmcache import cli, common, locks
from mmcache.errors import DiskFullError

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig(dim=8, heads=2, epochs=1, batch_size=16, eval_batch_size=64, lr=3e-3, patience=0, device="cpu")
CLI_BASE = TrainConfig(dim=8, epochs=1, batch_size=16, lr=3e-3, device="cpu")  # what FLAGS give `ablate`
FLAGS = ["--dim", "8", "--epochs", "1", "--batch-size", "16", "--lr", "3e-3", "--device", "cpu", "--threads", "1",
         "--no-plots"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=40, dt=8, di=8, lt=4, li=3)
    return root


def _tmp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if ".tmp" in p.name]


def _rows(results: Path) -> list[tuple]:
    """The measured numbers of a table set (no timings, no paths)."""
    table = json.loads((results / "ablation_synth.json").read_text())
    return [(r["head"], r["features"], r["seeds_finished"], *(r[k]["mean"] for k in ("accuracy", "macro_f1",
                                                                                     "weighted_f1")))
            for r in table["rows"]]


# --------------------------------------------------------------------------------------------- disk full

class _Full:
    """Replaces ``open`` in mmcache.common: files whose name matches ``match`` (after the first ``after``
    of them) share ``budget`` bytes, then every write raises ENOSPC (after writing what fitted, as a
    real disk does)."""

    def __init__(self, match: str, budget: int, after: int = 0):
        self.match, self.budget, self.after, self.hits = match, budget, after, 0

    def __call__(self, path, mode="r", *a, **kw):
        fh = open(path, mode, *a, **kw)  # noqa: SIM115 -- handed back to the caller's with block
        if "w" not in mode or self.match not in Path(path).name:
            return fh
        self.hits += 1
        return fh if self.hits <= self.after else _FullFile(fh, self)


class _FullFile:
    def __init__(self, fh, disk: _Full):
        self.fh, self.disk = fh, disk

    def write(self, data):
        n = min(len(data), max(0, self.disk.budget))
        self.disk.budget -= n
        self.fh.write(data[:n])
        if n < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_atomic_write_enospc_is_one_error_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old\n")
    monkeypatch.setattr(common, "open", _Full("x.json", budget=3), raising=False)
    with pytest.raises(DiskFullError, match=r"disk full writing .*x\.json: needs 1,000 bytes, [\d,]+ bytes available"):
        common.atomic_write(target, "y" * 1000)
    assert target.read_text() == "old\n" and not _tmp_files(tmp_path)


def test_write_results_is_all_or_nothing(cache, tmp_path, monkeypatch):
    """A full disk while writing the .json of a table set leaves the old .md/.csv/.json as they were."""
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only"], features=["cls"], seeds=1,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    ab.run_grid(runs)
    res = tmp_path / "results"
    ab.write_results(ab.aggregate(runs), res, plots=False)
    old = {p.name: p.read_bytes() for p in res.glob("ablation_*")}
    more = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only"], features=["cls"], seeds=2,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    ab.run_grid(more)
    monkeypatch.setattr(common, "open", _Full("ablation_synth.json", budget=100), raising=False)
    with pytest.raises(DiskFullError, match="needs"):
        ab.write_results(ab.aggregate(more), res, plots=False)
    assert {p.name: p.read_bytes() for p in res.glob("ablation_*")} == old and not _tmp_files(res)
    monkeypatch.undo()
    ab.write_results(ab.aggregate(more), res, plots=False)
    assert _rows(res)[0][2] == 2


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "disk full" in lines[0] and "needs" in lines[0] and "bytes available" in lines[0]
    return lines[0]


def test_train_fusion_disk_full(cache, tmp_path, monkeypatch, capsys):
    args = ["train-fusion", "--head", "basic", "--cache-dir", cache, "--runs-dir", tmp_path / "runs", "--run-name",
            "r", "--quiet", *[f for f in FLAGS if f != "--no-plots"]]
    monkeypatch.setattr(common, "open", _Full("metrics.json", budget=50), raising=False)
    code, _, err = _cli(capsys, *args)
    assert code == 1
    _one_error_line(err)
    run = tmp_path / "runs" / "r"
    assert (run / "UNFINISHED").is_file() and not (run / "metrics.json").exists() and not _tmp_files(tmp_path / "runs")
    monkeypatch.undo()
    code, _, _ = _cli(capsys, *args)  # after freeing space: a new folder (the unfinished one is kept, as always)
    assert code == 0
    clean = ["train-fusion", "--head", "basic", "--cache-dir", cache, "--runs-dir", tmp_path / "clean", "--run-name",
             "r", "--quiet", *[f for f in FLAGS if f != "--no-plots"]]
    assert _cli(capsys, *clean)[0] == 0
    rerun = json.loads((tmp_path / "runs" / "r-2" / "metrics.json").read_text())
    ref = json.loads((tmp_path / "clean" / "r" / "metrics.json").read_text())
    assert rerun["test"] == ref["test"] and rerun["val"] == ref["val"]


def test_ablate_disk_full_mid_grid_keeps_finished_runs_and_old_tables(cache, tmp_path, monkeypatch, capsys):
    base = ["ablate", "-d", "synth", "--heads", "text_only,basic", "--features", "cls", "--cache-dir", cache,
            "--jobs", "1", "--no-stack", *FLAGS]
    args = [*base, "--seeds", "3", "--runs-dir", tmp_path / "runs", "--results-dir", tmp_path / "results"]
    assert _cli(capsys, *base, "--seeds", "1", "--runs-dir", tmp_path / "runs", "--results-dir",
                tmp_path / "results")[0] == 0  # the old table set: one seed
    res = tmp_path / "results"
    old = {p.name: p.read_bytes() for p in res.glob("ablation_*")}
    # the 3rd new run's metrics.json does not fit (2 trained before it)
    monkeypatch.setattr(common, "open", _Full("metrics.json", budget=0, after=2), raising=False)
    code, _, err = _cli(capsys, *args)
    assert code == 1
    line = _one_error_line(err)
    assert "left unfinished" in line and "rerun" in line
    grid = ab.expand_grid(CLI_BASE, datasets=["synth"], heads=["text_only", "basic"], features=["cls"], seeds=3,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    status = [ab.run_status(r) for r in grid]
    assert status.count("finished") == 4 and status.count("unfinished") == 1 and "failed" not in status
    assert not list((tmp_path / "runs").rglob("error.json"))
    assert {p.name: p.read_bytes() for p in res.glob("ablation_*")} == old
    assert not _tmp_files(tmp_path / "runs", res)
    monkeypatch.undo()
    code, out, _ = _cli(capsys, *args)
    assert code == 0 and "2 trained, 4 reused, 0 failed" in out
    assert _cli(capsys, *base, "--seeds", "3", "--runs-dir", tmp_path / "clean",
                "--results-dir", tmp_path / "clean_results")[0] == 0
    assert _rows(res) == _rows(tmp_path / "clean_results")


def test_ablate_disk_full_writing_tables(cache, tmp_path, monkeypatch, capsys):
    args = ["ablate", "-d", "synth", "--heads", "text_only", "--features", "cls", "--cache-dir", cache, "--jobs", "1",
            "--runs-dir", tmp_path / "runs", "--results-dir", tmp_path / "results", *FLAGS]
    assert _cli(capsys, *args, "--seeds", "1")[0] == 0
    res = tmp_path / "results"
    old = {p.name: p.read_bytes() for p in res.glob("ablation_*")}
    monkeypatch.setattr(common, "open", _Full("ablation_synth.csv", budget=10), raising=False)
    code, _, err = _cli(capsys, *args, "--seeds", "2")
    assert code == 1
    _one_error_line(err)
    assert {p.name: p.read_bytes() for p in res.glob("ablation_*")} == old and not _tmp_files(tmp_path / "runs", res)
    monkeypatch.undo()
    code, out, _ = _cli(capsys, *args, "--seeds", "2")
    assert code == 0 and "0 trained, 2 reused" in out and _rows(res)[0][2] == 2


def test_analyze_disk_full(cache, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mmcache.fuse.analyze import analyze_run
    from mmcache.fuse.train import train

    run = train(dataclasses.replace(TINY, head="basic", cache_dir=str(cache), runs_dir=str(tmp_path / "runs"),
                                    run_name="a", dataset="synth")).run_dir
    monkeypatch.setattr(common, "open", _Full("analysis.json", budget=20), raising=False)
    with pytest.raises(DiskFullError, match=r"disk full writing .*analysis\.json: needs"):
        analyze_run(run, heatmaps=0, gallery=0)
    assert not _tmp_files(run) and not (run / "analysis" / "analysis.json").exists()
    monkeypatch.undo()
    again = analyze_run(run, heatmaps=0, gallery=0).summary
    clean = analyze_run(run, heatmaps=0, gallery=0).summary
    assert again["calibration"] == clean["calibration"] and again["curves"] == clean["curves"]
    assert json.loads((run / "analysis" / "analysis.json").read_text())["n_test"] == clean["n_test"]


# --------------------------------------------------------------------------------------------- locks

def test_run_lock_of_a_dead_process_is_recovered(cache, tmp_path, caplog):
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only"], features=["cls"], seeds=1,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = execute.run_lock_path(runs[0])
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": "here", "since": "earlier"}))
    runs[0].run_dir.mkdir(parents=True)  # its half-written folder
    with caplog.at_level("INFO", logger="mmcache.locks"):
        out = ab.run_grid(runs)
    assert out["trained"] == [runs[0].name] and out["elsewhere"] == []
    assert any("recovered lock" in r.getMessage() for r in caplog.records)
    assert locks.holder(lock) is None


def test_held_run_is_left_alone_and_waited_for(cache, tmp_path, caplog):
    """A run another holder has is not trained, not removed, not marked failed; the wait times out."""
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only"], features=["cls"], seeds=2,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    runs[0].run_dir.mkdir(parents=True)
    (runs[0].run_dir / "UNFINISHED").write_text("training\n")
    held = locks.try_lock(execute.run_lock_path(runs[0]))  # another open file description: another holder
    try:
        out = ab.run_grid(runs)
        assert out["elsewhere"] == [runs[0].name] and out["trained"] == [runs[1].name] and not out["failed"]
        assert sorted(p.name for p in runs[0].run_dir.iterdir()) == ["UNFINISHED"]
        t0 = time.monotonic()
        with caplog.at_level("INFO", logger="mmcache.fuse.ablate.execute"):
            assert ab.wait_for_elsewhere([runs[0]], timeout=1.5, heartbeat=0.2) == [runs[0].name]
        assert time.monotonic() - t0 < 5
        beats = [r.getMessage() for r in caplog.records if "running elsewhere" in r.getMessage()]
        assert any(f"pid {os.getpid()}" in b for b in beats) and "still running elsewhere" in beats[-1]
    finally:
        held.release()
    assert ab.wait_for_elsewhere([runs[0]], timeout=1.0) == []


def _spawn(args: list, cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def _until(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_ablate_processes_share_a_runs_folder(cache, tmp_path):
    """The reported fault: a second `ablate` on the same folders retrained everything and wrote error.json
    into the first one's runs. The first is paused (SIGSTOP) once it holds its runs, so the second
    certainly meets them held."""
    args = ["ablate", "-d", "synth", "--heads", "text_only,basic", "--features", "cls", "--seeds", "2",
            "--cache-dir", cache, "--runs-dir", tmp_path / "runs", "--results-dir", tmp_path / "results",
            "--jobs", "1", *FLAGS]
    grid = ab.expand_grid(CLI_BASE, datasets=["synth"], heads=["text_only", "basic"], features=["cls"], seeds=2,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    first = _spawn(args, tmp_path, tmp_path / "first.log")
    try:
        _until(lambda: all((locks.holder(execute.run_lock_path(r)) or {}).get("pid") == first.pid for r in grid),
               300, "the first process to claim its runs")
        os.kill(first.pid, signal.SIGSTOP)
        second = _spawn(args, tmp_path, tmp_path / "second.log")
        _until(lambda: "running elsewhere" in (tmp_path / "second.log").read_text() or second.poll() is not None,
               300, "the second process to find the runs held")
        time.sleep(1.0)
        assert second.poll() is None, (tmp_path / "second.log").read_text()  # waiting, not aggregating
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, _ = first.communicate(timeout=600)
    out2, _ = second.communicate(timeout=600)
    log1, log2 = (tmp_path / "first.log").read_text(), (tmp_path / "second.log").read_text()
    assert first.returncode == 0 and second.returncode == 0, log1 + log2
    assert "4 trained, 0 reused, 0 failed" in out1
    assert "0 trained, 0 reused, 0 failed, 4 running elsewhere" in out2
    assert [ab.run_status(r) for r in grid] == ["finished"] * 4
    assert not list((tmp_path / "runs").rglob("error.json"))
    assert "4 runs finished" in out2 and "failed" not in out2.split("4 runs finished")[1].splitlines()[0]
    table = json.loads((tmp_path / "results" / "ablation_synth.json").read_text())
    assert table["counts"]["finished"] == 4 and table["counts"]["failed"] == 0
    assert all(r["seeds_finished"] == 2 for r in table["rows"] if r["kind"] == "measured")


# --------------------------------------------------------------------------------------------- killed worker

_REAL_INIT = execute._worker_init  # this module imported fresh in a spawned worker: the real one


def _killing_init(*args):
    """Worker initializer: as the real one, then ``train`` kills this worker with signal 9 when it is
    handed the run named in $MMCACHE_TEST_KILL_RUN (the OOM killer, as the worker sees it)."""
    _REAL_INIT(*args)
    from mmcache.fuse.ablate import execute as ex

    real_train, victim = ex.train, os.environ["MMCACHE_TEST_KILL_RUN"]

    def train(config, *a, **kw):
        if config.run_name == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_train(config, *a, **kw)

    ex.train = train


def test_killed_worker_fails_only_its_run(cache, tmp_path, monkeypatch):
    runs = ab.expand_grid(TINY, datasets=["synth"], heads=["text_only", "basic"], features=["cls"], seeds=3,
                          cache_dir=cache, runs_dir=tmp_path / "runs")
    victim = runs[1].name
    monkeypatch.setenv("MMCACHE_TEST_KILL_RUN", victim)
    monkeypatch.setattr(execute, "_worker_init", _killing_init)
    out = ab.run_grid(runs, jobs=2, threads=1, progress=False)
    assert list(out["failed"]) == [victim]
    assert out["failed"][victim] == "worker killed by signal 9 (out of memory?)"
    assert sorted(out["trained"]) == sorted(r.name for r in runs if r.name != victim)
    status = {r.name: ab.run_status(r) for r in runs}
    assert status.pop(victim) == "failed" and set(status.values()) == {"finished"}
    table = ab.aggregate(runs)["synth"]
    assert table["counts"]["finished"] == 5 and table["counts"]["failed"] == 1
    assert "worker killed by signal 9" in next(x["error"] for x in table["runs"] if x["run"] == victim)
    # a plain rerun retries the failed run only
    monkeypatch.undo()
    again = ab.run_grid(runs, jobs=1)
    assert again["trained"] == [victim] and len(again["reused"]) == 5
