"""``analyze``: what a trained head does, from its cache and run folder only (stage two).

Writes ``<run>/analysis/`` (see :func:`analyze_run`):

* ``curves``: per class (one-vs-rest on the test split) the precision-recall curve with average
  precision (AP) and ROC AUC;
* ``calibration``: a reliability diagram (confidence = top probability, in equal-width bins) with the
  expected calibration error (ECE = sum over bins of |accuracy - confidence| x share of posts), before and
  after temperature scaling. The temperature T is fitted on the validation split (minimum NLL of
  softmax(log p / T)) and stored in the run (``calibration.json``, :func:`fuse.runs.write_calibration`);
  ``predict --calibrated`` applies it;
* ``attention`` (heads whose ``explains`` hook is set: self_attention, dual_attention): the share of attention the fusion token puts on
  text vs image tokens (self-attention), or the share of each stream's update that comes from the other
  modality (dual attention: |cross-attention output| / (|own state| + |cross-attention output|), as its
  weights always sum to one over the other modality), per class and, where the index has
  ``labels_agree`` (MVSA), for posts whose text and image labels agree vs disagree; plus per-post
  patch and token weights for a few posts (heat maps);
* ``gallery``: the most confident mistakes and the least confident correct answers.

Numbers go to ``analysis.json`` and CSVs; figures and ``report.html`` come from
:mod:`fuse.analysis_report` (figures need matplotlib, the HTML does not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmcache.fuse.analysis_report import write_analysis
from mmcache.fuse.bootstrap import LEVEL, B, metric_intervals
from mmcache.fuse.engine import predict
from mmcache.fuse.heads import get_head, list_heads
from mmcache.fuse.metrics import METRICS, compute_metrics
from mmcache.fuse.report import metrics_table as format_table
from mmcache.fuse.runs import RunFolder
from mmcache.fuse.scoring import open_for_scoring

from mmcache import cache as cf
from mmcache.common import resolve_device
from mmcache.errors import BadInputError

log = logging.getLogger(__name__)

__all__ = ["AnalysisResult", "analyze_run", "apply_temperature", "expected_calibration_error", "explaining_heads",
           "fit_temperature", "format_analysis", "reliability"]

@dataclass
class AnalysisResult:
    run_dir: Path
    out_dir: Path
    summary: dict[str, Any]  # analysis.json
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- calibration

def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) for (N, C) probabilities: the same as softmax(logits / T)."""
    z = np.log(np.clip(probs.astype(np.float64), 1e-45, None)) / float(temperature)
    z -= z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of ``apply_temperature(probs, T)``. 1.0 without data
    or when every post is classified correctly: then the NLL only falls as T -> 0 (sharper is always
    "better"), so no temperature is identifiable from these posts."""
    if len(labels) == 0 or bool((probs.argmax(-1) == labels).all()):
        return 1.0
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: _nll(apply_temperature(probs, float(np.exp(lt))), labels),
                          bounds=(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


T_BOUNDS = (0.05, 20.0)


def fit_temperature_checked(probs: np.ndarray, labels: np.ndarray) -> tuple[float, bool, str]:
    """(T, fitted, why): ``fitted`` is False when no temperature is identifiable (no val posts, none
    misclassified) or the search stopped at a bound of :data:`T_BOUNDS` (the NLL still falls beyond it:
    the number is the search's edge, not a fit). Then T = 1.0 is used and nothing is stored for
    ``predict --calibrated``."""
    if len(labels) == 0:
        return 1.0, False, "no validation posts"
    if bool((probs.argmax(-1) == labels).all()):
        return 1.0, False, "no validation post misclassified"
    t = fit_temperature(probs, labels)
    lo, hi = T_BOUNDS
    if t <= lo * 1.01 or t >= hi / 1.01:
        return 1.0, False, f"the fit reached the search bound (T = {t:.3g}, bounds {lo:g}..{hi:g})"
    return t, True, ""


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width confidence bins: ``lo, hi, n, confidence`` (mean top probability), ``accuracy``."""
    conf = probs.max(-1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(-1) == labels) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for b in range(bins):
        sel = (conf > edges[b]) & (conf <= edges[b + 1]) if b else (conf >= 0) & (conf <= edges[1])
        n = int(sel.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                    "confidence": float(conf[sel].mean()) if n else None,
                    "accuracy": float(correct[sel].mean()) if n else None})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float | None:
    """ECE = sum_b n_b / N * |accuracy_b - confidence_b| over equal-width confidence bins."""
    if len(labels) == 0:
        return None
    return float(sum(b["n"] / len(labels) * abs(b["accuracy"] - b["confidence"])
                     for b in reliability(probs, labels, bins) if b["n"]))


# --------------------------------------------------------------------------------------------- curves

def curves(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Per class, one-vs-rest: PR curve points, average precision and ROC AUC (None for a class with
    no positive or no negative test post)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    out: dict[str, Any] = {}
    for c, name in enumerate(classes):
        y = (labels == c).astype(int)
        if y.sum() == 0 or y.sum() == len(y):
            out[name] = {"ap": None, "roc_auc": None, "positives": int(y.sum()), "precision": [], "recall": []}
            continue
        prec, rec, _ = precision_recall_curve(y, probs[:, c])
        out[name] = {"ap": float(average_precision_score(y, probs[:, c])), "roc_auc": float(roc_auc_score(y, probs[:, c])),
                     "positives": int(y.sum()), "precision": prec.tolist(), "recall": rec.tolist()}
    aps = [v["ap"] for v in out.values() if v["ap"] is not None]
    aucs = [v["roc_auc"] for v in out.values() if v["roc_auc"] is not None]
    return {"per_class": out, "macro_ap": float(np.mean(aps)) if aps else None,
            "macro_roc_auc": float(np.mean(aucs)) if aucs else None}


# --------------------------------------------------------------------------------------------- attention

def explaining_heads() -> list[str]:
    """Registered heads that can explain their predictions (their ``explains`` hook), sorted."""

    return [h for h in list_heads() if get_head(h).explains]


@torch.inference_mode()
def attention_maps(model, data, rows: torch.Tensor, head: str | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Per post (in ``rows`` order), from the head's :meth:`~fuse.heads.FusionHead.explain` hook:
    ``text_share`` / ``image_share`` / ``self_share`` (None where the head has no such token), plus the
    weights over each modality's real tokens (``text_weights`` (Lt,), ``image_weights`` (Li,)) for heat
    maps. ``head``: unused, kept for existing callers (the model itself says how it explains)."""
    if not model.explains:
        raise BadInputError(f"fusion head {model.name!r} cannot explain its predictions; heads that can: "
                            f"{', '.join(explaining_heads())}")
    model.eval()
    out: dict[str, list] = {"text_share": [], "image_share": [], "self_share": [], "text_weights": [], "image_weights": []}
    for start in range(0, rows.numel(), batch_size):
        text, tmask, image, imask = data.batch(rows[start:start + batch_size])
        got = model.explain(text, tmask, image, imask)
        for key in ("text_share", "image_share", "self_share"):
            out[key] += [None] * text.shape[0] if got[key] is None else got[key].tolist()
        for b in range(text.shape[0]):
            out["text_weights"].append(got["text_weights"][b][tmask[b]].cpu().numpy())
            out["image_weights"].append(got["image_weights"][b][imask[b]].cpu().numpy())
    return out


def _share_table(shares: dict[str, list], groups: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Mean text / image share per group of posts (boolean selections over the analysed rows)."""
    t, i = np.asarray(shares["text_share"], float), np.asarray(shares["image_share"], float)
    rows = []
    for name, sel in groups.items():
        n = int(sel.sum())
        rows.append({"group": name, "n": n, "text_share": float(t[sel].mean()) if n else None,
                     "image_share": float(i[sel].mean()) if n else None})
    return rows


# --------------------------------------------------------------------------------------------- the run

def _open(run_dir: str | Path, device: str, *, cache_dir: str | Path | None = None, split_choice: str | None = None):
    """The run and its checked data through the one door (:func:`fuse.scoring.open_for_scoring`):
    manifest, the run's recorded cache root, encoder identity, classes and split, as for evaluate."""

    folder = RunFolder(run_dir).open(full=True)
    meta = folder.metrics()
    targets = meta["model"].get("targets") or {}
    if len(targets) > 1:  # before loading data: the task may not even be in the cache
        raise BadInputError(f"run {folder.path} predicts the task {meta.get('target')!r} ({', '.join(targets)}); "
                            "analyze takes single-target runs")
    return open_for_scoring(folder, split="test", cache_dir=cache_dir, split_choice=split_choice, device=device)


def _load(run_dir: Path, device: str):
    """(model, config, metrics.json, data) of a run, through :func:`_open`."""
    sc = _open(run_dir, device)
    return sc.model, sc.config, sc.meta, sc.data


def _gallery(probs: np.ndarray, labels: np.ndarray, k: int) -> dict[str, list[int]]:
    """Positions (into the test rows) of the k most confident mistakes and k least confident correct."""
    conf, pred = probs.max(-1), probs.argmax(-1)
    wrong, right = np.flatnonzero(pred != labels), np.flatnonzero(pred == labels)
    return {"confident_mistakes": wrong[np.argsort(-conf[wrong], kind="stable")][:k].tolist(),
            "unsure_correct": right[np.argsort(conf[right], kind="stable")][:k].tolist()}


def analyze_run(run_dir: str | Path, *, gallery: int = 6, heatmaps: int = 4, device: str = "cpu", bins: int = 10,
                tokenize: Callable[[list[str]], list[list[str]]] | None = None, cache_dir: str | Path | None = None,
                split_choice: str | None = None) -> AnalysisResult:
    """Analyse a finished run on its test split (temperature fitted on val); write ``<run>/analysis/``
    (built in a staging folder, then swapped in: no stale figures, never half-written) and, when a
    temperature could be fitted, ``<run>/calibration.json``. The run and data come through
    :func:`fuse.scoring.open_for_scoring`, so a re-split cache is refused as by evaluate unless
    ``split_choice`` is ``"original"`` / ``"current"``; ``cache_dir`` overrides the run's recorded
    cache root. ``tokenize``: texts -> token strings, for the text heat maps (without it tokens are
    shown by position)."""

    if gallery < 0 or heatmaps < 0 or bins < 1:
        raise BadInputError("--gallery and --heatmaps must be >= 0")

    sc = _open(run_dir, str(resolve_device(device)), cache_dir=cache_dir, split_choice=split_choice)
    model, config, data = sc.model, sc.config, sc.data
    labels = data.labels.cpu().numpy()
    probs, ys, rows = {}, {}, {}
    for split in ("val", "test"):
        rows[split], _scored = sc.rows_for(split)
        probs[split] = predict(model, data, rows[split], config.eval_batch_size, config.amp)
        ys[split] = labels[rows[split].cpu().numpy()]
    if len(ys["test"]) == 0:
        raise BadInputError(f"run {sc.run.path}: its test split has no posts to analyse")
    calib, scaled = _calibration(sc, probs, ys, bins)
    summary = _summary(sc, probs, ys, rows, calib, scaled, gallery)
    return _write(sc, summary, probs, ys, rows, heatmaps, tokenize)


def _calibration(sc, probs: dict[str, np.ndarray], ys: dict[str, np.ndarray],
                 bins: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit T on val; store it for ``predict --calibrated`` only when fitted (else drop an older one).
    Returns the record and the scaled (N, C) probabilities per split."""
    t, fitted, why = fit_temperature_checked(probs["val"], ys["val"])
    scaled = {s: apply_temperature(p, t) for s, p in probs.items()}
    calib = {"temperature": t, "fitted": fitted, "not_fitted_because": why or None, "fitted_on": "val",
             "n_val": int(len(ys["val"])), "bins": bins,
             "val_errors": int((probs["val"].argmax(-1) != ys["val"]).sum()) if len(ys["val"]) else 0,
             **{f"ece_{s}_{w}": expected_calibration_error(p[s], ys[s], bins)
                for s in ("val", "test") for w, p in (("before", probs), ("after", scaled))},
             **{f"nll_{s}_{w}": (_nll(p[s], ys[s]) if len(ys[s]) else None)
                for s in ("val", "test") for w, p in (("before", probs), ("after", scaled))}}
    if fitted:
        sc.run.write_calibration(calib)
    else:
        log.warning("run %s: temperature not fitted (%s); predict --calibrated stays unavailable", sc.run.path, why)
        sc.run.drop_calibration()
    return calib, scaled


def _summary(sc, probs, ys, rows, calib, scaled, gallery: int) -> dict[str, Any]:

    config, data = sc.config, sc.data
    index = cf.read_index(data.index_path)
    test_rows = rows["test"].cpu().numpy()
    bins = calib["bins"]
    summary: dict[str, Any] = {
        "run": str(sc.run.path), "head": config.head, "features": config.features, "dataset": data.dataset,
        "classes": data.classes, "n_test": int(len(test_rows)), "curves": curves(probs["test"], ys["test"], data.classes),
        "calibration": {**calib, "reliability_before": reliability(probs["test"], ys["test"], bins),
                        "reliability_after": reliability(scaled["test"], ys["test"], bins)},
        "gallery": {k: [str(data.ids[test_rows[p]]) for p in v] for k, v in _gallery(probs["test"], ys["test"], gallery).items()},
        "split_scored": sc.rows_for("test")[1], "scored": sc.what_was_scored("test", rows["test"]),
    }
    summary.update(_headline(probs["test"], ys["test"], data.classes))
    summary.update(_run_record(sc))
    if sc.model.explains:
        att = attention_maps(sc.model, data, rows["test"])
        groups = {"all": np.ones(len(test_rows), bool),
                  **{f"true {c}": ys["test"] == k for k, c in enumerate(data.classes)}}
        if "labels_agree" in index.extra:
            agree = np.asarray(index.extra["labels_agree"])[test_rows].astype(bool)
            groups.update({"labels agree": agree, "labels disagree": ~agree})
        summary["attention"] = {"kind": sc.model.explain_kind,
                                "shares": _share_table(att, groups)}
        summary["_attention_maps"] = att
    summary["_index"] = index
    return summary


def _headline(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """What a reader asks first: test accuracy / macro-F1 / weighted-F1 with 95% bootstrap intervals
    over test posts, the per-class table and the confusion matrix (rows = true class)."""

    pred = probs.argmax(-1)
    m = compute_metrics(labels, pred, classes)
    ci = metric_intervals(labels, pred, len(classes))
    return {"headline": {"n": m["n"], "replicates": B, "level": LEVEL,
                         **{k: {"value": m[k], "ci": ci[k]} for k in METRICS}},
            "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"]}


def _run_record(sc) -> dict[str, Any]:
    """The run's training config and where its numbers come from: each encoder with its identity, the
    cache files, the index and the split."""
    prov = sc.run.provenance()
    encoders = {}
    for m, rec in (prov.get("caches") or {}).items():
        conf, fprov = rec.get("config") or {}, rec.get("provenance") or {}
        encoders[m] = {"model": rec.get("model") or fprov.get("model_id"), "file": rec.get("path"),
                       "weights_sha256": conf.get("weights_sha256"), "commit_hash": conf.get("commit_hash"),
                       "dtype": rec.get("dtype"), "layer": fprov.get("layer") or conf.get("layer")}
    index = prov.get("index") or {}
    return {"config": sc.config.to_dict(),
            "provenance": {"dataset": prov.get("dataset"), "encoders": encoders, "index": index.get("path"),
                           "index_fingerprint": index.get("fingerprint"), "split": prov.get("split"),
                           "git_commit": prov.get("git_commit")}}


def _write(sc, summary, probs, ys, rows, heatmaps: int, tokenize) -> AnalysisResult:
    """Write into a staging folder, then swap it in for ``analysis/``."""

    att, index = summary.pop("_attention_maps", None), summary.pop("_index")
    data = sc.data
    staged = sc.run.staging_analysis_dir()
    try:
        files = write_analysis(staged, summary, probs=probs["test"], labels=ys["test"],
                               test_rows=rows["test"].cpu().numpy(), index=index, attention=att, heatmaps=heatmaps,
                               tokenize=tokenize, grid=data.image.info.get("grid") if data.image is not None else None,
                               processor=(data.image.info.get("config") or {}).get("processor")
                               if data.image is not None else None)
    except BaseException:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)  # the previous analysis stays as it was
        raise
    out_dir = sc.run.publish_analysis(staged)
    files = [out_dir / p.relative_to(staged) for p in files]
    return AnalysisResult(run_dir=sc.run.path, out_dir=out_dir, summary=summary, files=files)


def format_analysis(result: AnalysisResult) -> str:
    """What the CLI prints: AP / AUC per class, ECE before/after, attention shares, where the files are."""

    s = result.summary
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    cur = s["curves"]["per_class"]
    lines = [f"analysis of {result.run_dir} ({s['head']}, {s['features']}, {s['n_test']} test posts)", "",
             format_table(["class", "test posts", "AP", "ROC AUC"],
                          [[c, v["positives"], f(v["ap"]), f(v["roc_auc"])] for c, v in cur.items()]),
             f"macro AP {f(s['curves']['macro_ap'])}, macro ROC AUC {f(s['curves']['macro_roc_auc'])}", ""]
    c = s["calibration"]
    if c.get("fitted", bool(c.get("val_errors", 1))):
        fitted = f"fitted on {c['n_val']} val posts"
    else:
        fitted = f"not fitted: {c.get('not_fitted_because') or 'no val post misclassified'}; T = 1 kept"
    lines.append(f"temperature {c['temperature']:.3f} ({fitted}): test ECE "
                 f"{f(c['ece_test_before'])} -> {f(c['ece_test_after'])}, NLL {f(c['nll_test_before'])} -> "
                 f"{f(c['nll_test_after'])}")
    if "attention" in s:
        lines += ["", f"attention shares ({s['attention']['kind']}):",
                  format_table(["posts", "n", "text", "image"],
                               [[r["group"], r["n"], f(r["text_share"]), f(r["image_share"])]
                                for r in s["attention"]["shares"]])]
    if s.get("scored"):
        sc = s["scored"]
        lines += ["", f"scored {sc['n_scored']} test posts, {sc['n_dropped']} dropped "
                      f"({', '.join(f'{k} {v}' for k, v in sc['dropped_by_reason'].items() if v) or 'none'}); features: "
                      + "; ".join(f"{m} {f['path']}" for m, f in sc["features"].items())]
    lines += ["", f"written to {result.out_dir}/ ({', '.join(p.name for p in result.files)})"]
    return "\n".join(lines)
