"""The run folder: the one contract that train, evaluate, analyze, ablate and predict share (owner module).

A run folder ``runs/<name>/`` holds, in the order they are written:

* ``config.json``: the resolved :class:`~mmcache.fuse.train.TrainConfig`;
* ``provenance.json``: caches (files, encoders), the ABSOLUTE cache root (``cache_root``), index
  fingerprint, library versions, host, argv;
* ``split.json``: the split it trained, validated and tested on: its source, fingerprint and the exact
  sample ids of train / val / test; ``evaluate``, ``analyze``, ``predict`` and ``ablate`` compare it
  with the cache's split (:mod:`fuse.scoring`), so a run is never scored on samples it trained on;
* ``history.json``: one row per epoch (rewritten each epoch, so a crashed run shows how far it got);
* ``model.safetensors``: the best-validation weights;
* ``predictions.csv``: test samples, ``id, true, predicted, p_<class>...``;
* ``metrics.json``: the scores (the finished run's payload);
* ``manifest.json``: written LAST: every file above with its size, mtime and sha256. A run is complete
  only when it exists and every listed file still matches (:meth:`RunFolder.verify`);
* ``train.log``: the log and progress lines of the run (informational, not in the manifest).

``UNFINISHED`` is created with the folder and removed after the manifest is written: a folder that
holds it was interrupted (Ctrl-C, kill) or is still being trained, and never counts as a run.
``error.json`` marks a run an ablation recorded as failed. ``calibration.json`` (written by ``analyze``)
holds the temperature fitted on the validation split, used by ``predict --calibrated``; ``analysis/``
holds analyze's figures, tables and ``report.html``; ``evaluations/`` holds evaluate's outputs.

:class:`RunFolder` is the only code that reads or writes these files; their names live only here.
Runs made before manifests existed are accepted as "unverified" (a logged warning).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcache.common import atomic_write
from mmcache.csvsafe import csv_row
from mmcache.errors import BadInputError, PipelineError

if TYPE_CHECKING:
    from mmcache.fuse.targets import TargetSet

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # the resolved TrainConfig
PROVENANCE_FILE = "provenance.json"  # caches, encoders, absolute cache root, versions
SPLIT_FILE = "split.json"  # the run's split: source, fingerprint, ids per split
HISTORY_FILE = "history.json"  # one row per epoch
MODEL_FILE = "model.safetensors"  # best-validation weights
PREDICTIONS_FILE = "predictions.csv"  # test samples with probabilities
FINISHED_MARKER = "metrics.json"  # the scores; written just before the manifest
MANIFEST_FILE = "manifest.json"  # written LAST: the run's files with size, mtime and sha256
LOG_FILE = "train.log"
ERROR_FILE = "error.json"  # an ablation's record of a run that raised
UNFINISHED_MARKER = "UNFINISHED"  # present from the folder's creation until the manifest is written
CALIBRATION_FILE = "calibration.json"  # temperature scaling fitted by analyze
ANALYSIS_DIR = "analysis"
EVALUATIONS_DIR = "evaluations"
TRACKING_DIR = "tb"  # TensorBoard event files (fuse/tracking.py); not sealed, never read back
RUN_FILES = (CONFIG_FILE, PROVENANCE_FILE, SPLIT_FILE, HISTORY_FILE, MODEL_FILE, PREDICTIONS_FILE, FINISHED_MARKER,
             LOG_FILE)
SEALED_FILES = (CONFIG_FILE, PROVENANCE_FILE, SPLIT_FILE, HISTORY_FILE, MODEL_FILE, PREDICTIONS_FILE,
                FINISHED_MARKER)  # listed in the manifest (train.log is appended to; not sealed)
MANIFEST_FORMAT = "mmcache-run-manifest/1"


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
    """``name`` if it is a plain folder name; :class:`BadInputError` for a blank or whitespace-only name,
    control characters, path separators or ``..`` (a run name never places its folder outside the runs
    folder, and always shows as what it is in a listing)."""
    if not isinstance(name, str) or not name.strip():
        raise BadInputError(f"run name {name!r} is blank; give a plain folder name")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadInputError(f"run name {name!r} contains control characters; give a plain folder name")
    if "/" in name or "\\" in name or name in (".", "..") or (os.altsep and os.altsep in name):
        raise BadInputError(f"run name {name!r} must be a plain folder name (no path separators, not '.' or "
                            "'..'); choose the parent folder with --runs-dir")
    return name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat_record(path: Path, digest: bool = True) -> dict[str, Any]:
    st = path.stat()
    rec: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if digest:
        rec["sha256"] = _sha256(path)
    return rec


class RunFolder:
    """One run folder: the only reader and writer of its files (see the module docstring).

    Verification (:meth:`verify`): ``full=True`` (scoring: evaluate, analyze, predict) hashes every
    file the manifest lists; ``full=False`` (ablate's reuse check over thousands of runs) compares size
    and mtime and hashes only a file whose mtime changed but whose size did not (so a copy that kept
    its mtimes costs nothing, and an edit that kept the size is still caught). A run without a manifest
    (made before manifests existed) is "unverified": accepted with a logged warning.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._hashed: str | None = None  # the result of a full verify of this object (hash once per command)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # -- state
    def exists(self) -> bool:
        return self.path.is_dir()

    def is_run(self) -> bool:
        """A run folder at all (it has a config)."""
        return (self.path / CONFIG_FILE).is_file()

    def is_finished(self) -> bool:
        """Sealed (manifest present; or, for a run from before manifests, metrics.json present) and not
        marked UNFINISHED. Says nothing about whether the files still match: :meth:`verify`."""
        if (self.path / UNFINISHED_MARKER).exists():
            return False
        return (self.path / MANIFEST_FILE).is_file() or (self.path / FINISHED_MARKER).is_file()

    def state(self) -> str:
        """``finished``, ``failed`` (an ablation recorded an error), ``unfinished`` or ``missing``."""
        if not self.path.is_dir():
            return "missing"
        if self.is_finished():
            return "finished"
        if (self.path / ERROR_FILE).is_file():
            return "failed"
        return "unfinished"

    def require_finished(self) -> RunFolder:
        """This folder; :class:`BadInputError` unless it is a finished run folder."""
        if not self.is_run():
            raise BadInputError(f"{self.path} is not a run folder (no {CONFIG_FILE})")
        if not self.is_finished():
            why = ""
            marker = self.path / UNFINISHED_MARKER
            if marker.is_file():
                why = f": {(marker.read_text(encoding='utf-8', errors='replace').splitlines() or [''])[0]}"
            raise BadInputError(f"run {self.path} did not finish (marked {UNFINISHED_MARKER}{why}); train it again")
        return self

    def open(self, *, full: bool = True) -> RunFolder:
        """A finished run whose files match its manifest (:meth:`require_finished` + :meth:`verify`)."""
        self.require_finished().verify(full=full)
        return self

    # -- manifest
    def seal(self) -> dict[str, Any]:
        """Write ``manifest.json`` (LAST: after metrics.json): every sealed file present with its size,
        mtime and sha256. Tests that fabricate a run (edit a file on purpose) call it to re-seal."""
        files = {n: _stat_record(self.path / n) for n in SEALED_FILES if (self.path / n).is_file()}
        manifest = {"format": MANIFEST_FORMAT, "files": files}
        write_json(self.path / MANIFEST_FILE, manifest)
        return manifest

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, None for a run made before manifests; :class:`BadInputError` when unreadable."""
        path = self.path / MANIFEST_FILE
        if not path.is_file():
            return None
        rec = read_json(path)
        if not (isinstance(rec, dict) and isinstance(rec.get("files"), dict)):
            raise BadInputError(f"{path}: the run's manifest is unreadable or damaged; train the run again")
        return rec

    def verify(self, *, full: bool = True) -> str:
        """``verified`` or ``unverified`` (no manifest: warned); :class:`BadInputError` naming the first
        file that is missing or differs from the manifest. ``full``: hash every file (scoring); else the
        size + mtime fast path (ablate's reuse check), hashing only where the mtime moved."""
        if full and self._hashed is not None:  # analyze opens, then scores: one hash of every file is enough
            return self._hashed
        manifest = self.manifest()
        if manifest is None:  # warned when scoring; ablate's reuse check over many old runs stays quiet
            logger.log(logging.WARNING if full else logging.DEBUG, "run %s has no %s (made before runs were "
                       "sealed): its files are unverified", self.path, MANIFEST_FILE)
            if full:
                self._hashed = "unverified"
            return "unverified"
        for name, want in manifest["files"].items():
            path = self.path / name
            if not path.is_file():
                raise BadInputError(f"{path}: missing, but listed in the run's {MANIFEST_FILE}; train the run again")
            st = path.stat()
            if st.st_size != want.get("size"):
                raise BadInputError(f"{path}: {st.st_size} bytes, the run recorded {want.get('size')} (changed or "
                                    "truncated since training); train the run again")
            if (full or st.st_mtime_ns != want.get("mtime_ns")) and _sha256(path) != want.get("sha256"):
                raise BadInputError(f"{path}: its content differs from the run's {MANIFEST_FILE} (edited or swapped "
                                    "since training); train the run again")
        if full:
            self._hashed = "verified"
        return "verified"

    def is_intact(self) -> bool:
        """The fast check (:meth:`verify` ``full=False``) as a bool, for ablate's reuse."""
        try:
            self.verify(full=False)
        except BadInputError as e:
            logger.warning("%s", e)
            return False
        return True

    # -- JSON files
    def _read(self, name: str, *, required: bool = True) -> Any:
        path = self.path / name
        if not path.is_file():
            if required:
                raise BadInputError(f"{path}: missing (not a complete run folder)")
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInputError(f"{path}: not readable JSON ({type(e).__name__}); the run is damaged") from None

    def config_dict(self) -> dict[str, Any]:
        d = self._read(CONFIG_FILE)
        if not isinstance(d, dict):
            raise BadInputError(f"{self.path / CONFIG_FILE}: not a JSON object")
        return d

    def saved_config(self) -> dict[str, Any] | None:
        """config.json as a dict, None when missing or unreadable (ablate compares it, never raises)."""
        d = read_json(self.path / CONFIG_FILE)
        return d if isinstance(d, dict) else None

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path / CONFIG_FILE, config)

    def metrics(self) -> dict[str, Any]:
        m = self._read(FINISHED_MARKER)
        if not isinstance(m, dict) or "model" not in m:
            raise BadInputError(f"{self.path / FINISHED_MARKER}: not a finished run's metrics")
        return m

    def saved_metrics(self) -> dict[str, Any] | None:
        m = read_json(self.path / FINISHED_MARKER)
        return m if isinstance(m, dict) else None

    def provenance(self) -> dict[str, Any]:
        """provenance.json ({} for a run folder without one)."""
        p = self._read(PROVENANCE_FILE, required=False)
        return p if isinstance(p, dict) else {}

    def write_provenance(self, provenance: dict[str, Any]) -> None:
        write_json(self.path / PROVENANCE_FILE, provenance)

    def cache_root(self) -> Path | None:
        """The absolute cache folder the run was trained from (recorded since provenance has
        ``cache_root``); for older runs the folder above the recorded feature files' dataset folder, if
        recorded absolute; else None (the caller falls back to the config's ``cache_dir``)."""
        prov = self.provenance()
        if prov.get("cache_root"):
            return Path(prov["cache_root"])
        for rec in (prov.get("caches") or {}).values():
            p = Path(str((rec or {}).get("path") or ""))
            if p.is_absolute():
                return p.parent.parent
        return None

    def split(self) -> dict[str, Any] | None:
        """The run's split record, or None for a run made before runs recorded their split."""
        rec = read_json(self.path / SPLIT_FILE)
        return rec if isinstance(rec, dict) and "fingerprint" in rec else None

    def write_split(self, split: dict[str, Any], ids: dict[str, list[str]]) -> None:
        """``split`` (the index's ``split_info``: spec, source, fingerprint, counts) and ``ids`` (train /
        val / test sample ids as in the index, before dropping samples missing a modality)."""
        rec = {**split, "ids": {s: list(v) for s, v in ids.items()}}
        atomic_write(self.path / SPLIT_FILE, json.dumps(rec, separators=(",", ":"), default=str) + "\n")  # compact: ids

    def write_history(self, history: list[dict[str, Any]]) -> None:
        write_json(self.path / HISTORY_FILE, history)

    def history(self) -> list[dict[str, Any]]:
        h = read_json(self.path / HISTORY_FILE)
        return h if isinstance(h, list) else []

    # -- weights, predictions, markers
    def write_model(self, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tmp = self.path / f".{MODEL_FILE}.tmp{os.getpid()}"
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, self.path / MODEL_FILE)

    def load_model_state(self) -> dict[str, Any]:
        """The saved tensors; :class:`BadInputError` naming the file when it cannot be read."""
        from safetensors.torch import load_file

        path = self.path / MODEL_FILE
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
            raise BadInputError(f"{path}: cannot read the run's weights ({type(e).__name__}: {e})") from None

    def write_predictions(self, ids: np.ndarray, labels: np.ndarray, probs: np.ndarray, target: TargetSet) -> None:
        atomic_write(self.path / PREDICTIONS_FILE, predictions_csv(ids, labels, probs, target))

    def predictions_text(self) -> str | None:
        path = self.path / PREDICTIONS_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def mark_unfinished(self, why: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write(self.path / UNFINISHED_MARKER, f"{why}\n{stamp} pid {os.getpid()} host {platform.node()}\n")

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write metrics.json, then the manifest (last), then drop the ``UNFINISHED`` marker."""
        write_json(self.path / FINISHED_MARKER, metrics)
        self.seal()
        (self.path / UNFINISHED_MARKER).unlink(missing_ok=True)

    def write_error(self, run_name: str, message: str, config: dict[str, Any] | None = None) -> None:
        """An ablation's failure record (``error.json``), plus the config when the folder has none."""
        self.path.mkdir(parents=True, exist_ok=True)
        if config is not None and not (self.path / CONFIG_FILE).is_file():
            self.write_config(config)
        write_json(self.path / ERROR_FILE, {"run": run_name, "error": message})

    def error(self) -> str | None:
        rec = read_json(self.path / ERROR_FILE)
        if rec is None:
            return None
        return (rec if isinstance(rec, dict) else {}).get("error", "unknown error")

    # -- analyze / evaluate outputs
    def calibration(self) -> dict[str, Any] | None:
        """calibration.json when it holds a FITTED temperature, else None."""
        cal = read_json(self.path / CALIBRATION_FILE)
        ok = isinstance(cal, dict) and isinstance(cal.get("temperature"), (int, float)) and cal.get("fitted", True)
        return cal if ok else None

    def write_calibration(self, calibration: dict[str, Any]) -> Path:
        path = self.path / CALIBRATION_FILE
        write_json(path, calibration)
        return path

    def drop_calibration(self) -> None:
        (self.path / CALIBRATION_FILE).unlink(missing_ok=True)

    def analysis_dir(self) -> Path:
        return self.path / ANALYSIS_DIR

    def staging_analysis_dir(self) -> Path:
        """An empty folder to write a new analysis into; :meth:`publish_analysis` swaps it in."""
        tmp = self.path / f".{ANALYSIS_DIR}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def publish_analysis(self, staged: Path) -> Path:
        """Replace ``analysis/`` by ``staged`` (so stale figures of an earlier analysis go, and a crash
        mid-analysis never leaves a half-written one)."""
        final = self.analysis_dir()
        old = self.path / f".{ANALYSIS_DIR}.old{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def tracking_dir(self) -> Path:
        """Where experiment trackers write (``tb/``: TensorBoard event files); not created here."""
        return self.path / TRACKING_DIR

    def evaluation_paths(self, stem: str) -> tuple[Path, Path]:
        """(predictions .csv, metrics .json) of one evaluation, in ``evaluations/`` (created)."""
        out = self.path / EVALUATIONS_DIR
        out.mkdir(exist_ok=True)
        return out / f"{stem}.csv", out / f"{stem}.json"

    def attach_log(self) -> logging.Handler:
        return attach_run_log(self.path)


# -- module-level helpers (kept for callers that hold a path)

def finished_runs(runs_dir: str | Path) -> list[RunFolder]:
    """Every folder under ``runs_dir`` (any depth) holding a run's metrics, sorted by path."""
    return [RunFolder(p.parent) for p in sorted(Path(runs_dir).glob(f"**/{FINISHED_MARKER}"))]


def mark_unfinished(run_dir: str | Path, why: str) -> None:
    """Write (or rewrite) the ``UNFINISHED`` marker with a line saying why, when and which process."""
    RunFolder(run_dir).mark_unfinished(why)


def mark_finished(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` and the manifest (the run finished), then drop the ``UNFINISHED`` marker."""
    RunFolder(run_dir).finish(metrics)


def attach_run_log(run_dir: str | Path) -> logging.Handler:
    """Append this process's mmcache log records (progress lines included) to ``<run>/train.log``
    until :func:`detach_run_log`."""
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("mmcache").addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("mmcache").removeHandler(handler)
        handler.close()


def is_finished(run_dir: str | Path) -> bool:
    return RunFolder(run_dir).is_finished()


def run_state(run_dir: str | Path) -> str:
    """``finished``, ``failed`` (an ablation recorded an error), ``unfinished`` (interrupted or still
    training) or ``missing``."""
    return RunFolder(run_dir).state()


def require_finished(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path; :class:`BadInputError` unless it is a finished run folder."""
    return RunFolder(run_dir).require_finished().path


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """``metrics.json`` of a finished run."""
    return RunFolder(run_dir).require_finished().metrics()


def read_provenance(run_dir: str | Path) -> dict[str, Any]:
    """``provenance.json`` ({} for a run folder without one)."""
    return RunFolder(run_dir).provenance()


def write_split(run_dir: str | Path, split: dict[str, Any], ids: dict[str, list[str]]) -> None:
    RunFolder(run_dir).write_split(split, ids)


def read_split(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``split.json``, or None for a run made before runs recorded their split."""
    return RunFolder(run_dir).split()


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """``calibration.json`` with a fitted temperature, or None when the run has none."""
    return RunFolder(run_dir).calibration()


def write_calibration(run_dir: str | Path, calibration: dict[str, Any]) -> Path:
    return RunFolder(run_dir).write_calibration(calibration)


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
    w.writerow(csv_row(head))
    offsets = np.cumsum([0, *target.sizes])
    for i, sid in enumerate(ids):
        row = [sid]
        for j, classes in enumerate(target.classes):
            block = probs[i, offsets[j]:offsets[j + 1]]
            y = int(labels[i, j])
            row += [classes[y] if y >= 0 else "", classes[int(block.argmax())], *(f"{v:.6f}" for v in block)]
        w.writerow(csv_row(row))  # ids and class names come from the data
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
