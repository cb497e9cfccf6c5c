"""The split is part of the data (issue 16, issue 10 items 1 and 9).

Stage one: a later ``extract`` without split flags keeps the stored split exactly (another modality,
another encoder); asking for another split exits 2 unless ``--resplit``, which records the change. Stage
two: every run records its split; ``evaluate`` refuses a run whose split the cache no longer has (or
scores its original test ids, or the current split labelled as such); ``ablate`` marks such runs stale;
training without a validation split is refused unless ``--allow-no-val``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as _run
from mmcache.extract import tiny_models as tm
from mmcache.extract.datasets import Sample, load_dataset
from mmcache.extract.split_policy import decide_split
from mmcache.fuse.heads import head_uses, list_heads

from mmcache import cache as cf
from mmcache.errors import BadInputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"




# --------------------------------------------------------------------------------------------- stage one

@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    """Tiny demo encoders, 30 demo posts and a split file for them (ids sorted: 18 / 6 / 6)."""
    from mmcache.extract.demo_models import ensure_demo_models

    root = tmp_path_factory.mktemp("split_identity")
    text_dir, image_dir = ensure_demo_models(root / "models")
    other_text = tm.build_bert(root / "models" / "bert-other", hidden_size=16, num_heads=2, seed=5)
    data = root / "demo"
    ids = sorted(s.id for s in load_dataset("demo", data, n="30").samples)
    split_file = root / "split.csv"
    split_file.write_text("id,split\n" + "".join(
        f"{sid},{'train' if k < 18 else 'val' if k < 24 else 'test'}\n" for k, sid in enumerate(ids)))
    return {"root": root, "text": text_dir, "image": image_dir, "other_text": other_text, "data": data,
            "split_file": split_file, "ids": ids}


def _extract_args(env, cache, *extra):
    return ["extract", "--dataset", "demo", "--data-dir", env["data"], "--option", "n=30",
            "--text-model", env["text"], "--image-model", env["image"], "--cache-dir", cache,
            "--num-workers", "0", "--batch-size", "16", "--no-progress", *extra]


def _split_of(cache: Path) -> tuple[dict[str, str], cf.SampleIndex]:
    idx = cf.read_index(cache / "demo" / cf.INDEX_NAME)
    return dict(zip(idx.ids, idx.splits, strict=True)), idx


@pytest.mark.slow
def test_second_modality_and_encoder_keep_the_split_resplit_needs_the_flag(demo_env, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, err = _run(capsys, *_extract_args(demo_env, cache, "--modality", "text",
                                                 "--split-file", demo_env["split_file"]))
    assert code == 0, err
    assert "split: file" in out
    chosen, idx = _split_of(cache)
    assert idx.split_spec["kind"] == "file" and cf.split_counts(idx.splits) == {"train": 18, "val": 6, "test": 6}
    fp = idx.split_fingerprint

    # the image features, then a second text encoder: no split flag, the split is kept exactly
    for extra in (["--modality", "image"], ["--modality", "text", "--text-model", demo_env["other_text"]]):
        code, out, err = _run(capsys, *_extract_args(demo_env, cache, *extra))
        assert code == 0, err
        assert "kept from the cache" in out
        now, idx = _split_of(cache)
        assert now == chosen and idx.split_fingerprint == fp and idx.split_spec["kind"] == "file"
    assert len(cf.list_feature_files(cache / "demo")) == 3

    # inspect shows the split the cache holds and what extract would do with it
    inspect = ["inspect", "-d", "demo", "--data-dir", demo_env["data"], "-o", "n=30", "--cache-dir", cache]
    code, out, err = _run(capsys, *inspect, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["split_spec"]["kind"] == "file" and "extract keeps it" in s["cache_split"]
    assert {k: sum(v.values()) for k, v in s["split_counts"].items()} == {"train": 18, "val": 6, "test": 6}
    code, out, err = _run(capsys, *inspect, "--seed", "1")
    assert code == 0 and "refused without --resplit" in out and "split: stratified(seed=1" in out

    # asking for another split without --resplit: exit 2 naming both, nothing written
    before = (cache / "demo" / cf.INDEX_NAME).read_bytes()
    code, out, err = _run(capsys, *_extract_args(demo_env, cache, "--modality", "image", "--seed", "1"))
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert f"file {demo_env['split_file']}" in err and "seeded (seed 1" in err and "--resplit" in err
    assert (cache / "demo" / cf.INDEX_NAME).read_bytes() == before

    # the same split asked for again is no re-split
    code, out, err = _run(capsys, *_extract_args(demo_env, cache, "--modality", "image",
                                                 "--split-file", demo_env["split_file"]))
    assert code == 0, err
    assert _split_of(cache)[0] == chosen

    # --resplit: replaced, the moves printed, recorded in the history; features untouched
    code, out, err = _run(capsys, *_extract_args(demo_env, cache, "--modality", "image", "--seed", "1",
                                                 "--resplit"))
    assert code == 0, err
    assert "RE-SPLIT" in out and "samples moved" in out and "up to date" in out
    now, idx = _split_of(cache)
    assert now != chosen and idx.split_spec == {"kind": "seeded", "seed": 1, "ratios": [0.8, 0.1, 0.1]}
    [entry] = idx.split_history
    assert entry["from"]["kind"] == "file" and entry["to"]["kind"] == "seeded"
    assert entry["from_fingerprint"] == fp and entry["to_fingerprint"] == idx.split_fingerprint
    assert sum(entry["moved"].values()) == sum(chosen[i] != now[i] for i in chosen) > 0

    # cache info shows the source and the counts
    code, out, err = _run(capsys, "cache", "info", cache, "--json")
    assert code == 0, err
    info = next(e for e in json.loads(out) if e["kind"] == "index")
    assert info["split_source"].startswith("seeded (seed 1") and info["split_fingerprint"] == idx.split_fingerprint
    assert sum(info["splits"].values()) == 30 and len(info["split_history"]) == 1
    code, out, err = _run(capsys, "cache", "info", cache)
    assert "seeded (seed 1" in out


def test_split_file_matching_no_id_is_refused(demo_env, tmp_path, capsys):
    bad = tmp_path / "other.csv"
    bad.write_text("id,split\nnot-a-demo-id,train\nnor-this,test\n")
    code, out, err = _run(capsys, *_extract_args(demo_env, tmp_path / "cache", "--modality", "text",
                                                 "--split-file", bad))
    assert code == 2 and "matches none of the 30 sample ids" in err
    assert not (tmp_path / "cache" / "demo" / cf.INDEX_NAME).exists()
    code, out, err = _run(capsys, "inspect", "--dataset", "demo", "--data-dir", demo_env["data"], "-o", "n=30",
                          "--split-file", bad)
    assert code == 2 and "matches none" in err


def _samples(ids, split=None):
    return [Sample(sid, f"text {sid}", None, k % 3, "x", split=split) for k, sid in enumerate(ids)]


def _index(tmp_path, samples, decision) -> cf.SampleIndex:
    path = tmp_path / "index.h5"
    cf.write_index(path, dataset="t", classes=["a", "b", "c"], ids=[s.id for s in samples],
                   labels=[s.label for s in samples], splits=[decision.assignment[s.id] for s in samples],
                   texts=[s.text for s in samples], image_paths=[""] * len(samples), split_spec=decision.spec,
                   split_history=decision.history)
    return cf.read_index(path)


def test_new_samples_go_to_none_and_empty_splits_warn(tmp_path):
    ids = [f"p{i:02d}" for i in range(20)]
    first = decide_split(_samples(ids), None)
    assert first.status == "new" and first.spec["kind"] == "seeded" and not first.warnings
    stored = _index(tmp_path, _samples(ids), first)
    grown = _samples([*ids, "p98", "p99"])
    kept = decide_split(grown, stored)
    assert kept.status == "kept" and kept.spec == first.spec
    assert {i: kept.assignment[i] for i in ids} == first.assignment
    assert kept.assignment["p98"] == kept.assignment["p99"] == "none"
    assert any("2 samples are new" in w and "--resplit" in w for w in kept.warnings)
    with pytest.raises(BadInputError, match="needs the split to use"):
        decide_split(grown, stored, resplit=True)
    resplit = decide_split(grown, stored, seed=0, resplit=True)
    assert resplit.status == "resplit" and "none" not in resplit.assignment.values()
    # a split file that leaves val and test empty: warned at extract
    f = tmp_path / "all_train.csv"
    f.write_text("id,split\n" + "".join(f"{i},train\n" for i in ids))
    d = decide_split(_samples(ids), None, split_file=f)
    assert any("val split is empty" in w and "--allow-no-val" in w for w in d.warnings)
    assert any("test split is empty" in w for w in d.warnings)


def test_inspect_warns_about_an_empty_val_split(tmp_path, capsys):
    data = tmp_path / "demo"
    ids = sorted(s.id for s in load_dataset("demo", data, n="12").samples)
    f = tmp_path / "no_val.csv"
    f.write_text("id,split\n" + "".join(f"{i},{'train' if k < 9 else 'test'}\n" for k, i in enumerate(ids)))
    code, out, err = _run(capsys, "inspect", "-d", "demo", "--data-dir", data, "-o", "n=12", "--split-file", f)
    assert code == 0, err
    assert "warning: the val split is empty" in out and "test split is empty" not in out


def test_manifest_column_is_kept_and_an_edited_one_needs_resplit(tmp_path):
    ids = [f"m{i:02d}" for i in range(9)]
    samples = _samples(ids)
    for k, s in enumerate(samples):
        s.split = ("train", "val", "test")[k % 3]
    first = decide_split(samples, None)
    assert first.spec["kind"] == "manifest"
    stored = _index(tmp_path, samples, first)
    assert decide_split(samples, stored).status == "same"
    samples[0].split = "test"
    with pytest.raises(BadInputError, match="manifest split column"):
        decide_split(samples, stored)
    assert decide_split(samples, stored, resplit=True).assignment[ids[0]] == "test"


def test_legacy_index_without_a_source_keeps_its_split(tmp_path):
    """An index written before split sources were stored: its split is the recorded one."""
    import h5py

    ids = [f"o{i:02d}" for i in range(12)]
    samples = _samples(ids)
    first = decide_split(samples, None, seed=3)
    stored = _index(tmp_path, samples, first)
    with h5py.File(tmp_path / "index.h5", "r+") as f:
        for key in ("split_spec", "split_fingerprint", "split_history"):
            del f.attrs[key]
        f.attrs["split_source"] = "stratified(seed=3, ratios=0.8/0.1/0.1)"
    stored = cf.read_index(tmp_path / "index.h5")
    assert stored.split_spec["kind"] == "unrecorded" and "seed=3" in cf.split_spec_text(stored.split_spec)
    assert stored.split_fingerprint == cf.split_fingerprint(ids, [first.assignment[i] for i in ids])
    kept = decide_split(samples, stored)
    assert kept.assignment == first.assignment and kept.spec["kind"] == "unrecorded"
    with pytest.raises(BadInputError):
        decide_split(samples, stored, seed=0)  # seed 0 differs from the seed-3 split it holds
    assert decide_split(samples, stored, seed=3).spec["kind"] == "seeded"  # same split: the source is learnt


@pytest.mark.shared_data
@pytest.mark.slow
def test_clmlf_split_survives_adding_the_images(tmp_path, capsys):
    """The issue's case: MVSA-Single text with the CLMLF split, then the images without --split-file."""
    data, split = SHARED / "mvsa_single_sample", SHARED / "splits" / "mvsa_single_clmlf"
    if not (data.is_dir() and split.is_dir()):
        pytest.skip("../shared/data with the MVSA-Single sample and the CLMLF split is not here")
    models = tmp_path / "models"
    text = tm.build_bert(models / "bert", hidden_size=16, num_heads=2, seed=1)
    image = tm.build_dinov2(models / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32, seed=2)
    cache = tmp_path / "cache"
    base = ["extract", "-d", "mvsa_single", "--data-dir", data, "--text-model", text, "--image-model", image,
            "--cache-dir", cache, "--num-workers", "0", "--batch-size", "64", "--no-progress"]
    code, out, err = _run(capsys, *base, "--modality", "text", "--split-file", split)
    assert code == 0, err
    before = dict(zip(*(lambda i: (i.ids, i.splits))(cf.read_index(cache / "mvsa_single" / cf.INDEX_NAME)),
                      strict=True))
    code, out, err = _run(capsys, *base, "--modality", "image")
    assert code == 0, err
    idx = cf.read_index(cache / "mvsa_single" / cf.INDEX_NAME)
    after = dict(zip(idx.ids, idx.splits, strict=True))
    assert after == before and idx.split_spec["kind"] == "file"
    test_ids = {i for i, s in after.items() if s == "test"}
    assert test_ids and test_ids == {i for i, s in before.items() if s == "test"}
    assert len(test_ids) == 82  # the CLMLF test posts among the sample's 931 (a seed-0 re-split kept 3 of them)


# --------------------------------------------------------------------------------------------- stage two

TINY = dict(dim=8, heads=2, epochs=2, batch_size=16, lr=3e-3, patience=0, device="cpu", threads=1)


def _resplit_index(cache: Path, dataset: str, seed: int) -> cf.SampleIndex:
    """What `extract --resplit` does to the index: the same samples (features stay valid), another split."""
    path = cache / dataset / cf.INDEX_NAME
    idx = cf.read_index(path)
    new = np.random.default_rng(seed).permutation(np.asarray(idx.splits, dtype=object)).tolist()
    cf.write_index(path, dataset=idx.dataset, classes=idx.classes, ids=list(idx.ids), labels=idx.labels.tolist(),
                   splits=new, texts=list(idx.texts), image_paths=list(idx.image_paths),
                   split_spec={"kind": "seeded", "seed": seed, "ratios": [0.6, 0.2, 0.2]},
                   split_history=[{"from": idx.split_spec, "to": {"kind": "seeded", "seed": seed}}])
    out = cf.read_index(path)
    assert out.fingerprint == idx.fingerprint and out.split_fingerprint != idx.split_fingerprint
    return out


@pytest.fixture
def synth(tmp_path):
    from mmcache.fuse.synthetic import make_cache

    make_cache(tmp_path / "cache", "synth", n=40, dt=8, di=8, lt=4, li=3)
    return tmp_path / "cache"


def _train(cache, tmp_path, **kw):
    from mmcache.fuse.train import TrainConfig, train

    return train(TrainConfig(**{**TINY, "head": "basic", "dataset": "synth", "cache_dir": str(cache),
                                "runs_dir": str(tmp_path / "runs"), **kw}))


def test_run_records_its_split_and_evaluate_refuses_after_a_resplit(synth, tmp_path, capsys):
    from mmcache.fuse.evaluate import evaluate

    r = _train(synth, tmp_path)
    idx = cf.read_index(synth / "synth" / cf.INDEX_NAME)
    rec = json.loads((r.run_dir / "split.json").read_text())
    assert rec["fingerprint"] == idx.split_fingerprint == r.metrics["split"]["fingerprint"]
    assert rec["ids"] == idx.split_ids() and rec["counts"] == {"train": 24, "val": 8, "test": 8}
    same = evaluate(r.run_dir, write=False)
    assert same.metrics["split_scored"]["which"] == "run"
    assert same.metrics["accuracy"] == r.metrics["test"]["accuracy"] and same.metrics["n"] == r.metrics["test"]["n"]

    _resplit_index(synth, "synth", seed=5)
    with pytest.raises(BadInputError, match="split of synth changed since run") as e:
        evaluate(r.run_dir, write=False)
    assert "--original-split" in str(e.value) and "--current-split" in str(e.value)
    code, out, err = _run(capsys, "evaluate", "--run", r.run_dir)
    assert code == 2 and "changed since run" in err and len(err.strip().splitlines()) == 1
    assert not (r.run_dir / "evaluations").exists()  # nothing written on a refusal

    # --original-split: the run's own test ids, hence its own numbers
    orig = evaluate(r.run_dir, split_choice="original")
    assert orig.metrics["split_scored"]["which"] == "original"
    assert orig.metrics["n"] == r.metrics["test"]["n"] and orig.metrics["macro_f1"] == r.metrics["test"]["macro_f1"]
    assert sorted(ln.split(",")[0] for ln in orig.predictions_path.read_text().splitlines()[1:]) == \
        sorted(rec["ids"]["test"])
    # --current-split: the cache's test split, labelled as not the run's, in a file of its own
    code, out, err = _run(capsys, "evaluate", "--run", r.run_dir, "--current-split", "--json")
    assert code == 0, err
    cur = json.loads(out)["split_scored"]
    assert cur["which"] == "current" and cur["run_split"] == rec["fingerprint"] and cur["seen_in_training"] > 0
    assert any("-current-" in p.name for p in (r.run_dir / "evaluations").iterdir())
    code, out, err = _run(capsys, "evaluate", "--run", r.run_dir, "--current-split")
    assert "NOT the run's" in out
    assert _run(capsys, "evaluate", "--run", r.run_dir, "--current-split", "--original-split")[0] == 2


def test_run_without_a_split_record_is_not_trusted_after_the_index_changed(synth, tmp_path):
    from mmcache.fuse.evaluate import evaluate

    r = _train(synth, tmp_path)
    (r.run_dir / "split.json").unlink()  # a run made before runs recorded their split (and before manifests)
    (r.run_dir / "manifest.json").unlink()
    with pytest.raises(BadInputError, match="no split record"):
        evaluate(r.run_dir, write=False)
    assert evaluate(r.run_dir, write=False, split_choice="current").metrics["split_scored"]["which"] == "current"


def test_reproducing_a_run_on_another_split_warns(synth, tmp_path, capsys, caplog):
    r = _train(synth, tmp_path)
    _resplit_index(synth, "synth", seed=6)
    with caplog.at_level("WARNING"):
        code, out, err = _run(capsys, "train-fusion", "--config", r.run_dir / "config.json", "--quiet")
    assert code == 0, err
    assert any("does not reproduce it" in rec.getMessage() for rec in caplog.records)


def test_no_validation_split_is_refused_unless_allowed(tmp_path, capsys):
    from mmcache.fuse.synthetic import make_cache

    make_cache(tmp_path / "cache", "allt", n=20, dt=8, di=8, lt=4, li=3, all_train=True)
    args = ["train-fusion", "--head", "text_only", "--dataset", "allt", "--cache-dir", tmp_path / "cache",
            "--runs-dir", tmp_path / "runs", "--epochs", "2", "--dim", "8", "--device", "cpu", "--quiet"]
    code, out, err = _run(capsys, *args)
    assert code == 2 and "no validation samples" in err and "--allow-no-val" in err
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made
    code, out, err = _run(capsys, *args, "--allow-no-val", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["val"] is None and m["best_epoch"] == 2


@pytest.mark.slow
def test_ablate_marks_runs_of_an_old_split_stale(synth, tmp_path):
    import dataclasses

    import mmcache.fuse.ablate as ab
    from mmcache.fuse.train import TrainConfig

    base = TrainConfig(**TINY)
    cfg = ab.AblationConfig(datasets=["synth"], heads=["text_only"], features=["cls"], seeds=1, base=base,
                            cache_dir=str(synth), runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"),
                            plots=False)
    first = ab.run_ablation(cfg)
    [old] = first.runs
    assert first.tables["synth"]["split"]["fingerprint"] == old.split_fingerprint
    new_idx = _resplit_index(synth, "synth", seed=7)
    # the same folder found again under the new split: stale, and rerun
    moved = dataclasses.replace(old, split_fingerprint=new_idx.split_fingerprint)
    assert ab.run_status(moved) == "stale"
    done = ab.run_grid([moved])
    assert done["stale"] == [old.name] and done["trained"] == [old.name] and ab.run_status(moved) == "finished"
    # a fresh ablation: the old split's runs are named in the table as left out, the split in its header
    old_dir = tmp_path / "runs" / "synth" / old.name
    assert old_dir.is_dir()
    (old_dir / "split.json").write_text(json.dumps({"fingerprint": old.split_fingerprint, "ids": {}}))
    second = ab.run_ablation(cfg)
    [new] = second.runs
    assert new.name != old.name  # the key hashes the split: the old split's results are kept, not overwritten
    table = second.tables["synth"]
    assert table["split"]["fingerprint"] == new_idx.split_fingerprint
    assert table["stale_runs"] == [old.name]
    md = (tmp_path / "res" / "ablation_synth.md").read_text()
    assert f"fingerprint {new_idx.split_fingerprint}" in md and "made on another split" in md
    assert "seeded (seed 7" in ab.format_tables(second.tables)


def test_ablate_on_a_text_only_cache_runs_the_text_heads(synth, tmp_path, capsys):
    for p in (synth / "synth").glob("image--*.h5"):
        p.unlink()
    code, out, err = _run(capsys, "ablate", "-d", "synth", "--features", "cls", "--seeds", "1", "--jobs", "1",
                          "--cache-dir", synth, "--runs-dir", tmp_path / "runs", "--results-dir", tmp_path / "res",
                          "--no-plots", "--dim", "8", "--epochs", "1", "--device", "cpu", "--json")
    assert code == 0, err
    table = json.loads(out)["synth"]
    assert [r["head"] for r in table["rows"]] == ["text_only", "probe (text)"]  # the probe: text only too
    assert table["rows"][0]["seeds_finished"] == 1
    skipped = {x["head"]: x["reason"] for x in table["skipped"]}
    assert set(skipped) == {h for h in list_heads() if "image" in head_uses(h)}  # every head that reads images
    assert all("needs image features" in why for why in skipped.values())
    md = (tmp_path / "res" / "ablation_synth.md").read_text()
    assert "Skipped image_only: needs image features" in md
