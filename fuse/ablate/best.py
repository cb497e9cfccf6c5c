"""The ablation's look at its best config: :func:`analyze_best` analyses one run of the best row
(:mod:`fuse.analyze`) and :func:`markdown_section` renders what the Markdown table shows of it."""

from __future__ import annotations

import logging
from typing import Any

from mmcache.fuse.analyze import analyze_run

from mmcache.errors import PipelineError

log = logging.getLogger(__name__)

__all__ = ["analyze_best", "markdown_section"]


def analyze_best(table: dict[str, Any], *, device: str = "cpu") -> dict[str, Any] | None:
    """For an ablation table: analyse the first finished seed of the best config (highest mean macro-F1),
    among the row's own runs (its chosen lr and its variant), and return the figures its markdown shows
    (``table["analysis"]``); None when nothing finished. A failure is recorded in the result, never
    raised: the tables must not depend on it."""
    best = table.get("confusion")
    if not best:
        return None
    # the row's OWN runs: with --lrs / --dims / --dropouts the head, features and encoder match runs of
    # other learning rates and variants too, whose figures are not the row's
    own = set(best.get("runs") or [])
    runs = sorted((r for r in table["runs"] if r["status"] == "finished" and r["run"] in own), key=lambda r: r["seed"])
    if not runs:
        return None
    out: dict[str, Any] = {"run": runs[0]["run"], "run_dir": runs[0]["run_dir"], "seed": runs[0]["seed"],
                           "head": best["head"], "features": best["features"], "encoder": best["encoder"],
                           "lr": runs[0].get("lr"), "variant": best.get("variant") or ""}
    try:
        res = analyze_run(runs[0]["run_dir"], device=device)
    except (PipelineError, OSError, ValueError) as e:
        log.warning("analysis of the best config %s failed: %s", runs[0]["run"], e)
        return {**out, "error": str(e)}
    s = res.summary
    out.update(report=str(res.out_dir / "report.html"), curves={k: {"ap": v["ap"], "roc_auc": v["roc_auc"]}
                                                             for k, v in s["curves"]["per_class"].items()},
               macro_ap=s["curves"]["macro_ap"], macro_roc_auc=s["curves"]["macro_roc_auc"],
               calibration={k: v for k, v in s["calibration"].items() if not k.startswith("reliability")},
               attention=s.get("attention"))
    return out


def markdown_section(a: dict[str, Any]) -> list[str]:
    """The ablation markdown's analysis section for :func:`analyze_best`'s result."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    what = [a["head"], a["features"], a["encoder"], *([a["variant"]] if a.get("variant") else []),
            *([f"lr {a['lr']:g}"] if a.get("lr") is not None else [])]
    head = [f"## Analysis of the best config ({', '.join(what)}; seed {a['seed']})", ""]
    if a.get("error"):
        return [*head, f"Not available: {a['error']}"]
    c = a["calibration"]
    lines = [*head, f"Run `{a['run']}` (the head row with the highest mean macro-F1, at its own chosen lr and "
                    f"variant; whether it is distinguishable from the others: see the marks); full report: "
                    f"`{a['report']}`.", "",
             "| class | AP | ROC AUC |", "|---|---|---|",
             *(f"| {k} | {f(v['ap'])} | {f(v['roc_auc'])} |" for k, v in a["curves"].items()),
             f"| macro | {f(a['macro_ap'])} | {f(a['macro_roc_auc'])} |", "",
             f"Calibration (test): ECE {f(c['ece_test_before'])} as trained, {f(c['ece_test_after'])} after temperature "
             f"scaling (T = {c['temperature']:.3f}, fitted on {c['n_val']} validation posts); NLL "
             f"{f(c['nll_test_before'])} -> {f(c['nll_test_after'])}."]
    if a.get("attention"):
        lines += ["", f"Attention shares ({a['attention']['kind']}):", "", "| posts | n | text | image |", "|---|---|---|---|",
                  *(f"| {r['group']} | {r['n']} | {f(r['text_share'])} | {f(r['image_share'])} |"
                    for r in a["attention"]["shares"])]
    return lines
