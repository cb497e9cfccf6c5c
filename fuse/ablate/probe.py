"""The linear-probe baseline of every ablation table: L2 logistic regression on the same cached features.

Why: a tuned linear probe on frozen features is the baseline representation papers (dinov2 and others)
report, and on real data it can beat the fusion heads; a table without it cannot say whether a head
adds anything. For each (features, encoder pair) group of a table and each modality set the cache has
(text, image, text+image concatenated):

* the samples are exactly the heads' (the group's data loaded as :mod:`fuse.ablate.execute` loads it,
  with both modalities, so the same posts are dropped);
* features: ``cls`` / ``mean`` / ``proj`` as stored, ``tokens`` as their masked mean; standardised on
  train;
* C is swept over :data:`PROBE_CS` (13 values, 1e-4..1e2) and chosen on validation macro-F1 (the
  table's selection metric; ties -> the smaller C); lbfgs, fixed random_state: deterministic;
* a task (several targets) gets one probe per member, each with its own C.

The test predictions are cached in ``<results>/probe/<dataset>-<key>.json`` (key: the data fingerprint
the grid computes, features, target and probe settings), so re-aggregating never refits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.fuse.ablate.grid import GridRun, index_fingerprint
from mmcache.fuse.bootstrap import scores_from_confusion
from mmcache.fuse.data import FusionData, load_data
from mmcache.fuse.metrics import METRICS, compute_metrics
from mmcache.fuse.runs import predictions_csv

from mmcache import cache as cf
from mmcache.common import atomic_write
from mmcache.errors import PipelineError

logger = logging.getLogger(__name__)

__all__ = ["PROBE_CS", "probe_records"]

PROBE_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
VERSION = 1  # bump when the probe's method changes: old cached predictions are then ignored


def _file_fp(path: str) -> str:
    with cf.FeatureFile(Path(path)) as ff:
        return f"{ff.attrs.get('config_fingerprint')}/{ff.index_fingerprint}"


def _cache_key(run: GridRun) -> str:
    """Hash of what the probe's numbers depend on: the grid's data fingerprint (index, each feature file's
    settings), features, target and the probe's settings."""
    index = cf.read_index(Path(run.config.cache_dir) / run.dataset / cf.INDEX_NAME)
    data_fp = "|".join([index_fingerprint(index), *(_file_fp(getattr(run.encoder, m)) for m in run.encoder.modalities)])
    payload = json.dumps({"data": data_fp, "features": run.features, "target": run.target,
                          "files": [Path(getattr(run.encoder, m)).name for m in run.encoder.modalities],
                          "cs": PROBE_CS, "version": VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def _matrix(data: FusionData, modality: str) -> np.ndarray:
    """(N, D) float32 features of one modality: the stored vector, or the masked mean of ``tokens``."""
    md = data.modality(modality)
    x, mask = md.x.float().cpu().numpy(), md.mask.cpu().numpy()
    if x.shape[1] == 1:
        return x[:, 0]
    m = mask[..., None].astype(np.float32)
    return (x * m).sum(1) / np.maximum(m.sum(1), 1.0)


def _macro_f1(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    """Macro-F1 over all ``c`` classes (absent ones score 0, as :func:`fuse.metrics.compute_metrics`), from
    numpy confusion counts: sklearn's checks cost ~40 ms a call, 13 calls per probe."""
    conf = np.bincount(y * c + pred, minlength=c * c).reshape(c, c).astype(np.float64)
    return float(scores_from_confusion(conf)["macro_f1"])


def _fit_member(x: np.ndarray, y: np.ndarray, rows: dict[str, np.ndarray], n_classes: int) -> dict[str, Any]:
    """Standardise on train, sweep C (ascending, warm-started), keep the best validation macro-F1 (the
    first, i.e. smallest C, on ties); returns C, validation macro-F1, test probabilities (n_test, C)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, va = (rows[s][y[rows[s]] >= 0] for s in ("train", "val"))
    scaler = StandardScaler().fit(x[tr])
    xt, xv, xs = scaler.transform(x[tr]), scaler.transform(x[va]), scaler.transform(x[rows["test"]])
    model = LogisticRegression(max_iter=1000, solver="lbfgs", random_state=0, warm_start=True)
    best: dict[str, Any] = {"C": None, "val_macro_f1": -1.0}
    with warnings.catch_warnings():
        # the largest C rarely reach lbfgs' tolerance; the validation score judges them anyway
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in PROBE_CS:
            model.set_params(C=c).fit(xt, y[tr])
            f1 = _macro_f1(y[va], model.predict(xv), n_classes)
            if f1 > best["val_macro_f1"]:
                proba = np.zeros((len(xs), n_classes))
                proba[:, model.classes_] = model.predict_proba(xs)  # a class absent from train: probability 0
                best = {"C": c, "val_macro_f1": f1, "proba": proba, "params": int(model.coef_.size + model.intercept_.size)}
    return best


def _probe_one(data: FusionData, mods: tuple[str, ...], rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """One probe (a modality set) on one group's data: chosen C per member, test predictions and scores."""
    t0 = time.perf_counter()
    x = np.concatenate([_matrix(data, m) for m in mods], axis=1)
    labels = data.target_labels.cpu().numpy()
    fits = [_fit_member(x, labels[:, j], rows, len(cls)) for j, cls in enumerate(data.target.classes)]
    test = rows["test"]
    csv_text = predictions_csv(data.ids[test], labels[test], np.concatenate([f["proba"] for f in fits], axis=1),
                               data.target)
    per = []
    for j, (f, cls) in enumerate(zip(fits, data.target.classes, strict=True)):
        ok = labels[test, j] >= 0
        per.append(compute_metrics(labels[test, j][ok], f["proba"][ok].argmax(1), list(cls)))
    rec: dict[str, Any] = {k: float(np.mean([p[k] for p in per])) for k in METRICS}
    rec.update(C={m: f["C"] for m, f in zip(data.target.members, fits, strict=True)},
               val_macro_f1=float(np.mean([f["val_macro_f1"] for f in fits])), n_test=int(len(test)),
               num_parameters=sum(f["params"] for f in fits), seconds=time.perf_counter() - t0,
               predictions_csv=csv_text)
    if data.target.multi:
        rec["targets"] = {m: p["macro_f1"] for m, p in zip(data.target.members, per, strict=True)}
    else:
        rec["confusion_matrix"] = per[0]["confusion_matrix"]
        rec["per_class_recall"] = {c: v["recall"] for c, v in per[0]["per_class"].items()}
    return rec


def _fit_group(run: GridRun) -> list[dict[str, Any]]:
    """Every probe of ``run``'s group (text, image, text+image where the cache has them)."""
    data = load_data(run.dataset, modalities=run.encoder.modalities, features=run.features,
                     cache_dir=run.config.cache_dir, text_cache=run.encoder.text, image_cache=run.encoder.image,
                     target=run.target)
    rows = {s: data.split_rows[s].cpu().numpy() for s in ("train", "val", "test")}
    if not len(rows["val"]) or not len(rows["train"]):
        raise PipelineError("no train or validation samples: the probe's C cannot be chosen")
    sets = [(m,) for m in data.modalities] + ([tuple(data.modalities)] if len(data.modalities) > 1 else [])
    import sklearn.linear_model  # noqa: F401 - loads scipy's / sklearn's thread pools before they are limited
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # One thread: these problems are small, and sklearn's OpenMP / BLAS threads cost ~10x the work itself
    # (measured on the demo: 1.8 s CPU for one probe's C sweep with 2 threads, 0.19 s with 1).
    with threadpool_limits(1):
        return [{"modalities": list(mods), **_probe_one(data, mods, rows)} for mods in sets]


def probe_records(druns: list[GridRun], cache_dir: str | Path | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Probe records (shaped like the run records of :func:`fuse.ablate.aggregate.aggregate`, ``kind``
    ``probe``) for every (features, encoder pair) group of one table's runs, fitted or read from the
    cache folder ``cache_dir`` (None: always fitted, nothing written); and the errors of groups whose
    probe failed (the tables never depend on it)."""
    groups: dict[tuple, GridRun] = {}
    for r in druns:
        groups.setdefault(r.group, r)
    records, errors = [], []
    for run in groups.values():
        try:
            fits = _cached_fits(run, cache_dir)
        except (PipelineError, OSError, ValueError) as e:
            logger.warning("probe of %s %s (%s) failed: %s", run.dataset, run.features, run.encoder.label, e)
            errors.append(f"{run.features} ({run.encoder.label}): {e}")
            continue
        for f in fits:
            name = "+".join(f["modalities"])
            records.append({**f, "run": f"probe-{name}-{run.features}-{run.encoder.tag}", "kind": "probe",
                            "head": f"probe ({name})", "features": run.features, "encoder": run.encoder.label,
                            "variant": "", "seed": 0, "lr": None, "status": "finished", "error": None})
    return records, errors


def _cached_fits(run: GridRun, cache_dir: str | Path | None) -> list[dict[str, Any]]:
    path = None if cache_dir is None else Path(cache_dir) / f"{run.dataset}-{_cache_key(run)}.json"
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["probes"]
        except (ValueError, KeyError) as e:  # a damaged cache file is refitted, not trusted
            logger.warning("%s unreadable (%s): probe refitted", path, e)
    fits = _fit_group(run)
    if path is not None:
        atomic_write(path, json.dumps({"probes": fits}, indent=1) + "\n")
    return fits
