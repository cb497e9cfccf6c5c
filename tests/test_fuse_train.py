"""Stage two end to end on synthetic caches written with the real cache writer: data loading, the
trainer, run folders, evaluate, cross-dataset evaluation, and the `train-fusion` / `evaluate` CLI.

Padding invariance of the heads is tested in test_heads.py and not repeated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli as _run
from mmcache.fuse.data import load_data
from mmcache.fuse.evaluate import evaluate
from mmcache.fuse.heads import head_uses, list_heads
from mmcache.fuse.metrics import compute_metrics
from mmcache.fuse.synthetic import CLASSES, make_cache
from mmcache.fuse.train import TrainConfig, load_run_config, train

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import BadInputError, CacheError

HEADS = list_heads()
FEATURES = ["cls", "mean", "tokens"]
TINY = dict(dim=16, heads=2, layers=1, batch_size=16, eval_batch_size=64, threads=1)  # 1 thread: tiny ops, shared CPUs


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """cache/synth: 60 samples, text missing for rows 1 (train) and 40 (val), image for 50 (test)."""
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", text_invalid=(1, 40), image_invalid=(50,))
    make_cache(root, "synth2", seed=1)  # same encoders and classes: cross-dataset target
    return root


def _cfg(cache: Path, tmp_path: Path, **kw) -> TrainConfig:
    base = dict(TINY, dataset="synth", cache_dir=str(cache), runs_dir=str(tmp_path / "runs"), epochs=2, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("seconds", "run"):
        m.pop(key)
    return m


# --------------------------------------------------------------------------------------------- trainer

@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_for_every_features_mode(cache, tmp_path, head, features):
    r = train(_cfg(cache, tmp_path, head=head, features=features, label_smoothing=0.1, class_balanced=True))
    assert sorted(p.name for p in r.run_dir.iterdir()) == sorted(
        ["config.json", "provenance.json", "split.json", "history.json", "model.safetensors", "predictions.csv",
         "metrics.json", "manifest.json", "train.log"])
    assert len(r.history) == 2 and all(np.isfinite(h["train_loss"]) for h in r.history)
    assert r.history[0]["lr"] > 0 and r.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0
    assert r.config.modalities == sorted(head_uses(head), key=["text", "image"].index)
    for split in ("val", "test"):
        m = r.metrics[split]
        assert 0 <= m["accuracy"] <= 1 and len(m["confusion_matrix"]) == 3
    assert r.run_dir.name.startswith(f"synth-{head}-{features}-s0-")
    lines = (r.run_dir / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,true,predicted,p_negative,p_neutral,p_positive"
    assert len(lines) - 1 == r.metrics["test"]["n"]


@pytest.mark.parametrize("head", HEADS)
def test_each_head_overfits_tiny_cache(tmp_path, head):
    # weak class signal: the training set must be memorised, not just read off a centroid
    # and with no val split (allowed explicitly) the trainer keeps the last epoch's weights
    make_cache(tmp_path / "c", "tiny", n=32, signal=0.3, seed=3, all_train=True)
    r = train(TrainConfig(head=head, features="tokens", dataset="tiny", cache_dir=str(tmp_path / "c"),
                          runs_dir=str(tmp_path / "runs"), dim=32, heads=2, dropout=0.0, epochs=60, lr=3e-3,
                          batch_size=8, weight_decay=0.0, patience=0, warmup_frac=0.05, threads=1), allow_no_val=True)
    assert r.metrics["train"]["accuracy"] >= 0.95, r.metrics["train"]
    assert r.metrics["val"] is None and r.metrics["test"] is None and r.metrics["best_epoch"] == 60


def test_same_seed_same_numbers_and_from_saved_config(cache, tmp_path, capsys):
    cfg = _cfg(cache, tmp_path, head="self_attention", features="tokens", epochs=3, dropout=0.2)
    a, b = train(cfg), train(cfg)
    assert a.run_dir != b.run_dir  # the same name in the same second gets a -2 suffix
    assert _metrics(a.run_dir) == _metrics(b.run_dir)
    assert (a.run_dir / "predictions.csv").read_bytes() == (b.run_dir / "predictions.csv").read_bytes()
    assert (a.run_dir / "model.safetensors").read_bytes() == (b.run_dir / "model.safetensors").read_bytes()
    # the saved, resolved config reproduces the run (through the library and through the CLI)
    c = train(load_run_config(a.run_dir))
    assert _metrics(c.run_dir) == _metrics(a.run_dir)
    assert cli.main(["train-fusion", "--config", str(a.run_dir / "config.json"), "--quiet", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run.startswith(a.run_dir.name + "-")  # the saved run_name is taken: suffixed, never overwritten
    assert _metrics(tmp_path / "runs" / run) == _metrics(a.run_dir)
    # another seed gives other numbers
    d = train(_cfg(cache, tmp_path, head="self_attention", features="tokens", epochs=3, dropout=0.2, seed=1))
    assert (d.run_dir / "predictions.csv").read_bytes() != (a.run_dir / "predictions.csv").read_bytes()


def test_missing_modality_samples_are_dropped_and_counted(cache, tmp_path):
    both = train(_cfg(cache, tmp_path, head="basic", epochs=1)).metrics
    assert both["samples"] == {"train": 35, "val": 11, "test": 11}
    assert both["dropped"]["total"] == 3
    assert both["dropped"]["by_split"] == {"train": 1, "val": 1, "test": 1}
    assert both["dropped"]["by_modality"] == {"text": 2, "image": 1}
    text = train(_cfg(cache, tmp_path, head="text_only", epochs=1)).metrics
    assert text["samples"] == {"train": 35, "val": 11, "test": 12} and text["dropped"]["total"] == 2
    image = train(_cfg(cache, tmp_path, head="image_only", epochs=1)).metrics
    assert image["samples"] == {"train": 36, "val": 12, "test": 11}
    # an ablation loads both modalities once: every head then sees the same samples
    data = load_data("synth", modalities={"text", "image"}, features="cls", cache_dir=cache)
    r = train(_cfg(cache, tmp_path, head="text_only", epochs=1), data=data)
    assert r.metrics["samples"] == both["samples"] and r.config.modalities == ["text", "image"]
    assert train(load_run_config(r.run_dir)).metrics["samples"] == both["samples"]


def test_early_stopping_keeps_best_val_weights(cache, tmp_path):
    r = train(_cfg(cache, tmp_path, head="basic", epochs=40, patience=2, lr=1e-2))
    m = r.metrics
    assert m["stopped_early"] and m["epochs_run"] == m["best_epoch"] + 2
    best = r.history[m["best_epoch"] - 1]
    assert best["val_macro_f1"] == max(h["val_macro_f1"] for h in r.history) == pytest.approx(m["val"]["macro_f1"])


def test_cls_run_never_reads_tokens(cache, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(cache / "synth", root / "synth")
    for p in cf.list_feature_files(root / "synth"):
        with h5py.File(p, "r+") as f:
            del f["tokens"]
    seen = []
    real_load = cf.FeatureFile.load

    def spy(self, fields=("cls",), dtype="float32"):
        seen.extend(fields)
        return real_load(self, fields, dtype)

    monkeypatch.setattr(cf.FeatureFile, "load", spy)
    for features in ("cls", "mean"):
        train(TrainConfig(head="self_attention", features=features, cache_dir=str(root), runs_dir=str(tmp_path / "r"),
                          epochs=1, **TINY))
    assert set(seen) == {"cls", "mean"}
    seen.clear()
    data = load_data("synth", modalities={"text", "image"}, features="tokens", cache_dir=cache)
    assert seen == ["tokens", "mask", "tokens", "mask"]
    assert data.text.x.shape == (60, 6, 12) and data.text.x.dtype == torch.float16  # as stored
    assert data.image.mask.dtype == torch.bool
    t, tm, i, im = data.batch(data.split_rows["train"])
    assert t.dtype == i.dtype == torch.float32 and tm.dtype == torch.bool
    assert t.shape[1] == int(tm.sum(1).max()) <= 6  # cut to the batch's longest text


def test_vector_features_are_single_token_sequences(cache):
    data = load_data(None, modalities=("image",), features="mean", cache_dir=cache / ".." / cache.name,
                     image_cache=cache / "synth" / "image--tiny--image-enc.h5")
    assert data.dataset == "synth" and data.text is None
    assert data.image.x.shape == (60, 1, 16) and bool(data.image.mask.all())
    t, tm, i, im = data.batch(data.split_rows["train"][:5])
    assert t is None and tm is None and i.shape == (5, 1, 16) and im.shape == (5, 1)


# --------------------------------------------------------------------------------------------- cache checks

def test_unfinished_cache_is_refused(tmp_path):
    make_cache(tmp_path, "half", complete=False)
    with pytest.raises(CacheError, match=r"unfinished.*extract --dataset half.*resume"):
        load_data("half", modalities={"image"}, cache_dir=tmp_path)
    load_data("half", modalities={"text"}, cache_dir=tmp_path)  # the finished modality still loads


def test_cache_for_another_index_is_refused(tmp_path):
    paths = make_cache(tmp_path, "moved")
    idx = cf.read_index(paths["index"])
    cf.write_index(paths["index"], dataset="moved", classes=idx.classes, ids=list(idx.ids), labels=list(idx.labels),
                   splits=list(idx.splits), texts=[t + "!" for t in idx.texts], image_paths=list(idx.image_paths))
    with pytest.raises(CacheError, match="different sample index"):
        load_data("moved", modalities={"text"}, cache_dir=tmp_path)


def test_several_caches_need_a_choice(tmp_path):
    make_cache(tmp_path, "multi", extra_text_files=1)
    with pytest.raises(BadInputError, match=r"text--tiny--text-enc-v2\.h5.*--text-cache") as err:
        load_data("multi", modalities={"text"}, cache_dir=tmp_path)
    assert "text--tiny--text-enc.h5" in str(err.value)
    data = load_data("multi", modalities={"text"}, cache_dir=tmp_path, text_cache="text--tiny--text-enc-v2.h5")
    assert data.text.path.name == "text--tiny--text-enc-v2.h5"


def test_missing_cache_names_the_extract_command(tmp_path):
    with pytest.raises(CacheError, match=r"make extract DATASET=memotion"):
        load_data("memotion", modalities={"text"}, cache_dir=tmp_path)
    (tmp_path / "memotion").mkdir()
    cf.write_index(tmp_path / "memotion" / cf.INDEX_NAME, dataset="memotion", classes=CLASSES, ids=["a"], labels=[0],
                   splits=["train"], texts=["x"], image_paths=["a.png"])
    with pytest.raises(CacheError, match=r"no image feature cache.*python cli.py extract --dataset memotion"):
        load_data("memotion", modalities={"image"}, cache_dir=tmp_path)


def test_config_file_rejects_unknown_keys_and_types(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"head": "basic", "learning_rate": 1}))
    with pytest.raises(BadInputError, match="learning_rate"):
        TrainConfig.from_json(p)
    with pytest.raises(BadInputError, match="epochs"):
        TrainConfig.from_dict({"epochs": "ten"})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0
    with pytest.raises(BadInputError, match="needs image"):
        TrainConfig(head="basic", modalities=["text"]).validate()


def test_metrics_match_hand_computed():
    m = compute_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), ["a", "b", "c"])
    assert m["accuracy"] == 0.5 and m["n"] == 4
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(1 / 3), "recall": 1.0, "f1": 0.5, "support": 1}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 2 / 3 + 0.5) / 4)


# --------------------------------------------------------------------------------------------- evaluate

@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(head="dual_attention", features="tokens", dataset="synth", cache_dir=str(cache),
                             runs_dir=str(runs), epochs=4, lr=3e-3, **TINY))


def test_evaluate_rescores_identically(trained):
    e = evaluate(trained.run_dir)
    for key in ("n", "accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "loss"):
        assert e.metrics[key] == trained.metrics["test"][key], key
    assert e.predictions_path.read_bytes() == (trained.run_dir / "predictions.csv").read_bytes()
    assert evaluate(trained.run_dir, split="val", write=False).metrics["macro_f1"] == trained.metrics["val"]["macro_f1"]


def test_cross_dataset_evaluation(trained, cache, tmp_path):
    e = evaluate(trained.run_dir, "synth2")
    assert e.dataset == "synth2" and e.metrics["trained_on"] == "synth" and e.metrics["n"] == 12
    assert e.metrics_path.name == "synth2-test.json" and e.metrics["accuracy"] > 0.5  # same centroids
    make_cache(tmp_path, "twins", extra_text_files=1)  # two text caches: the one named like the run's is used
    assert evaluate(trained.run_dir, "twins", cache_dir=tmp_path, write=False).metrics["n"] == 12
    make_cache(tmp_path, "otherclasses", classes=["neg", "neu", "pos"])
    with pytest.raises(BadInputError, match="classes"):
        evaluate(trained.run_dir, "otherclasses", cache_dir=tmp_path)
    make_cache(tmp_path, "otherenc", image_model="tiny/other-image-enc")
    with pytest.raises(BadInputError, match="other-image-enc"):
        evaluate(trained.run_dir, "otherenc", cache_dir=tmp_path)
    make_cache(tmp_path, "otherdim", dt=20)
    with pytest.raises(BadInputError, match="20-d"):
        evaluate(trained.run_dir, "otherdim", cache_dir=tmp_path)


def test_unfinished_run_is_not_evaluated(trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained.run_dir, broken)
    (broken / "metrics.json").unlink()  # an unfinished run has neither its metrics nor its manifest
    (broken / "manifest.json").unlink()
    with pytest.raises(BadInputError, match="did not finish"):
        evaluate(broken)


# --------------------------------------------------------------------------------------------- CLI



def test_cli_train_and_evaluate(cache, tmp_path, capsys):
    code, out, err = _run(capsys, "train-fusion", "--head", "basic", "--dataset", "synth", "--cache-dir", str(cache),
                          "--runs-dir", str(tmp_path / "runs"), "--epochs", "2", "--dim", "16", "--lr", "0.003",
                          "--seed", "5", "--threads", "1", "--run-name", "cli-run", "--quiet")
    assert code == 0, err
    assert "macro-F1" in out and "val (best)" in out and "dropped 3 samples" in out
    run = tmp_path / "runs" / "cli-run"
    cfg = load_run_config(run)
    assert (cfg.seed, cfg.lr, cfg.dim, cfg.epochs, cfg.features, cfg.threads) == (5, 0.003, 16, 2, "cls", 1)
    code, out, err = _run(capsys, "evaluate", "--run", str(run), "--dataset", "synth2", "--json")
    assert code == 0, err
    assert json.loads(out)["dataset"] == "synth2"
    # config file + flag override
    code, out, err = _run(capsys, "train-fusion", "--config", str(run / "config.json"), "--seed", "6", "--quiet",
                          "--json")
    assert code == 0, err
    assert json.loads(out)["seed"] == 6


def test_cli_errors(cache, tmp_path, capsys):
    code, _, err = _run(capsys, "train-fusion", "--head", "nope", "--cache-dir", str(cache))
    assert code == 2 and all(h in err for h in HEADS)
    code, _, err = _run(capsys, "train-fusion", "--head", "basic", "--cache-dir", str(cache))
    assert code == 2 and "synth, synth2" in err and "--dataset" in err
    code, _, err = _run(capsys, "train-fusion", "--head", "basic", "--dataset", "memotion", "--cache-dir", str(cache))
    assert code == 2 and "make extract DATASET=memotion" in err  # an uncached dataset is bad input (issue 11)
    code, _, err = _run(capsys, "train-fusion", "--head", "basic", "--cache-dir", str(tmp_path / "empty"))
    assert code == 2 and "make extract" in err
    code, _, err = _run(capsys, "train-fusion", "--head", "basic", "--features", "pooled", "--cache-dir", str(cache))
    assert code == 2 and "cls, mean, tokens" in err
    code, _, err = _run(capsys, "evaluate", "--run", str(tmp_path / "nowhere"))
    assert code == 2 and "not a run folder" in err and "Traceback" not in err
