"""report.html in a real headless browser (Chromium): it renders offline without JS/console errors and
its main sections are there and visible. Skipped where no chromium / chromium-browser is on PATH.

A probe script is injected into a copy of the report: it records ``window.onerror`` / ``console.error``
and, once the page has loaded, each section's rendered size and each image's decoded width into a
``<pre id="probe">`` element, which ``--dump-dom`` then shows (no DevTools protocol needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium / chromium-browser on PATH")

SECTIONS = ("headline", "confusion", "per-class", "config", "provenance", "heatmaps")

PROBE = """<script>
window.__errors = [];
window.onerror = function (msg, src, line) { window.__errors.push("error: " + msg + " @" + line); };
var __ce = console.error; console.error = function () { window.__errors.push("console: " + [].join.call(arguments, " ")); __ce.apply(console, arguments); };
window.addEventListener("load", function () {
  var out = {errors: window.__errors, sections: {}, images: [], text: document.body.innerText.slice(0, 20000)};
  SECTION_IDS.forEach(function (id) {
    var el = document.getElementById(id), r = el && el.getBoundingClientRect();
    out.sections[id] = el ? {w: r.width, h: r.height, shown: getComputedStyle(el).display !== "none"} : null;
  });
  document.querySelectorAll("img").forEach(function (im) { out.images.push(im.naturalWidth); });
  var pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>""".replace("SECTION_IDS", json.dumps(list(SECTIONS)))


def _run_and_analyze(root: Path) -> Path:
    """A 3-epoch self-attention head on 60 demo posts with tiny local encoders, analysed."""
    from mmcache.extract.demo_models import ensure_demo_models
    from mmcache.fuse.analyze import analyze_run

    import mmcache

    text_dir, image_dir = ensure_demo_models(root / "models")
    mmcache.extract("demo", data_dir=root / "data", options={"n": 60}, cache_dir=root / "cache",
                    text_model=str(text_dir), image_model=str(image_dir), device="cpu", precision="fp32",
                    num_workers=0, dtype="float32", text_max_length=24, progress=False)
    run = mmcache.train_fusion(head="self_attention", features="tokens", dataset="demo", dim=16, heads=2, epochs=3,
                               threads=1, cache_dir=str(root / "cache"), runs_dir=str(root / "runs"),
                               run_name="sa", device="cpu")
    res = analyze_run(run.run_dir, gallery=3, heatmaps=2)
    return res.out_dir / "report.html"


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                           "--disable-extensions", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_errors(tmp_path):
    report = _run_and_analyze(tmp_path)
    page = tmp_path / "probed.html"
    html = report.read_text()
    assert "<head>" in html
    page.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    url = page.as_uri()

    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m, "the probe never ran (page did not finish loading?)"
    import html as h

    probe = json.loads(h.unescape(m.group(1)))
    assert probe["errors"] == []
    # Chromium reports uncaught page errors / console errors on stderr with --enable-logging
    assert not re.search(r"Uncaught|CONSOLE\(\d+\)\].*(error|Error)", dom.stderr), dom.stderr[-2000:]
    for sid in SECTIONS:
        box = probe["sections"][sid]
        assert box is not None, f"section {sid} missing"
        assert box["shown"] and box["w"] > 0 and box["h"] > 0, f"section {sid} not visible: {box}"
    assert probe["images"] and all(w > 0 for w in probe["images"])  # every embedded figure decoded
    text = probe["text"]
    for words in ("Test metrics", "macro-F1", "weighted-F1", "95% interval", "Confusion matrix", "precision",
                  "support", "Training config", "Provenance", "predicted"):
        assert words in text, words
    assert "http://" not in html and "https://" not in html  # self-contained: opens offline

    shot = tmp_path / "report.png"
    got = _chromium(f"--screenshot={shot}", "--window-size=1200,4000", "--hide-scrollbars", url)
    assert got.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, got.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 4000) and len(set(im.convert("L").resize((60, 200)).getdata())) > 20  # not blank
    if os.environ.get("MMCACHE_KEEP_ARTIFACTS"):
        keep = Path(__file__).parent / "artifacts"
        keep.mkdir(exist_ok=True)
        shutil.copy(shot, keep / "report.png")
