"""The ablation tables as text: terminal, Markdown and CSV, and the result files
(``results/ablation_<table>.md|csv|json`` and figures)."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
from pathlib import Path
from typing import Any

from mmcache.extract.summary import format_table
from mmcache.fuse.ablate.aggregate import REPORTED_LABEL
from mmcache.fuse.ablate.best import markdown_section
from mmcache.fuse.metrics import METRIC_NAMES, METRICS

from mmcache.common import atomic_write_many, disk_full_error

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- output

def _cell(s: dict[str, float | None], best: bool, style: str) -> str:
    """``mean ± std`` (4 decimals; std ``-`` for one seed); best: bold in markdown, ``*`` in the terminal."""
    if s["mean"] is None:
        return "-"
    std = "-" if s["std"] is None else f"{s['std']:.4f}"
    text = f"{s['mean']:.4f} ± {std}"
    if best:
        text = f"**{text}**" if style == "md" else f"{text} *"
    return text


def _seeds_cell(row: dict[str, Any]) -> str:
    text = f"{row['seeds_finished']}/{row['seeds_total']}"
    return text + (f" ({row['seeds_failed']} failed)" if row["seeds_failed"] else "")


def _table_rows(table: dict[str, Any], style: str) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Headers and rows of the main table and (MVSA) of the agreement table."""
    show_enc = len(table["encoders"]) > 1
    show_var, show_lr = _sweeps(table)
    lead = (["head", "features"] + (["encoder"] if show_enc else []) + (["variant"] if show_var else [])
            + (["lr (best on val)"] if show_lr else []))

    def lead_cells(r):
        return ([r["head"], r["features"]] + ([r["encoder"]] if show_enc else []) + ([r.get("variant") or "-"] if show_var
                else []) + ([_lr_cell(r)] if show_lr else []))

    members = list(table.get("targets") or {}) if len(table.get("targets") or {}) > 1 else []
    names = [METRIC_NAMES[k] for k in METRICS]
    if members:  # a task: macro-F1 is the task score; each target's macro-F1 follows
        names[METRICS.index("macro_f1")] = "task score (mean macro-F1)"
    extra_heads = [f"{m} macro-F1" for m in members] or (["min class recall"] if table["rows"] and
                                                        "min_recall" in table["rows"][0] else [])
    headers = lead + ["seeds", *names, *extra_heads, "parameters", "train s"]
    rows = []
    for r in table["rows"]:
        extra = ([_cell(r["targets"][m], False, style) for m in members] if members else
                 [_cell(r["min_recall"], False, style)] if extra_heads else [])
        rows.append(lead_cells(r) + [
            _seeds_cell(r), *(_cell(r[k], r[f"best_{k}"], style) for k in METRICS), *extra,
            "-" if r["num_parameters"] is None else f"{r['num_parameters']:,}",
            "-" if r["train_seconds_mean"] is None else f"{r['train_seconds_mean']:.1f}"])
    for ref in table.get("references") or ([table["reference"]] if table.get("reference") else []):
        source = "" if ref.get("source", "").startswith("paper") or not ref.get("source") else f" ({ref['source']})"
        name = f"{ref['head'] or 'best model'}{source}: {REPORTED_LABEL}"
        rows.append([name] + ["-"] * (len(lead) - 1) + ["-", *(
            "-" if ref.get(k) is None else f"{ref[k]:.4f}" for k in METRICS), *("-" for _ in extra_heads), "-", "-"])
    a_headers: list[str] = []
    a_rows: list[list[str]] = []
    if table.get("mvsa_agreement"):
        a_headers = lead + [f"{part} {what}" for part in ("agree", "disagree")
                            for what in ("n", *(METRIC_NAMES[k] for k in METRICS))]
        for r in table["rows"]:
            cells = lead_cells(r)
            for part in ("agree", "disagree"):
                cells.append(str(r[part]["n"]))
                cells += [_cell(r[part][k], r[f"best_{part}_{k}"], style) for k in METRICS]
            a_rows.append(cells)
    return headers, rows, a_headers, a_rows


def _sweeps(table: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the table has a --dims/--dropouts variant column and a --lrs choice column."""
    return (any(r.get("variant") for r in table["rows"]), any(r.get("lr_choice") for r in table["rows"]))


def _lr_cell(r: dict[str, Any]) -> str:
    """The chosen lr and, in brackets, every lr's mean validation macro-F1."""
    if not r.get("lr_choice"):
        return "-" if r.get("lr") is None else f"{r['lr']:g}"
    vals = ", ".join(f"{lr}: {'-' if v is None else f'{v:.3f}'}" for lr, v in r["lr_choice"].items())
    return f"{r['lr']:g} (val F1 {vals})"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [headers, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _failures(table: dict[str, Any], limit: int = 10) -> list[str]:
    failed = [x for x in table["runs"] if x["status"] == "failed"]
    lines = [f"{x['run']}: {x['error']}" for x in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more (see the results JSON)")
    return lines


def _heading(table: dict[str, Any]) -> str:
    c = table["counts"]
    enc = table["encoders"][0] if len(table["encoders"]) == 1 else f"{len(table['encoders'])} encoder pairs"
    target = table.get("target")
    what = table["dataset"] + (f", target {target}" if target else "")
    members = table.get("targets") or {}
    if len(members) > 1:
        what += f" ({', '.join(members)})"
    text = (f"{what}: {len(table['rows'])} configs x {len(table['seeds'])} seeds, encoders {enc}; "
            f"{c['finished']} runs finished")
    if c["failed"]:
        text += f", {c['failed']} failed"
    if c["unfinished"]:
        text += f", {c['unfinished']} unfinished (interrupted or running)"
    if c["missing"]:
        text += f", {c['missing']} not run yet"
    if c.get("stale"):
        text += f", {c['stale']} stale (made on another split)"
    return text


def _split_lines(table: dict[str, Any]) -> list[str]:
    """The split the table was computed on, heads skipped, runs made on other splits."""
    sp = table.get("split") or {}
    counts = sp.get("counts") or {}
    out = [f"split: {sp.get('source')} (fingerprint {sp.get('fingerprint')}; train/val/test "
           f"{'/'.join(str(counts.get(s, 0)) for s in ('train', 'val', 'test'))})"]
    out += [f"skipped {x['head']}: {x['reason']}" for x in table.get("skipped") or []]
    stale = table.get("stale_runs") or []
    if stale:
        out.append(f"left out: {len(stale)} finished runs made on another split of {table['dataset']} "
                   f"(e.g. {', '.join(stale[:2])})")
    return out


NOTE = ("test split; mean ± sample std (ddof=1) over the finished seeds, '-' when one seed finished; "
        "best mean per column marked")


def format_tables(tables: dict[str, dict[str, Any]]) -> str:
    """The terminal version of every dataset's table (best marked with ``*``)."""
    out = []
    for table in tables.values():
        headers, rows, a_headers, a_rows = _table_rows(table, "text")
        out += [_heading(table), *_split_lines(table), format_table(headers, rows)]
        if a_rows:
            out += ["", "text and image labels agree vs disagree (test posts):", format_table(a_headers, a_rows)]
        failures = _failures(table)
        if failures:
            out += ["", "failed runs:", *(f"  {f}" for f in failures)]
        out.append("")
    out.append(f"({NOTE} with *)")
    return "\n".join(out)


def _markdown(table: dict[str, Any]) -> str:
    headers, rows, a_headers, a_rows = _table_rows(table, "md")
    title = table["dataset"] + (f", target {table['target']}" if table.get("target") else "")
    out = [f"# Ablation: {title}", "", _heading(table) + ".", "",
           *(f"- {line[0].upper()}{line[1:]}." for line in _split_lines(table)), "",
           f"Test split; mean ± sample standard deviation (ddof=1) over the finished seeds "
           f"({', '.join(map(str, table['seeds']))}); `-` = only one seed finished. Best mean per column in "
           f"**bold**. Macro-F1 averages over the classes present in the scored labels (a class without a test "
           f"post is left out, not counted as 0). Reference rows hold published figures, not measured here."
           + (" Each row trained every learning rate of `--lrs`; the one with the best mean validation macro-F1 "
              "is chosen (its column lists each lr's), and test is reported for it only." if _sweeps(table)[1] else ""),
           "", _md_table(headers, rows)]
    if len(table.get("targets") or {}) > 1:
        out += ["", "Task score = mean of the per-target macro-F1 (the SemEval-2020 Task 8 measure); accuracy and "
                    "weighted-F1 are per-target means."]
    if a_rows:
        out += ["", "## Text and image labels agree vs disagree", "",
                "The same metrics on the test posts whose text and image labels agree (`labels_agree`) and on "
                "those where they disagree; macro-F1 averages over the classes present in each subset.", "",
                _md_table(a_headers, a_rows)]
    if table.get("confusion"):
        c = table["confusion"]
        out += ["", f"## Confusion matrix of the best config ({c['head']}, {c['features']}, {c['encoder']}: "
                    f"best mean macro-F1)", "", f"Rows = true class, columns = predicted; {c['how']}.", "",
                _md_table(["true \\ predicted", *table["classes"]],
                          [[cls, *map(str, row)] for cls, row in zip(table["classes"], c["matrix"], strict=True)])]
    if table.get("analysis"):
        out += ["", *markdown_section(table["analysis"])]
    failures = _failures(table)
    if failures:
        out += ["", "## Failed runs", "", *(f"- `{f}`" for f in failures)]
    return "\n".join(out) + "\n"


def _csv(table: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["dataset", "target", "kind", "head", "features", "encoder", "seeds_finished", "seeds_failed", "seeds_total"]
    for k in METRICS:
        head += [f"{k}_mean", f"{k}_std", f"best_{k}"]
    head += ["num_parameters", "train_seconds_mean"]
    members = list(table.get("targets") or {}) if len(table.get("targets") or {}) > 1 else []
    per = [(m, ("targets", m)) for m in members] or ([("min_recall", ("min_recall",))]
                                                     if table["rows"] and "min_recall" in table["rows"][0] else [])
    for name, _path in per:
        head += [f"{name}{'_macro_f1' if members else ''}_mean", f"{name}{'_macro_f1' if members else ''}_std"]
    show_var, show_lr = _sweeps(table)
    head += (["variant"] if show_var else []) + (["lr", "lr_val_macro_f1"] if show_lr else [])
    parts = ("agree", "disagree") if table.get("mvsa_agreement") else ()
    for part in parts:
        head.append(f"{part}_n")
        for k in METRICS:
            head += [f"{part}_{k}_mean", f"{part}_{k}_std", f"best_{part}_{k}"]
    w.writerow(head)

    def num(v):
        return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)

    for r in table["rows"]:
        line = [table["dataset"], table.get("target") or "", "measured", r["head"], r["features"], r["encoder"],
                r["seeds_finished"],
                r["seeds_failed"], r["seeds_total"]]
        for k in METRICS:
            line += [num(r[k]["mean"]), num(r[k]["std"]), r[f"best_{k}"]]
        line += [num(r["num_parameters"]), num(r["train_seconds_mean"])]
        for _name, path in per:
            cell = r[path[0]] if len(path) == 1 else r[path[0]][path[1]]
            line += [num(cell["mean"]), num(cell["std"])]
        line += ([r.get("variant") or ""] if show_var else []) + (
            [num(r["lr"]), json.dumps(r["lr_choice"])] if show_lr else [])
        for part in parts:
            line.append(r[part]["n"])
            for k in METRICS:
                line += [num(r[part][k]["mean"]), num(r[part][k]["std"]), r[f"best_{part}_{k}"]]
        w.writerow(line)
    for ref in table.get("references") or ([table["reference"]] if table.get("reference") else []):
        line = [table["dataset"], table.get("target") or "", "reported", ref["head"] or "", "",
                f"{REPORTED_LABEL}: {ref.get('source') or 'paper'}", "", "", ""]
        for k in METRICS:
            line += [num(ref.get(k)), "", False]
        line += ["", ""] + ["", ""] * len(per) + [""] * (show_var + 2 * show_lr)
        for _ in parts:
            line += [""] + ["", "", False] * len(METRICS)
        w.writerow(line)
    return buf.getvalue()


def write_results(tables: dict[str, dict[str, Any]], results_dir: str | Path, *, plots: bool = True) -> dict[str, list[Path]]:
    """``results/ablation_<dataset>.md|.csv|.json`` (+ ``.png`` and ``_confusion.png`` when matplotlib is
    installed and ``plots``); returns the paths per dataset.

    The text files of every table are written as one set (:func:`atomic_write_many`): on a failure (disk
    full: :class:`~mmcache.errors.DiskFullError`) no temp file is left and the old set is unchanged, so a
    ``.md`` never disagrees with its ``.json``. Figures follow once the set is in place."""
    results_dir = Path(results_dir)
    written: dict[str, list[Path]] = {}
    files: dict[Path, str] = {}
    for dataset, table in tables.items():
        stem = results_dir / f"ablation_{table.get('name', dataset)}"
        paths = [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".json")]
        files.update(zip(paths, (_markdown(table), _csv(table), json.dumps(table, indent=2, default=str) + "\n"),
                         strict=True))
        written[dataset] = paths
    atomic_write_many(files)
    if plots:
        from mmcache.fuse.plots import plot_table

        for dataset, table in tables.items():
            try:
                written[dataset] += plot_table(table, results_dir)
            except OSError as e:  # matplotlib writes the PNG itself: ENOSPC as the text files report it
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full_error(results_dir / f"ablation_{table.get('name', dataset)}.png", None, e) from e
                raise
    return written
