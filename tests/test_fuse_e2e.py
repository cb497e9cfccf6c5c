"""Both stages through the CLI: `extract` the demo dataset with tiny local encoders, then `train-fusion`
and `evaluate` on the cache the extraction code made (no synthetic shortcuts)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli as _run
from mmcache.fuse.heads import list_heads

from mmcache import cli


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    from mmcache.extract.demo_models import ensure_demo_models

    root = tmp_path_factory.mktemp("e2e")
    text_dir, image_dir = ensure_demo_models(root / "models")
    args = ["extract", "--dataset", "demo", "--data-dir", str(root / "demo"), "--option", "n=90",
            "--text-model", str(text_dir), "--image-model", str(image_dir), "--cache-dir", str(root / "cache"),
            "--text-max-length", "16", "--num-workers", "0", "--batch-size", "32", "--no-progress"]
    assert cli.main(args) == 0
    return root




@pytest.mark.parametrize("features", ["cls", "tokens"])
def test_train_fusion_on_extracted_demo_cache(demo_cache, capsys, features):
    runs = demo_cache / "runs"
    for head in list_heads():
        # no --dataset, no --text-cache/--image-cache: the only cached dataset and its only files are found
        code, out, err = _run(capsys, "train-fusion", "--head", head, "--features", features, "--cache-dir",
                              str(demo_cache / "cache"), "--runs-dir", str(runs), "--epochs", "3", "--dim", "16",
                              "--attention-heads", "2", "--lr", "0.003", "--threads", "1", "--run-name", f"{head}-{features}", "--quiet", "--json")
        assert code == 0, err
        m = json.loads(out)
        assert m["dataset"] == "demo" and m["epochs_run"] >= 1 and m["dropped"]["total"] == 0
        assert sum(m["samples"].values()) == 90 and m["test"]["n"] == m["samples"]["test"]
    run = runs / f"self_attention-{features}"
    prov = json.loads((run / "provenance.json").read_text())
    assert set(prov["caches"]) == {"text", "image"} and prov["caches"]["text"]["model"]
    code, out, err = _run(capsys, "evaluate", "--run", str(run), "--json")
    assert code == 0, err
    saved = json.loads((run / "metrics.json").read_text())["test"]
    assert json.loads(out)["macro_f1"] == saved["macro_f1"]
