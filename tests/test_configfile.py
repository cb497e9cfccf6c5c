"""Config files (mmcache/configfile.py): YAML / JSON in, clear errors, flags the user gave override the
file (typer defaults never do), and the resolved config each command stores repeats the call:
train-fusion and ablate on a synthetic cache, extract with the tiny demo encoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli as _run
from mmcache.fuse.synthetic import make_cache

from mmcache import configfile
from mmcache.errors import BadInputError

TINY = {"dim": 8, "heads": 2, "epochs": 2, "batch_size": 16, "lr": 3e-3, "patience": 0, "device": "cpu",
        "threads": 1}




@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=40, dt=8, di=8, lt=4, li=3)
    return root


# ------------------------------------------------------------------------------------------ reading

@pytest.mark.parametrize("name,text,word", [
    ("missing.yaml", None, "does not exist"),
    ("bad.yaml", "head: [basic\n", "cannot read config file"),
    ("bad.json", "{head: 1}", "as JSON"),
    ("list.yaml", "- head\n- basic\n", "must be a mapping"),
    ("scalar.json", "3", "must be a mapping"),
    ("config.toml", "head = 1", "unknown extension"),
    ("unknown.yaml", "head: basic\nbogus: 1\n", "bogus; known: head, dataset"),
])
def test_read_config_errors_are_bad_input(tmp_path, name, text, word):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(BadInputError, match=word):
        configfile.read_config(path, known=["head", "dataset"])


def test_yaml_and_json_read_the_same_and_empty_yaml_is_empty(tmp_path):
    (tmp_path / "a.yaml").write_text("head: basic\nlr: 1.0e-3\nmodalities: [text, image]\n")
    (tmp_path / "a.json").write_text('{"head": "basic", "lr": 0.001, "modalities": ["text", "image"]}')
    (tmp_path / "empty.yml").write_text("# nothing yet\n")
    assert configfile.read_config(tmp_path / "a.yaml") == configfile.read_config(tmp_path / "a.json")
    assert configfile.read_config(tmp_path / "empty.yml") == {}
    path = configfile.write_config(tmp_path / "out" / "b.yaml", {"p": tmp_path, "t": (1, 2)}, header="hi")
    assert path.read_text().startswith("# hi\n") and yaml.safe_load(path.read_text()) == {"p": str(tmp_path), "t": [1, 2]}


def test_cli_config_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("head: basic\nepochz: 3\n")
    (tmp_path / "a.yaml").write_text("heads: [basic]\nbase:\n  epochz: 3\n")
    (tmp_path / "e.yaml").write_text("dataset: demo\ntext_modle: x\n")
    (tmp_path / "both.yaml").write_text("base: {}\ntraining: {}\n")
    for argv, word in [(["train-fusion", "--config", tmp_path / "t.yaml"], "epochz"),
                       (["ablate", "--config", tmp_path / "a.yaml"], "epochz"),
                       (["ablate", "--config", tmp_path / "both.yaml"], "not both"),
                       (["extract", "--config", tmp_path / "e.yaml"], "text_modle; known: dataset"),
                       (["extract", "--config", tmp_path / "nope.yaml"], "does not exist"),
                       (["extract", "--config", tmp_path / "t.yaml"], "epochz")]:
        code, out, err = _run(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and word in err, (argv, err)


# ------------------------------------------------------------------------------------- train-fusion

def test_train_fusion_yaml_config_flags_override_and_round_trip(cache, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"head": "basic", "dataset": "synth", "features": "mean", "seed": 3,
                                   "cache_dir": str(cache), "runs_dir": str(tmp_path / "runs"), "run_name": "a",
                                   **TINY}))
    code, out, err = _run(capsys, "train-fusion", "--config", cfg, "--epochs", "3", "--quiet", "--json")
    assert code == 0, err
    first = json.loads(out)
    saved = json.loads((tmp_path / "runs" / "a" / "config.json").read_text())
    assert saved["epochs"] == 3 and saved["seed"] == 3 and saved["features"] == "mean"  # flag over file, file kept
    # the resolved config.json fed back (another run name): the same numbers
    code, out, err = _run(capsys, "train-fusion", "--config", tmp_path / "runs" / "a" / "config.json",
                          "--run-name", "b", "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["test"] == first["test"]
    again = json.loads((tmp_path / "runs" / "b" / "config.json").read_text())
    assert {**again, "run_name": "a"} == saved


# ------------------------------------------------------------------------------------------- ablate

def _rows(results: Path) -> list:
    table = json.loads((results / "ablation_synth.json").read_text())
    return [{k: r[k] for k in ("head", "features", "accuracy", "macro_f1", "seeds_finished") if k in r}
            for r in table["rows"]]


def test_ablate_config_flags_override_and_resolved_file_repeats_the_table(cache, tmp_path, capsys):
    cfg = tmp_path / "ablate.yaml"
    cfg.write_text(yaml.safe_dump({
        "datasets": ["synth"], "heads": "text_only,basic", "features": ["cls"], "seeds": 3, "jobs": 1,
        "cache_dir": str(cache), "runs_dir": str(tmp_path / "runs1"), "results_dir": str(tmp_path / "res1"),
        "plots": False, "probe": False, "bootstrap": 50, "training": TINY}))
    # --seeds 2 overrides the file's 3; --jobs left at its typer default (0) must not replace the file's 1
    code, out, err = _run(capsys, "ablate", "--config", cfg, "--seeds", "2", "--epochs", "1")
    assert code == 0, err
    resolved = yaml.safe_load((tmp_path / "res1" / configfile.ABLATION_CONFIG_NAME).read_text())
    assert resolved["seeds"] == 2 and resolved["jobs"] == 1 and resolved["heads"] == ["text_only", "basic"]
    assert resolved["base"]["epochs"] == 1 and resolved["base"]["dim"] == 8 and resolved["probe"] is False
    first = _rows(tmp_path / "res1")
    assert len(first) == 2 and all(r["seeds_finished"] == 2 for r in first)
    # the resolved file fed back into fresh folders: the same table
    code, out, err = _run(capsys, "ablate", "--config", tmp_path / "res1" / configfile.ABLATION_CONFIG_NAME,
                          "--runs-dir", tmp_path / "runs2", "--results-dir", tmp_path / "res2")
    assert code == 0, err
    assert "4 trained" in out  # a fresh runs folder: every run trained again, none reused
    assert _rows(tmp_path / "res2") == first
    again = yaml.safe_load((tmp_path / "res2" / configfile.ABLATION_CONFIG_NAME).read_text())
    assert {**again, "runs_dir": resolved["runs_dir"], "results_dir": resolved["results_dir"]} == resolved


def test_ablate_still_takes_a_training_config_as_its_base(cache, tmp_path):
    run_cfg = tmp_path / "config.json"
    run_cfg.write_text(json.dumps({"head": "basic", "epochs": 1, "dim": 8}))
    got = configfile.read_ablation(run_cfg)
    assert set(got) == {"base"} and got["base"]["epochs"] == 1 and got["base"]["dim"] == 8


# ------------------------------------------------------------------------------------------ extract

def test_extract_config_round_trip_with_tiny_encoders(tmp_path, capsys):
    from mmcache.extract.demo_models import ensure_demo_models

    import mmcache

    text_dir, image_dir = ensure_demo_models(tmp_path / "models")
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(yaml.safe_dump({
        "dataset": "demo", "data_dir": str(tmp_path / "demo"), "options": {"n": 20}, "text_model": str(text_dir),
        "image_model": str(image_dir), "cache_dir": str(tmp_path / "c1"), "num_workers": 0, "batch_size": 8,
        "text_max_length": 64, "device": "cpu", "progress": False}))
    code, out, err = _run(capsys, "extract", "--config", cfg, "--text-max-length", "16")
    assert code == 0, err
    saved_path = tmp_path / "c1" / "demo" / configfile.EXTRACT_CONFIG_NAME
    resolved = yaml.safe_load(saved_path.read_text())
    assert resolved["text_max_length"] == 16 and resolved["batch_size"] == 8 and resolved["num_workers"] == 0
    assert resolved["modality"] == "both" and resolved["shard"] == "0/1" and "command" not in resolved
    # the stored file fed back into another cache root: the same arrays
    code, out, err = _run(capsys, "extract", "--config", saved_path, "--cache-dir", tmp_path / "c2")
    assert code == 0, err
    one = mmcache.load_cache("demo", cache_dir=tmp_path / "c1", fields=("cls", "tokens", "mask"))
    two = mmcache.load_cache("demo", cache_dir=tmp_path / "c2", fields=("cls", "tokens", "mask"))
    assert one.features["text"]["tokens"].shape[1] == 16
    for m in ("text", "image"):
        for f in ("cls", "tokens", "mask"):
            np.testing.assert_array_equal(one.features[m][f], two.features[m][f])
    again = yaml.safe_load((tmp_path / "c2" / "demo" / configfile.EXTRACT_CONFIG_NAME).read_text())
    assert {**again, "cache_dir": resolved["cache_dir"]} == resolved


def test_load_cache_keeps_the_stored_dtype_unless_asked(cache):
    import mmcache

    kept = mmcache.load_cache("synth", cache_dir=cache, fields=("cls", "mask"))
    assert kept.features["text"]["cls"].dtype == np.float16 and kept.features["text"]["mask"].dtype == bool
    cast = mmcache.load_cache("synth", cache_dir=cache, fields=("cls", "mask"), dtype="float32")
    assert cast.features["image"]["cls"].dtype == np.float32 and cast.features["image"]["mask"].dtype == bool
    np.testing.assert_array_equal(cast.features["image"]["cls"], kept.features["image"]["cls"].astype(np.float32))
