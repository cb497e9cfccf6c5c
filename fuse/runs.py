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
* ``metrics.json``: written last; its presence means the run finished (:data:`FINISHED_MARKER`).

``error.json`` marks a run an ablation recorded as failed. Everything here reads and writes those
files; other modules do not open them by name.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

from mmcache.common import atomic_write
from mmcache.errors import BadInputError, PipelineError

logger = logging.getLogger(__name__)

RUN_FILES = ("config.json", "provenance.json", "split.json", "history.json", "model.safetensors",
             "predictions.csv", "metrics.json")
SPLIT_FILE = "split.json"  # the run's split: source, fingerprint, ids per split
FINISHED_MARKER = "metrics.json"  # written last: a run folder without it did not finish
ERROR_FILE = "error.json"  # an ablation's record of a run that raised


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
        return d
    raise PipelineError(f"too many runs named {name} in {runs_dir}")


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / FINISHED_MARKER).is_file()


def require_finished(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path; :class:`BadInputError` unless it is a finished run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise BadInputError(f"{run_dir} is not a run folder (no config.json)")
    if not is_finished(run_dir):
        raise BadInputError(f"run {run_dir} did not finish (no {FINISHED_MARKER}); train it again")
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
