"""Progress of long jobs, where the user reads it (neutral: both stages use it).

:func:`progress` returns a reporter with ``update(n, **postfix)``, ``set_postfix(**postfix)`` and
``close()`` (also a context manager):

* on an interactive terminal (stderr is a tty): a tqdm bar, as before;
* otherwise (output to a file: nohup, SLURM, CI): a log line every ``interval`` seconds while work
  goes on (checked at each update; with ``heartbeat`` also from a timer thread, for work whose
  units take longer than that), and one at the end, each with done/total, percent,
  rate and ETA, e.g. ``extract image image--dinov2-demo: 320/600 samples (53%), 45.1 samples/s,
  ETA 6s, elapsed 7s``. Lines go through :mod:`logging` (logger ``mmcache.progress``), so they land
  wherever the CLI sends log records (stderr, ``--log-file``, a run's ``train.log``);
* ``enabled=False``: nothing.

The clock and the stream are injectable (tests use a fake clock and a non-tty stream).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mmcache.progress")

DEFAULT_INTERVAL_S = 10.0

__all__ = ["DEFAULT_INTERVAL_S", "LineProgress", "format_duration", "progress"]


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h04m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _fmt_value(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class LineProgress:
    """Periodic log lines for a non-interactive stream (see the module doc)."""

    def __init__(self, total: int | None, desc: str, unit: str = "item", *, interval: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None,
                 heartbeat: bool = False) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.interval, self.clock, self.log = interval, clock, logger or log
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.start = self.last = clock()  # time of the last line (none yet: the start)
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if heartbeat:
            threading.Thread(target=self._beat, name=f"progress {desc}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            self.update(0)

    def update(self, n: int = 1, **postfix: Any) -> None:
        with self._lock:
            self.n += n
            if postfix:
                self.postfix.update(postfix)
            now = self.clock()
            if not self.closed and now - self.last >= self.interval:
                self._emit(now)

    def set_postfix(self, **postfix: Any) -> None:
        self.postfix.update(postfix)

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 0.0)
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate_s = f"{rate:.1f} {self.unit}s/s" if math.isfinite(rate) else f"? {self.unit}s/s"
        if final:
            tail = f"done in {format_duration(elapsed)}"
        else:
            left = (self.total - self.n) / rate if self.total and math.isfinite(rate) and rate > 0 else float("nan")
            tail = f"ETA {format_duration(left)}, elapsed {format_duration(elapsed)}"
        extra = "".join(f", {k} {_fmt_value(v)}" for k, v in self.postfix.items())
        return f"{self.desc}: {done} {self.unit}s{pct}, {rate_s}, {tail}{extra}"

    def _emit(self, now: float, final: bool = False) -> None:
        self.last = now
        self.log.info("%s", self.line(now, final))

    def close(self, finished: bool = True) -> None:
        """The closing line: ``done in ...`` when ``finished`` (early stopping counts), else where the
        work stood."""
        self._stop.set()
        with self._lock:
            if not self.closed:
                self.closed = True
                self._emit(self.clock(), final=finished)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        # An exception (Ctrl-C included) still gets its closing line: where the work stood.
        self.close(finished=exc_type is None)


class _Bar:
    """tqdm with the same interface (postfix keywords on update)."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self.set_postfix(**postfix)
        self.bar.update(n)

    def set_postfix(self, **postfix: Any) -> None:
        self.bar.set_postfix({k: _fmt_value(v) for k, v in postfix.items()}, refresh=False)

    def close(self, finished: bool = True) -> None:
        self.bar.close()

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent:
    def update(self, n: int = 1, **postfix: Any) -> None:
        pass

    def set_postfix(self, **postfix: Any) -> None:
        pass

    def close(self, finished: bool = True) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "item", *, enabled: bool | None = None, stream=None,
             interval: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
             heartbeat: bool = False):
    """A reporter for ``total`` units of work: a tqdm bar when ``stream`` (default stderr) is a
    terminal, periodic log lines otherwise, nothing when ``enabled`` is False. The interval can be
    set with the environment variable ``MMCACHE_PROGRESS_INTERVAL`` (seconds)."""
    interval = float(os.environ.get("MMCACHE_PROGRESS_INTERVAL", interval))
    if enabled is False:
        return _Silent()
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return _Bar(total, desc, unit)
    return LineProgress(total, desc, unit, interval=interval, clock=clock, heartbeat=heartbeat)
