"""One checked door to a run (fuse/runs.RunFolder + fuse/scoring.open_for_scoring).

Every fault here is injected and the outcome asserted: a run folder whose files no longer match its
manifest is refused in one line naming the file (evaluate, analyze, predict); analyze refuses a
re-split cache exactly as evaluate does; the run's recorded cache root is used, not the working
folder's; no module outside fuse/runs.py names the run files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as _run

from mmcache import cache as cf
from mmcache.errors import BadInputError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=8, heads=2, epochs=2, batch_size=16, lr=3e-3, patience=0, device="cpu", threads=1)




def _make(cache: Path, seed: int = 0) -> Path:
    from mmcache.fuse.synthetic import make_cache

    make_cache(cache, "synth", n=40, dt=8, di=8, lt=4, li=3, seed=seed)
    return cache


def _train(cache, runs, **kw):
    from mmcache.fuse.train import TrainConfig, train

    return train(TrainConfig(**{**TINY, "head": "basic", "dataset": "synth", "cache_dir": str(cache),
                                "runs_dir": str(runs), **kw}))


@pytest.fixture
def trained(tmp_path):
    cache = _make(tmp_path / "cache")
    return _train(cache, tmp_path / "runs"), cache


# --------------------------------------------------------------------------------------------- manifest

def test_a_finished_run_is_sealed_by_a_manifest_written_last(trained):
    from mmcache.fuse.runs import MANIFEST_FILE, SEALED_FILES, RunFolder

    r, _cache = trained
    folder = RunFolder(r.run_dir)
    manifest = json.loads((r.run_dir / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == set(SEALED_FILES)
    newest = max((r.run_dir / n).stat().st_mtime_ns for n in SEALED_FILES)
    assert (r.run_dir / MANIFEST_FILE).stat().st_mtime_ns >= newest
    assert folder.verify(full=True) == "verified" and folder.verify(full=False) == "verified"


def _tamper(run: Path, what: str) -> str:
    if what == "config":
        cfg = json.loads((run / "config.json").read_text())
        cfg["lr"] = 0.5
        (run / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return "config.json"
    if what == "model":
        data = (run / "model.safetensors").read_bytes()
        (run / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    data = (run / "metrics.json").read_bytes()
    (run / "metrics.json").write_bytes(data[: len(data) // 3])
    return "metrics.json"


@pytest.mark.parametrize("what", ["config", "model", "metrics"])
def test_a_damaged_run_file_is_a_one_line_refusal_naming_it(trained, tmp_path, capsys, what):
    r, cache = trained
    run = tmp_path / "copy"
    shutil.copytree(r.run_dir, run)
    name = _tamper(run, what)
    for argv in (["evaluate", "--run", run], ["analyze", "--run", run],
                 ["predict", "--run", run, "--text", "hi", "--device", "cpu"]):
        code, out, err = _run(capsys, *argv)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (argv, err)
        assert "Traceback" not in err and len([ln for ln in lines if ln.startswith("error:")]) == 1, err
        assert name in err, err
    assert not (run / "analysis").exists() and not (run / "evaluations").exists()  # nothing written
    assert _run(capsys, "evaluate", "--run", r.run_dir)[0] == 0  # the original is untouched and still scores


def test_a_run_from_before_manifests_is_accepted_unverified_with_a_warning(trained, caplog):
    from mmcache.fuse.evaluate import evaluate
    from mmcache.fuse.runs import MANIFEST_FILE, RunFolder

    r, _cache = trained
    (r.run_dir / MANIFEST_FILE).unlink()
    assert RunFolder(r.run_dir).is_finished()
    with caplog.at_level("WARNING"):
        res = evaluate(r.run_dir, write=False)
    assert res.metrics["accuracy"] == r.metrics["test"]["accuracy"]
    assert res.metrics["scored"]["run_verified"] == "unverified"
    assert any("unverified" in m for m in caplog.messages)


def test_ablate_reuse_check_uses_the_fast_path_and_still_catches_an_edit(trained):
    from mmcache.fuse.runs import RunFolder

    r, _cache = trained
    folder = RunFolder(r.run_dir)
    assert folder.is_intact()
    path = r.run_dir / "history.json"
    text = path.read_text()
    path.write_text(text.replace("1", "2", 1))  # same size, new mtime: hashed, caught
    assert not folder.is_intact()


# --------------------------------------------------------------------------------------------- the door

def test_evaluate_says_what_it_scored(trained):
    from mmcache.fuse.evaluate import evaluate

    r, cache = trained
    m = evaluate(r.run_dir, write=True).metrics
    s = m["scored"]
    assert s["n_scored"] == m["n"] and s["n_dropped"] == sum(s["dropped_by_reason"].values())
    assert set(s["features"]) == {"text", "image"}
    for f in s["features"].values():
        assert Path(f["path"]).is_absolute() and Path(f["path"]).parent == (cache / "synth").resolve()
        assert f["config_fingerprint"]


def _resplit_index(cache: Path, seed: int) -> None:
    path = cache / "synth" / cf.INDEX_NAME
    idx = cf.read_index(path)
    new = np.random.default_rng(seed).permutation(np.asarray(idx.splits, dtype=object)).tolist()
    cf.write_index(path, dataset=idx.dataset, classes=idx.classes, ids=list(idx.ids), labels=idx.labels.tolist(),
                   splits=new, texts=list(idx.texts), image_paths=list(idx.image_paths),
                   split_spec={"kind": "seeded", "seed": seed, "ratios": [0.6, 0.2, 0.2]},
                   split_history=[{"from": idx.split_spec, "to": {"kind": "seeded", "seed": seed}}])


def test_analyze_after_a_resplit_refuses_as_evaluate_does(trained, capsys):
    from mmcache.fuse.evaluate import evaluate
    from mmcache.fuse.runs import RunFolder

    from mmcache.api import analyze

    r, cache = trained
    before = RunFolder(r.run_dir).calibration()
    _resplit_index(cache, seed=5)
    with pytest.raises(BadInputError) as ev:
        evaluate(r.run_dir, write=False)
    with pytest.raises(BadInputError) as an:
        analyze(r.run_dir)
    assert str(an.value) == str(ev.value) and "split of synth changed" in str(an.value)
    assert RunFolder(r.run_dir).calibration() == before  # no temperature refitted on former train posts
    code, _out, err = _run(capsys, "analyze", "--run", r.run_dir)
    assert code == 2 and "--original-split" in err and "Traceback" not in err
    res = analyze(r.run_dir, split_choice="original")
    assert res.summary["split_scored"]["which"] == "original"
    assert res.summary["n_test"] == r.metrics["test"]["n"]
    assert analyze(r.run_dir, split_choice="current").summary["split_scored"]["which"] == "current"


def test_scoring_uses_the_runs_recorded_cache_root_not_the_working_folder(tmp_path, monkeypatch):
    from mmcache.fuse.evaluate import evaluate

    from mmcache.api import analyze

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    _make(home / "cache", seed=0)
    _make(elsewhere / "cache", seed=9)  # another dataset under the same name, in the other folder's cache/
    monkeypatch.chdir(home)
    r = _train("cache", tmp_path / "runs")  # a relative cache_dir, as the CLI default
    monkeypatch.chdir(elsewhere)
    m = evaluate(r.run_dir, write=False).metrics
    assert m["accuracy"] == r.metrics["test"]["accuracy"]
    for f in m["scored"]["features"].values():
        assert Path(f["path"]).is_relative_to(home.resolve())
    res = analyze(r.run_dir)
    assert all(Path(f["path"]).is_relative_to(home.resolve()) for f in res.summary["scored"]["features"].values())
    # an explicit cache_dir overrides the recorded root
    other = evaluate(r.run_dir, write=False, cache_dir=elsewhere / "cache", split_choice="current").metrics
    assert all(Path(f["path"]).is_relative_to(elsewhere.resolve()) for f in other["scored"]["features"].values())


def test_the_runs_own_features_gone_is_refused_not_replaced(trained):
    from mmcache.fuse.evaluate import evaluate
    from mmcache.fuse.runs import RunFolder

    r, cache = trained
    path = Path(RunFolder(r.run_dir).provenance()["caches"]["text"]["path"])
    shutil.copy(path, path.with_name("text--another.h5"))  # a file the run never used
    path.unlink()
    with pytest.raises(BadInputError, match="text features .* are gone"):
        evaluate(r.run_dir, write=False)


def test_a_reextract_with_other_weights_in_the_same_folder_is_refused(trained):
    """Stage one records each file's encoder identity (weights sha256): a cache rewritten with other
    weights is refused by analyze and evaluate, naming the weights."""
    from mmcache.fuse.evaluate import evaluate
    from mmcache.fuse.runs import RunFolder

    from mmcache.api import analyze

    r, cache = trained
    prov = RunFolder(r.run_dir).provenance()
    path = Path(prov["caches"]["text"]["path"])
    import h5py

    with h5py.File(path, "r+") as f:  # what a re-extract with other weights in the same folder records
        conf = json.loads(f.attrs["config"])
        conf["weights_sha256"] = "f" * 64
        f.attrs["config"] = json.dumps(conf)
    for call in (lambda: evaluate(r.run_dir, write=False), lambda: analyze(r.run_dir)):
        with pytest.raises(BadInputError, match="weights_sha256"):
            call()


# --------------------------------------------------------------------------------------------- analyze

def test_a_temperature_at_its_search_bound_is_not_fitted():
    from mmcache.fuse.analyze import fit_temperature_checked

    probs = np.array([[0.99, 0.01]] * 40, dtype=np.float32)
    labels = np.array([0] * 20 + [1] * 20)  # half right at 0.99: flatter is always better, T runs to its bound
    t, fitted, why = fit_temperature_checked(probs, labels)
    assert not fitted and t == 1.0 and "bound" in why
    ok = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]], dtype=np.float32)
    assert fit_temperature_checked(ok, np.array([0, 1, 1, 0]))[1]
    from mmcache.fuse.analysis_report import _temperature_line

    line = _temperature_line({"temperature": 1.0, "fitted": False, "not_fitted_because": why, "n_val": 40})
    assert "fitted" not in line.replace("not fitted", "") and "bound" in line
    assert "fitted on 40" in _temperature_line({"temperature": 1.3, "fitted": True, "n_val": 40})


def test_analyze_swaps_its_folder_in_and_drops_stale_files(trained):
    from mmcache.api import analyze

    r, _cache = trained
    first = analyze(r.run_dir)
    stale = first.out_dir / "heatmap_stale.png"
    stale.write_bytes(b"old")
    second = analyze(r.run_dir)
    assert second.out_dir == first.out_dir and not stale.exists()
    assert all(p.is_file() for p in second.files)
    assert not [p for p in r.run_dir.iterdir() if p.name.startswith(".analysis")]


def test_predict_calibrated_refuses_a_run_without_a_fitted_temperature(trained):
    from mmcache.fuse.runs import RunFolder

    from mmcache.predict import Predictor

    r, _cache = trained
    RunFolder(r.run_dir).write_calibration({"temperature": 0.05, "fitted": False})
    with pytest.raises(BadInputError, match="no fitted temperature"):
        Predictor.from_run(r.run_dir, device="cpu", calibrated=True)


# --------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("name", ["", "   ", "a\tb", "run\n1", "x\x00y", "a/b", ".."])
def test_blank_control_and_path_run_names_are_refused(name):
    from mmcache.fuse.runs import check_run_name

    with pytest.raises(BadInputError):
        check_run_name(name)
    assert check_run_name("demo-basic s0") == "demo-basic s0"


RUN_FILE_NAMES = ("config.json", "metrics.json", "model.safetensors", "split.json", "predictions.csv",
                  "calibration.json", "provenance.json", "history.json", "error.json")
# extract/ reads Hugging Face model folders, whose own config.json is not a run file
# a Hugging Face checkpoint has its own config.json: the modules that find and name checkpoints may say so
ALLOWED = {"fuse/runs.py": set(RUN_FILE_NAMES), "extract/hub.py": {"config.json"}, "mmcache/cache/encoder.py": {"config.json"}}


def _string_literals(source: str) -> list[str]:
    """String constants in code (docstrings excluded)."""
    import ast

    tree = ast.parse(source)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_no_module_outside_runs_names_the_run_files():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", ".venv/", "build/")) or "/." in f"/{rel}":
            continue
        for lit in _string_literals(path.read_text(encoding="utf-8")):
            for name in RUN_FILE_NAMES:
                if re.search(rf"(^|[/\\]){re.escape(name)}$", lit) and name not in ALLOWED.get(rel, set()):
                    offenders.append(f"{rel}: {lit!r}")
    assert not offenders, offenders
    assert os.path.isfile(ROOT / "fuse" / "runs.py")


# --------------------------------------------------------------------------------------------- real encoders

N_DEMO = 30


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Tiny demo encoders, a demo cache of 30 posts and one basic run on it."""
    from mmcache.extract.demo_models import ensure_demo_models

    import mmcache

    root = tmp_path_factory.mktemp("one-door")
    text_dir, image_dir = ensure_demo_models(root / "models")
    opts = dict(data_dir=root / "data", options={"n": N_DEMO}, cache_dir=root / "cache", text_model=str(text_dir),
                image_model=str(image_dir), device="cpu", precision="fp32", num_workers=0, text_max_length=24,
                progress=False)
    mmcache.extract("demo", **opts)
    run = mmcache.train_fusion(head="basic", features="mean", dataset="demo", dim=16, epochs=2, threads=1,
                               cache_dir=str(root / "cache"), runs_dir=str(root / "runs"), run_name="basic-mean",
                               device="cpu")
    return {"root": root, "text": text_dir, "image": image_dir, "opts": opts, "run": run.run_dir}


def test_predict_says_what_it_scored_and_checks_the_dataset_split(demo):
    from mmcache import api

    res = api.predict(demo["run"], dataset="demo", data_dir=demo["root"] / "data", options={"n": N_DEMO},
                          device="cpu", num_workers=0)
    split = json.loads((demo["run"] / "split.json").read_text())
    assert sorted(r["id"] for r in res.rows) == sorted(split["ids"]["test"])
    s = res.scored
    assert s["n_scored"] + s["n_dropped"] == len(res.rows)
    assert set(s["encoders"]) == {"text", "image"} and all(e["weights_sha256"] for e in s["encoders"].values())


def test_predict_with_a_moved_encoder_folder_checks_its_weights(demo, tmp_path):
    from mmcache.extract import tiny_models as tm
    from mmcache.extract.demo_models import DEMO_BERT, demo_words

    from mmcache import api

    moved_text, moved_image = tmp_path / "bert-moved", tmp_path / "dino-moved"
    shutil.copytree(demo["text"], moved_text)
    shutil.copytree(demo["image"], moved_image)
    res = api.predict(demo["run"], texts=["sunny day"], images=[None], device="cpu", text_model=moved_text,
                          image_model=moved_image)
    assert res.scored["encoders"]["text"]["path"] == str(moved_text.resolve())
    other = tm.build_bert(tmp_path / "bert-other", **{**DEMO_BERT, "seed": 7, "vocab_words": demo_words()})
    with pytest.raises(BadInputError, match="weights_sha256"):
        api.predict(demo["run"], texts=["sunny day"], device="cpu", text_model=other, image_model=moved_image)


def test_analyze_after_a_reextract_with_other_weights_in_the_same_folder_is_refused(tmp_path, capsys):
    """Build tiny models, train a run, rebuild the model folder with other random weights, re-extract
    (same folder, so the same feature file is rewritten): analyze and evaluate refuse, naming the
    weights; the run itself stays intact."""
    from mmcache.extract import tiny_models as tm
    from mmcache.extract.demo_models import DEMO_BERT, demo_words, ensure_demo_models
    from mmcache.fuse.runs import RunFolder

    import mmcache

    text_dir, image_dir = ensure_demo_models(tmp_path / "models")
    opts = dict(data_dir=tmp_path / "data", options={"n": N_DEMO}, cache_dir=tmp_path / "cache",
                text_model=str(text_dir), image_model=str(image_dir), device="cpu", precision="fp32", num_workers=0,
                text_max_length=24, progress=False)
    mmcache.extract("demo", **opts)
    run = mmcache.train_fusion(head="basic", features="mean", dataset="demo", dim=16, epochs=2, threads=1,
                               cache_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"), device="cpu").run_dir
    assert _run(capsys, "evaluate", "--run", run)[0] == 0
    tm.build_bert(text_dir, **{**DEMO_BERT, "seed": 11, "vocab_words": demo_words()})  # same folder, new weights
    mmcache.extract("demo", **{**opts, "modality": "text", "force": True})
    for argv in (["analyze", "--run", run], ["evaluate", "--run", run]):
        code, _out, err = _run(capsys, *argv)
        assert code == 2 and "weights_sha256" in err and "Traceback" not in err, err
    assert RunFolder(run).verify() == "verified"  # the run itself is intact
