"""Plain-text summaries of training and evaluation results (what the CLI prints)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_eval", "format_train"]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    from mmcache.extract.summary import format_table  # stage-one module; pulls no encoders or torch

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
    lines += ["", _table(HEADERS, [_row("train", m.get("train")), _row("val (best)", m.get("val")),
                                   _row("test", m.get("test"))])]
    return "\n".join(lines)


def format_eval(result) -> str:
    """Summary of a :class:`fuse.train.EvalResult`."""
    m = result.metrics
    where = m["dataset"] if m["dataset"] == m["trained_on"] else f"{m['dataset']} (trained on {m['trained_on']})"
    lines = [f"run {result.run_dir} on {where}, split {result.split}"]
    scored = m.get("split_scored") or {}
    what = {"run": "the run's own split (unchanged in the cache)", "original": "the run's ORIGINAL split (its split.json ids)",
            "current": "the cache's CURRENT split, NOT the run's", "dataset": "that dataset's split"}.get(scored.get("which"))
    if what:
        lines.append(f"scored on {what}: {scored.get('source')} (fingerprint {scored.get('fingerprint')})"
                     + (f"; {scored['note']}" if scored.get("note") else ""))
    if result.dropped.get("total"):
        lines.append(f"dropped {result.dropped['total']} samples with a missing modality")
    lines += ["", _table(HEADERS, [_row(result.split, m)])]
    classes = list(m["per_class"])
    if classes:
        lines += ["", _table(["class", "precision", "recall", "F1", "support"],
                             [[c, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]), v["support"]]
                              for c, v in m["per_class"].items()])]
    if result.predictions_path:
        lines.append(f"\npredictions: {result.predictions_path}")
    return "\n".join(lines)
