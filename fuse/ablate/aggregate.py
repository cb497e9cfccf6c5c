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
from mmcache.fuse.ablate.grid import GridRun, run_status
from mmcache.fuse.ablate.probe import PROBE_CS, probe_records
from mmcache.fuse.ablate.stats import (
    DEFAULT_B,
    DEFAULT_SEED,
    RowPredictions,
    interval,
    mark_rows,
    paired_delta,
    table_replicates,
)
from mmcache.fuse.metrics import METRICS, compute_metrics
from mmcache.fuse.runs import RunFolder
from mmcache.fuse.targets import resolve_target

from mmcache import cache as cf
from mmcache.csvsafe import csv_value

logger = logging.getLogger(__name__)

REPORTED_LABEL = "reported (paper), not measured"
SEMEVAL = "SemEval-2020 Task 8 overview (Sharma et al. 2020), best system"

SEMEVAL_TEST = "the SemEval-2020 Task 8 official test set (1,878 memes), not this split's"

# Published figures, shown as reference rows, never marked: dataset -> target (None = the dataset's default
# target) -> rows. The paper's own (arXiv 2503.07943) and the SemEval-2020 Task 8 best systems (macro-F1;
# Task B and C: mean of the per-target macro-F1, as our task score). Figures are strings, as published:
# 0.35 is printed 0.35, never 0.3500 (a precision the source does not claim). ``scored_on``: the test set
# they were scored on; unknown -> "another test set than this split's".
REPORTED: dict[str, dict[str | None, list[dict[str, Any]]]] = {
    "memotion": {
        None: [{"head": "dual_attention", "macro_f1": "0.3552", "note": "Memotion 7k Task A, dual attention"},
               {"head": None, "macro_f1": "0.35", "note": "Memotion 7k Task A", "source": SEMEVAL,
                "scored_on": SEMEVAL_TEST}],
        "task_b": [{"head": None, "macro_f1": "0.51", "note": "Memotion 7k Task B", "source": SEMEVAL,
                    "scored_on": SEMEVAL_TEST}],
        "task_c": [{"head": None, "macro_f1": "0.32", "note": "Memotion 7k Task C", "source": SEMEVAL,
                    "scored_on": SEMEVAL_TEST}],
    },
    "mvsa_single": {None: [{"head": None, "accuracy": "0.73", "note": "MVSA-Single, accuracy about 0.73"}]},
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
    """Scores on a subset of the test posts (class names, (n,) object): :func:`compute_metrics`, so
    macro-F1 averages over the classes present in the subset, as every other score does."""
    if y_true.size == 0:
        return {m: None for m in METRICS}
    classes = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    code = {c: i for i, c in enumerate(classes)}
    m = compute_metrics(np.asarray([code[c] for c in y_true]), np.asarray([code[c] for c in y_pred]), classes)
    return {k: m[k] for k in METRICS}


def _agreement_scores(text: str | None, agree: dict[str, bool]) -> dict[str, dict[str, Any]] | None:
    """Test metrics of one run (its predictions.csv ``text``) on the posts whose text and image labels
    agree / disagree."""
    if text is None:
        return None
    rows = _prediction_rows(text)
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


def _run_record(r: GridRun, agree: dict[str, bool] | None) -> dict[str, Any]:
    """What the table keeps of one run of the grid (its test scores when finished, its error when failed)."""
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
            rec["agreement"] = _agreement_scores(_read_predictions(r.run_dir), agree)
    elif status == "failed":
        rec["error"] = RunFolder(r.run_dir).error() or "unknown error"
    return rec


def _build_row(key: tuple[str, str, str, str], recs: list[dict[str, Any]], target, agree, kind: str = "measured",
               lr=None, lr_choice=None) -> dict[str, Any]:
    """One table row from the chosen records of a (head, features, encoder, variant): means, std, counts."""
    head, feat, enc, variant = key
    done = [x for x in recs if x["status"] == "finished"]
    row: dict[str, Any] = {
        "kind": kind, "head": head, "features": feat, "encoder": enc, "variant": variant,
        "lr": lr, "lr_choice": lr_choice, "seeds_total": len(recs), "seeds_finished": len(done),
        "seeds_failed": sum(x["status"] == "failed" for x in recs),
        "num_parameters": next((x["num_parameters"] for x in done if x.get("num_parameters") is not None), None),
        "train_seconds_mean": mean_std([x.get("seconds") for x in done])[0],
        "runs": [x["run"] for x in done],
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
            row[part] = {"n": parts[0]["n"] if parts else 0, **{k: _summary([p[k] for p in parts]) for k in METRICS}}
    return row


def _probe_rows(druns: list[GridRun], target, agree, probe_dir) -> tuple[list, list, dict[str, Any]]:
    """(probe rows, their records, what the table says about the probe)."""

    recs, errors = probe_records(druns, probe_dir)
    rows = []
    for rec in recs:
        if agree is not None:
            rec["agreement"] = _agreement_scores(rec["predictions_csv"], agree)
        row = _build_row((rec["head"], rec["features"], rec["encoder"], ""), [rec], target, agree, kind="probe")
        row.update(C=rec["C"], val_macro_f1=rec["val_macro_f1"], modalities=rec["modalities"])
        rows.append(row)
    info = {"method": f"L2 logistic regression (lbfgs) on standardised features; C in {len(PROBE_CS)} values "
                      f"{PROBE_CS[0]:g}..{PROBE_CS[-1]:g} chosen on validation macro-F1 (ties: smaller C)",
            "errors": errors}
    return rows, recs, info


def _references(dataset: str, target, default: bool, n_test: int) -> list[dict[str, Any]]:
    """Reference rows: the published figures as printed (``published``) and as numbers, and the test
    set they were scored on."""
    out = []
    for rep in REPORTED.get(dataset, {}).get(None if default else target.name, []):
        published = {k: rep[k] for k in METRICS if rep.get(k) is not None}
        out.append({"kind": "reported", "label": REPORTED_LABEL, "head": rep.get("head"), "note": rep["note"],
                    "source": rep.get("source", "paper (arXiv 2503.07943)"),
                    "scored_on": rep.get("scored_on") or f"another test set than this split's ({n_test} test posts)",
                    "published": published, **{k: (float(published[k]) if k in published else None) for k in METRICS}})
    return out


def aggregate(runs: list[GridRun], skipped: list[dict[str, Any]] | None = None, *, probe: bool = False,
              probe_dir: str | Path | None = None, baseline: str | None = None, bootstrap: int = DEFAULT_B,
              bootstrap_seed: int = DEFAULT_SEED) -> dict[str, dict[str, Any]]:
    """Per (dataset, target): the table (rows, reference rows, per-run records, MVSA agreement split, the
    split it was computed on, heads skipped for a missing modality, runs made on another split), keyed
    ``<dataset>`` for the default target, else ``<dataset>-<target>``.

    ``probe``: add the linear-probe rows (:mod:`fuse.ablate.probe`; fitted test predictions cached in
    ``probe_dir``). Every row gets bootstrap intervals over test posts and seeds, a paired Δ against
    ``baseline`` (a head name; None: the best probe of the same features) and best / tied marks
    (:mod:`fuse.ablate.stats`)."""
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
            rec = _run_record(r, agree)
            records.append(rec)
            groups.setdefault(r.row_key, []).append(rec)
        rows, chosen = [], []
        for key, all_recs in groups.items():
            lr, lr_choice, recs = _choose_lr(all_recs)
            rows.append(_build_row(key, recs, target, agree, lr=lr, lr_choice=lr_choice))
            chosen.append(recs)
        probe_info = None
        if probe:
            prows, precs, probe_info = _probe_rows(druns, target, agree, probe_dir)
            rows += prows
            chosen += [[x] for x in precs]
        split = index.split_info()
        n_split_test = int((split.get("counts") or {}).get("test", 0))
        marks = _uncertainty(rows, chosen, target, n_split_test, baseline, bootstrap, bootstrap_seed)
        for k in METRICS:
            if agree is not None:
                for part in ("agree", "disagree"):
                    _mark_best(rows, (part, k, "mean"), f"best_{part}_{k}")
        default = druns[0].target in (None, druns[0].default_target)
        references = _references(dataset, target, default, n_split_test)
        confusion = _top_confusion(rows, chosen)
        encoders = sorted({r.encoder.label for r in druns})
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
            "confusion": confusion, "runs": records, "probe": probe_info, "marks": marks,
            "bootstrap": {"replicates": bootstrap, "seed": bootstrap_seed, "level": 0.95,
                          "method": "hierarchical: test posts and seeds resampled with replacement; percentile"},
            "mvsa_agreement": agree is not None,
            "notes": {"metrics": "test split; mean and sample standard deviation (ddof=1) over finished seeds; "
                                 "std null when only one seed finished; ci: 95% bootstrap interval over test posts "
                                 "and seeds",
                      "best": "best_<metric>: the top mean, only when its paired 95% CI against the runner-up "
                              "excludes 0; otherwise tied_<metric> marks the top row and every row whose CI against "
                              "it includes 0; reference rows never",
                      "delta": "delta: row minus the baseline row, paired bootstrap 95% CI over the same resampled "
                               "test posts and seeds",
                      "agreement": "agree/disagree: test posts whose text and image labels (index field labels_agree) "
                                   "agree / disagree; macro-F1 over the classes present in the subset; best mean "
                                   "marked (no interval)"},
        }
    return tables


def _top_confusion(rows: list[dict[str, Any]], chosen: list[list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The confusion matrix of the head row with the highest mean macro-F1, summed over its chosen runs
    (its own lr and variant: ``runs`` names them, for :func:`fuse.ablate.best.analyze_best`)."""
    measured = [(row, recs) for row, recs in zip(rows, chosen, strict=True)
                if row["kind"] == "measured" and row["macro_f1"]["mean"] is not None]
    if not measured:
        return None
    row, recs = max(measured, key=lambda p: p[0]["macro_f1"]["mean"])
    mats = [np.asarray(x["confusion_matrix"]) for x in recs if x["status"] == "finished" and x.get("confusion_matrix")]
    if not mats:
        return None
    return {"head": row["head"], "features": row["features"], "encoder": row["encoder"], "variant": row["variant"],
            "lr": row["lr"], "runs": row["runs"], "seeds": len(mats),
            "how": f"summed over its {len(mats)} finished seed(s), test split", "matrix": np.sum(mats, axis=0).tolist()}


# --------------------------------------------------------------------------------------------- uncertainty

def _read_predictions(run_dir: str | Path) -> str | None:
    """A run's predictions.csv text, None when absent (the one place the tables read runs' predictions)."""
    return RunFolder(run_dir).predictions_text()


def _prediction_rows(text: str) -> list[dict[str, str]]:
    """predictions.csv rows as written before :func:`~mmcache.csvsafe.csv_cell` made them spreadsheet-safe
    (an id such as ``@user`` is stored ``'@user``; the index holds ``@user``)."""
    return [{k: csv_value(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]


def _parse_predictions(text: str, target) -> dict[str, list[tuple[int, int]]]:
    """id -> per member (true id or -1 when masked, predicted id), from predictions.csv text."""
    out = {}
    lookup = [{c: i for i, c in enumerate(classes)} for classes in target.classes]
    for r in _prediction_rows(text):
        cells = []
        for m, idx in zip(target.members, lookup, strict=True):
            pre = f"{m}:" if target.multi else ""
            cells.append((idx.get(r[f"{pre}true"], -1), idx.get(r[f"{pre}predicted"], 0)))
        out[r["id"]] = cells
    return out


def _row_predictions(recs: list[dict[str, Any]], target) -> list[dict[str, list[tuple[int, int]]]] | None:
    """Parsed predictions of each finished record of a row; None when any of them has none."""
    out = []
    for x in recs:
        if x["status"] != "finished":
            continue
        text = x.get("predictions_csv") if x.get("kind") == "probe" else _read_predictions(x["run_dir"])
        if text is None:
            return None
        out.append(_parse_predictions(text, target))
    return out or None


def _to_arrays(parsed, ids: list[str], target) -> RowPredictions:
    """Align one row's parsed seeds on the table's test ids: (n,) truths, (S, n) predictions per member;
    a post some seed lacks counts as not scored (-1)."""
    pos = {sid: i for i, sid in enumerate(ids)}
    n, members = len(ids), len(target.members)
    y_true = [np.full(n, -1, dtype=np.int64) for _ in range(members)]
    y_pred = [np.zeros((len(parsed), n), dtype=np.int64) for _ in range(members)]
    common = set.intersection(*(set(p) for p in parsed))
    for s, p in enumerate(parsed):
        for sid, cells in p.items():
            for j, (t, pr) in enumerate(cells):
                y_pred[j][s, pos[sid]] = pr
                if sid in common:
                    y_true[j][pos[sid]] = t
    return RowPredictions(y_true, y_pred, [len(c) for c in target.classes])


def _baseline_index(rows: list[dict[str, Any]], i: int, baseline: str | None) -> int | None:
    """The row row ``i`` is compared with: head ``baseline`` of the same features and encoder (the best
    variant by mean macro-F1), else (no such head: the Δ column names what it is against) the best probe
    of the same features and encoder."""
    r = rows[i]
    same = [j for j, x in enumerate(rows) if x["features"] == r["features"] and x["encoder"] == r["encoder"]
            and x["macro_f1"]["mean"] is not None]
    cand = [j for j in same if rows[j]["head"] == baseline] or [j for j in same if rows[j]["kind"] == "probe"]
    return max(cand, key=lambda j: rows[j]["macro_f1"]["mean"], default=None)


def _uncertainty(rows, chosen, target, n_split_test: int, baseline: str | None, b: int, seed: int) -> dict[str, Any]:
    """Add to every row: n scored / dropped, each metric's 95% bootstrap interval (``ci``), the paired Δ
    against its baseline row (``delta``) and the best / tied marks. Returns the marks' decisions."""
    parsed = [_row_predictions(recs, target) for recs in chosen]
    ids = sorted({sid for p in parsed if p for seed_preds in p for sid in seed_preds})
    preds = [None if p is None or not ids else _to_arrays(p, ids, target) for p in parsed]
    reps = table_replicates(preds, b, seed)
    for row, pr, rp in zip(rows, preds, reps, strict=True):
        row["n_test"] = None if pr is None else pr.n_scored
        row["n_dropped"] = None if pr is None else max(n_split_test - pr.n_scored, 0)
        for k in METRICS:
            row[k]["ci"] = None if rp is None else interval(rp[k])
    for i, row in enumerate(rows):
        j = _baseline_index(rows, i, baseline)
        row["delta"] = None
        if j is not None and reps[i] is not None and reps[j] is not None:
            base = rows[j]
            row["delta"] = {"vs": base["head"] + (f" ({base['variant']})" if base["variant"] else ""), "is_baseline": i == j,
                            **{k: paired_delta(reps[i], reps[j], k, row[k]["mean"] - base[k]["mean"]) for k in METRICS}}
    marks = {}
    for k in METRICS:
        m = mark_rows(rows, reps, k)
        if "row" in m:
            m["row"] = rows[m.pop("row")]["head"]
        marks[k] = m
    return marks
