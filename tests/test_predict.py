"""predict: a trained run applied to raw posts (encoders from its provenance, stage one's extraction
path, then the head). Tiny demo encoders and 60 demo posts, so the whole file runs in seconds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmcache import cli

N = 60


def _setup(root: Path, dtype: str) -> Path:
    from mmcache.extract.demo_models import ensure_demo_models
    from mmcache.extract.extraction import ExtractConfig, run_extract
    from mmcache.fuse.train import TrainConfig, train

    text_dir, image_dir = ensure_demo_models(root / "models")
    run_extract(ExtractConfig(dataset="demo", data_dir=root / "data", options={"n": N}, cache_dir=root / "cache",
                              text_model=str(text_dir), image_model=str(image_dir), device="cpu", precision="fp32",
                              num_workers=0, dtype=dtype, text_max_length=24, progress=False))
    for head, features in (("self_attention", "tokens"), ("basic", "mean")):
        train(TrainConfig(head=head, features=features, dataset="demo", dim=16, heads=2, epochs=3, threads=1,
                          cache_dir=str(root / "cache"), runs_dir=str(root / "runs"), run_name=f"{head}-{features}",
                          device="cpu"))
    return root


@pytest.fixture(scope="module", params=["float32", "float16"])
def demo(request, tmp_path_factory):
    return _setup(tmp_path_factory.mktemp(f"predict-{request.param}"), request.param)


@pytest.fixture(scope="module")
def demo32(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("predict-main"), "float32")


def _run(capsys, *argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _read_csv(path_or_text, is_text=False):
    import io

    text = path_or_text if is_text else Path(path_or_text).read_text()
    return list(csv.DictReader(io.StringIO(text)))


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
    return d / "manifest.csv"


@pytest.mark.parametrize("run_name", ["self_attention-tokens", "basic-mean"])
def test_every_manifest_row_gets_a_row_with_its_reason(demo32, capsys, run_name):
    manifest = _bad_manifest(demo32)
    out_file = demo32 / f"{run_name}.jsonl"
    code, out, err = _run(capsys, "predict", "--run", demo32 / "runs" / run_name, "--manifest", manifest,
                          "--output", out_file, "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ok", "ok#row2", "escape", "nofile", "broken", "notext"]
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


def test_a_different_encoder_is_refused(demo32, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo32 / "runs" / "basic-mean", run)
    prov = json.loads((run / "provenance.json").read_text())
    prov["caches"]["text"]["config"]["weights_sha256"] = "0" * 32
    (run / "provenance.json").write_text(json.dumps(prov))
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
