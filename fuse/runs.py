"""The run folder: the one contract that train, evaluate, ablate and predict share (owner module).

A run folder ``runs/<name>/`` holds, in the order they are written:

* ``config.json``: the resolved :class:`~mmcache.fuse.train.TrainConfig`;
* ``provenance.json``: caches (files, encoders), index fingerprint, library versions, host, argv;
* ``split.json``: the split it trained, validated and tested on: its source, fingerprint and the exact
  sample ids of train / val / test (:func:`write_split`); ``evaluate`` and ``ablate`` compare it with
  the cache's split, so a run is never scored on samples it trained on after a re-split;
* ``history.json``: one row per epoch (rewritten each epoch, so a crashed run shows how far it got);
* ``model.safetensors``: the best-validation weights;
* ``predictions.csv``: test samples, ``id, true, predicted, p_<class>...``;
* ``metrics.json``: written last; its presence means the run finished (:data:`FINISHED_MARKER`);
* ``train.log``: the log and progress lines of the run (train-fusion; informational).

``UNFINISHED`` is created with the folder and removed after ``metrics.json`` is written: a folder
that holds it was interrupted (Ctrl-C, kill) or is still being trained, and never counts as a run
(:func:`is_finished`, :func:`run_state`). ``error.json`` marks a run an ablation recorded as failed.
Everything here reads and writes those files; other modules do not open them by name.
``error.json`` marks a run an ablation recorded as failed. ``calibration.json`` (written by ``analyze``)
holds the temperature fitted on the validation split, used by ``predict --calibrated``; ``analysis/``
holds analyze's figures, tables and ``report.html``. Everything here reads and writes those
files; other modules do not open them by name.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcache.common import atomic_write
from mmcache.errors import BadInputError, PipelineError

if TYPE_CHECKING:
    from mmcache.fuse.targets import TargetSet

logger = logging.getLogger(__name__)

RUN_FILES = ("config.json", "provenance.json", "split.json", "history.json", "model.safetensors",
             "predictions.csv", "metrics.json", "train.log")
SPLIT_FILE = "split.json"  # the run's split: source, fingerprint, ids per split
FINISHED_MARKER = "metrics.json"  # written last: a run folder without it did not finish
ERROR_FILE = "error.json"  # an ablation's record of a run that raised
UNFINISHED_MARKER = "UNFINISHED"  # present from the folder's creation until metrics.json is written
CALIBRATION_FILE = "calibration.json"  # temperature scaling fitted by analyze
ANALYSIS_DIR = "analysis"


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def make_run_dir(runs_dir: Path, name: str) -> Path:
    """Create ``runs_dir/name`` (or ``name-2``, ``name-3`` ... when taken) and return it."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        d = runs_dir / (name if k == 1 else f"{name}-{k}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        if k > 1:
            logger.info("run folder %s exists; writing to %s", runs_dir / name, d)
        mark_unfinished(d, "training (or interrupted: the process is gone)")
        return d
    raise PipelineError(f"too many runs named {name} in {runs_dir}")


def check_run_name(name: str) -> str:
    """``name`` if it is a plain folder name; :class:`BadInputError` for path separators or ``..``
    (a run name never places its folder outside the runs folder)."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or (os.altsep and os.altsep in name):
        raise BadInputError(f"run name {name!r} must be a plain folder name (no path separators, not '.' or "
                            "'..'); choose the parent folder with --runs-dir")
    return name


def mark_unfinished(run_dir: str | Path, why: str) -> None:
    """Write (or rewrite) the ``UNFINISHED`` marker with a line saying why, when and which process."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write(Path(run_dir) / UNFINISHED_MARKER, f"{why}\n{stamp} pid {os.getpid()} host {platform.node()}\n")


def mark_finished(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` (the run finished), then drop the ``UNFINISHED`` marker."""
    write_json(Path(run_dir) / FINISHED_MARKER, metrics)
    (Path(run_dir) / UNFINISHED_MARKER).unlink(missing_ok=True)


def attach_run_log(run_dir: str | Path) -> logging.Handler:
    """Append this process's mmcache log records (progress lines included) to ``<run>/train.log``
    until :func:`detach_run_log`."""
    handler = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("mmcache").addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("mmcache").removeHandler(handler)
        handler.close()


def is_finished(run_dir: str | Path) -> bool:
    d = Path(run_dir)
    return (d / FINISHED_MARKER).is_file() and not (d / UNFINISHED_MARKER).exists()


def run_state(run_dir: str | Path) -> str:
    """``finished``, ``failed`` (an ablation recorded an error), ``unfinished`` (interrupted or still
    training) or ``missing``."""
    d = Path(run_dir)
    if not d.is_dir():
        return "missing"
    if is_finished(d):
        return "finished"
    if (d / ERROR_FILE).is_file():
        return "failed"
    return "unfinished"


def require_finished(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path; :class:`BadInputError` unless it is a finished run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise BadInputError(f"{run_dir} is not a run folder (no config.json)")
    if not is_finished(run_dir):
        why = ""
        if (run_dir / UNFINISHED_MARKER).is_file():
            why = f": {(run_dir / UNFINISHED_MARKER).read_text(encoding='utf-8', errors='replace').splitlines()[0]}"
        raise BadInputError(f"run {run_dir} did not finish (marked {UNFINISHED_MARKER}{why}); train it again")
    return run_dir


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """``metrics.json`` of a finished run."""
    return json.loads((require_finished(run_dir) / FINISHED_MARKER).read_text(encoding="utf-8"))


def read_provenance(run_dir: str | Path) -> dict[str, Any]:
    """``provenance.json`` ({} for a run folder without one)."""
    return read_json(Path(run_dir) / "provenance.json") or {}


def write_split(run_dir: str | Path, split: dict[str, Any], ids: dict[str, list[str]]) -> None:
    """``split.json``: ``split`` (the index's ``split_info``: spec, source, fingerprint, counts) and
    ``ids`` (train / val / test sample ids as in the index, before dropping samples missing a modality)."""
    rec = {**split, "ids": {s: list(v) for s, v in ids.items()}}
    atomic_write(Path(run_dir) / SPLIT_FILE, json.dumps(rec, separators=(",", ":"), default=str) + "\n")  # compact: ids


def read_split(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``split.json``, or None for a run made before runs recorded their split."""
    rec = read_json(Path(run_dir) / SPLIT_FILE)
    return rec if isinstance(rec, dict) and "fingerprint" in rec else None


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """``calibration.json`` (``{"temperature": T, ...}``), or None when the run has none."""
    cal = read_json(Path(run_dir) / CALIBRATION_FILE)
    return cal if isinstance(cal, dict) and isinstance(cal.get("temperature"), (int, float)) else None


def write_calibration(run_dir: str | Path, calibration: dict[str, Any]) -> Path:
    path = Path(run_dir) / CALIBRATION_FILE
    write_json(path, calibration)
    return path


def analysis_dir(run_dir: str | Path) -> Path:
    """``<run>/analysis/`` (created)."""
    d = Path(run_dir) / ANALYSIS_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def predictions_csv(ids: np.ndarray, labels: np.ndarray, probs: np.ndarray, target: TargetSet) -> str:
    """One target: ``id, true, predicted, p_<class>...``. A task: ``id`` then per target, in task order,
    ``<target>:true, <target>:predicted, <target>:p_<class>...`` (``true`` empty where the label is masked).
    labels (n, T) int64; probs (n, sum C)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    multi = target.multi
    head = ["id"]
    for m, classes in zip(target.members, target.classes, strict=True):
        pre = f"{m}:" if multi else ""
        head += [f"{pre}true", f"{pre}predicted", *(f"{pre}p_{c}" for c in classes)]
    w.writerow(head)
    offsets = np.cumsum([0, *target.sizes])
    for i, sid in enumerate(ids):
        row = [sid]
        for j, classes in enumerate(target.classes):
            block = probs[i, offsets[j]:offsets[j + 1]]
            y = int(labels[i, j])
            row += [classes[y] if y >= 0 else "", classes[int(block.argmax())], *(f"{v:.6f}" for v in block)]
        w.writerow(row)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)  # fixed for the process; an ablation writes it for every run
def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "h5py", "scikit-learn", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


@functools.lru_cache(maxsize=1)  # one git subprocess per process, not per run
def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None
