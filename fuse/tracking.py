"""Experiment tracking: per-epoch rows, final metrics and the config sent to run loggers (TensorBoard, or a
user's own), besides the run folder's history.json / metrics.json.

A :class:`RunLogger` gets ``on_run_start(run_dir, config)`` when a run folder is opened
(:func:`fuse.session.open_run`), ``on_epoch(epoch, row)`` with each history row as it is written (the
single-head loop in :mod:`fuse.train` and every member of a stack in :mod:`fuse.stack`) and
``on_run_end(metrics)`` with metrics.json's content (:func:`fuse.session.finish_run`); ``close()``, if it
has one, is called last, also when the run was interrupted or failed.

Which loggers run is a process-wide choice, never part of a TrainConfig (tracking never changes a run's
numbers, so it is not in the run key): :func:`use` / :func:`tracking` take ``"tensorboard"``, ``"none"``,
``"auto"`` (tensorboard when the ``tensorboard`` package is installed) or a list of logger factories
(zero-argument callables returning a fresh :class:`RunLogger` per run). The library default is none; the
CLI's ``--track`` defaults to ``auto``. A logger that raises is dropped with a warning: a tracker never
fails a training run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mmcache.fuse.runs import RunFolder

from mmcache.errors import BadInputError

logger = logging.getLogger(__name__)

TRACK_CHOICES = ("auto", "tensorboard", "none")


@runtime_checkable
class RunLogger(Protocol):
    """Receives one run's life; a new instance per run (see the module docstring for when each is called)."""

    def on_run_start(self, run_dir: Path, config: dict[str, Any]) -> None: ...

    def on_epoch(self, epoch: int, row: dict[str, Any]) -> None: ...

    def on_run_end(self, metrics: dict[str, Any]) -> None: ...


LoggerFactory = Callable[[], RunLogger]

_FACTORIES: list[LoggerFactory] = []  # the active choice (process-wide)
_OPEN: dict[str, list[RunLogger]] = {}  # run folder -> its loggers, from open_run to finish_run / close_run


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def resolve(choice: str | list[LoggerFactory] | None) -> list[LoggerFactory]:
    """The logger factories ``choice`` names (see the module docstring); None = none."""
    if choice is None or isinstance(choice, list):
        return list(choice or [])
    if choice not in TRACK_CHOICES:
        raise BadInputError(f"--track must be one of {', '.join(TRACK_CHOICES)}, got {choice!r}")
    if choice == "tensorboard" and not tensorboard_available():
        raise BadInputError("--track tensorboard needs the tensorboard package: pip install 'mmcache[track]'")
    if choice == "tensorboard" or (choice == "auto" and tensorboard_available()):
        return [TensorBoardLogger]
    return []


def use(choice: str | list[LoggerFactory] | None) -> None:
    """Make ``choice`` the loggers of every run this process opens from now on."""
    _FACTORIES[:] = resolve(choice)


def active() -> list[LoggerFactory]:
    return list(_FACTORIES)


def portable() -> list[LoggerFactory]:
    """The active factories that can be sent to spawned worker processes (an ablation's ``--jobs``); the
    others (lambdas, local classes) are left out there, with a warning."""
    out = []
    for factory in _FACTORIES:
        try:
            pickle.dumps(factory)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            logger.warning("run logger %r cannot be sent to worker processes (%s): those runs are not tracked by it",
                           factory, e)
            continue
        out.append(factory)
    return out


@contextmanager
def tracking(choice: str | list[LoggerFactory] | None) -> Iterator[None]:
    """``use(choice)`` for the duration of the block, then the previous choice again."""
    before = active()
    use(choice)
    try:
        yield
    finally:
        _FACTORIES[:] = before


# --------------------------------------------------------------------------------------------- run hooks

def _call(run_dir: Path, method: str, *args: Any) -> None:
    """Call ``method`` on each of the run's loggers; one that raises is warned about and dropped."""
    loggers = _OPEN.get(str(run_dir), [])
    for lg in list(loggers):
        try:
            getattr(lg, method)(*args)
        except Exception as e:  # a tracker must never fail the training it observes
            logger.warning("run logger %s failed in %s (%s: %s); it is dropped for run %s", type(lg).__name__,
                           method, type(e).__name__, e, run_dir)
            loggers.remove(lg)
            _close(lg)


def _close(lg: RunLogger) -> None:
    close = getattr(lg, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as e:  # closing a broken writer: say so, the run's own files are unaffected
        logger.warning("run logger %s failed to close (%s: %s)", type(lg).__name__, type(e).__name__, e)


def start_run(run_dir: Path, config: dict[str, Any]) -> None:
    close_run(run_dir)  # a folder reused in this process (a rerun) starts afresh
    if not _FACTORIES:
        return
    _OPEN[str(run_dir)] = [factory() for factory in _FACTORIES]
    _call(run_dir, "on_run_start", run_dir, config)


def log_epoch(run_dir: Path, epoch: int, row: dict[str, Any]) -> None:
    if str(run_dir) in _OPEN:
        _call(run_dir, "on_epoch", epoch, row)


def end_run(run_dir: Path, metrics: dict[str, Any]) -> None:
    if str(run_dir) in _OPEN:
        _call(run_dir, "on_run_end", metrics)
    close_run(run_dir)


def close_run(run_dir: Path | None) -> None:
    """Close the run's loggers without an end (interrupted, failed, or already ended); idempotent."""
    if run_dir is None:
        return
    for lg in _OPEN.pop(str(run_dir), []):
        _close(lg)


# --------------------------------------------------------------------------------------------- TensorBoard

def scalar_tags(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A history row as TensorBoard tags: ``train_loss`` -> ``train/loss``, ``val_macro_f1`` ->
    ``val/macro_f1``, ``lr`` -> ``lr``; nested dicts (per-target F1) one level deeper; ``epoch`` and
    non-numbers left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch":
            continue
        split, _, rest = key.partition("_")
        tag = prefix + (f"{split}/{rest}" if split in ("train", "val") and rest else key)
        if isinstance(value, dict):
            out.update(scalar_tags({f"{k}": v for k, v in value.items()}, tag + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def _hparam(value: Any) -> Any:
    """hparams hold numbers, strings and booleans only: the rest (lists, dicts, None) as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class TensorBoardLogger:
    """Event files in ``<run>/tb/``: per-epoch scalars (``train/loss``, ``val/loss``, ``val/accuracy``,
    ``val/macro_f1``, ``val/weighted_f1``, ``lr``, ``seconds``), the final ``test/*`` metrics at the best
    epoch, and the config as hparams (HPARAMS dashboard: one row per run, test metrics as its columns)."""

    def __init__(self) -> None:
        self.writer = None
        self.config: dict[str, Any] = {}

    def on_run_start(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(log_dir=str(RunFolder(run_dir).tracking_dir()))

    def on_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for tag, value in scalar_tags(row).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()  # a run killed mid-way still shows its epochs

    def on_run_end(self, metrics: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = metrics.get("best_epoch") or 0
        final = {f"test/{k}": float(v) for k, v in (metrics.get("test") or {}).items()
                 if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, step)
        # Written into this run's own event file (add_hparams would open a sub-folder per call).
        for summary in hparams({k: _hparam(v) for k, v in self.config.items()}, final):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
