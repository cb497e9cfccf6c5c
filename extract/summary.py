"""What `inspect` shows: class counts per split, dropped and flagged samples, decode fallbacks."""

from __future__ import annotations

from collections import Counter
from typing import Any

from mmcache.extract.datasets import LoadResult
from mmcache.extract.splits import SPLITS, UNASSIGNED, SplitResult, empty_split_warnings

from mmcache.tables import format_table


def summarize(result: LoadResult, splits: SplitResult) -> dict[str, Any]:
    """A JSON-ready summary of one loaded dataset and its split."""
    per_split: dict[str, dict[str, int]] = {}
    counts = Counter((splits.assignment[s.id], s.label_name) for s in result.samples)
    for split in (*SPLITS, UNASSIGNED):
        row = {c: counts.get((split, c), 0) for c in result.classes}
        if split in SPLITS or any(row.values()):
            per_split[split] = row
    rep = result.report
    return {
        "dataset": result.dataset,
        "root": str(result.root),
        "options": result.options,
        "classes": list(result.classes),
        "samples": len(result.samples),
        "class_counts": result.class_counts(),
        "split_source": splits.source,
        "split_spec": splits.spec,
        "split_counts": per_split,
        "split_file_unknown_ids": len(splits.unknown_ids),
        "split_file_unassigned_ids": len(splits.unassigned_ids),
        "split_warnings": empty_split_warnings(Counter(splits.assignment.values())),
        "report": rep.to_dict(),
        "dropped_total": sum(rep.dropped.values()),
        "fallback_decodes": rep.fallback_decodes,
        "targets": result.target_counts(),
        "default_target": result.targets[0].name if result.targets else None,
        "tasks": {k: list(v) for k, v in result.tasks.items()},
    }


def format_summary(s: dict[str, Any]) -> str:
    out = [f"dataset {s['dataset']} at {s['root']}: {s['samples']} samples "
           f"({s['report']['rows_seen']} rows read, {s['dropped_total']} dropped)"]
    classes = s["classes"]
    rows = [[split] + [row[c] for c in classes] + [sum(row.values())] for split, row in s["split_counts"].items()]
    rows.append(["all"] + [s["class_counts"][c] for c in classes] + [s["samples"]])
    out += ["", f"split: {s['split_source']}"]
    if s.get("cache_split"):
        out.append(s["cache_split"])
    out.append(format_table(["split", *classes, "total"], rows))
    out += [f"warning: {w}" for w in s.get("split_warnings", [])]
    if s["split_file_unknown_ids"] or s["split_file_unassigned_ids"]:
        out.append(f"split file: {s['split_file_unknown_ids']} ids not in the data, "
                   f"{s['split_file_unassigned_ids']} samples not in the file (split 'none')")
    rep = s["report"]
    for title, key in (("dropped", "dropped"), ("flagged (kept)", "flagged")):
        if rep[key]:
            out += ["", title]
            out.append(format_table(["reason", "count", "e.g. ids"], [
                [r, n, ", ".join(rep["examples"].get(r, [])[:3])] for r, n in sorted(rep[key].items())]))
    if rep["decoded_with"]:
        enc = ", ".join(f"{e}: {n}" for e, n in sorted(rep["decoded_with"].items()))
        out += ["", f"text decoding: {enc} ({s['fallback_decodes']} via fallback)"]
    out += _format_targets(s)
    for w in rep.get("warnings", []):
        out += ["", f"WARNING: {w}"]
    return "\n".join(out)


def _format_targets(s: dict[str, Any]) -> list[str]:
    """Targets (``--target`` of stage two): samples per class in the scale's order, missing / outside."""
    if not s.get("targets"):
        return []
    rows = []
    for name, counts in s["targets"].items():
        classes = [f"{c} {n}" for c, n in counts.items() if c not in ("missing", "outside_classes")]
        bad = [f"{k} {counts[k]}" for k in ("missing", "outside_classes") if counts.get(k)]
        mark = " (default)" if name == s.get("default_target") else ""
        rows.append([name + mark, ", ".join(classes), ", ".join(bad) or "-"])
    out = ["", "targets (stage two --target)", format_table(["target", "classes (samples)", "masked"], rows)]
    out += [f"task {k}: {', '.join(v)}" for k, v in s.get("tasks", {}).items()]
    return out
