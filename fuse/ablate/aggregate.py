"""Aggregation of a grid's finished runs into tables: one row per (head, features, encoder, variant),
mean and sample standard deviation over seeds, best marks, reference rows of published figures."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.extract import cache_format as cf
from mmcache.fuse.ablate.grid import GridRun, run_status
from mmcache.fuse.metrics import METRICS
from mmcache.fuse.runs import RunFolder
from mmcache.fuse.targets import resolve_target

logger = logging.getLogger(__name__)

REPORTED_LABEL = "reported (paper), not measured"
SEMEVAL = "SemEval-2020 Task 8 overview (Sharma et al. 2020), best system"

# Published figures, shown as reference rows, never marked best: dataset -> target (None = the dataset's
# default target) -> rows. The paper's own (arXiv 2503.07943) and the SemEval-2020 Task 8 best systems
# (macro-F1; Task B and C: mean of the per-target macro-F1, as our task score).
REPORTED: dict[str, dict[str | None, list[dict[str, Any]]]] = {
    "memotion": {
        None: [{"head": "dual_attention", "macro_f1": 0.3552, "note": "Memotion 7k Task A, dual attention"},
               {"head": None, "macro_f1": 0.35, "note": "Memotion 7k Task A", "source": SEMEVAL}],
        "task_b": [{"head": None, "macro_f1": 0.51, "note": "Memotion 7k Task B", "source": SEMEVAL}],
        "task_c": [{"head": None, "macro_f1": 0.32, "note": "Memotion 7k Task C", "source": SEMEVAL}],
    },
    "mvsa_single": {None: [{"head": None, "accuracy": 0.73, "note": "MVSA-Single, accuracy about 0.73"}]},
}




# --------------------------------------------------------------------------------------------- aggregation

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); std None for one value, both None for none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    mean = sum(v) / len(v)
    if len(v) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))


def _subset_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | None]:
    """Scores on a subset of the test posts; macro-F1 averages over the classes present in it (true or
    predicted), so a class the subset lacks does not count as F1 0."""
    if y_true.size == 0:
        return {m: None for m in METRICS}
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0))}


def _agreement_scores(run_dir: Path, agree: dict[str, bool]) -> dict[str, dict[str, Any]] | None:
    """Test metrics of one run on the posts whose text and image labels agree / disagree."""
    text = RunFolder(run_dir).predictions_text()
    if text is None:
        return None
    rows = list(csv.DictReader(io.StringIO(text)))
    out = {}
    for part, want in (("agree", True), ("disagree", False)):
        sel = [r for r in rows if agree.get(r["id"]) is want]
        y_true = np.asarray([r["true"] for r in sel], dtype=object)
        y_pred = np.asarray([r["predicted"] for r in sel], dtype=object)
        out[part] = {"n": len(sel), **_subset_scores(y_true, y_pred)}
    return out


def _summary(values: list[float | None]) -> dict[str, float | None]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def _mark_best(rows: list[dict[str, Any]], path: tuple[str, ...], flag: str) -> None:
    def get(r):
        v = r
        for p in path:
            v = (v or {}).get(p)
        return v

    values = [get(r) for r in rows]
    best = max((v for v in values if v is not None), default=None)
    for r, v in zip(rows, values, strict=True):
        r[flag] = best is not None and v is not None and math.isclose(v, best, rel_tol=0, abs_tol=1e-12)


def _choose_lr(recs: list[dict[str, Any]]) -> tuple[float | None, dict[str, float | None] | None, list[dict[str, Any]]]:
    """With several learning rates in one row: the one with the best mean validation macro-F1 over its
    finished seeds (dinov2 linear-eval style); test is then reported for its runs only. Returns (lr, {lr:
    mean val macro-F1} or None with one lr, the chosen lr's records)."""
    lrs = list(dict.fromkeys(x["lr"] for x in recs))
    if len(lrs) == 1:
        return lrs[0], None, recs
    val = {lr: mean_std([x.get("val_macro_f1") for x in recs if x["lr"] == lr and x["status"] == "finished"])[0]
           for lr in lrs}
    scored = [lr for lr in lrs if val[lr] is not None]
    best = max(scored, key=lambda lr: val[lr]) if scored else lrs[0]
    return best, {f"{lr:g}": v for lr, v in val.items()}, [x for x in recs if x["lr"] == best]


def _stale_elsewhere(druns: list[GridRun], split_fp: str) -> list[str]:
    """Finished run folders beside the grid's (same ``runs_dir/<dataset>/``) made on another split of
    the dataset: left out of the table, named so nobody mistakes them for current results."""
    names = {r.name for r in druns}
    out = []
    for folder in sorted({r.run_dir.parent for r in druns}):
        for d in sorted(folder.iterdir()) if folder.is_dir() else []:
            if d.name in names or RunFolder(d).saved_metrics() is None:
                continue
            rec = RunFolder(d).split()
            if rec is not None and rec["fingerprint"] != split_fp:
                out.append(d.name)
    return out


def aggregate(runs: list[GridRun], skipped: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per (dataset, target): the table (rows, reference rows, per-run records, MVSA agreement split, the
    split it was computed on, heads skipped for a missing modality, runs made on another split), keyed
    ``<dataset>`` for the default target, else ``<dataset>-<target>``."""
    tables: dict[str, dict[str, Any]] = {}
    by_table: dict[str, list[GridRun]] = {}
    for r in runs:
        by_table.setdefault(r.table, []).append(r)
    for table_name, druns in by_table.items():
        dataset = druns[0].dataset
        index_path = Path(druns[0].config.cache_dir) / dataset / cf.INDEX_NAME
        index = cf.read_index(index_path)
        target, _labels = resolve_target(index, druns[0].target)
        agree = None
        if "labels_agree" in index.extra:
            agree = {str(i): bool(int(a)) for i, a in zip(index.ids, index.extra["labels_agree"], strict=True)}
        records, groups = [], {}
        for r in druns:
            status = run_status(r)
            rec: dict[str, Any] = {"run": r.name, "run_dir": str(r.run_dir), "key": r.key, "head": r.head,
                                   "features": r.features, "encoder": r.encoder.label, "seed": r.seed,
                                   "lr": r.config.lr, "variant": r.variant, "status": status, "error": None}
            if status == "finished":
                m = RunFolder(r.run_dir).saved_metrics() or {}
                test = m.get("test") or {}
                rec.update({k: test.get(k) for k in METRICS}, n_test=test.get("n"), seconds=m.get("seconds"),
                           num_parameters=(m.get("model") or {}).get("num_parameters"), best_epoch=m.get("best_epoch"),
                           epochs_run=m.get("epochs_run"), confusion_matrix=test.get("confusion_matrix"),
                           per_class_recall={c: v.get("recall") for c, v in (test.get("per_class") or {}).items()})
                if test.get("targets"):
                    rec["targets"] = {t: v.get("macro_f1") for t, v in test["targets"].items()}
                rec["val_macro_f1"] = (m.get("val") or {}).get("macro_f1")
                if agree is not None:
                    rec["agreement"] = _agreement_scores(r.run_dir, agree)
            elif status == "failed":
                rec["error"] = RunFolder(r.run_dir).error() or "unknown error"
            records.append(rec)
            groups.setdefault(r.row_key, []).append(rec)
        rows, chosen = [], {}
        for (head, feat, enc, variant), all_recs in groups.items():
            lr, lr_choice, recs = _choose_lr(all_recs)
            chosen[(head, feat, enc, variant)] = recs
            done = [x for x in recs if x["status"] == "finished"]
            row: dict[str, Any] = {
                "kind": "measured", "head": head, "features": feat, "encoder": enc, "variant": variant,
                "lr": lr, "lr_choice": lr_choice, "seeds_total": len(recs), "seeds_finished": len(done),
                "seeds_failed": sum(x["status"] == "failed" for x in recs),
                "num_parameters": next((x["num_parameters"] for x in done if x.get("num_parameters") is not None), None),
                "train_seconds_mean": mean_std([x.get("seconds") for x in done])[0],
            }
            for k in METRICS:
                row[k] = _summary([x.get(k) for x in done])
            if target.multi:
                row["targets"] = {t: _summary([(x.get("targets") or {}).get(t) for x in done]) for t in target.members}
            else:  # the lowest per-class recall (mean over seeds): near 0 = a class the head never predicts
                recalls = [min(v for v in x["per_class_recall"].values() if v is not None)
                           for x in done if x.get("per_class_recall")]
                row["min_recall"] = _summary(recalls)
            if agree is not None:
                for part in ("agree", "disagree"):
                    parts = [x["agreement"][part] for x in done if x.get("agreement")]
                    row[part] = {"n": parts[0]["n"] if parts else 0,
                                 **{k: _summary([p[k] for p in parts]) for k in METRICS}}
            rows.append(row)
        for k in METRICS:
            _mark_best(rows, (k, "mean"), f"best_{k}")
            if agree is not None:
                for part in ("agree", "disagree"):
                    _mark_best(rows, (part, k, "mean"), f"best_{part}_{k}")
        default = druns[0].target in (None, druns[0].default_target)
        references = [{"kind": "reported", "label": REPORTED_LABEL, "head": rep.get("head"), "note": rep["note"],
                       "source": rep.get("source", "paper (arXiv 2503.07943)"), **{k: rep.get(k) for k in METRICS}}
                      for rep in REPORTED.get(dataset, {}).get(None if default else target.name, [])]
        best = max((row for row in rows if row["macro_f1"]["mean"] is not None),
                   key=lambda row: row["macro_f1"]["mean"], default=None)
        confusion = None
        if best is not None:
            mats = [np.asarray(x["confusion_matrix"]) for x in
                    chosen[(best["head"], best["features"], best["encoder"], best["variant"])]
                    if x["status"] == "finished" and x.get("confusion_matrix")]
            if mats:
                confusion = {"head": best["head"], "features": best["features"], "encoder": best["encoder"],
                             "seeds": len(mats), "how": f"summed over its {len(mats)} finished seed(s), test split",
                             "matrix": np.sum(mats, axis=0).tolist()}
        encoders = sorted({r.encoder.label for r in druns})
        split = index.split_info()
        tables[table_name] = {
            "split": {"source": split["source"], "fingerprint": split["fingerprint"], "counts": split["counts"]},
            "skipped": [x for x in skipped or [] if x["dataset"] == dataset],
            "stale_runs": _stale_elsewhere(druns, split["fingerprint"]),
            "name": table_name, "dataset": dataset, "target": target.name, "targets": target.to_dict(),
            "classes": list(target.classes[0]), "encoders": encoders,
            "heads": list(dict.fromkeys(r.head for r in druns)),
            "features": list(dict.fromkeys(r.features for r in druns)),
            "seeds": sorted({r.seed for r in druns}),
            "counts": {s: sum(x["status"] == s for x in records)
                       for s in ("finished", "failed", "unfinished", "missing", "stale")},
            "rows": rows, "reference": references[0] if references else None, "references": references,
            "confusion": confusion, "runs": records,
            "mvsa_agreement": agree is not None,
            "notes": {"metrics": "test split; mean and sample standard deviation (ddof=1) over finished seeds; "
                                 "std null when only one seed finished",
                      "best": "best_<metric> marks the highest mean per column (ties: all); the reference row never",
                      "agreement": "agree/disagree: test posts whose text and image labels (index field labels_agree) "
                                   "agree / disagree; macro-F1 over the classes present in the subset"},
        }
    return tables


