"""EncoderSpec: one record of an encoder across the stages (mmcache.cache.encoder).

A real (tiny) extraction writes the provenance the spec must give back unchanged; the source /
revision rules are checked on folders that exist, were moved, and on hub ids; repair_command must name
the encoder as it did before the spec existed."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mmcache.extract import tiny_models as tm
from mmcache.extract.encoders import load_encoder_from_provenance, load_tokenizer
from mmcache.extract.extraction import ExtractConfig, run_extract
from PIL import Image

from mmcache import cache as cf
from mmcache.cache import EncoderSpec
from mmcache.errors import BadInputError

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 12


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny two-modality extract by the current code: (cfg, {modality: feature file path})."""
    root = tmp_path_factory.mktemp("encspec")
    bert = tm.build_bert(root / "models" / "bert", hidden_size=16, num_heads=2, seed=3)
    dino = tm.build_dinov2(root / "models" / "dino", hidden_size=16, num_heads=2, patch_size=8, image_size=16,
                           seed=4)
    data = root / "data"
    (data / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(data / f"img/{i}.png")
        rows.append({"id": f"s{i}", "text": "good day " * (i + 1), "image": f"img/{i}.png", "label": "positive"})
    with open(data / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        w.writerows(rows)
    cfg = ExtractConfig(dataset="folder", data_dir=data, cache_dir=root / "cache", text_model=str(bert),
                        image_model=str(dino), text_max_length=MAX_LEN, text_layer="-1", device="cpu",
                        batch_size=2, num_workers=0, progress=False, command="python cli.py extract ...")
    summary = run_extract(cfg)
    return cfg, {m.modality: Path(m.path) for m in summary.modalities}


def _recorded(path: Path) -> tuple[EncoderSpec, dict, dict]:
    with cf.FeatureFile(path) as ff:
        return EncoderSpec.from_provenance(ff.modality, ff.provenance, ff.config), ff.provenance, ff.config


# --------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("modality", ["text", "image"])
def test_provenance_round_trip_is_the_stored_dict(run, modality):
    cfg, paths = run
    spec, prov, conf = _recorded(paths[modality])
    back = spec.to_provenance()
    assert back == prov
    # byte-compatible with what the writer stores (json, sorted keys)
    assert json.dumps(back, sort_keys=True, default=str) == json.dumps(prov, sort_keys=True, default=str)
    asked = cfg.encoder(modality)
    assert spec.model == asked.model == prov["model_id"]
    assert spec.resolved_path == str(Path(asked.model).resolve()) and spec.source == spec.resolved_path
    assert spec.load_revision is None  # a local folder has no revisions
    assert spec.layer == asked.layer == {"text": "-1", "image": "last"}[modality] and spec.family == prov["family"]
    assert spec.display_name == prov["name"]
    suffix = {"text": ".layer-1", "image": ""}[modality]
    assert paths[modality].stem == f"{modality}--{cf.name_slug(spec.display_name)}{suffix}"  # the file it names
    assert spec.weights_sha256 == conf["weights_sha256"]
    size = "max_length" if modality == "text" else "patch_pool"
    assert getattr(spec, size) == conf[size]


def test_identity_speaks_the_config_and_tells_layers_apart(run):
    _cfg, paths = run
    spec, _prov, conf = _recorded(paths["text"])
    ident = spec.identity()
    assert ident == {k: conf.get(k, cf.CONFIG_DEFAULTS.get(k)) for k in ident}
    assert cf.encoder_difference(ident, {k: conf.get(k) for k in ident}, storage=False) == ""
    other = EncoderSpec(**{**{f: getattr(spec, f) for f in ("modality", "model", "resolved_path", "max_length",
                                                                "weights_sha256")}, "layer": "-2"})
    assert "layer" in cf.encoder_difference(ident, other.identity(), storage=False)


def test_old_provenance_without_newer_keys_round_trips():
    """A file written before layer / name / family existed, or with a model_id a fallback replaces."""
    old = {"model_id": "bert-base-uncased", "resolved_path": None, "commit_hash": "c0ffee", "max_length": 64,
           "transformers_version": "4.30.0", "dataset": "demo"}
    spec = EncoderSpec.from_provenance("text", old)
    assert spec.to_provenance() == old and spec.layer is None and spec.name is None
    weird = {"model_id": None, "resolved_path": "/gone/bert"}
    spec = EncoderSpec.from_provenance("text", weird, {"model": "/gone/bert", "max_length": 32})
    assert spec.model == "/gone/bert" and spec.max_length == 32
    assert spec.to_provenance() == weird  # the stored None stays None; max_length was not stored


# --------------------------------------------------------------------------------------------- the rules

def test_source_and_revision_rules(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    prov = {"model_id": "models/bert", "resolved_path": str(folder), "commit_hash": None}
    here = EncoderSpec.from_provenance("text", prov, {"revision": "v1"})
    assert here.source == str(folder) and here.load_revision is None
    shutil.rmtree(folder)  # the folder moved: the model as given, and no revision for it to mean
    moved = EncoderSpec.from_provenance("text", prov, {"revision": None})
    assert moved.source == "models/bert" and moved.load_revision is None
    hub = {"model_id": "owner/model", "resolved_path": None, "commit_hash": "abc123"}
    assert EncoderSpec.from_provenance("image", hub, {"revision": "main"}).load_revision == "abc123"
    assert EncoderSpec.from_provenance("image", hub, {"revision": "main"}).source == "owner/model"
    # no recorded commit: the asked revision (encoder and tokenizer alike; they used to differ here)
    assert EncoderSpec.from_provenance("text", {**hub, "commit_hash": None}, {"revision": "v2"}).load_revision == "v2"
    with pytest.raises(BadInputError):
        EncoderSpec.from_provenance("audio", hub)


def test_tokenizer_and_encoder_load_at_the_same_revision(monkeypatch):
    """load_tokenizer asks transformers for spec.source at spec.load_revision, never remote code."""
    import transformers

    seen = {}

    def fake(src, **kw):
        seen.update(src=src, **kw)
        return "tok"

    from mmcache.extract import encoders

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    spec = EncoderSpec.from_provenance("text", {"model_id": "owner/model", "commit_hash": None}, {"revision": "v2"})
    for reachable in (True, False):  # offline (or the hub unreachable): local files only, never network retries
        monkeypatch.setattr(encoders, "hub_reachable", lambda reachable=reachable: reachable)
        assert load_tokenizer(spec) == "tok"
        assert seen == {"src": "owner/model", "revision": "v2", "trust_remote_code": False,
                        "local_files_only": not reachable}


def test_recorded_spec_rebuilds_the_encoder_and_its_tokenizer(run):
    _cfg, paths = run
    spec, prov, conf = _recorded(paths["text"])
    enc = load_encoder_from_provenance(spec, config=conf)
    via_dict = load_encoder_from_provenance("text", prov, config=conf)
    assert enc.max_length == via_dict.max_length == MAX_LEN and enc.layer == "-1" and enc.name == prov["name"]
    tok = load_tokenizer(spec)
    texts = ["good day good day"]
    assert tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"] == enc.tokenize(texts)["input_ids"].tolist()
    with pytest.raises(BadInputError, match="weights_sha256"):
        load_encoder_from_provenance(spec, config={**conf, "weights_sha256": "0" * 32})


def test_extract_options_ask_for_the_same_encoder_again(run):
    cfg, paths = run
    for modality in ("text", "image"):
        spec, _prov, _conf = _recorded(paths[modality])
        again = ExtractConfig(dataset="x", **spec.extract_options()).encoder(modality)
        assert again.model == spec.source and again.layer == spec.layer and again.name == spec.name
        assert again.identity() == {**spec.identity(), "commit_hash": None, "weights_sha256": None}


def test_config_encoder_and_batch_size_for():
    cfg = ExtractConfig(dataset="demo", text_model="t", image_model="i", text_revision="v1", image_layer="-2",
                        image_name="mine", text_max_length=40, patch_pool=2, batch_size=8, image_batch_size=3)
    t, i = cfg.encoder("text"), cfg.encoder("image")
    assert (t.model, t.revision, t.layer, t.name, t.max_length) == ("t", "v1", "last", None, 40)
    assert (i.model, i.revision, i.layer, i.name, i.patch_pool) == ("i", None, "-2", "mine", 2)
    assert cfg.batch_size_for("text") == cfg.text_bs == 8 and cfg.batch_size_for("image") == cfg.image_bs == 3
    with pytest.raises(BadInputError, match="unknown modality"):
        cfg.encoder("audio")


# --------------------------------------------------------------------------------------------- readers

def test_repair_command_names_the_encoder_as_before(tmp_path, run):
    """Outputs of repair_command before EncoderSpec (same inputs, the previous code's strings)."""
    p = tmp_path / "cache" / "mydata" / "text--x.h5"
    local = {"model_id": "/models/bert", "resolved_path": "/abs/models/bert", "layer": "-2", "name": "me/bert",
             "dataset": "folder"}
    assert cf.repair_command(p, local, "text") == (
        f"python cli.py extract --dataset folder --cache-dir {p.parent.parent} --name mydata --modality text "
        "--text-model /models/bert --text-layer -2 --text-name me/bert --repair")
    hub = {"model_id": "facebook/dinov2-base", "resolved_path": None, "commit_hash": "abc", "layer": "last",
           "name": "facebook/dinov2-base", "dataset": "mydata"}
    assert cf.repair_command(p, hub, "image") == (
        f"python cli.py extract --dataset mydata --cache-dir {p.parent.parent} --modality image "
        "--image-model facebook/dinov2-base --image-name facebook/dinov2-base --repair")
    no_id = {"resolved_path": "/abs/models/bert", "dataset": "mydata"}
    assert "--text-model /abs/models/bert --repair" in cf.repair_command(p, no_id, "text")
    # a real file: its own model folder and readable name, so the same file is found again
    cfg, paths = run
    with cf.FeatureFile(paths["text"]) as ff:
        cmd = cf.repair_command(paths["text"], ff.provenance, "text")
        assert f"--text-model {cfg.text_model} --text-layer -1 --text-name {ff.provenance['name']}" in cmd


def test_describe_and_info_read_the_spec(run):
    _cfg, paths = run
    spec, _prov, _conf = _recorded(paths["text"])
    d = cf.describe(paths["text"])
    assert d["model"] == spec.model and d["name"] == spec.name
    text = cf.format_info([d], width=400)
    assert f"model {spec.model} (" in text and f"family {spec.family}, layer -1" in text
    assert f"revision/path {spec.resolved_path}" in text


def test_spec_module_never_imports_torch():
    code = "import sys, mmcache.cache.encoder; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_extraction_has_no_text_or_image_branches():
    """Per-modality options come from cfg.encoder(modality) / cfg.batch_size_for(modality)."""
    src = (ROOT / "extract" / "extraction.py").read_text(encoding="utf-8")
    assert not re.search(r'==\s*"text"\s+else', src)
