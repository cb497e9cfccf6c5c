"""Progress where users read it (mmcache/progress.py): periodic lines in a non-interactive stream,
driven by a fake clock; and `cache info` fitting the terminal width."""

import io
import logging

import pytest

from mmcache.progress import LineProgress, _Bar, _Silent, format_duration, progress
from mmcache.tables import fit_line, fit_table


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mmcache.progress"]


def test_non_tty_stream_gives_periodic_lines_with_done_total_rate_eta(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="mmcache.progress")
    rep = progress(100, "extract image x", "sample", stream=io.StringIO(), interval=10, clock=clock)
    assert isinstance(rep, LineProgress)
    for _ in range(30):  # 30 samples, one every 1.5 s: 45 s of work
        clock.t += 1.5
        rep.update(1)
    lines = _lines(caplog)
    # one line per 10 s of work (at 10.5, 21, 31.5, 42 s), not one per update
    assert len(lines) == 4, lines
    assert lines[0].startswith("extract image x: 7/100 samples (7%)")
    last = lines[-1]
    assert "28/100 samples (28%)" in last
    assert "0.7 samples/s" in last  # 28 done in 42 s
    assert "ETA 1m48s" in last  # 72 left at 2/3 per s
    rep.close()
    end = _lines(caplog)[-1]
    assert "30/100" in end and "done in 45s" in end


def test_line_for_long_steps_and_postfix(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="mmcache.progress")
    rep = progress(4, "train basic on synth", "step", stream=io.StringIO(), interval=10, clock=clock)
    clock.t += 25  # one step longer than the interval: a line at that step, not one per missed interval
    rep.update(1, epoch="1/2")
    rep.set_postfix(loss=0.5, val_macro_f1=0.25)
    clock.t += 25
    rep.update(1, epoch="1/2")
    lines = _lines(caplog)
    assert len(lines) == 2
    assert "1/4 steps (25%)" in lines[0] and "epoch 1/2" in lines[0]
    assert "2/4 steps (50%), 0.0 steps/s, ETA 50s" in lines[1] and "loss 0.5000" in lines[1]
    assert "val_macro_f1 0.2500" in lines[1]


def test_interrupted_work_closes_with_where_it_stood(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="mmcache.progress")
    with pytest.raises(KeyboardInterrupt), progress(10, "ablate", "run", stream=io.StringIO(), clock=clock) as rep:
        clock.t += 3
        rep.update(2)
        raise KeyboardInterrupt
    lines = _lines(caplog)
    assert len(lines) == 1 and "2/10 runs (20%)" in lines[0] and "ETA 12s" in lines[0]


def test_tty_gets_a_bar_and_disabled_gets_nothing(caplog):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    caplog.set_level(logging.INFO, logger="mmcache.progress")
    bar = progress(3, "x", stream=Tty())
    assert isinstance(bar, _Bar)
    bar.close()
    quiet = progress(3, "x", enabled=False, stream=io.StringIO())
    assert isinstance(quiet, _Silent)
    quiet.update(3)
    quiet.close()
    assert _lines(caplog) == []


def test_format_duration():
    assert [format_duration(s) for s in (4.4, 65, 7500, float("nan"))] == ["4s", "1m05s", "2h05m", "?"]


def test_cache_info_fits_the_width():
    path = "cache/some_dataset/" + "image--" + "a" * 60 + ".h5"  # a single path longer than the width stays whole
    rows = [[path, "image", "/very/long/" + "m" * 70, "complete", 60, 60, 60, 0, "64x32", "float16", "1 KiB"]]
    headers = ["file", "modality", "model", "state", "samples", "done", "valid", "failed", "tokens", "dtype", "size"]
    text = fit_table(headers, rows, 100)
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert path in text and "state complete" in text and "size 1 KiB" in text
    wide = fit_table(headers, rows, 400)
    assert len(wide.splitlines()) == 3  # fits: the ordinary table
    line = "  transformers 5.0, torch 2.13.0+cpu, h5py 3.16.0; config 6f759135e02a7a40, index 3fad142683ce2428"
    wrapped = fit_line(line, 60)
    assert all(len(x) <= 60 for x in wrapped.splitlines()) and " ".join(wrapped.split()) == " ".join(line.split())
