"""Encoder families through the CLI: whole CLIP / SigLIP checkpoints and a RoBERTa-style encoder
extract and train; encoder identity (replaced weights refused, symlinked / copied weights accepted);
models validated before any work. Tiny random checkpoints, built locally."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli as _run
from mmcache.extract import tiny_models as tm
from mmcache.extract.encoders import load_encoder_for_cache

from mmcache import cache as cf
from mmcache import cli

N = 30
COMMON = ["--num-workers", "0", "--batch-size", "8", "--text-max-length", "16", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    models = root / "tiny"
    return {"root": root, "data": root / "demo", "clip": tm.build_clip(models / "clip", seed=1),
            "siglip": tm.build_siglip(models / "siglip", seed=2),
            "roberta": tm.build_roberta(models / "roberta", seed=3),
            "bert": tm.build_bert(models / "bert", hidden_size=16, num_heads=2, seed=4),
            "dinov2": tm.build_dinov2(models / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32,
                                      seed=5)}


def _extract(env, cache, *args):
    return cli.main(["extract", "--dataset", "demo", "--data-dir", str(env["data"]), "--option", f"n={N}",
                     "--cache-dir", str(cache), *COMMON, *map(str, args)])




@pytest.mark.slow
def test_whole_clip_as_text_and_image_model_and_siglip_image(env, capsys):
    cache = env["root"] / "cache_clip"
    assert _extract(env, cache, "--text-model", env["clip"], "--image-model", env["clip"]) == 0
    out = capsys.readouterr().out
    assert "text--tiny--clip.h5" in out and "image--tiny--clip.h5" in out
    for modality in ("text", "image"):
        path = cache / "demo" / f"{modality}--tiny--clip.h5"
        with cf.FeatureFile(path) as ff:
            assert ff.complete and ff.provenance["family"] == f"clip-{'text' if modality == 'text' else 'vision'}"
            arrays = ff.load(("cls", "proj"))
            assert arrays["proj"].shape == (N, 16) and ff.config["proj_size"] == 16
            assert np.isfinite(arrays["proj"]).all() and np.abs(arrays["proj"]).sum(1).min() > 0
        # cached cls = the pooler output of the encoder rebuilt from the file's provenance
        enc = load_encoder_for_cache(path)
        idx = cf.read_index(cache / "demo" / cf.INDEX_NAME)
        if modality == "text":
            want = enc.encode_texts(list(idx.texts[:4]))["cls"].numpy()
        else:
            from PIL import Image
            root = idx.attrs["root"]
            want = enc.encode(enc.preprocess([Image.open(f"{root}/{p}") for p in idx.image_paths[:4]]))["cls"].numpy()
        np.testing.assert_allclose(arrays["cls"][:4], want, atol=2e-3, rtol=2e-3)
    # proj rows are checksummed like the other arrays: a flipped byte is found
    import h5py

    with h5py.File(cache / "demo" / "image--tiny--clip.h5", "r+") as f:
        f["proj"][3] = f["proj"][3] + 1
    with cf.FeatureFile(cache / "demo" / "image--tiny--clip.h5") as ff:
        assert ff.verify().rows_by_field["proj"].tolist() == [3]
    # ... and recomputed by the repair command the error names (model, name: the same file)
    assert _extract(env, cache, "--modality", "image", "--image-model", env["clip"], "--image-name", "tiny/clip",
                    "--repair") == 0
    with cf.FeatureFile(cache / "demo" / "image--tiny--clip.h5") as ff:
        assert not ff.verify() and np.array_equal(ff.load(("proj",))["proj"], arrays["proj"])
    assert _extract(env, cache, "--modality", "image", "--image-model", env["siglip"]) == 0
    with cf.FeatureFile(cache / "demo" / "image--tiny--siglip.h5") as ff:
        assert ff.complete and ff.provenance["family"] == "siglip-vision" and "proj" not in ff._f
    # the joint-space embeddings train a head too
    code, out, err = _run(capsys, "train-fusion", "--head", "basic", "--features", "proj", "--cache-dir", cache,
                          "--runs-dir", env["root"] / "runs", "--epochs", "2", "--dim", "8", "--threads", "1",
                          "--image-cache", "image--tiny--clip.h5", "--quiet", "--json")
    assert code == 0, err
    code, out, err = _run(capsys, "train-fusion", "--head", "basic", "--features", "proj", "--cache-dir", cache,
                          "--runs-dir", env["root"] / "runs", "--epochs", "1", "--image-cache", "image--tiny--siglip.h5",
                          "--quiet")
    assert code == 2 and "no proj array" in err


@pytest.mark.slow
def test_roberta_style_encoder_extracts_and_trains(env, capsys):
    cache = env["root"] / "cache_rob"
    assert _extract(env, cache, "--text-model", env["roberta"], "--image-model", env["dinov2"],
                    "--text-layer", "-2") == 0
    path = cache / "demo" / "text--tiny--roberta.layer-2.h5"
    with cf.FeatureFile(path) as ff:
        assert ff.complete and ff.provenance["family"] == "text-transformer" and ff.config["layer"] == "-2"
        assert ff.provenance["tokenizer_class"] == "RobertaTokenizer"
    code, out, err = _run(capsys, "train-fusion", "--head", "basic", "--cache-dir", cache, "--runs-dir",
                          env["root"] / "runs", "--epochs", "2", "--dim", "8", "--threads", "1", "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["epochs_run"] >= 1


@pytest.mark.slow
def test_identity_replaced_weights_refused_symlink_and_copy_accepted(env, tmp_path, capsys):
    bert = tmp_path / "enc" / "bert"
    shutil.copytree(env["bert"], bert)
    cache = tmp_path / "cache"
    assert _extract(env, cache, "--text-model", bert, "--image-model", env["dinov2"]) == 0
    code, out, err = _run(capsys, "train-fusion", "--head", "basic", "--cache-dir", cache, "--runs-dir",
                          tmp_path / "runs", "--epochs", "2", "--dim", "8", "--threads", "1", "--run-name", "r", "--quiet")
    assert code == 0, err
    run = tmp_path / "runs" / "r"
    text_file = cache / "demo" / "text--enc--bert.h5"
    # the same weights through a symlink: up to date for extraction, accepted by evaluate
    link = tmp_path / "enc" / "bert-link"
    link.symlink_to(bert, target_is_directory=True)
    assert _extract(env, cache, "--text-model", link, "--image-model", env["dinov2"]) == 0
    assert capsys.readouterr().out.startswith("up to date")
    # a byte-identical copy elsewhere, extracted into another cache (named alike): accepted by evaluate
    copy = tmp_path / "elsewhere" / "bert"
    shutil.copytree(bert, copy)
    other = tmp_path / "cache_copy"
    assert _extract(env, other, "--text-model", copy, "--text-name", "enc/bert", "--modality", "text") == 0
    code, out, err = _run(capsys, "evaluate", "--run", run, "--text-cache", other / "demo" / "text--enc--bert.h5")
    assert code == 0, err
    # replaced weights in the same folder: extraction refuses without --force ...
    tm.build_bert(bert, hidden_size=16, num_heads=2, seed=99)
    before = text_file.read_bytes()
    assert _extract(env, cache, "--text-model", bert, "--modality", "text") == 2
    assert "weights_sha256" in capsys.readouterr().err
    assert text_file.read_bytes() == before  # nothing touched
    # ... and after --force, evaluate refuses the run's own (rebuilt) file, naming what differs
    assert _extract(env, cache, "--text-model", bert, "--modality", "text", "--force") == 0
    code, out, err = _run(capsys, "evaluate", "--run", run)
    assert code == 2 and "weights_sha256" in err and err.count("\n") == 1
    assert (run / "metrics.json").is_file()  # the run itself is untouched


def test_models_validated_before_any_work(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, err = _run(capsys, "extract", "--dataset", "demo", "--data-dir", env["data"], "--option", f"n={N}",
                          "--cache-dir", cache, "--text-model", tmp_path / "no-such-model", "--image-model",
                          env["dinov2"], *COMMON)
    assert code == 2 and "no-such-model" in err and err.count("\n") == 1
    assert not list(cache.glob("demo/*.h5"))  # neither the index nor the image pass ran
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, out, err = _run(capsys, "extract", "--dataset", "demo", "--data-dir", env["data"], "--option", f"n={N}",
                          "--cache-dir", cache, "--text-model", tmp_path / "gpt2", "--image-model", env["dinov2"], *COMMON)
    assert code == 2 and "Known text families" in err and "extract/adapters/" in err
    no_weights = tmp_path / "bert-no-weights"
    shutil.copytree(env["bert"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    code, out, err = _run(capsys, "extract", "--dataset", "demo", "--data-dir", env["data"], "--option", f"n={N}",
                          "--cache-dir", cache, "--text-model", no_weights, "--image-model", env["dinov2"], *COMMON)
    assert code == 2 and "no weights" in err and not list(cache.glob("demo/*.h5"))


def test_ablation_grid_mixes_families_with_readable_labels(env, tmp_path):
    from mmcache.fuse.ablate import expand_grid

    cache = tmp_path / "cache"
    assert _extract(env, cache, "--text-model", env["clip"], "--image-model", env["clip"]) == 0
    assert _extract(env, cache, "--text-model", env["bert"], "--image-model", env["dinov2"]) == 0
    runs = expand_grid(datasets=["demo"], heads=["basic"], features=["cls"], seeds=1, cache_dir=cache,
                       runs_dir=tmp_path / "runs")
    assert {r.encoder.label for r in runs} == {"tiny/bert + tiny/clip", "tiny/bert + tiny/dinov2",
                                               "tiny/clip + tiny/clip", "tiny/clip + tiny/dinov2"}


def test_files_named_before_readable_names_are_still_found(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ("--text-model", env["bert"], "--modality", "text")
    assert _extract(env, cache, *args) == 0
    (cache / "demo" / "text--tiny--bert.h5").rename(cache / "demo" / "text--bert.h5")  # the old name
    capsys.readouterr()
    assert _extract(env, cache, *args) == 0
    out = capsys.readouterr().out
    assert out.startswith("up to date") and "text--bert.h5" in out
    assert not (cache / "demo" / "text--tiny--bert.h5").exists()


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch):
    import socket

    import huggingface_hub.constants as hub_constants
    from mmcache.extract import encoders, hub

    from mmcache.errors import ModelLoadError

    def refuse(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not encoders.hub_reachable()
    with pytest.raises(ModelLoadError) as e:
        encoders.load_image_encoder("nobody-owns-this/tiny-vit-xyz")
    assert str(e.value) == ("could not load image model 'nobody-owns-this/tiny-vit-xyz': not found locally; "
                            "set --image-model to a folder or enable network")
