"""Plain-text summaries of training and evaluation results (what the CLI prints)."""

from __future__ import annotations

from typing import Any

from mmcache.tables import format_table

__all__ = ["format_eval", "format_metrics", "format_train"]


def metrics_table(headers: list[str], rows: list[list[Any]]) -> str:

    return format_table(headers, rows)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _row(name: str, m: dict[str, Any] | None) -> list[Any]:
    m = m or {}
    return [name, m.get("n", 0), _f(m.get("accuracy")), _f(m.get("macro_f1")), _f(m.get("weighted_f1"))]


HEADERS = ["split", "n", "accuracy", "macro-F1", "weighted-F1"]


def format_train(result) -> str:
    """Summary of a :class:`fuse.train.TrainResult`: run folder, stopping point, table per split."""
    m = result.metrics
    dropped = m["dropped"]["total"]
    lines = [
        f"run {result.run_dir}",
        f"{m['head']} on {m['dataset']} ({m['features']} features, seed {m['seed']}): best epoch {m['best_epoch']} "
        f"of {m['epochs_run']}{' (early stop)' if m['stopped_early'] else ''}, "
        f"{m['model']['num_parameters']:,} parameters, {m['seconds']:.1f}s",
    ]
    if dropped:
        by = ", ".join(f"{k}: {v}" for k, v in m["dropped"]["by_modality"].items() if v)
        lines.append(f"dropped {dropped} samples with a missing modality ({by})")
    if m.get("split"):
        lines.append(f"split: {m['split'].get('source')} (fingerprint {m['split'].get('fingerprint')}; ids in split.json)")
    lines += _target_lines(m)
    lines += ["", metrics_table(HEADERS, [_row("train", m.get("train")), _row("val (best)", m.get("val")),
                                   _row("test", m.get("test"))])]
    lines += _per_target(m.get("test"), "test")
    return "\n".join(lines)


def _target_lines(m: dict[str, Any]) -> list[str]:
    """The target line, and labels masked (missing / outside the classes) per target and reason."""
    info = m.get("model", {}).get("targets") or {}
    if not m.get("target"):
        return []
    out = [f"target {m['target']}" + (f" ({', '.join(info)}): task score = mean per-target macro-F1"
                                      if len(info) > 1 else f": {', '.join(next(iter(info.values()), []))}")]
    masked = (m.get("dropped", {}).get("target") or {}).get("masked") or {}
    for t, per in masked.items():
        out.append(f"  {t}: masked labels " + "; ".join(f"{why} {sum(c.values())}" for why, c in per.items()))
    return out


def _per_target(metrics: dict[str, Any] | None, split: str) -> list[str]:
    """Per target (a task) the scores, and per class the recall: a head that predicts only the majority
    class shows recall 0 for the others."""
    if not metrics:
        return []
    per = metrics.get("targets") or {metrics.get("target") or "label": metrics}
    lines = []
    if "targets" in metrics:
        lines += ["", metrics_table(["target", "n", "accuracy", "macro-F1", "weighted-F1"], [_row(t, v) for t, v in per.items()])]
    lines.append("")
    for t, v in per.items():
        recalls = ", ".join(f"{c} {_f(x['recall'])}" for c, x in (v.get("per_class") or {}).items())
        lines.append(f"{split} recall per class, {t}: {recalls}")
    return lines


def format_metrics(m: dict[str, Any], name: str) -> str:
    """One metrics dict (``compute_metrics``): the summary row and the per-class table."""
    lines = [metrics_table(HEADERS, [_row(name, m)])]
    if m.get("per_class"):
        lines += ["", metrics_table(["class", "precision", "recall", "F1", "support"],
                             [[c, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]), v["support"]]
                              for c, v in m["per_class"].items()])]
    return "\n".join(lines)


def format_eval(result) -> str:
    """Summary of a :class:`fuse.train.EvalResult`."""
    m = result.metrics
    where = m["dataset"] if m["dataset"] == m["trained_on"] else f"{m['dataset']} (trained on {m['trained_on']})"
    lines = [f"run {result.run_dir} on {where}, split {result.split}"]
    if m.get("target"):
        trained = m.get("trained_target")
        lines[0] += f", target {m['target']}" + (f" (trained on {trained})" if trained and trained != m["target"] else "")
    scored = m.get("split_scored") or {}
    what = {"run": "the run's own split (unchanged in the cache)", "original": "the run's ORIGINAL split (its split.json ids)",
            "current": "the cache's CURRENT split, NOT the run's", "dataset": "that dataset's split"}.get(scored.get("which"))
    if what:
        lines.append(f"scored on {what}: {scored.get('source')} (fingerprint {scored.get('fingerprint')})"
                     + (f"; {scored['note']}" if scored.get("note") else ""))
    if result.dropped.get("total"):
        lines.append(f"dropped {result.dropped['total']} samples with a missing modality")
    lines += ["", metrics_table(HEADERS, [_row(result.split, m)])]
    if m.get("targets"):
        lines += _per_target(m, result.split)
    elif m.get("per_class"):
        lines += ["", metrics_table(["class", "precision", "recall", "F1", "support"],
                             [[c, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]), v["support"]]
                              for c, v in m["per_class"].items()])]
    if result.predictions_path:
        lines.append(f"\npredictions: {result.predictions_path}")
    return "\n".join(lines)
