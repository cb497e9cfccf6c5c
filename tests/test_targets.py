"""Targets beyond the main label: reader declarations, the index round trip, --target in train-fusion /
evaluate / ablate, multi-target (task) heads with masked labels, and the bad-input exits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmcache.extract.datasets import (
    MISSING,
    OUTSIDE,
    Sample,
    get_dataset,
    list_datasets,
    load_dataset,
)
from mmcache.extract.datasets.memotion import SCALES
from mmcache.fuse import ablate as ab
from mmcache.fuse.data import load_data
from mmcache.fuse.evaluate import evaluate
from mmcache.fuse.synthetic import CLASSES, make_cache
from mmcache.fuse.targets import available_targets, resolve_target, target_loss
from mmcache.fuse.train import TrainConfig, train

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import BadInputError

TINY = dict(dim=16, heads=2, layers=1, batch_size=16, eval_batch_size=64, threads=1, epochs=3, lr=3e-3)
N = 60


def _codes(n: int = N) -> dict[str, tuple[list[str], list[int]]]:
    labels = (np.arange(n) * 7) % 3  # make_cache's labels (seed 0)
    binary = (labels == 0).astype(int)
    binary[np.arange(n) % 10 == 3] = MISSING
    binary[np.arange(n) % 10 == 7] = OUTSIDE
    return {"binary": (["other", "first"], binary.tolist()),
            "single": (["only", "never"], [0] * n),
            "shuffled": (list(CLASSES), np.random.default_rng(0).permutation(labels).tolist())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", targets=_codes(), tasks={"both": ["sentiment", "binary"]})
    make_cache(root, "legacy")  # an index written before targets existed
    return root


def _cfg(cache: Path, tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "dataset": "synth", "cache_dir": str(cache), "runs_dir": str(tmp_path / "runs"),
                          "head": "basic", **kw})


# --------------------------------------------------------------------------------------------- readers

@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_declares_targets(name):
    spec = get_dataset(name)
    names = [t.name for t in spec.targets]
    assert names and spec.targets[0].field is None, "the first target is the main label (the default)"
    assert len(set(names)) == len(names)
    for t in spec.targets[1:]:
        assert len(t.classes) >= 2 and len(set(t.classes)) == len(t.classes) and t.field
    for task, members in spec.tasks.items():
        assert task not in names and set(members) <= set(names) and len(members) >= 2


def test_memotion_declares_the_semeval_scales_in_order():
    spec = get_dataset("memotion")
    t = {x.name: x for x in spec.targets}
    assert t["sentiment"].classes == ("positive", "neutral", "negative")
    assert t["sarcasm"].classes == ("not_sarcastic", "general", "twisted_meaning", "very_twisted")
    assert t["humour"].classes == ("not_funny", "funny", "very_funny", "hilarious")
    assert t["offensive"].classes == ("not_offensive", "slight", "very_offensive", "hateful_offensive")
    assert t["motivational"].classes == ("not_motivational", "motivational")
    assert spec.tasks == {"task_b": ("humour_b", "sarcasm_b", "offensive_b", "motivational_b"),
                          "task_c": ("humour", "sarcasm", "offensive", "motivational")}
    sb = t["sarcasm_b"]
    s = Sample("x", "", None, 0, "positive", {"sarcasm": "Very_Twisted "})
    assert sb.code(s) == 1 and t["sarcasm"].code(s) == 3
    assert sb.code(Sample("x", "", None, 0, "positive", {"sarcasm": "not_sarcastic"})) == 0
    for value, want in (("", MISSING), (None, MISSING), ("sarcastic-ish", OUTSIDE)):
        assert t["sarcasm"].code(Sample("x", "", None, 0, "positive", {"sarcasm": value})) == want
    assert [get_dataset(n).targets[0].name for n in ("mvsa_single", "mvsa_multiple", "demo", "folder")] == [
        "sentiment", "sentiment", "sentiment", "label"]
    assert [x.name for x in get_dataset("mvsa_single").targets] == ["sentiment", "text_label", "image_label"]


def _memotion(root: Path, rows: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "image_name", "text_ocr", "text_corrected", "humour", "sarcasm", "offensive", "motivational",
                    "overall_sentiment"])
        for i, (sarcasm, s5) in enumerate(rows):
            w.writerow([i, f"image_{i}.jpg", "ocr", "text", "funny", sarcasm, "slight", "motivational", s5])
    return root


def test_memotion_target_codes_mask_missing_and_unknown(tmp_path):
    root = _memotion(tmp_path / "m", [("general", "positive"), ("", "negative"), ("very_twisted", "neutral"),
                                      ("sarcasm??", "very_negative")])
    res = load_dataset("memotion", root)
    codes = res.target_codes()
    assert codes["sarcasm"] == [1, MISSING, 3, OUTSIDE] and codes["sarcasm_b"] == [1, MISSING, 1, OUTSIDE]
    assert codes["sentiment"] == [0, 2, 1, 2] and codes["sentiment5"] == [1, 3, 2, 4]
    counts = res.target_counts()["sarcasm"]
    assert counts == {"not_sarcastic": 0, "general": 1, "twisted_meaning": 0, "very_twisted": 1, "missing": 1,
                      "outside_classes": 1}


def test_folder_targets_option(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    rows = [("a", "positive", "low", "x"), ("b", "negative", "high", "y"), ("c", "neutral", "", "y"),
            ("d", "positive", "mid", "z")]
    (root / "manifest.csv").write_text("id,text,image,label,level,tag\n" + "".join(
        f"{i},t,,{lbl},{lv},{tg}\n" for i, lbl, lv, tg in rows))
    res = load_dataset("folder", root, targets="level:low|mid|high,tag")
    t = {x.name: x for x in res.targets}
    assert list(t) == ["label", "level", "tag"] and t["label"].classes == ("positive", "neutral", "negative")
    assert t["level"].classes == ("low", "mid", "high") and t["tag"].classes == ("x", "y", "z")
    assert res.target_codes()["level"] == [0, 2, MISSING, 1]
    with pytest.raises(BadInputError, match="extra columns: level, tag"):
        load_dataset("folder", root, targets="nope")


# --------------------------------------------------------------------------------------------- index

def test_index_round_trip_of_targets(tmp_path):
    p = tmp_path / "index.h5"
    cf.write_index(p, dataset="d", classes=["a", "b"], ids=["1", "2", "3"], labels=[0, 1, 0],
                   splits=["train"] * 3, texts=["x"] * 3, image_paths=[""] * 3,
                   targets={"main": (["a", "b"], [0, 1, 0]), "deg": (["lo", "mid", "hi"], [2, MISSING, OUTSIDE])},
                   attrs={"default_target": "main", "tasks": {"t": ["main", "deg"]}})
    idx = cf.read_index(p)
    assert idx.target_classes == {"main": ["a", "b"], "deg": ["lo", "mid", "hi"]}
    assert idx.targets["deg"].tolist() == [2, -1, -2] and idx.targets["deg"].dtype == np.int64
    assert idx.default_target == "main" and idx.tasks == {"t": ["main", "deg"]}
    target, labels = resolve_target(idx, "t")
    assert target.members == ("main", "deg") and target.sizes == [2, 3] and labels.tolist() == [[0, 2], [1, -1], [0, -2]]
    assert resolve_target(idx, None)[0].name == "main"


def test_index_without_targets_offers_only_the_label(cache):
    idx = cf.read_index(cache / "legacy" / cf.INDEX_NAME)
    assert available_targets(idx) == ({"label": CLASSES}, {}, "label")
    with pytest.raises(BadInputError, match="predates targets: re-run the extract command"):
        resolve_target(idx, "sarcasm")


def test_relabelling_rewrites_only_the_index(tmp_path):
    """A new label value re-runs as an index update: same fingerprint, so feature files stay valid."""
    from mmcache.extract.extraction import ExtractConfig, prepare_index

    root = tmp_path / "f"
    root.mkdir()
    manifest = root / "manifest.csv"
    manifest.write_text("id,text,image,label,level\na,t,,positive,low\nb,u,,negative,high\nc,v,,neutral,low\n")
    cfg = ExtractConfig(dataset="folder", data_dir=root, options={"targets": "level"}, cache_dir=tmp_path / "cache")
    first = prepare_index(cfg)
    manifest.write_text("id,text,image,label,level\na,t,,positive,high\nb,u,,negative,high\nc,v,,neutral,low\n")
    second = prepare_index(cfg)
    assert first.status == "written" and second.status == "updated" and second.fingerprint == first.fingerprint
    idx = cf.read_index(second.path)
    assert idx.targets["level"].tolist() == [0, 0, 1] and idx.target_classes["level"] == ["high", "low"]


# --------------------------------------------------------------------------------------------- training

def test_single_target_run_records_target(cache, tmp_path):
    r = train(_cfg(cache, tmp_path, target="binary"))
    cfg = json.loads((r.run_dir / "config.json").read_text())
    assert cfg["target"] == "binary"
    m = r.metrics
    assert m["target"] == "binary" and m["model"]["targets"] == {"binary": ["other", "first"]}
    assert len(m["test"]["per_class"]) == 2 and m["test"]["target"] == "binary"
    # rows with a masked label are left out (counted per reason and split), never a class
    masked = m["dropped"]["target"]["masked"]["binary"]
    assert masked["missing"] == {"train": 4, "val": 1, "test": 1} and sum(masked["outside_classes"].values()) == 6
    assert sum(m["samples"].values()) == N - 12
    rows = list(csv.DictReader((r.run_dir / "predictions.csv").open()))
    assert list(rows[0]) == ["id", "true", "predicted", "p_other", "p_first"]
    assert all(x["true"] in ("other", "first") for x in rows)
    # the default run's config resolves to the index's default target
    assert train(_cfg(cache, tmp_path, epochs=1)).config.target == "sentiment"


def test_task_trains_one_head_with_per_target_metrics(cache, tmp_path):
    from sklearn.metrics import f1_score

    r = train(_cfg(cache, tmp_path, target="both", class_balanced=True))
    m = r.metrics
    assert m["model"]["targets"] == {"sentiment": CLASSES, "binary": ["other", "first"]}
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(r.run_dir / "model.safetensors"))
    assert state["classifier.3.weight"].shape[0] == 5  # one stacked linear classifier per target: 3 + 2 outputs
    test = m["test"]
    assert set(test["targets"]) == {"sentiment", "binary"} and test["n"] == 12  # rows with >= 1 label all kept
    rows = list(csv.DictReader((r.run_dir / "predictions.csv").open()))
    assert list(rows[0])[:4] == ["id", "sentiment:true", "sentiment:predicted", "sentiment:p_negative"]
    f1s = []
    for t, classes in (("sentiment", CLASSES), ("binary", ["other", "first"])):
        lab = [x for x in rows if x[f"{t}:true"]]
        f1 = f1_score([x[f"{t}:true"] for x in lab], [x[f"{t}:predicted"] for x in lab], labels=classes,
                      average="macro", zero_division=0)
        assert test["targets"][t]["macro_f1"] == pytest.approx(f1) and test["targets"][t]["n"] == len(lab)
        f1s.append(f1)
    assert len([x for x in rows if x["binary:true"]]) == 10  # 2 of the 12 test rows have a masked binary label
    assert test["task_score"] == pytest.approx(np.mean(f1s)) == pytest.approx(test["macro_f1"])
    history = json.loads((r.run_dir / "history.json").read_text())
    assert m["val"]["macro_f1"] == pytest.approx(max(h["val_macro_f1"] for h in history))  # early stopping on the mean
    assert set(history[0]["val_target_macro_f1"]) == {"sentiment", "binary"}
    ev = evaluate(r.run_dir)  # evaluate rebuilds the multi-target head and scores the same numbers
    assert ev.metrics["task_score"] == pytest.approx(test["task_score"])


def test_masked_labels_do_not_move_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    labels = torch.tensor([[0, 1], [2, -1], [1, 0], [0, -2]])
    loss = target_loss(logits, labels, [3, 2])
    want = (F.cross_entropy(logits[:, :3], labels[:, 0]) + F.cross_entropy(logits[[0, 2], 3:], labels[[0, 2], 1])) / 2
    assert loss.item() == pytest.approx(want.item())
    noisy = logits.clone()
    noisy[[1, 3], 3:] += 100.0  # the masked rows' binary logits: no effect
    assert target_loss(noisy, labels, [3, 2]).item() == pytest.approx(loss.item())
    # one target, all labelled: exactly the plain cross-entropy
    assert target_loss(logits[:, :3], labels[:, :1], [3]).item() == F.cross_entropy(logits[:, :3], labels[:, 0]).item()


def test_evaluate_against_another_target(cache, tmp_path):
    r = train(_cfg(cache, tmp_path, target="binary", epochs=1))
    with pytest.raises(BadInputError, match="classes"):
        evaluate(r.run_dir, target="sentiment")
    # same classes (as MVSA sentiment vs image_label): scored against the other labels, filed apart
    s = train(_cfg(cache, tmp_path, epochs=2))
    own, other = evaluate(s.run_dir), evaluate(s.run_dir, target="shuffled")
    assert own.metrics_path.name == "synth-test.json" and other.metrics_path.name == "synth-test-shuffled.json"
    assert other.metrics["target"] == "shuffled" and other.metrics["trained_target"] == "sentiment"
    assert own.metrics["macro_f1"] == pytest.approx(s.metrics["test"]["macro_f1"])
    preds = [r["predicted"] for r in csv.DictReader(other.predictions_path.open())]
    assert preds == [r["predicted"] for r in csv.DictReader(own.predictions_path.open())]  # same model outputs
    idx = cf.read_index(cache / "synth" / cf.INDEX_NAME)
    rows = np.flatnonzero(idx.splits == "test")
    assert [r["true"] for r in csv.DictReader(other.predictions_path.open())] == [
        CLASSES[int(idx.targets["shuffled"][i])] for i in rows]
    d = load_data("synth", modalities=["text", "image"], cache_dir=cache, target="both")
    assert d.target.members == ("sentiment", "binary") and d.with_target("binary").target_labels.shape == (N, 1)


# --------------------------------------------------------------------------------------------- bad input (CLI)

def _train_cli(cache, tmp_path, *extra) -> int:
    return cli.main(["train-fusion", "--head", "basic", "-d", "synth", "--cache-dir", str(cache), "--runs-dir",
                     str(tmp_path / "runs"), "--epochs", "1", "--dim", "8", "--threads", "1", "-q", *extra])


def test_unknown_target_exits_2_listing_targets(cache, tmp_path, capsys):
    assert _train_cli(cache, tmp_path, "--target", "sarcasm") == 2
    err = capsys.readouterr().err
    assert "no target 'sarcasm'" in err and "sentiment (default), binary, single, shuffled" in err and "both" in err
    assert not (tmp_path / "runs").exists()


def test_target_with_one_class_in_train_exits_2(cache, tmp_path, capsys):
    assert _train_cli(cache, tmp_path, "--target", "single") == 2
    assert "target 'single' has 1 class(es) in the training split (only)" in capsys.readouterr().err


def test_cli_target_trains_and_ablate_unknown_target(cache, tmp_path, capsys):
    assert _train_cli(cache, tmp_path, "--target", "both") == 0
    out = capsys.readouterr().out
    assert "target both (sentiment, binary)" in out and "test recall per class, binary:" in out
    rc = cli.main(["ablate", "-d", "synth", "--cache-dir", str(cache), "--runs-dir", str(tmp_path / "ab"),
                   "--results-dir", str(tmp_path / "res"), "--targets", "nope", "--seeds", "1"])
    assert rc == 2 and "no target 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- ablate

def test_ablate_target_axis_one_table_each(cache, tmp_path):
    kw = dict(heads=["basic"], features=["cls"], seeds=1, cache_dir=cache, runs_dir=tmp_path / "runs",
              datasets=["synth"])
    base = TrainConfig(**TINY)
    runs = ab.expand_grid(base, targets=["sentiment", "both"], **kw)
    assert [r.target for r in runs] == ["both", "sentiment"]
    plain = ab.expand_grid(base, **kw)  # no --targets: the default; same key and folder as --targets sentiment
    assert plain[0].run_dir == next(r.run_dir for r in runs if r.target == "sentiment")
    assert "-both-" in next(r.name for r in runs if r.target == "both")
    assert len(ab.run_grid(runs, threads=1)["trained"]) == 2
    assert ab.run_grid(runs, threads=1)["reused"] == [r.name for r in runs]  # finished runs are recognised
    tables = ab.aggregate(runs)
    assert set(tables) == {"synth", "synth-both"} and tables["synth-both"]["target"] == "both"
    row = tables["synth-both"]["rows"][0]
    assert set(row["targets"]) == {"sentiment", "binary"} and row["macro_f1"]["mean"] == pytest.approx(
        np.mean([row["targets"][t]["mean"] for t in ("sentiment", "binary")]))
    assert "min_recall" in tables["synth"]["rows"][0]
    files = ab.write_results(tables, tmp_path / "res", plots=False)
    assert files["synth-both"][0].name == "ablation_synth-both.md"
    md = files["synth-both"][0].read_text()
    assert "target both" in md and "binary macro-F1" in md and "task score" in md
    head = files["synth-both"][1].read_text().splitlines()[0].split(",")
    assert head[:2] == ["dataset", "target"] and "binary_macro_f1_mean" in head


def test_task_reference_rows_for_memotion(tmp_path):
    make_cache(tmp_path / "c", "memotion", n=30, dt=8, di=8, lt=3, li=2,
               targets={"humour_b": (["a", "b"], [i % 2 for i in range(30)]),
                        "sarcasm_b": (["a", "b"], [(i // 2) % 2 for i in range(30)])},
               tasks={"task_b": ["humour_b", "sarcasm_b"]})
    runs = ab.expand_grid(TrainConfig(**TINY), heads=["basic"], features=["cls"], seeds=1, cache_dir=tmp_path / "c",
                          runs_dir=tmp_path / "runs", targets=["task_b"])
    refs = ab.aggregate(runs)["memotion-task_b"]["references"]
    assert [r["macro_f1"] for r in refs] == [0.51] and "SemEval-2020 Task 8" in refs[0]["source"]


# --------------------------------------------------------------------------------------------- real data

@pytest.mark.shared_data
def test_memotion_target_counts_match_labels_csv():
    root = Path("../shared/data/memotion7k")
    if not (root / "labels.csv").is_file():
        pytest.skip("../shared/data/memotion7k not available")
    res = load_dataset("memotion", root)
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = {s.id for s in res.samples}
    rows = [r for r in rows if Path(r["image_name"].strip()).stem in kept]
    counts = res.target_counts()
    for col, scale in SCALES.items():
        want = {c: sum(r[col].strip().lower() == c for r in rows) for c in scale}
        assert counts[col] == want, col
    assert counts["sarcasm"] == {"not_sarcastic": 1544, "general": 3507, "twisted_meaning": 1547, "very_twisted": 394}
    assert counts["sarcasm_b"] == {"not_sarcastic": 1544, "sarcastic": 3507 + 1547 + 394}
