"""Streamed training (fuse/stream.py, mmcache/cache/blocks.py): features over ``--max-memory`` are read in
chunk-aligned, checksum-verified blocks through a shuffle buffer filled by a prefetch thread.

* a buffer as large as the train split gives the in-memory run bit for bit (weights, predictions, history),
  through the stacked trainer and through train()'s own loop;
* a smaller buffer changes the order (block shuffle) but still trains, and a stack of members served by one
  pass gives each member the numbers it has alone;
* the peak memory of a streamed run in a child process stays under its budget (see ``test_peak_rss``);
* a reader-thread error reaches the main thread, no thread is left behind; a damaged row is one error line;
* ``--max-memory`` parsing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import one_error_line, run_cli
from mmcache.fuse import stream
from mmcache.fuse import train as train_mod
from mmcache.fuse.data import load_data
from mmcache.fuse.stack import train_stack
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig, train
from safetensors.torch import load_file

from mmcache import cache as cf
from mmcache.cache.blocks import BlockReader
from mmcache.errors import BadInputError, CacheError

ROOT = Path(__file__).resolve().parent.parent
TINY = TrainConfig(head="self_attention", dataset="synth", features="tokens", dim=8, heads=2, epochs=2, batch_size=16,
                   eval_batch_size=32, lr=3e-3, patience=0, device="cpu", threads=1, dropout=0.1)
MODS = ("text", "image")


@pytest.fixture(autouse=True)
def no_working_allowance(monkeypatch):
    """The small caches here are a few MB: the 16 MB set aside for the model and batches
    (stream.WORKING_BYTES) is left out so that MB budgets stream. The peak-RSS test's child keeps it."""
    monkeypatch.setattr(stream, "WORKING_BYTES", 0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """200 samples, 64 tokens x 64 dims float16 per modality: 3.3 MB of tokens, 32-row HDF5 chunks."""
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=200, dt=64, di=64, lt=64, li=64)
    return root


def _needed(root: Path) -> int:
    data = load_data("synth", modalities=MODS, features="tokens", cache_dir=root)
    return sum(md.x.numel() * md.x.element_size() for md in (data.text, data.image))


def _run(cfg: TrainConfig, root: Path, runs: Path, name: str, data=None):
    return train(TrainConfig(**{**cfg.to_dict(), "cache_dir": str(root), "runs_dir": str(runs), "run_name": name}),
                 data)


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (a, b))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ha] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in hb]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert all(ma[s] == mb[s] for s in ("train", "val", "test"))


@pytest.mark.parametrize("own_loop", [False, True], ids=["stacked-trainer", "train-own-loop"])
def test_full_buffer_equals_in_memory(cache, tmp_path, monkeypatch, own_loop):
    if own_loop:  # a head that cannot be stacked takes train()'s own loop
        monkeypatch.setattr(train_mod, "can_stack", lambda config: False)
    monkeypatch.setattr(stream, "BUFFER_SHARE", 0.9)  # a buffer larger than the 120-row train split
    budget = _needed(cache) - 1  # one byte short: streamed
    streamed = load_data("synth", modalities=MODS, features="tokens", cache_dir=cache, max_memory=budget)
    assert streamed.stream is not None and streamed.stream.buffer_rows >= streamed.split_rows["train"].numel()
    assert isinstance(streamed.text.x, stream.StreamedArray)
    mem = _run(TINY, cache, tmp_path, "mem")
    st = _run(TrainConfig(**{**TINY.to_dict(), "max_memory": budget}), cache, tmp_path, "streamed", streamed)
    _same_run(mem.run_dir, st.run_dir)


def test_small_buffer_block_shuffle_trains_and_stacks(cache, tmp_path):
    budget = _needed(cache) // 2
    data = load_data("synth", modalities=MODS, features="tokens", cache_dir=cache, max_memory=budget)
    assert data.stream is not None and data.stream.buffer_rows < data.split_rows["train"].numel()
    cfg = TrainConfig(**{**TINY.to_dict(), "epochs": 4, "max_memory": budget, "cache_dir": str(cache),
                         "runs_dir": str(tmp_path)})
    mem = _run(TINY, cache, tmp_path, "mem")
    alone = [train(TrainConfig(**{**cfg.to_dict(), "seed": s, "run_name": f"alone{s}"}), data) for s in (0, 1)]
    assert alone[0].history[0]["train_loss"] != mem.history[0]["train_loss"]  # another order: block shuffle
    assert alone[0].metrics["test"]["accuracy"] > 0.7  # 3 classes: chance is 1/3
    stacked = train_stack([TrainConfig(**{**cfg.to_dict(), "seed": s, "run_name": f"stack{s}"}) for s in (0, 1)],
                          data)
    for a, s in zip(alone, stacked, strict=True):  # one pass serves both members; each is as it is alone
        assert s.error is None
        _same_run(a.run_dir, s.run_dir)


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mmcache-stream"]


def test_reader_error_reaches_main_thread_and_no_thread_is_left(cache, monkeypatch):
    data = load_data("synth", modalities=MODS, features="tokens", cache_dir=cache, max_memory=_needed(cache) // 2)
    rows, gen = data.split_rows["train"], torch.Generator().manual_seed(0)
    with data.stream.batches(rows, 16, gen, 1, 0, torch.device("cpu")) as it:  # stopped early: thread ends
        next(it)
    assert not _stream_threads()
    calls = {"n": 0}
    real = BlockReader.read

    def flaky(self, a, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        return real(self, a, b)

    monkeypatch.setattr(BlockReader, "read", flaky)
    with pytest.raises(OSError, match="disk went away"):
        with data.stream.batches(rows, 16, gen, 2, 0, torch.device("cpu")) as it:
            for _ in it:
                pass
    assert not _stream_threads()


def _damage_train_row(root: Path) -> str:
    path = next(p for p in cf.list_feature_files(root / "synth") if p.name.startswith("text--"))
    with h5py.File(path, "r+") as f:
        row = f["tokens"][5]
        row[0, 0] += np.float16(1.0)
        f["tokens"][5] = row
        return f["id"].asstr()[5]


def test_damaged_row_during_streaming_is_one_error(tmp_path, capsys):
    root = tmp_path / "cache"
    make_cache(root, "synth", n=200, dt=64, di=64, lt=64, li=64)  # 3.3 MB of tokens, 32-row chunks
    sid = _damage_train_row(root)
    code, _, err = run_cli(capsys, "train-fusion", "--head", "self_attention", "--features", "tokens",
                           "--cache-dir", root, "--runs-dir", tmp_path / "runs", "--epochs", "1", "--dim", "8",
                           "--attention-heads", "2", "--device", "cpu", "--max-memory", "2M", "-q")
    line = one_error_line(err)
    assert code == 1 and "damaged" in line and sid in line and "--repair" in line


def test_max_memory_parsing(cache, tmp_path, capsys):
    assert stream.parse_size("512M") == 512 << 20
    assert stream.parse_size("4G") == 4 << 30
    assert stream.parse_size("1.5g") == 3 << 29
    assert stream.parse_size("300MiB") == 300 << 20
    assert stream.parse_size("2000000") == 2_000_000
    for bad in ("", "4X", "-1G", "1K", "G"):
        with pytest.raises(BadInputError):
            stream.parse_size(bad)
    for bad in ("lots", "0"):
        code, _, err = run_cli(capsys, "train-fusion", "--head", "basic", "--cache-dir", cache, "--runs-dir",
                               tmp_path, "--max-memory", bad)
        assert code == 2 and "--max-memory" in one_error_line(err)
    assert TrainConfig.from_dict({"max_memory": "64M"}).max_memory == 64 << 20
    with pytest.raises(BadInputError):
        TrainConfig.from_dict({"max_memory": True})


def test_evaluate_streams_to_the_same_numbers(cache, tmp_path, capsys, caplog):
    run = _run(TINY, cache, tmp_path, "mem")
    out = {}
    for name, extra in (("memory", []), ("streamed", ["--max-memory", "2M"])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mmcache.fuse.data"):
            code, stdout, err = run_cli(capsys, "evaluate", "--run", run.run_dir, "--json", *extra)
        assert code == 0, err
        assert ("streamed from the cache files" in caplog.text) == (name == "streamed"), caplog.text
        out[name] = json.loads(stdout)
    assert out["memory"]["accuracy"] == out["streamed"]["accuracy"]
    assert out["memory"]["macro_f1"] == out["streamed"]["macro_f1"]


def test_damaged_block_reader_raises_cache_error(tmp_path):
    root = tmp_path / "cache"
    make_cache(root, "synth", n=40, dt=8, di=8, lt=4, li=4)
    sid = _damage_train_row(root)
    path = next(p for p in cf.list_feature_files(root / "synth") if p.name.startswith("text--"))
    with BlockReader(path, "tokens") as r:
        assert r.read(10, 40).shape == (30, 4, 8)  # undamaged rows read fine
        with pytest.raises(CacheError, match=sid):
            r.read(0, 10)


# The peak memory check runs in a child process. "Under the budget" means: the child's peak RSS (VmHWM of
# /proc/self/status: the high-water mark of this process image; ru_maxrss is not used because Linux carries
# the parent's over exec) minus the interpreter baseline stays below --max-memory. The baseline is the
# child's RSS after a warm-up run on a 40-sample cache: torch, sklearn, scipy, pandas, ... imported and
# torch's one-time allocations made (about 500 MB here), which no budget can shrink.
_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from mmcache.fuse.train import TrainConfig, train

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    run = dict(head="self_attention", features="tokens", dim=16, heads=2, epochs=1, batch_size=16,
               eval_batch_size=16, patience=0, device="cpu", threads=1, cache_dir=sys.argv[1],
               runs_dir=sys.argv[1] + "/runs")
    train(TrainConfig(dataset="tiny", **run))  # warm-up: imports, thread pools
    base = status("VmRSS")
    res = train(TrainConfig(dataset="synth", max_memory=int(sys.argv[2]), **run))
    print(json.dumps({"base": base, "peak": status("VmHWM"), "acc": res.metrics["test"]["accuracy"]}))
""")


def test_peak_rss_under_budget(tmp_path):
    root = tmp_path / "cache"
    make_cache(root, "synth", n=600, dt=512, di=512, lt=64, li=64)  # 78.6 MB of float16 tokens
    make_cache(root, "tiny", n=40, dt=512, di=512, lt=64, li=64)  # the warm-up: same widths, 5 MB
    budget = 32 << 20  # measured: ~25 MB over the baseline (fuse/stream.py); bench/scale_stream.py does 3x
    tokens = sum(p.stat().st_size for p in cf.list_feature_files(root / "synth"))
    assert tokens > 2 * budget
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(budget)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["peak"] - got["base"] < budget, got
    assert got["acc"] > 0.5


# --------------------------------------------------------------------------------------------- the key
# The module cache: 200 rows of 2 x 64 x 64 float16 tokens = 16 KiB a row, 3.1 MiB in all, 32-row chunks.
# With no working allowance (the autouse fixture) a budget of 2 MiB streams with an auto window of 32 rows
# (62 fit, rounded down to a power of two), 3 MiB with 64 rows (94 fit).
CLI_TINY = ["--head", "self_attention", "--features", "tokens", "--dim", "8", "--attention-heads", "2",
            "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--patience", "0", "--device", "cpu",
            "--threads", "1", "-q"]


def _free_ram(monkeypatch, nbytes: int) -> None:
    """Simulate MemAvailable (the default budget is half of it)."""
    from mmcache.fuse import stack

    monkeypatch.setattr(stack, "available_memory", lambda device: nbytes)


def _train_cli(capsys, cache, runs, name, *extra):
    code, _, err = run_cli(capsys, "train-fusion", *CLI_TINY, "--cache-dir", cache, "--runs-dir", runs,
                           "--run-name", name, *extra)
    assert code == 0, err
    return runs / name


def test_default_budget_window_is_in_config_and_a_rerun_reproduces_it(cache, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    _free_ram(monkeypatch, 4 << 20)
    small = _train_cli(capsys, cache, runs, "small")
    _free_ram(monkeypatch, 6 << 20)
    larger = _train_cli(capsys, cache, runs, "larger")
    cfg = {d.name: json.loads((d / "config.json").read_text()) for d in (small, larger)}
    assert cfg["small"]["streamed"] is True and cfg["small"]["shuffle_buffer"] == 32
    assert cfg["larger"]["streamed"] is True and cfg["larger"]["shuffle_buffer"] == 64
    assert cfg["small"]["max_memory"] is None  # the budget stays "default": the window is what counts
    hist = {d.name: json.loads((d / "history.json").read_text()) for d in (small, larger)}
    assert hist["small"][0]["train_loss"] != hist["larger"][0]["train_loss"]  # another window, another order

    # rerun of the stored config with plenty of free RAM (auto would now read it into memory): the same run
    _free_ram(monkeypatch, 1 << 30)
    rerun = _train_cli(capsys, cache, runs, "rerun", "--config", small / "config.json")
    assert json.loads((rerun / "config.json").read_text())["shuffle_buffer"] == 32
    _same_run(small, rerun)
    in_memory = _train_cli(capsys, cache, runs, "in-memory")  # the same flags, auto: in memory, recorded so
    assert json.loads((in_memory / "config.json").read_text())["streamed"] is False

    # too little free RAM for the recorded window: refused, naming the budget, not trained with another one
    _free_ram(monkeypatch, 2 << 20)
    code, _, err = run_cli(capsys, "train-fusion", "--config", small / "config.json", "--run-name", "tight")
    line = one_error_line(err)
    assert code == 2 and "--shuffle-buffer 32 rows" in line and f"{1 << 20:,} bytes" in line
    assert not (runs / "tight").exists()


def test_explicit_shuffle_buffer_is_used_or_refused(cache, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    run = _train_cli(capsys, cache, runs, "w48", "--max-memory", "3M", "--shuffle-buffer", "48")
    assert json.loads((run / "config.json").read_text())["shuffle_buffer"] == 48
    for flags, what in ((["--max-memory", "2M", "--shuffle-buffer", "100"], "--max-memory"),
                        (["--max-memory", "2M", "--shuffle-buffer", "16"], "at least 32"),  # under one block
                        (["--shuffle-buffer", "-1"], "shuffle_buffer")):
        code, _, err = run_cli(capsys, "train-fusion", *CLI_TINY, "--cache-dir", cache, "--runs-dir", runs, *flags)
        assert code == 2 and what in one_error_line(err), (flags, err)
    with pytest.raises(BadInputError, match="streamed: false"):  # a config trained in memory, now over budget
        load_data("synth", modalities=MODS, features="tokens", cache_dir=cache, max_memory=2 << 20, streamed=False)


def _ablate_grid(cache, runs, base: TrainConfig, features: str):
    import mmcache.fuse.ablate as ab

    return ab.expand_grid(base, datasets=["synth"], heads=["basic"], features=[features], seeds=1, cache_dir=cache,
                          runs_dir=runs)


def test_ablate_key_tells_stream_windows_apart(cache, tmp_path, monkeypatch):
    import mmcache.fuse.ablate as ab

    trained = []
    real = ab.execute.train
    monkeypatch.setattr(ab.execute, "train", lambda config, data=None, **kw: trained.append(config.run_name)
                        or real(config, data=data, **kw))
    base = TrainConfig(**{**TINY.to_dict(), "epochs": 1, "head": "basic"})
    grid = {mib: _ablate_grid(cache, tmp_path, TrainConfig(**{**base.to_dict(), "max_memory": int(mib * 2**20)}),
                              "tokens") for mib in (1.5, 2, 3)}
    assert [r.config.shuffle_buffer for r in grid[2]] == [32] and [r.config.shuffle_buffer for r in grid[3]] == [64]
    assert grid[1.5][0].key == grid[2][0].key  # another budget, the same window (32): the same run
    ab.run_grid(grid[2], threads=1)
    assert trained == [grid[2][0].name]
    assert json.loads((grid[2][0].run_dir / "config.json").read_text())["shuffle_buffer"] == 32
    ab.run_grid(grid[1.5], threads=1)  # reused
    ab.run_grid(grid[3], threads=1)  # another window: trained, not reused
    assert trained == [grid[2][0].name, grid[3][0].name] and grid[3][0].key != grid[2][0].key
    # streamed with a window holding the whole train split is still not the in-memory run
    full = _ablate_grid(cache, tmp_path, TrainConfig(**{**base.to_dict(), "max_memory": 8 << 20, "streamed": True,
                                                        "shuffle_buffer": 120}), "tokens")
    memory = _ablate_grid(cache, tmp_path, base, "tokens")
    assert memory[0].config.streamed is False
    assert len({full[0].key, memory[0].key, grid[2][0].key, grid[3][0].key}) == 4


def _old_key(config: dict, data_fp: str) -> str:
    """The run key as ablate computed it before streaming was recorded (fuse/ablate/grid.py at 4086020), for
    a config on the dataset's default target."""
    import hashlib
    d = {k: v for k, v in config.items() if k not in ("runs_dir", "run_name", "device", "threads", "cache_dir",
                                                      "target", "streamed", "shuffle_buffer")}
    for k, default in (("max_memory", None), ("stream_seed", 0)):
        if d.get(k) == default:
            d.pop(k)
    d.update(text_cache=Path(d["text_cache"]).name, image_cache=Path(d["image_cache"]).name,
             modalities=sorted(d["modalities"]))
    payload = json.dumps({"config": d, "data": data_fp}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:10]


def test_ablate_keeps_the_keys_of_old_in_memory_runs(cache, tmp_path, monkeypatch):
    import mmcache.fuse.ablate as ab
    from mmcache.fuse.ablate import grid as grid_mod
    from mmcache.fuse.runs import RunFolder

    base = TrainConfig(**{**TINY.to_dict(), "epochs": 1, "head": "basic", "features": "cls"})
    runs = _ablate_grid(cache, tmp_path, base, "cls")
    run = runs[0]
    assert run.config.streamed is False and run.config.max_memory is not None  # the grid's budget, pinned
    seen = {}
    real_key = grid_mod.run_key
    monkeypatch.setattr(grid_mod, "run_key", lambda cfg, fp, default=None: seen.setdefault("fp", fp) and
                        real_key(cfg, fp, default))
    _ablate_grid(cache, tmp_path, base, "cls")
    old_style = {k: v for k, v in run.config.to_dict().items() if k not in ("streamed", "shuffle_buffer")}
    assert run.key == _old_key({**old_style, "max_memory": None}, seen["fp"])
    ab.run_grid(runs, threads=1)
    # the folder as the code before this change left it: no streamed / shuffle_buffer, the default budget
    folder = RunFolder(run.run_dir)
    folder.write_config({**old_style, "max_memory": None, "run_name": run.name, "runs_dir": str(run.run_dir.parent)})
    folder.seal()
    trained = []
    monkeypatch.setattr(ab.execute, "train", lambda *a, **kw: trained.append(a))
    again = _ablate_grid(cache, tmp_path, base, "cls")
    assert [r.name for r in again] == [run.name] and ab.run_status(again[0]) == "finished"
    out = ab.run_grid(again, threads=1)
    assert trained == [] and out["reused"] == [run.name]
