"""Experiment tracking (fuse/tracking.py): TensorBoard event files per run, the --track flag, custom run
loggers on both trainers (train's own loop and the stacked trainer), ablation grids under one logdir,
failing / interrupted loggers, and that tracking never changes a run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import mmcache.fuse.train as train_mod
import pytest
from conftest import one_error_line
from conftest import run_cli as _run
from mmcache.fuse import tracking
from mmcache.fuse.stack import can_stack, train_stack
from mmcache.fuse.synthetic import make_cache
from mmcache.fuse.train import TrainConfig, train

from mmcache import api
from mmcache.errors import Interrupted

TINY = dict(dim=8, heads=2, layers=1, batch_size=16, eval_batch_size=64, threads=1, lr=3e-3, patience=0,
            device="cpu")
FLAGS = ["--dim", "8", "--attention-heads", "2", "--batch-size", "16", "--lr", "3e-3", "--patience", "0",
         "--device", "cpu", "--threads", "1", "--quiet"]
EPOCH_TAGS = ["train/loss", "val/loss", "val/accuracy", "val/macro_f1", "val/weighted_f1", "lr"]
needs_tb = pytest.mark.skipif(not tracking.tensorboard_available(), reason="tensorboard not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=40, dt=8, di=8, lt=4, li=3)
    return root


@pytest.fixture(autouse=True)
def no_tracking_left():
    """Every test starts and ends with no active run loggers (the CLI / API restore the choice)."""
    tracking.use("none")
    yield
    assert tracking.active() == [] and tracking._OPEN == {}


def _cfg(cache: Path, runs: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "head": "basic", "dataset": "synth", "cache_dir": str(cache), "runs_dir": str(runs),
                          "epochs": 3, **kw})


def _accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def _hparams(acc) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.string_value or v.number_value or v.bool_value for k, v in info.hparams.items()}


class Recorder:
    """A user's run logger: each instance (one per run) keeps its calls; ``made``: every instance."""

    made: list[Recorder] = []

    def __init__(self):
        self.calls: list[tuple] = []
        Recorder.made.append(self)

    def on_run_start(self, run_dir, config):
        self.calls.append(("start", Path(run_dir).name, config))

    def on_epoch(self, epoch, row):
        self.calls.append(("epoch", epoch, dict(row)))

    def on_run_end(self, metrics):
        self.calls.append(("end", metrics["run"], metrics))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def recorder():
    Recorder.made = []
    return Recorder


# --------------------------------------------------------------------------------------------- TensorBoard

@needs_tb
def test_train_fusion_writes_tensorboard_scalars_test_metrics_and_hparams(cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = _run(capsys, "train-fusion", "--head", "basic", "-d", "synth", "--cache-dir", cache,
                          "--runs-dir", runs, "--epochs", "3", "--seed", "4", "--json", *FLAGS)
    assert code == 0, err
    metrics = json.loads(out)
    run = runs / metrics["run"]
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 3 and len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    acc = _accumulator(run / "tb")
    for tag in EPOCH_TAGS:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag  # one value per epoch
        key = "train_loss" if tag == "train/loss" else tag.replace("/", "_")
        assert [e.value for e in events] == pytest.approx([h[key] for h in history], rel=1e-6), tag
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        (final,) = acc.Scalars(f"test/{name}")
        assert final.step == metrics["best_epoch"] and final.value == pytest.approx(metrics["test"][name], rel=1e-6)
    hp = _hparams(acc)
    assert hp["head"] == "basic" and hp["seed"] == 4 and hp["epochs"] == 3 and hp["dataset"] == "synth"
    assert tracking.active() == []  # the CLI's choice did not outlive the call


def test_track_none_writes_nothing_and_the_library_default_is_none(cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = _run(capsys, "train-fusion", "--head", "basic", "-d", "synth", "--cache-dir", cache,
                          "--runs-dir", runs, "--epochs", "1", "--track", "none", "--json", *FLAGS)
    assert code == 0, err
    assert not (runs / json.loads(out)["run"] / "tb").exists()
    r = train(_cfg(cache, runs, epochs=1))  # no choice made: the library writes no tracking files
    assert not (r.run_dir / "tb").exists()


def test_track_tensorboard_without_the_package_is_one_error_line(cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking, "tensorboard_available", lambda: False)
    code, _, err = _run(capsys, "train-fusion", "--head", "basic", "-d", "synth", "--cache-dir", cache,
                        "--runs-dir", tmp_path / "runs", "--epochs", "1", "--track", "tensorboard", *FLAGS)
    assert code == 2 and "pip install 'mmcache[track]'" in one_error_line(err)
    assert not (tmp_path / "runs").exists()  # refused before any run folder
    assert tracking.resolve("auto") == []  # auto without the package: no tracking, no error


@needs_tb
def test_ablate_grid_logs_every_run_under_the_runs_dir(cache, tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = tmp_path / "runs"
    result = api.ablate(["synth"], base={**TINY, "epochs": 2}, heads=["text_only", "basic"], features=["cls"],
                        seeds=2, cache_dir=str(cache), runs_dir=str(runs), results_dir=str(tmp_path / "results"),
                        jobs=1, plots=False, probe=False, analyze=False, bootstrap=10, track="tensorboard")
    assert len(result.trained) == 4 and not result.failed
    mux = EventMultiplexer().AddRunsFromDirectory(str(runs))  # what `tensorboard --logdir runs` shows
    mux.Reload()
    logged = {Path(name).parent.name for name in mux.Runs()}
    assert logged == {r.name for r in result.runs}
    for name in mux.Runs():
        assert [e.step for e in mux.Scalars(name, "val/macro_f1")] == [1, 2]
    assert not (tmp_path / "results" / "tb").exists()


@needs_tb
def test_ablate_worker_processes_get_the_choice(cache, tmp_path):
    runs = tmp_path / "runs"
    result = api.ablate(["synth"], base={**TINY, "epochs": 1}, heads=["text_only"], features=["cls"], seeds=2,
                        cache_dir=str(cache), runs_dir=str(runs), results_dir=str(tmp_path / "results"), jobs=2,
                        stack=False, plots=False, probe=False, analyze=False, bootstrap=10, track="tensorboard")
    assert len(result.trained) == 2 and not result.failed
    assert all(list((r.run_dir / "tb").glob("events.out.tfevents.*")) for r in result.runs)


# --------------------------------------------------------------------------------------------- custom loggers

def _check_calls(calls: list[tuple], run_dir: Path) -> None:
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert calls[0] == ("start", run_dir.name, config)
    epochs = [c for c in calls if c[0] == "epoch"]
    assert [c[1] for c in epochs] == list(range(1, len(history) + 1))
    assert [c[2] for c in epochs] == history
    assert calls[-2:] == [("end", run_dir.name, metrics), ("close",)]


def test_custom_logger_gets_every_epoch_on_the_stacked_path(cache, tmp_path, recorder):
    assert can_stack(_cfg(cache, tmp_path))  # basic trains as a stack of one
    r = api.train_fusion(_cfg(cache, tmp_path / "runs").to_dict(), track=[Recorder])
    (only,) = Recorder.made
    _check_calls(only.calls, r.run_dir)


def test_custom_logger_gets_every_epoch_on_trains_own_loop(cache, tmp_path, recorder, monkeypatch):
    monkeypatch.setattr(train_mod, "can_stack", lambda config: False)
    with tracking.tracking([Recorder]):
        r = train(_cfg(cache, tmp_path / "runs"))
    (only,) = Recorder.made
    _check_calls(only.calls, r.run_dir)


def test_custom_logger_gets_each_member_of_a_stack(cache, tmp_path, recorder):
    configs = [_cfg(cache, tmp_path / "runs", seed=s, run_name=f"m{s}") for s in (0, 1)]
    with tracking.tracking([Recorder]):
        results = train_stack(configs)
    assert len(Recorder.made) == 2  # one logger per member, each sees only its own run
    for logger, res in zip(Recorder.made, results, strict=True):
        assert res.error is None
        _check_calls(logger.calls, res.run_dir)


# --------------------------------------------------------------------------------------------- faults

class Broken:
    def on_run_start(self, run_dir, config):
        pass

    def on_epoch(self, epoch, row):
        raise RuntimeError("tracking server unreachable")

    def on_run_end(self, metrics):
        raise AssertionError("a dropped logger is not called again")


def test_a_failing_logger_is_dropped_and_the_run_finishes(cache, tmp_path, recorder, caplog):
    with tracking.tracking([Broken, Recorder]):
        r = train(_cfg(cache, tmp_path / "runs"))
    assert (r.run_dir / "metrics.json").is_file() and len(r.history) == 3
    assert "run logger Broken failed in on_epoch" in caplog.text
    (healthy,) = Recorder.made
    _check_calls(healthy.calls, r.run_dir)  # the other logger still got everything


class StopsTraining(Recorder):
    def on_epoch(self, epoch, row):
        super().on_epoch(epoch, row)
        if epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C while a logger writes


def test_interrupted_run_closes_its_loggers_and_keeps_its_epochs(cache, tmp_path, recorder):
    with tracking.tracking([StopsTraining]), pytest.raises(Interrupted):
        train(_cfg(cache, tmp_path / "runs", run_name="cut"))
    run = tmp_path / "runs" / "cut"
    assert len(json.loads((run / "history.json").read_text())) == 2  # the epochs done are kept
    (only,) = Recorder.made
    assert [c[0] for c in only.calls] == ["start", "epoch", "epoch", "close"]  # closed, never ended


# --------------------------------------------------------------------------------------------- numbers

@needs_tb
def test_tracking_never_changes_a_runs_numbers(cache, tmp_path):
    plain = train(_cfg(cache, tmp_path / "a", run_name="r"))
    with tracking.tracking("tensorboard"):
        tracked = train(_cfg(cache, tmp_path / "b", run_name="r"))
    assert (tracked.run_dir / "tb").is_dir() and not (plain.run_dir / "tb").exists()

    def numbers(r):
        return ({k: v for k, v in r.metrics.items() if k != "seconds"},
                [{k: v for k, v in row.items() if k != "seconds"} for row in r.history])

    assert numbers(plain) == numbers(tracked)
    assert (plain.run_dir / "model.safetensors").read_bytes() == (tracked.run_dir / "model.safetensors").read_bytes()
