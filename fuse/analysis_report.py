"""Files of ``analyze``: ``analysis.json`` and CSVs always; PNG figures with matplotlib; one
self-contained ``report.html`` (figures and image thumbnails embedded as base64: it opens offline).

Images are read only to draw thumbnails and heat maps (PIL, size-checked before decoding)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.fuse import plots  # plots.pyplot(): matplotlib when installed (tests replace it to go without)

from mmcache.common import atomic_write
from mmcache.csvsafe import csv_row

log = logging.getLogger(__name__)

__all__ = ["write_analysis"]

MAX_PIXELS = 50_000_000  # thumbnails: refuse to decode larger images


def _image(index, row: int):
    """The post's image as RGB PIL, or None (no path, unreadable, too large)."""
    from PIL import Image

    rel = str(index.image_paths[row])
    if not rel:
        return None
    path = Path(str(index.attrs.get("root", "/"))) / rel
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                return None
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 -- a report never fails on one picture
        log.debug("no thumbnail for %s: %s", path, e)
        return None


def model_view(img, processor: dict[str, Any] | None):
    """The part of ``img`` the image encoder saw, so a patch grid lines up with it: with a
    shortest-edge resize and a center crop (DINOv2's processor), the centered crop region in the
    original image's coordinates; otherwise the whole image (resized to the model's input)."""
    p = processor or {}
    edge, crop = (p.get("size") or {}).get("shortest_edge"), p.get("crop_size") or {}
    if not (p.get("do_center_crop") and edge and crop.get("height") and crop.get("width")):
        return img
    w, h = img.size
    scale = edge / min(w, h)
    cw, ch = min(w, crop["width"] / scale), min(h, crop["height"] / scale)
    left, top = (w - cw) / 2, (h - ch) / 2
    return img.crop((round(left), round(top), round(left + cw), round(top + ch)))


def _png_b64(img, size: int = 160) -> str:
    im = img.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(csv_row(header))
    w.writerows(csv_row(r) for r in rows)  # ids and texts come from the data
    atomic_write(path, buf.getvalue())
    return path


def _tables(out: Path, s: dict[str, Any]) -> list[Path]:
    files = []
    pr = [[c, v["ap"], v["roc_auc"], p, r] for c, v in s["curves"]["per_class"].items()
          for p, r in zip(v["precision"], v["recall"], strict=True)]
    files.append(_csv(out / "pr_curves.csv", ["class", "ap", "roc_auc", "precision", "recall"], pr))
    cal = s["calibration"]
    rel = [[w, b["lo"], b["hi"], b["n"], b["confidence"], b["accuracy"]]
           for w in ("before", "after") for b in cal[f"reliability_{w}"]]
    files.append(_csv(out / "reliability.csv", ["temperature_scaling", "lo", "hi", "n", "confidence", "accuracy"], rel))
    if "attention" in s:
        files.append(_csv(out / "attention_shares.csv", ["group", "n", "text_share", "image_share"],
                          [[r["group"], r["n"], r["text_share"], r["image_share"]] for r in s["attention"]["shares"]]))
    return files


# --------------------------------------------------------------------------------------------- figures

def _fig_b64(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figures(plt, out: Path, s: dict[str, Any]) -> dict[str, str]:
    figs = {}
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    for c, v in s["curves"]["per_class"].items():
        if v["ap"] is not None:
            ax.step(v["recall"], v["precision"], where="post", label=f"{c} (AP {v['ap']:.2f}, AUC {v['roc_auc']:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall per class (test)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    figs["pr_curves"] = _fig_b64(fig, out / "pr_curves.png")
    cal = s["calibration"]
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for w, marker in (("before", "o-"), ("after", "s-")):
        pts = [(b["confidence"], b["accuracy"]) for b in cal[f"reliability_{w}"] if b["n"]]
        if pts:
            ece = cal[f"ece_test_{w}"]
            label = "as trained" if w == "before" else f"T = {cal['temperature']:.2f}"
            ax.plot(*zip(*pts, strict=True), marker, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability (test)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    figs["reliability"] = _fig_b64(fig, out / "reliability.png")
    if "confusion_matrix" in s:
        figs["confusion"] = _confusion_figure(plt, out, s["confusion_matrix"], s["classes"])
    if "attention" in s:
        rows = [r for r in s["attention"]["shares"] if r["n"]]
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["text_share"] for r in rows], 0.4, label="text")
        ax.bar(x + 0.2, [r["image_share"] for r in rows], 0.4, label="image")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['group'].replace(' ', chr(10), 1)}\n(n={r['n']})" for r in rows], fontsize=7)
        ax.set_ylabel("attention share")
        ax.set_title(f"modality attention ({s['attention']['kind']})", fontsize=10)
        ax.legend(fontsize=7)
        figs["attention_shares"] = _fig_b64(fig, out / "attention_shares.png")
    return figs


def _confusion_figure(plt, out: Path, cm: list[list[int]], classes: list[str]) -> str:
    """Counts (rows = true class, columns = predicted) with a colour scale beside them."""
    m = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    im = ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, fontsize=7, rotation=30)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="posts")
    return _fig_b64(fig, out / "confusion.png")


def _heatmap(plt, out: Path, sid: str, img, weights: np.ndarray, grid: list[int], caption: str = "") -> str:
    """The image with its patch weights over it, titled with the post's true / predicted label, and a
    colour scale (the weight of a patch) beside it."""
    fig, ax = plt.subplots(figsize=(3.8, 3.2))
    w, h = img.size
    ax.imshow(img)
    im = ax.imshow(weights.reshape(grid), cmap="inferno", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{sid}: patch attention\n{caption}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("attention weight", fontsize=7)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in sid)[:60]
    return _fig_b64(fig, out / f"heatmap_{safe}.png")


# --------------------------------------------------------------------------------------------- html

def _token_html(tokens: list[str], weights: np.ndarray) -> str:
    top = float(weights.max()) if weights.size and weights.max() > 0 else 1.0
    return " ".join(f'<span style="background: rgba(255,120,0,{float(w) / top:.2f})" title="{float(w):.3f}">'
                    f"{html.escape(t)}</span>" for t, w in zip(tokens, weights, strict=True))


def _post_cells(sid: str, row: int, index, classes: list[str], probs: np.ndarray, label: int) -> str:
    img = _image(index, row)
    thumb = f'<img src="data:image/png;base64,{_png_b64(img)}">' if img is not None else "(no image)"
    p = ", ".join(f"{c} {v:.2f}" for c, v in zip(classes, probs, strict=True))
    return (f"<tr><td>{thumb}</td><td><b>{html.escape(sid)}</b><br>{html.escape(str(index.texts[row]))}</td>"
            f"<td>{html.escape(classes[label])}</td><td>{html.escape(classes[int(probs.argmax())])}</td><td>{p}</td></tr>")


def _html(s: dict[str, Any], figs: dict[str, str], gallery_html: str, heat_html: str) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    c = s["calibration"]
    img = lambda k: f'<img src="data:image/png;base64,{figs[k]}">' if k in figs else ""  # noqa: E731
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['positives']}</td><td>{f(v['ap'])}</td><td>{f(v['roc_auc'])}</td></tr>"
                   for k, v in s["curves"]["per_class"].items())
    att = ""
    if "attention" in s:
        att_rows = "".join(f"<tr><td>{html.escape(r['group'])}</td><td>{r['n']}</td><td>{f(r['text_share'])}</td>"
                           f"<td>{f(r['image_share'])}</td></tr>" for r in s["attention"]["shares"])
        att = (f"<h2>Modality attention ({html.escape(s['attention']['kind'])})</h2>{img('attention_shares')}"
               f"<table><tr><th>posts</th><th>n</th><th>text</th><th>image</th></tr>{att_rows}</table>{heat_html}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>analysis {html.escape(Path(s['run']).name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse;margin:8px 0}}</style></head><body>
<h1>{html.escape(Path(s['run']).name)}</h1><p>{html.escape(s['head'])} on {html.escape(s['dataset'])}, {html.escape(s['features'])}
features, {s['n_test']} test posts.</p>{_headline_html(s, img('confusion'))}{_scored_html(s.get('scored'))}
<h2>Precision-recall and ROC AUC (test, one class vs rest)</h2>{img('pr_curves')}
<table><tr><th>class</th><th>test posts</th><th>AP</th><th>ROC AUC</th></tr>{rows}</table>
<p>macro AP {f(s['curves']['macro_ap'])}, macro ROC AUC {f(s['curves']['macro_roc_auc'])}</p>
<h2>Calibration</h2>{img('reliability')}
<p>{_temperature_line(c)} Test ECE {f(c['ece_test_before'])} before,
{f(c['ece_test_after'])} after; test NLL {f(c['nll_test_before'])} before, {f(c['nll_test_after'])} after.</p>
{att}<h2>Error gallery</h2>{gallery_html}{_config_html(s)}</body></html>
"""


def _headline_html(s: dict[str, Any], confusion_img: str = "") -> str:
    """Headline metrics with bootstrap intervals, the confusion matrix (table + figure), per-class table."""
    if "headline" not in s:
        return ""
    hd, classes = s["headline"], s["classes"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ci = lambda c: "-" if c is None else f"{c[0]:.3f} &ndash; {c[1]:.3f}"  # noqa: E731
    names = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1"}
    head = "".join(f"<tr><td>{n}</td><td><b>{f(hd[k]['value'])}</b></td><td>{ci(hd[k]['ci'])}</td></tr>"
                   for k, n in names.items())
    cm = "".join(f"<tr><th>{html.escape(c)}</th>{''.join(f'<td>{v}</td>' for v in row)}</tr>"
                 for c, row in zip(classes, s["confusion_matrix"], strict=True))
    pc = "".join(f"<tr><td>{html.escape(c)}</td><td>{f(v['precision'])}</td><td>{f(v['recall'])}</td>"
                 f"<td>{f(v['f1'])}</td><td>{v['support']}</td></tr>" for c, v in s["per_class"].items())
    return (f'<section id="headline"><h2>Test metrics</h2><table><tr><th>metric</th><th>test</th>'
            f"<th>{hd['level']:.0%} interval</th></tr>{head}</table><p>Intervals: percentile bootstrap, "
            f"{hd['replicates']} resamples of the {hd['n']} test posts.</p></section>"
            f'<section id="confusion"><h2>Confusion matrix (test; rows = true, columns = predicted)</h2>'
            f"<table><tr><th>true \\ predicted</th>{''.join(f'<th>{html.escape(c)}</th>' for c in classes)}</tr>"
            f"{cm}</table>{confusion_img}</section>"
            f'<section id="per-class"><h2>Per class (test)</h2><table><tr><th>class</th><th>precision</th>'
            f"<th>recall</th><th>F1</th><th>support</th></tr>{pc}</table></section>")


def _config_html(s: dict[str, Any]) -> str:
    """The run's training config and its provenance (encoders with identity, cache files, split)."""
    out = ""
    if "provenance" in s:
        pv = s["provenance"]
        enc = "".join(f"<tr><td>{html.escape(m)}</td><td>{html.escape(str(e['model']))}</td>"
                      f"<td>{html.escape(str(e.get('weights_sha256') or e.get('commit_hash') or '-'))[:16]}</td>"
                      f"<td>{html.escape(str(e.get('dtype')))}</td><td>{html.escape(str(e['file']))}</td></tr>"
                      for m, e in pv["encoders"].items())
        split = pv.get("split") or {}
        out += (f'<section id="provenance"><h2>Provenance</h2><table><tr><th>modality</th><th>encoder</th>'
                f"<th>weights</th><th>dtype</th><th>cache file</th></tr>{enc}</table>"
                f"<p>Index {html.escape(str(pv.get('index')))} (fingerprint {html.escape(str(pv.get('index_fingerprint')))})"
                f"; split {html.escape(str(split.get('source')))}, {html.escape(json.dumps(split.get('counts')))}"
                f"; code {html.escape(str(pv.get('git_commit')))}.</p></section>")
    if "config" in s:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                       for k, v in s["config"].items())
        out += f'<section id="config"><h2>Training config</h2><table>{rows}</table></section>'
    return out


def _scored_html(sc: dict[str, Any] | None) -> str:
    """What was scored: each feature file (path, weights sha256 / config fingerprint), n dropped by reason."""
    if not sc:
        return ""
    items = "".join(f"<li>{html.escape(m)}: {html.escape(str(f['path']))} (weights "
                    f"{html.escape(str(f.get('weights_sha256') or f.get('commit_hash') or '-'))[:16]}, config "
                    f"{html.escape(str(f.get('config_fingerprint') or '-'))})</li>" for m, f in sc["features"].items())
    why = ", ".join(f"{html.escape(k)} {v}" for k, v in sc["dropped_by_reason"].items() if v) or "none"
    return (f"<p>Scored {sc['n_scored']} posts; {sc['n_dropped']} dropped ({why}); run files "
            f"{html.escape(str(sc.get('run_verified')))}.</p><ul>{items}</ul>")


def _temperature_line(c: dict[str, Any]) -> str:
    """Never says "fitted" for a temperature that was not (search bound, no errors, no val posts)."""
    if c.get("fitted", True):
        return f"Temperature {c['temperature']:.3f} fitted on {c['n_val']} validation posts."
    why = html.escape(str(c.get("not_fitted_because") or "not identifiable"))
    return f"No temperature: it could not be estimated ({why}); T = 1 is shown and none is stored."


def write_analysis(out: Path, s: dict[str, Any], *, probs: np.ndarray, labels: np.ndarray, test_rows: np.ndarray,
                   index, attention: dict[str, Any] | None, heatmaps: int,
                   tokenize: Callable[[list[str]], list[list[str]]] | None, grid: list[int] | None,
                   processor: dict[str, Any] | None = None) -> list[Path]:
    """Write everything ``analyze`` produces into ``out``; returns the paths written."""

    files = _tables(out, s)
    plt = plots.pyplot()
    figs = _figures(plt, out, s) if plt is not None else {}
    pos = {str(index.ids[r]): k for k, r in enumerate(test_rows)}
    gallery_html, gal_rows = "", []
    for key, title in (("confident_mistakes", "Most confident mistakes"), ("unsure_correct", "Least confident correct")):
        cells = ""
        for sid in s["gallery"][key]:
            k = pos[sid]
            cells += _post_cells(sid, int(test_rows[k]), index, s["classes"], probs[k], int(labels[k]))
            gal_rows.append([key, sid, s["classes"][int(labels[k])], s["classes"][int(probs[k].argmax())],
                             *(f"{v:.4f}" for v in probs[k])])
        gallery_html += (f"<h3>{title}</h3><table><tr><th>image</th><th>text</th><th>true</th><th>predicted</th>"
                         f"<th>probabilities</th></tr>{cells}</table>")
    files.append(_csv(out / "gallery.csv", ["list", "id", "true", "predicted", *(f"p_{c}" for c in s["classes"])], gal_rows))
    heat_html = _heat_section(plt, out, s, attention, test_rows, index, heatmaps, tokenize, grid, processor,
                              probs=probs, labels=labels) if attention else ""
    atomic_write(out / "analysis.json", json.dumps(s, indent=1, default=str) + "\n")
    atomic_write(out / "report.html", _html(s, figs, gallery_html, heat_html))
    files += [out / "analysis.json", out / "report.html"]
    files += sorted(out.glob("*.png"))
    return files


def _heat_section(plt, out: Path, s: dict[str, Any], att: dict[str, Any], test_rows: np.ndarray, index,
                  k: int, tokenize, grid: list[int] | None, processor: dict[str, Any] | None = None, *,
                  probs: np.ndarray, labels: np.ndarray) -> str:
    """Heat maps of the first ``k`` gallery posts (mistakes first): patch weights over the image grid
    (token features with a known grid) and the text with its tokens weighted."""
    pos = {str(index.ids[r]): n for n, r in enumerate(test_rows)}
    ids = list(dict.fromkeys(s["gallery"]["confident_mistakes"] + s["gallery"]["unsure_correct"]))[:k]
    texts = [str(index.texts[test_rows[pos[i]]]) for i in ids]
    tokens = tokenize(texts) if tokenize and texts else [None] * len(ids)
    cells, saved = "", {}
    for sid, toks in zip(ids, tokens, strict=True):
        n = pos[sid]
        caption = f"true {s['classes'][int(labels[n])]}, predicted {s['classes'][int(probs[n].argmax())]}"
        tw, iw = np.asarray(att["text_weights"][n]), np.asarray(att["image_weights"][n])
        if toks is None or len(toks) != tw.size:
            toks = [f"#{j}" for j in range(tw.size)]
        img_html = ""
        if grid and iw.size == int(np.prod(grid)) and iw.size > 1 and plt is not None:
            img = _image(index, int(test_rows[n]))
            if img is not None:
                img = model_view(img, processor)
                img_html = f'<img src="data:image/png;base64,{_heatmap(plt, out, sid, img, iw, grid, caption)}">'
        saved[sid] = {"tokens": toks, "text_weights": tw.tolist(), "image_weights": iw.tolist(), "grid": grid}
        img_html = img_html or "(vector features: one image token)"
        cells += (f"<tr><td><b>{html.escape(sid)}</b>: {html.escape(caption)}</td><td>{img_html}</td>"
                  f"<td>{_token_html(toks, tw)}</td></tr>")
    atomic_write(out / "attention_posts.json", json.dumps(saved, indent=1) + "\n")
    return ('<section id="heatmaps"><h3>Per post: patch attention over the image grid (colour scale: the '
            "patch's weight), text tokens weighted</h3>"
            f"<table><tr><th>post</th><th>image</th><th>text</th></tr>{cells}</table></section>") if cells else ""
