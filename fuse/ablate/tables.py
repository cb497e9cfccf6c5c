"""The ablation tables as text: terminal, Markdown, CSV and LaTeX (booktabs), and the result files
(``results/ablation_<table>.md|csv|json|tex`` and figures)."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
from pathlib import Path
from typing import Any

from mmcache.fuse.ablate.aggregate import REPORTED_LABEL
from mmcache.fuse.ablate.best import markdown_section
from mmcache.fuse.metrics import METRIC_NAMES, METRICS
from mmcache.fuse.plots import plot_table

from mmcache.common import atomic_write_many, disk_full_error
from mmcache.csvsafe import csv_row
from mmcache.tables import format_table

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- output

def _cell(s: dict[str, Any], best: bool, style: str, tied: bool = False) -> str:
    """``mean ± std [lo, hi]`` (4 decimals; std ``-`` for one seed; the 95% bootstrap interval when known);
    best: bold in markdown, ``*`` in the terminal; tied: ``(tied)`` / ``~``."""
    if s["mean"] is None:
        return "-"
    std = "-" if s["std"] is None else f"{s['std']:.4f}"
    text = f"{s['mean']:.4f} ± {std}"
    if s.get("ci"):
        text += f" [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
    if best:
        text = f"**{text}**" if style == "md" else f"{text} *"
    elif tied:
        text = f"{text} (tied)" if style == "md" else f"{text} ~"
    return text


def _delta_cell(r: dict[str, Any], metric: str = "macro_f1") -> str:
    """``+0.0020 [-0.018, +0.022]``: Δ against the row's baseline and its paired 95% CI."""
    d = r.get("delta")
    if not d:
        return "-"
    if d["is_baseline"]:
        return "baseline"
    lo, hi = d[metric]["ci"]
    return f"{d[metric]['delta']:+.4f} [{lo:+.3f}, {hi:+.3f}]"


def _n_cell(r: dict[str, Any]) -> str:
    if r.get("n_test") is None:
        return "-"
    return f"{r['n_test']}" + (f" ({r['n_dropped']} dropped)" if r.get("n_dropped") else "")


def _seeds_cell(row: dict[str, Any]) -> str:
    if row["kind"] == "probe":
        return "deterministic"
    text = f"{row['seeds_finished']}/{row['seeds_total']}"
    return text + (f" ({row['seeds_failed']} failed)" if row["seeds_failed"] else "")


def _head_cell(r: dict[str, Any]) -> str:
    """The head, or for a probe row its modality set and chosen C."""
    if r["kind"] != "probe":
        return r["head"]
    cs = list((r.get("C") or {}).values())
    return r["head"] + (f", C={cs[0]:g}" if len(cs) == 1 else "")


def _reference_name(ref: dict[str, Any]) -> str:
    source = "" if ref.get("source", "").startswith("paper") or not ref.get("source") else f" ({ref['source']})"
    return f"{ref['head'] or 'best model'}{source}: {REPORTED_LABEL}; scored on {ref['scored_on']}"


def _published(ref: dict[str, Any], k: str) -> str:
    """A reference figure as published (0.35 stays 0.35)."""
    pub = (ref.get("published") or {}).get(k)
    return pub if pub is not None else ("-" if ref.get(k) is None else f"{ref[k]:g}")


def _delta_header(table: dict[str, Any]) -> list[str]:
    return ["Δ macro-F1 vs baseline [95% CI]"] if any(r.get("delta") for r in table["rows"]) else []


def _table_rows(table: dict[str, Any], style: str) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Headers and rows of the main table and (MVSA) of the agreement table."""
    show_enc = len(table["encoders"]) > 1
    show_var, show_lr = _sweeps(table)
    lead = (["head", "features"] + (["encoder"] if show_enc else []) + (["variant"] if show_var else [])
            + (["lr (best on val)"] if show_lr else []))

    def lead_cells(r):
        return ([_head_cell(r), r["features"]] + ([r["encoder"]] if show_enc else []) + ([r.get("variant") or "-"]
                if show_var else []) + ([_lr_cell(r)] if show_lr else []))

    members = list(table.get("targets") or {}) if len(table.get("targets") or {}) > 1 else []
    names = [METRIC_NAMES[k] for k in METRICS]
    if members:  # a task: macro-F1 is the task score; each target's macro-F1 follows
        names[METRICS.index("macro_f1")] = "task score (mean macro-F1)"
    extra_heads = [f"{m} macro-F1" for m in members] or (["min class recall"] if table["rows"] and
                                                        "min_recall" in table["rows"][0] else [])
    delta = _delta_header(table)
    headers = lead + ["test n", "seeds", *names, *delta, *extra_heads, "parameters", "train s"]
    rows = []
    for r in table["rows"]:
        extra = ([_cell(r["targets"][m], False, style) for m in members] if members else
                 [_cell(r["min_recall"], False, style)] if extra_heads else [])
        rows.append(lead_cells(r) + [
            _n_cell(r), _seeds_cell(r), *(_cell(r[k], r[f"best_{k}"], style, r.get(f"tied_{k}", False)) for k in METRICS),
            *([_delta_cell(r)] if delta else []), *extra,
            "-" if r["num_parameters"] is None else f"{r['num_parameters']:,}",
            "-" if r["train_seconds_mean"] is None else f"{r['train_seconds_mean']:.1f}"])
    for ref in _references(table):
        rows.append([_reference_name(ref)] + ["-"] * (len(lead) - 1) + ["-", "-", *(
            _published(ref, k) for k in METRICS), *("-" for _ in delta), *("-" for _ in extra_heads), "-", "-"])
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


def _references(table: dict[str, Any]) -> list[dict[str, Any]]:
    refs = table.get("references") or ([table["reference"]] if table.get("reference") else [])
    return [{"scored_on": "another test set than this split's", **ref} for ref in refs]


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
    heads = sum(r["kind"] == "measured" for r in table["rows"])
    probes = len(table["rows"]) - heads
    text = (f"{what}: {heads} configs x {len(table['seeds'])} seeds" + (f" (+ {probes} linear probes)" if probes else "")
            + f", encoders {enc}; {c['finished']} runs finished")
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


NOTE = ("test split; mean ± sample std (ddof=1) over the finished seeds, '-' when one seed finished; [95% "
        "bootstrap interval over test posts and seeds]; * = best (its paired CI against the runner-up excludes 0), "
        "~ = tied with the top row (paired CI includes 0)")


def _probe_lines(table: dict[str, Any]) -> list[str]:
    """How the probe rows were made and what every Δ is against."""
    out = []
    if table.get("probe"):
        out.append(f"probe rows: {table['probe']['method']}; same samples as the heads")
        out += [f"probe failed: {e}" for e in table["probe"].get("errors") or []]
    vs = sorted({(r["features"], r["encoder"], r["delta"]["vs"]) for r in table["rows"] if r.get("delta")})
    show_enc = len(table["encoders"]) > 1
    out += [f"Δ against {b} for {f}" + (f" ({e})" if show_enc else "") for f, e, b in vs]
    b = table.get("bootstrap") or {}
    if b:
        out.append(f"intervals: {b['replicates']} bootstrap replicates (seed {b['seed']}), {b['method']}")
    return out


def format_tables(tables: dict[str, dict[str, Any]]) -> str:
    """The terminal version of every dataset's table (best marked with ``*``, tied with ``~``)."""
    out = []
    for table in tables.values():
        headers, rows, a_headers, a_rows = _table_rows(table, "text")
        out += [_heading(table), *_split_lines(table), *_probe_lines(table), format_table(headers, rows)]
        if a_rows:
            out += ["", "text and image labels agree vs disagree (test posts; best mean marked, no interval):",
                    format_table(a_headers, a_rows)]
        failures = _failures(table)
        if failures:
            out += ["", "failed runs:", *(f"  {f}" for f in failures)]
        out.append("")
    out.append(f"({NOTE})")
    return "\n".join(out)


def _markdown(table: dict[str, Any]) -> str:
    headers, rows, a_headers, a_rows = _table_rows(table, "md")
    title = table["dataset"] + (f", target {table['target']}" if table.get("target") else "")
    out = [f"# Ablation: {title}", "", _heading(table) + ".", "",
           *(f"- {line[0].upper()}{line[1:]}." for line in [*_split_lines(table), *_probe_lines(table)]), "",
           f"Test split; mean ± sample standard deviation (ddof=1) over the finished seeds "
           f"({', '.join(map(str, table['seeds']))}); `-` = only one seed finished; in brackets the 95% bootstrap "
           f"interval over test posts and seeds. **Bold**: best, its paired 95% CI against the runner-up excludes 0; "
           f"(tied): the top row and every row whose paired CI against it includes 0 (then nothing is bold). "
           f"Macro-F1 averages over the classes present in the scored labels (a class without a test post is "
           f"left out, not counted as 0). Probe rows are logistic-regression baselines on the same features, not heads. Reference rows hold "
           f"published figures as published, scored on another test set, not measured here."
           + (" Each row trained every learning rate of `--lrs`; the one with the best mean validation macro-F1 "
              "is chosen (its column lists each lr's), and test is reported for it only." if _sweeps(table)[1] else ""),
           "", _md_table(headers, rows)]
    if len(table.get("targets") or {}) > 1:
        out += ["", "Task score = mean of the per-target macro-F1 (the SemEval-2020 Task 8 measure); accuracy and "
                    "weighted-F1 are per-target means."]
    if a_rows:
        out += ["", "## Text and image labels agree vs disagree", "",
                "The same metrics on the test posts whose text and image labels agree (`labels_agree`) and on "
                "those where they disagree; macro-F1 averages over the classes present in each subset; best mean "
                "in bold (no interval here).", "",
                _md_table(a_headers, a_rows)]
    if table.get("confusion"):
        c = table["confusion"]
        what = ", ".join([c["head"], c["features"], c["encoder"], *([c["variant"]] if c.get("variant") else [])])
        out += ["", f"## Confusion matrix of the top config ({what}: highest mean macro-F1)", "",
                f"Rows = true class, columns = predicted; {c['how']}.", "",
                _md_table(["true \\ predicted", *table["classes"]],
                          [[cls, *map(str, row)] for cls, row in zip(table["classes"], c["matrix"], strict=True)])]
    if table.get("analysis"):
        out += ["", *markdown_section(table["analysis"])]
    failures = _failures(table)
    if failures:
        out += ["", "## Failed runs", "", *(f"- `{f}`" for f in failures)]
    return "\n".join(out) + "\n"


def _num(v):
    return "" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)


def _stat_cells(s: dict[str, Any]) -> list:
    ci = s.get("ci") or [None, None]
    return [_num(s["mean"]), _num(s["std"]), _num(ci[0]), _num(ci[1])]


def _csv(table: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["dataset", "target", "kind", "head", "features", "encoder", "n_test", "n_dropped", "seeds_finished",
            "seeds_failed", "seeds_total"]
    for k in METRICS:
        head += [f"{k}_mean", f"{k}_std", f"{k}_ci_low", f"{k}_ci_high", f"best_{k}", f"tied_{k}"]
    head += ["delta_vs"] + [f"delta_{k}{x}" for k in METRICS for x in ("", "_ci_low", "_ci_high")]
    head += ["num_parameters", "train_seconds_mean", "probe_C", "scored_on"]
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
    w.writerow(csv_row(head))
    for r in table["rows"]:
        line = [table["dataset"], table.get("target") or "", r["kind"], r["head"], r["features"], r["encoder"],
                _num(r.get("n_test")), _num(r.get("n_dropped")), r["seeds_finished"], r["seeds_failed"],
                r["seeds_total"]]
        for k in METRICS:
            line += [*_stat_cells(r[k]), r[f"best_{k}"], r.get(f"tied_{k}", False)]
        d = r.get("delta")
        line.append("" if not d else d["vs"])
        for k in METRICS:
            line += ["", "", ""] if not d else [_num(d[k]["delta"]), _num(d[k]["ci"][0]), _num(d[k]["ci"][1])]
        line += [_num(r["num_parameters"]), _num(r["train_seconds_mean"]),
                 json.dumps(r["C"]) if r.get("C") else "", ""]
        for _name, path in per:
            cell = r[path[0]] if len(path) == 1 else r[path[0]][path[1]]
            line += [_num(cell["mean"]), _num(cell["std"])]
        line += ([r.get("variant") or ""] if show_var else []) + (
            [_num(r["lr"]), json.dumps(r["lr_choice"])] if show_lr else [])
        for part in parts:
            line.append(r[part]["n"])
            for k in METRICS:
                line += [_num(r[part][k]["mean"]), _num(r[part][k]["std"]), r[f"best_{part}_{k}"]]
        w.writerow(csv_row(line))
    for ref in _references(table):
        line = [table["dataset"], table.get("target") or "", "reported", ref["head"] or "", "",
                f"{REPORTED_LABEL}: {ref.get('source') or 'paper'}", "", "", "", "", ""]
        for k in METRICS:
            line += [(ref.get("published") or {}).get(k, _num(ref.get(k))), "", "", "", False, False]
        line += [""] * (1 + 3 * len(METRICS)) + ["", "", "", ref["scored_on"]]
        line += ["", ""] * len(per) + [""] * (show_var + 2 * show_lr)
        for _ in parts:
            line += [""] + ["", "", False] * len(METRICS)
        w.writerow(csv_row(line))
    return buf.getvalue()


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in str(text))


def _tex_cell(s: dict[str, Any], best: bool, tied: bool) -> str:
    if s["mean"] is None:
        return "--"
    std = "" if s["std"] is None else f" $\\pm$ {s['std']:.3f}"
    ci = f" [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]" if s.get("ci") else ""
    text = f"{s['mean']:.3f}{std}{ci}"
    return f"\\textbf{{{text}}}" if best else (f"{text}$^\\dagger$" if tied else text)


def _latex(table: dict[str, Any]) -> str:
    """The main table as a booktabs LaTeX table (``ablation_<table>.tex``), with the same marks."""
    show_enc = len(table["encoders"]) > 1
    names = [METRIC_NAMES[k] for k in METRICS]
    delta = bool(_delta_header(table))
    show_var = _sweeps(table)[0]
    headers = ["head", "features", *(["encoder"] if show_enc else []), *(["variant"] if show_var else []), "$n$", *names,
               *([r"$\Delta$ macro-F1 [95\% CI]"] if delta else [])]
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "l" * (2 + show_enc + show_var) + "r" * (
             len(headers) - 2 - show_enc - show_var) + "}", r"\toprule", " & ".join(headers) + r" \\", r"\midrule"]
    for r in table["rows"]:
        d = r.get("delta")
        dcell = ("--" if not d else "baseline" if d["is_baseline"] else
                 f"{d['macro_f1']['delta']:+.3f} [{d['macro_f1']['ci'][0]:+.3f}, {d['macro_f1']['ci'][1]:+.3f}]")
        cells = [_tex(_head_cell(r)), _tex(r["features"]), *([_tex(r["encoder"])] if show_enc else []),
                 *([_tex(r.get("variant") or "--")] if show_var else []), str(r.get("n_test") or "--"),
                 *(_tex_cell(r[k], r[f"best_{k}"], r.get(f"tied_{k}", False)) for k in METRICS),
                 *([dcell] if delta else [])]
        lines.append(" & ".join(cells) + r" \\")
    refs = _references(table)
    if refs:
        lines.append(r"\midrule")
    for ref in refs:
        cells = [_tex(f"{ref['head'] or 'best model'} (reported)"), "--", *(["--"] if show_enc else []),
                 *(["--"] if show_var else []), "--",
                 *(_tex(_published(ref, k)) for k in METRICS), *(["--"] if delta else [])]
        lines.append(" & ".join(cells) + r" \\")
    scored = "; ".join(f"{ref['head'] or 'best model'}: {ref['scored_on']}" for ref in refs)
    caption = (f"Ablation on {table['dataset']}" + (f", target {table['target']}" if table.get("target") else "")
               + ": test mean $\\pm$ std over seeds, [95\\% bootstrap interval over test posts and seeds]. "
               "Bold: best, its paired 95\\% CI against the runner-up excludes 0; $^\\dagger$: tied with the top "
               "row (paired CI includes 0). Probe rows: logistic regression on the same features."
               + (f" Reported rows are published figures, not measured here, scored on another test set ({_tex(scored)})."
                  if refs else ""))
    lines += [r"\bottomrule", r"\end{tabular}", f"\\caption{{{caption}}}",
              f"\\label{{tab:ablation-{_tex(table.get('name', table['dataset']))}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_results(tables: dict[str, dict[str, Any]], results_dir: str | Path, *, plots: bool = True) -> dict[str, list[Path]]:
    """``results/ablation_<dataset>.md|.csv|.json|.tex`` (+ ``.png`` and ``_confusion.png`` when matplotlib is
    installed and ``plots``); returns the paths per dataset.

    The text files of every table are written as one set (:func:`atomic_write_many`): on a failure (disk
    full: :class:`~mmcache.errors.DiskFullError`) no temp file is left and the old set is unchanged, so a
    ``.md`` never disagrees with its ``.json``. Figures follow once the set is in place."""
    results_dir = Path(results_dir)
    written: dict[str, list[Path]] = {}
    files: dict[Path, str] = {}
    for dataset, table in tables.items():
        stem = results_dir / f"ablation_{table.get('name', dataset)}"
        paths = [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".tex")]
        files.update(zip(paths, (_markdown(table), _csv(table), json.dumps(table, indent=2, default=str) + "\n",
                                 _latex(table)), strict=True))
        written[dataset] = paths
    atomic_write_many(files)
    if plots:

        for dataset, table in tables.items():
            try:
                written[dataset] += plot_table(table, results_dir)
            except OSError as e:  # matplotlib writes the PNG itself: ENOSPC as the text files report it
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full_error(results_dir / f"ablation_{table.get('name', dataset)}.png", None, e) from e
                raise
    return written
