"""predict and analyze: a trained run applied to raw posts (encoders from its provenance, stage one's
extraction path, then the head), and explained (curves, calibration, attention, gallery). Tiny demo
encoders and 60 demo posts, so the whole file runs in seconds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as _run

N = 60


def _setup(root: Path, dtype: str) -> Path:
    """Through the public API: mmcache.extract (the callable stage-one package), mmcache.train_fusion."""
    from mmcache.extract.demo_models import ensure_demo_models

    import mmcache

    text_dir, image_dir = ensure_demo_models(root / "models")
    summary = mmcache.extract("demo", data_dir=root / "data", options={"n": N}, cache_dir=root / "cache",
                              text_model=str(text_dir), image_model=str(image_dir), device="cpu", precision="fp32",
                              num_workers=0, dtype=dtype, text_max_length=24, progress=False)
    assert summary.num_samples == N
    for head, features in (("self_attention", "tokens"), ("basic", "mean"), ("dual_attention", "tokens")):
        run = mmcache.train_fusion(head=head, features=features, dataset="demo", dim=16, heads=2, epochs=3, threads=1,
                                   cache_dir=str(root / "cache"), runs_dir=str(root / "runs"),
                                   run_name=f"{head}-{features}", device="cpu")
        assert run.metrics["test"]["n"] == 6 and run.run_dir.name == f"{head}-{features}"
    return root


@pytest.fixture(scope="module", params=["float32", "float16"])
def demo(request, tmp_path_factory):
    return _setup(tmp_path_factory.mktemp(f"predict-{request.param}"), request.param)


@pytest.fixture(scope="module")
def demo32(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("predict-main"), "float32")




def _read_csv(path_or_text, is_text=False):
    import io

    text = path_or_text if is_text else Path(path_or_text).read_text()
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["self_attention-tokens", "basic-mean"])
def test_predict_on_raw_test_posts_reproduces_predictions_csv(demo, capsys, run_name):
    run = demo / "runs" / run_name
    out_file = demo / f"pred-{run_name}.csv"
    code, out, err = _run(capsys, "predict", "--run", run, "--dataset", "demo", "--data-dir", demo / "data",
                          "--split", "test", "--output", out_file, "--device", "cpu")
    assert code == 0, err
    ref = {r["id"]: r for r in _read_csv(run / "predictions.csv")}
    got = _read_csv(out_file)
    assert [r["id"] for r in got] == list(ref) and len(got) == 6
    classes = ["positive", "neutral", "negative"]
    diffs = [abs(float(r[f"p_{c}"]) - float(ref[r["id"]][f"p_{c}"])) for r in got for c in classes]
    # predictions.csv holds 6 decimals; a float32 cache reproduces them to that rounding, a float16 one
    # to float16 storage precision (encoder batches differ, so a value can round to the next float16).
    assert max(diffs) <= (1.1e-6 if "float32" in str(demo) else 2e-3)
    assert all(r["predicted"] == ref[r["id"]]["predicted"] and r["true"] == ref[r["id"]]["true"] for r in got)
    assert "accuracy" in out  # labelled posts: metrics printed


def _bad_manifest(root: Path) -> Path:
    from PIL import Image

    d = root / "posts"
    (d / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (250, 200, 0)).save(d / "img" / "sun.png")
    (d / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [
        {"id": "ok", "text": "sunny and happy", "image": "img/sun.png", "label": "positive"},
        {"id": "ok", "text": "same id again", "image": "img/sun.png", "label": "positive"},
        {"id": "escape", "text": "rain", "image": "../../etc/passwd", "label": "negative"},
        {"id": "nofile", "text": "rain again", "image": "img/none.png", "label": "negative"},
        {"id": "broken", "text": "cloudy", "image": "img/broken.jpg", "label": ""},
        {"id": "notext", "text": "  ", "image": "img/sun.png", "label": "weird"},
    ]
    with open(d / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        w.writerows(rows)
        fh.write("extra,cells,in,this,row\n")
    return d / "manifest.csv"


@pytest.mark.parametrize("run_name", ["self_attention-tokens", "basic-mean"])
def test_every_manifest_row_gets_a_row_with_its_reason(demo32, capsys, run_name):
    manifest = _bad_manifest(demo32)
    out_file = demo32 / f"{run_name}.jsonl"
    code, out, err = _run(capsys, "predict", "--run", demo32 / "runs" / run_name, "--manifest", manifest,
                          "--output", out_file, "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ok", "ok#row2", "escape", "nofile", "broken", "notext", "row7"]
    assert "line 8: malformed row (5 cells for 4 columns)" in rows[-1]["note"] and rows[-1]["predicted"] is None
    by = {r["id"]: r for r in rows}
    assert by["ok"]["predicted"] in ("positive", "neutral", "negative") and by["ok"]["note"] == ""
    assert abs(sum(by["ok"][f"p_{c}"] for c in ("positive", "neutral", "negative")) - 1) < 1e-5
    assert "duplicate id" in by["ok#row2"]["note"] and by["ok#row2"]["predicted"] is None
    assert "leaves the manifest's folder" in by["escape"]["note"]
    assert "missing image file" in by["nofile"]["note"]
    assert "image" in by["broken"]["note"] and by["broken"]["true"] is None
    assert "empty text" in by["notext"]["note"] and "not one of the run's classes" in by["notext"]["note"]
    if run_name == "self_attention-tokens":  # attends over what is there: one-modality answers, marked
        for sid in ("escape", "nofile", "broken"):
            assert by[sid]["predicted"] is not None and by[sid]["note"].startswith("answered from text only")
        assert by["notext"]["note"].startswith("answered from image only")
    else:  # basic concatenates both: no answer without either
        assert all(by[s]["predicted"] is None for s in ("escape", "nofile", "broken", "notext"))
    assert "labelled posts" in out  # metrics over the labelled, answered posts


def test_api_predict_takes_pil_images_and_paths_alike(demo32):
    from PIL import Image

    import mmcache

    img_path = demo32 / "data" / "images" / "demo_0004.png"
    p = mmcache.Predictor.from_run(demo32 / "runs" / "self_attention-tokens", device="cpu")
    texts = ["what a lovely sunny day", "rain again, so sad"]
    by_path = p.predict(texts=texts, images=[img_path, img_path])
    with Image.open(img_path) as im:
        by_pil = p.predict(texts=texts, images=[im.copy(), im.copy()])
    assert [r["predicted"] for r in by_path.rows] == [r["predicted"] for r in by_pil.rows]
    np.testing.assert_allclose(by_path.probs, by_pil.probs, atol=1e-6)
    assert by_path.probs.shape == (2, 3) and by_path.metrics is None
    assert by_path.columns()[:2] == ["id", "predicted"]


def test_cache_features_writes_a_normal_cache(demo32, capsys):
    import mmcache

    out_dir = demo32 / "kept"
    code, out, err = _run(capsys, "predict", "--run", demo32 / "runs" / "basic-mean", "--dataset", "demo",
                          "--data-dir", demo32 / "data", "--split", "val", "--cache-features", out_dir,
                          "--output", demo32 / "val.csv", "--device", "cpu")
    assert code == 0, err
    arrays = mmcache.load_cache("demo", cache_dir=out_dir, fields=("mean",))
    assert len(arrays.index["id"]) == 6 and arrays.valid["text"].all() and arrays.valid["image"].all()
    assert arrays.features["text"]["mean"].shape == (6, 32)
    # the kept cache is the same encoding as the run's own cache (float32 here: identical values)
    own = mmcache.load_cache("demo", cache_dir=demo32 / "cache", fields=("mean",))
    rows = [list(own.index["id"]).index(i) for i in arrays.index["id"]]
    np.testing.assert_allclose(arrays.features["image"]["mean"], own.features["image"]["mean"][rows], atol=1e-5)


def _reseal(run):
    """A run fabricated on purpose: seal its edited files into a new manifest."""
    from mmcache.fuse.runs import RunFolder

    RunFolder(run).seal()


def test_a_different_encoder_is_refused(demo32, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo32 / "runs" / "basic-mean", run)
    prov = json.loads((run / "provenance.json").read_text())
    prov["caches"]["text"]["config"]["weights_sha256"] = "0" * 32
    (run / "provenance.json").write_text(json.dumps(prov))
    _reseal(run)  # as if the run had recorded that encoder (the manifest would refuse an edited file)
    code, out, err = _run(capsys, "predict", "--run", run, "--text", "sunny", "--device", "cpu")
    assert code == 2 and "weights_sha256" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    ([], "give exactly one input"),
    (["--text", "x", "--manifest", "m.csv"], "give exactly one input"),
    (["--manifest", "nowhere.csv"], "no such file"),
    (["--text", "x", "--output", "out.txt"], ".csv or .jsonl"),
    (["--text", "x", "--calibrated"], "analyze"),
])
def test_bad_inputs_give_one_error_line(demo32, capsys, argv, message):
    code, out, err = _run(capsys, "predict", "--run", demo32 / "runs" / "basic-mean", "--device", "cpu", *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_import_mmcache_is_light():
    code = ("import sys, mmcache; assert callable(mmcache.extract) and 'Predictor' in dir(mmcache); "
            "print(sorted(m for m in ('torch', 'h5py', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------- analyze

def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    from mmcache.fuse.analyze import apply_temperature, expected_calibration_error, fit_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, size=(4000, 3))
    true_p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in true_p])
    over = apply_temperature(true_p.astype(np.float32), 0.5)  # overconfident: softmax(2 z)
    t = fit_temperature(over, y)
    assert 1.8 < t < 2.2
    assert expected_calibration_error(apply_temperature(over, t), y) < expected_calibration_error(over, y) / 2


def test_no_temperature_from_a_validation_split_without_mistakes():
    from mmcache.fuse.analyze import fit_temperature

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=np.float32)
    assert fit_temperature(probs, np.array([0, 1])) == 1.0  # NLL would push T to its lower bound
    assert fit_temperature(probs, np.array([0, 2])) != 1.0


def test_ece_by_hand():
    from mmcache.fuse.analyze import expected_calibration_error

    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=np.float32)
    y = np.array([0, 1, 0, 0])
    # bin (0.8, 0.9]: confidence 0.9, accuracy 0.5; bin (0.5, 0.6]: confidence 0.6, accuracy 1.0
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["self_attention-tokens", "dual_attention-tokens", "basic-mean"])
def test_analyze_writes_curves_calibration_attention_and_report(demo32, capsys, run_name):
    run = demo32 / "runs" / run_name
    code, out, err = _run(capsys, "analyze", "--run", run, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s == json.loads((run / "analysis" / "analysis.json").read_text())
    for c in ("positive", "neutral", "negative"):
        v = s["curves"]["per_class"][c]
        assert 0 <= v["ap"] <= 1 and 0 <= v["roc_auc"] <= 1 and v["recall"][0] == 1.0
    cal = s["calibration"]
    assert cal["temperature"] > 0 and cal["ece_test_before"] is not None and cal["ece_test_after"] is not None
    # stored for predict --calibrated only when fitted (these 3-epoch demo heads often hit the T bound)
    assert (run / "calibration.json").is_file() == cal["fitted"]
    assert sum(b["n"] for b in s["calibration"]["reliability_before"]) == s["n_test"]
    report = (run / "analysis" / "report.html").read_text()
    assert "Error gallery" in report and "data:image/png;base64," in report and "src=\"http" not in report
    gallery = s["gallery"]["confident_mistakes"] + s["gallery"]["unsure_correct"]
    assert gallery and all(sid in report for sid in gallery)
    # the first questions: headline metrics with intervals that hold them, the same numbers as metrics.json
    test = json.loads((run / "metrics.json").read_text())["test"]
    for k in ("accuracy", "macro_f1", "weighted_f1"):
        h = s["headline"][k]
        assert h["value"] == pytest.approx(test[k]) and h["ci"][0] <= h["value"] <= h["ci"][1]
    assert s["confusion_matrix"] == test["confusion_matrix"] and s["per_class"] == test["per_class"]
    assert s["config"]["head"] == s["head"] and set(s["provenance"]["encoders"]) == {"text", "image"}
    assert all(e["weights_sha256"] for e in s["provenance"]["encoders"].values())
    for section in ('id="headline"', 'id="confusion"', 'id="per-class"', 'id="config"', 'id="provenance"'):
        assert section in report
    if run_name == "basic-mean":
        assert "attention" not in s
        return
    shares = {r["group"]: r for r in s["attention"]["shares"]}
    assert shares["all"]["n"] == s["n_test"] and {"true positive", "true neutral", "true negative"} <= set(shares)
    for r in shares.values():
        assert r["n"] == 0 or (0 <= r["text_share"] <= 1 and 0 <= r["image_share"] <= 1)
    posts = json.loads((run / "analysis" / "attention_posts.json").read_text())
    one = next(iter(posts.values()))
    assert len(one["image_weights"]) == 64 and one["grid"] == [8, 8]  # tokens: the 8x8 patch grid
    assert len(one["tokens"]) == len(one["text_weights"])
    assert any(p.name.startswith("heatmap_") for p in (run / "analysis").glob("*.png"))


def test_self_attention_shares_add_up(demo32):
    from mmcache.fuse.analyze import _load, attention_maps

    model, config, _meta, data = _load(demo32 / "runs" / "self_attention-tokens", "cpu")
    att = attention_maps(model, data, data.split_rows["test"], "self_attention")
    total = np.asarray(att["text_share"]) + np.asarray(att["image_share"]) + np.asarray(att["self_share"])
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


@pytest.mark.slow
def test_predict_calibrated_applies_the_fitted_temperature(demo32, capsys):
    from mmcache.fuse.analyze import apply_temperature
    from mmcache.fuse.runs import RunFolder

    import mmcache.errors

    run = demo32 / "runs" / "basic-mean"
    assert _run(capsys, "analyze", "--run", run)[0] == 0
    if not (run / "calibration.json").is_file():  # analyze could not fit one: predict says so
        with pytest.raises(mmcache.errors.BadInputError, match="no fitted temperature"):
            mmcache_predict(run, True)
        RunFolder(run).write_calibration({"temperature": 1.7, "fitted": True})  # as a fitted one is stored
    t = json.loads((run / "calibration.json").read_text())["temperature"]
    plain = mmcache_predict(run, False)
    calibrated = mmcache_predict(run, True)
    np.testing.assert_allclose(calibrated, apply_temperature(plain, t), atol=1e-6)
    assert abs(t - 1) < 1e-3 or not np.allclose(plain, calibrated, atol=1e-4)


def mmcache_predict(run, calibrated):
    import mmcache

    p = mmcache.Predictor.from_run(run, device="cpu", calibrated=calibrated)
    return p.predict(texts=["what a lovely sunny day"], images=[run.parents[1] / "data" / "images" / "demo_0004.png"]).probs


def test_analyze_without_matplotlib_still_writes_numbers(demo32, capsys, monkeypatch, tmp_path):
    import shutil

    from mmcache.fuse import plots

    run = tmp_path / "run"
    shutil.copytree(demo32 / "runs" / "self_attention-tokens", run)
    (run / "analysis").exists() and shutil.rmtree(run / "analysis")
    monkeypatch.setattr(plots, "pyplot", lambda: None)
    code, out, err = _run(capsys, "analyze", "--run", run)
    assert code == 0, err
    names = {p.name for p in (run / "analysis").iterdir()}
    assert {"analysis.json", "pr_curves.csv", "reliability.csv", "attention_shares.csv", "gallery.csv", "report.html"} <= names
    assert not any(n.endswith(".png") for n in names)
    report = (run / "analysis" / "report.html").read_text()
    assert 'id="headline"' in report and 'id="confusion"' in report and 'id="per-class"' in report


def test_heat_map_covers_the_region_the_encoder_saw():
    from mmcache.fuse.analysis_report import model_view
    from PIL import Image

    img = Image.new("RGB", (200, 100))
    dinov2 = {"do_center_crop": True, "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}
    assert model_view(img, dinov2).size == (88, 88)  # 224/256 of the short side, centered
    assert model_view(img, {"do_center_crop": False, "size": {"height": 224, "width": 224}}).size == (200, 100)


@pytest.mark.slow
def test_ablation_markdown_has_the_best_configs_analysis(demo32, tmp_path):
    import mmcache

    res = mmcache.ablate(["demo"], heads=["basic", "self_attention"], features=["mean"], seeds=1,
                         base=dict(dim=16, heads=2, epochs=2, threads=1, device="cpu"), cache_dir=str(demo32 / "cache"),
                         runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"), jobs=1, plots=False)
    a = res.tables["demo"]["analysis"]
    assert a["head"] == res.tables["demo"]["confusion"]["head"] and Path(a["report"]).is_file()
    md = (tmp_path / "results" / "ablation_demo.md").read_text()
    assert "## Analysis of the best config" in md and "ECE" in md and "| macro |" in md
    assert json.loads((tmp_path / "results" / "ablation_demo.json").read_text())["analysis"]["run"] == a["run"]


def test_explain_gives_attention_per_post(demo32):
    import mmcache

    p = mmcache.Predictor.from_run(demo32 / "runs" / "self_attention-tokens", device="cpu")
    img = demo32 / "data" / "images" / "demo_0004.png"
    out = p.explain(texts=["what a lovely sunny day", "rain"], images=[img, demo32 / "missing.png"])
    first, second = out
    assert first["predicted"] in p.classes and len(first["image_weights"]) == 64 and first["grid"] == [8, 8]
    assert first["tokens"][0] == "[CLS]" and "lovely" in first["tokens"]  # token strings from the run's tokenizer
    assert len(first["tokens"]) == len(first["text_weights"])
    assert 0 < first["text_share"] and 0 < first["image_share"] and first["text_share"] + first["image_share"] <= 1 + 1e-6
    assert second["image_weights"] == [] and second["note"].startswith("answered from text only")
    with pytest.raises(mmcache.BadInputError, match="attention head"):
        mmcache.Predictor.from_run(demo32 / "runs" / "basic-mean", device="cpu").explain(texts=["x"])


def test_cache_features_never_overwrites_a_cache_of_other_posts(demo32, capsys, tmp_path):
    run = demo32 / "runs" / "basic-mean"
    args = ["predict", "--run", run, "--dataset", "demo", "--data-dir", demo32 / "data", "--cache-features", tmp_path,
            "--output", tmp_path / "out.csv", "--device", "cpu"]
    assert _run(capsys, *args, "--split", "test")[0] == 0
    index = tmp_path / "demo" / "index.h5"
    before = index.read_bytes()
    code, out, err = _run(capsys, *args, "--split", "val")
    assert code == 2 and "already holds a cache of other posts" in err
    assert index.read_bytes() == before  # the first cache is intact
    assert _run(capsys, *args, "--split", "test")[0] == 0  # the same posts again: reused


def test_a_broken_jsonl_line_gets_its_own_row(demo32, capsys, tmp_path):
    img = demo32 / "data" / "images" / "demo_0004.png"
    (tmp_path / "sun.png").write_bytes(img.read_bytes())
    lines = [json.dumps({"id": "a", "text": "lovely day", "image": "sun.png"}), "{not json", "[1, 2]",
             json.dumps({"id": "b", "text": "no image key"})]
    (tmp_path / "posts.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = _run(capsys, "predict", "--run", demo32 / "runs" / "basic-mean", "--manifest",
                          tmp_path / "posts.jsonl", "--device", "cpu")
    assert code == 0, err
    rows = _read_csv(out, is_text=True)
    assert [r["id"] for r in rows] == ["a", "row2", "row3", "b"]
    assert rows[0]["predicted"] and "not valid JSON" in rows[1]["note"] and "not a JSON object" in rows[2]["note"]
    assert rows[3]["predicted"] == "" and "no image path" in rows[3]["note"]


def test_dataset_split_comes_from_the_runs_split_json(demo32, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo32 / "runs" / "basic-mean", run)
    prov = json.loads((run / "provenance.json").read_text())
    prov["index"]["path"] = str(tmp_path / "gone" / "index.h5")  # the cache index is no help: split.json decides
    (run / "provenance.json").write_text(json.dumps(prov))
    _reseal(run)
    code, out, err = _run(capsys, "predict", "--run", run, "--dataset", "demo", "--data-dir", demo32 / "data",
                          "--option", f"n={N}", "--output", tmp_path / "p.csv", "--device", "cpu")
    assert code == 0, err
    test_ids = json.loads((run / "split.json").read_text())["ids"]["test"]
    assert [r["id"] for r in _read_csv(tmp_path / "p.csv")] == [r["id"] for r in _read_csv(run / "predictions.csv")]
    assert sorted(r["id"] for r in _read_csv(tmp_path / "p.csv")) == sorted(test_ids)


def test_a_multi_target_run_is_refused_with_a_reason(demo32, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo32 / "runs" / "basic-mean", run)
    meta = json.loads((run / "metrics.json").read_text())
    # two targets whose class counts still sum to the head's 3 outputs, so the weights load
    meta["target"], meta["model"]["targets"] = "task_x", {"a": ["x", "y"], "b": ["z"]}
    (run / "metrics.json").write_text(json.dumps(meta))
    _reseal(run)
    for argv in (["predict", "--run", run, "--text", "hi", "--device", "cpu"], ["analyze", "--run", run]):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and "single-target runs" in err and "Traceback" not in err


def test_predict_in_memory_writes_no_files_and_prints_nothing(demo32, capfd, tmp_path, monkeypatch):
    """No temporary cache per call (the temp dir and cwd are unchanged) and, with verbose=False, nothing
    on stdout/stderr, not even transformers' "Loading weights" bars on the first (loading) call."""
    import tempfile

    from mmcache.predict import Predictor

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.chdir(tmp_path)
    import transformers.utils.logging as tlog

    tlog.enable_progress_bar()  # the caller's setting: must be restored after the quiet call
    before = sorted(tmp_path.rglob("*"))
    capfd.readouterr()
    p = Predictor.from_run(demo32 / "runs" / "basic-mean", device="cpu")
    img = demo32 / "data" / "images" / "demo_0004.png"
    res = p.predict(texts=["what a lovely day"], images=[str(img)])
    again = p.predict(texts=["awful"], images=[str(img)])
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert sorted(tmp_path.rglob("*")) == before
    assert res.rows[0]["predicted"] in p.classes and again.rows[0]["predicted"] in p.classes
    assert res.cache_dir is None and tlog.is_progress_bar_enabled()


def test_bootstrap_intervals_narrow_with_more_posts_and_a_perfect_predictor_stays_at_one():
    from mmcache.fuse.bootstrap import metric_intervals

    rng = np.random.default_rng(0)
    perfect = rng.integers(0, 3, 50)
    assert all(v == [1.0, 1.0] for v in metric_intervals(perfect, perfect, 3).values())
    widths = []
    for n in (40, 4000):
        y = rng.integers(0, 3, n)
        pred = np.where(rng.random(n) < 0.7, y, (y + 1) % 3)  # ~70% accurate
        ci = metric_intervals(y, pred, 3)
        assert ci["accuracy"][0] <= float((pred == y).mean()) <= ci["accuracy"][1]
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    assert widths[1] < widths[0] / 4
    assert metric_intervals(np.zeros(0), np.zeros(0), 3)["macro_f1"] is None
