"""Optional PNG figures of an ablation table (matplotlib, the ``plot`` extra).

matplotlib is imported lazily; without it :func:`plot_table` logs one warning and returns no paths, so
the tables never depend on it. Figures per dataset:

* ``ablation_<dataset>.png``: each metric (accuracy, macro-F1, weighted-F1) per head, one bar per
  features / encoder variant (probe rows as their own bars), error bars = the 95% bootstrap interval
  over test posts and seeds (the sample std over seeds where runs left no predictions).
* ``ablation_<dataset>_confusion.png``: the confusion matrix of the best config (highest mean
  macro-F1), summed over its finished seeds (test split).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmcache.fuse.metrics import METRIC_NAMES, METRICS

logger = logging.getLogger(__name__)

__all__ = ["plot_table"]

_warned = False


def pyplot():
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            logger.warning("matplotlib is not installed: no ablation plots (pip install -e '.[plot]'); "
                           "the tables are written anyway")
            _warned = True
        return None
    return plt


def _error_bar(s: dict[str, Any]) -> tuple[float, float]:
    """(below, above) the mean: the 95% bootstrap interval (test posts and seeds) when the table has it,
    else the std over seeds (symmetric; 0 with one seed)."""
    if s.get("ci"):
        return max(s["mean"] - s["ci"][0], 0.0), max(s["ci"][1] - s["mean"], 0.0)
    return (s["std"] or 0.0, s["std"] or 0.0)


def plot_table(table: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the figures of one dataset's table (see the module doc); returns their paths."""
    plt = pyplot()
    if plt is None:
        return []

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = [r for r in table["rows"] if r["seeds_finished"]]
    if rows:
        heads = list(dict.fromkeys(r["head"] for r in rows))
        show_enc = len(table["encoders"]) > 1
        variants = list(dict.fromkeys((r["features"], r["encoder"]) for r in rows))
        width = 0.8 / len(variants)
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 4), squeeze=False)
        for ax, metric in zip(axes[0], METRICS, strict=True):
            for j, (feat, enc) in enumerate(variants):
                xs, ys, es = [], [], []
                for i, head in enumerate(heads):
                    row = next((r for r in rows if (r["head"], r["features"], r["encoder"]) == (head, feat, enc)), None)
                    if row is None or row[metric]["mean"] is None:
                        continue
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(row[metric]["mean"])
                    es.append(_error_bar(row[metric]))
                label = f"{feat} ({enc})" if show_enc else feat
                ax.bar(xs, ys, width=width, yerr=list(zip(*es, strict=True)) or None, capsize=3, label=label)
            ref = table.get("reference")
            if ref and ref.get(metric) is not None:
                ax.axhline(ref[metric], color="k", linestyle="--", linewidth=1, label="reported (paper)")
            ax.set_xticks(range(len(heads)))
            ax.set_xticklabels(heads, rotation=30, ha="right")
            ax.set_title(METRIC_NAMES[metric])
            ax.set_ylim(0, 1)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{table.get('name', table['dataset'])}: test, mean over seeds; error bars: 95% bootstrap "
                     "interval over test posts and seeds (std over seeds without predictions)")
        fig.tight_layout()
        path = out_dir / f"ablation_{table.get('name', table['dataset'])}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    conf = table.get("confusion")
    if conf:
        classes = table["classes"]
        fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
        im = ax.imshow(conf["matrix"], cmap="Blues")
        top = max(max(r) for r in conf["matrix"]) or 1
        for i, row in enumerate(conf["matrix"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels(classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)))
        ax.set_yticklabels(classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{conf['head']}, {conf['features']}\nsummed over {conf['seeds']} seed(s), test", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"ablation_{table.get('name', table['dataset'])}_confusion.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
