"""The encoder family registry: every registered adapter against a direct forward of a tiny random
checkpoint of its family (built locally with save_pretrained, loaded through the same from_pretrained
path as a hub id), plus identity / provenance round trips.

Adding a family: add its tiny checkpoint to ``TINY`` below; the parametrized tests do the rest.
"""

from __future__ import annotations

import json

import pytest
import torch
from mmcache.extract import tiny_models as tm
from mmcache.extract.adapters import (
    UnknownFamilyError,
    get_adapter,
    list_encoders,
    parse_layer,
)
from mmcache.extract.encoders import (
    load_encoder_from_provenance,
    load_image_encoder,
    load_text_encoder,
    readable_name,
)
from mmcache.extract.identity import encoder_config
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from mmcache import cache as cf
from mmcache.errors import BadInputError, ModelLoadError

TEXTS = ["good", "i love this movie , it is great and happy !", "awful weather , i hate it so much"]

def _build_swin(out):
    """Random 2-stage SwinModel (patch 4, one 2x2 merge: a 32x32 image -> a 4x4 grid) + its processor."""
    from transformers import SwinConfig, SwinModel, ViTImageProcessor

    torch.manual_seed(8)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2)
    SwinModel(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


#: family -> builder of a tiny random checkpoint (folder) of that family. Two-tower families share one.
TINY = {
    "bert": lambda d: tm.build_bert(d / "bert", hidden_size=24, num_heads=2, seed=1),
    "text-transformer": lambda d: tm.build_roberta(d / "roberta", hidden_size=24, num_heads=2, seed=2),
    "clip-text": lambda d: tm.build_clip(d / "clip", seed=3),
    "siglip-text": lambda d: tm.build_siglip(d / "siglip", seed=4),
    "dinov2": lambda d: tm.build_dinov2(d / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32,
                                        num_register_tokens=2, seed=5),
    "vit": lambda d: tm.build_vit(d / "vit", hidden_size=16, num_heads=2, patch_size=8, image_size=32, seed=6),
    "cnn": lambda d: tm.build_resnet(d / "resnet", hidden_sizes=(8, 12), depths=(1, 1), image_size=32, seed=7),
    "clip-vision": lambda d: tm.build_clip(d / "clip", seed=3),
    "siglip-vision": lambda d: tm.build_siglip(d / "siglip", seed=4),
    "swin": lambda d: _build_swin(d / "swin"),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, object] = {}

    def get(family):
        if family not in built:
            built[family] = TINY[family](root)
        return built[family]
    return get


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")
            for w, h in [(40, 30), (33, 50)]]


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4)


def test_every_family_has_a_tiny_checkpoint():
    assert set(TINY) == set(list_encoders())
    assert {"clip-text", "siglip-text", "text-transformer", "bert"} == set(list_encoders("text"))


def _text_reference(enc, folder):
    """Direct transformers forward, as each family's model card says to call it."""
    tok = AutoTokenizer.from_pretrained(folder)
    net = AutoModel.from_pretrained(folder).eval()
    tower = getattr(net, "text_model", net)
    if enc.family == "siglip-text":  # as trained: padded to max_length, no attention mask
        b = tok(TEXTS, padding="max_length", max_length=enc.max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = tower(input_ids=b["input_ids"])
    else:
        b = tok(TEXTS, padding="longest", return_tensors="pt")
        with torch.no_grad():
            out = tower(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return net, b, out


@pytest.mark.parametrize("family", list_encoders("text"))
def test_text_adapter_matches_direct_forward(family, ckpt):
    folder = ckpt(family)
    enc = load_text_encoder(str(folder))
    assert enc.family == family
    got = enc.encode_texts(TEXTS)
    net, b, ref = _text_reference(enc, folder)
    mask = b["attention_mask"].bool()
    assert torch.equal(got["mask"], mask)
    assert got["tokens"].shape == (len(TEXTS), mask.shape[1], enc.hidden_size)
    _close(got["tokens"][mask], ref.last_hidden_state[mask])
    m = mask.unsqueeze(-1).float()
    _close(got["mean"], (ref.last_hidden_state * m).sum(1) / m.sum(1))
    want_cls = ref.pooler_output if get_adapter(family).cls_is_pooled else ref.last_hidden_state[:, 0]
    _close(got["cls"], want_cls)
    if family == "clip-text":  # proj = text_embeds before normalisation
        with torch.no_grad():
            full = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=torch.zeros(1, 3, 32, 32))
        _close(torch.nn.functional.normalize(got["proj"], dim=-1), full.text_embeds)
        assert enc.proj_size == got["proj"].shape[1] == 16
    else:
        assert "proj" not in got and enc.proj_size is None


@pytest.mark.parametrize("family", list_encoders("image"))
def test_image_adapter_matches_direct_forward(family, ckpt, images):
    folder = ckpt(family)
    enc = load_image_encoder(str(folder))
    assert enc.family == family
    pv = enc.preprocess(images)
    got = enc.encode(pv)
    net = AutoModel.from_pretrained(folder).eval()
    tower = getattr(net, "vision_model", net)
    with torch.no_grad():
        ref = tower(pixel_values=pv)
    n = len(images)
    assert got["tokens"].shape == (n, enc.num_tokens, enc.hidden_size) and got["mask"].all()
    if enc.kind == "vit":
        patches = ref.last_hidden_state[:, enc.num_prefix_tokens:]
        _close(got["tokens"], patches)
        _close(got["mean"], patches.mean(1))
    want_cls = (ref.pooler_output.flatten(1) if get_adapter(family).cls_is_pooled or enc.kind == "cnn"
                else ref.last_hidden_state[:, 0])
    _close(got["cls"], want_cls)
    if family == "clip-vision":
        with torch.no_grad():
            full = net(input_ids=torch.tensor([[0, 1]]), pixel_values=pv)
        _close(torch.nn.functional.normalize(got["proj"], dim=-1), full.image_embeds)
    else:
        assert "proj" not in got


@pytest.mark.parametrize("family", list_encoders())
def test_identity_and_provenance_round_trip(family, ckpt, images):
    modality = get_adapter(family).modality
    loader = load_text_encoder if modality == "text" else load_image_encoder
    enc = loader(str(ckpt(family)))
    conf = json.loads(json.dumps(encoder_config(enc, modality, dtype="float16", revision=None)))
    prov = json.loads(json.dumps(enc.provenance()))
    assert prov["family"] == family and prov["layer"] == "last" and conf["weights_sha256"]
    again = load_encoder_from_provenance(modality, prov, config=conf)
    assert again.family == family and again.name == enc.name
    if modality == "text":
        _close(again.encode_texts(TEXTS)["cls"], enc.encode_texts(TEXTS)["cls"])
    else:
        _close(again.encode(again.preprocess(images))["cls"], enc.encode(enc.preprocess(images))["cls"])
    # a recorded config of other weights is refused, naming what differs
    with pytest.raises(BadInputError, match="weights_sha256"):
        load_encoder_from_provenance(modality, prov, config={**conf, "weights_sha256": "0" * 32})


def test_siglip_text_is_independent_of_batch_padding(ckpt):
    enc = load_text_encoder(str(ckpt("siglip-text")))
    both, alone = enc.encode_texts(TEXTS), enc.encode_texts(TEXTS[:1])
    _close(both["cls"][:1], alone["cls"])
    assert both["tokens"].shape[1] == enc.max_length == 16


def test_whole_clip_without_tokenizer_works_for_images_only(tmp_path, images):
    folder = tm.build_clip(tmp_path / "clip-image-only", tokenizer=False)
    enc = load_image_encoder(str(folder))
    assert enc.family == "clip-vision" and enc.encode(enc.preprocess(images))["proj"].shape == (2, 16)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_text_encoder(str(folder))


def test_unknown_family_lists_known_ones_and_how_to_add(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnknownFamilyError) as e:
        load_text_encoder(str(tmp_path / "gpt2"))
    msg = str(e.value)
    assert "'gpt2'" in msg and "bert (bert" in msg and "clip-text" in msg and "extract/adapters/" in msg
    assert "\n" not in msg and isinstance(e.value, BadInputError)


def test_wrong_modality_named(ckpt):
    with pytest.raises(BadInputError, match="image model.*--image-model"):
        load_text_encoder(str(ckpt("dinov2")))
    with pytest.raises(BadInputError, match="text model.*--text-model"):
        load_image_encoder(str(ckpt("bert")))


def test_layers(ckpt, images):
    assert [parse_layer(x) for x in (None, "last", -2, "3", "MEAN-LAST-2")] == ["last", "last", "-2", "3", "mean-last-2"]
    for bad in ("first", "mean-last-0", "1.5"):
        with pytest.raises(BadInputError):
            parse_layer(bad)
    folder = ckpt("bert")
    enc = load_text_encoder(str(folder), layer="mean-last-2")
    net = AutoModel.from_pretrained(folder).eval()
    b = enc.tokenize(TEXTS)
    with torch.no_grad():
        hs = net(**b, output_hidden_states=True).hidden_states
    got = enc.encode(b)
    want = (hs[-1] + hs[-2]) / 2
    mask = b["attention_mask"].bool()
    _close(got["tokens"][mask], want[mask])
    _close(got["cls"], want[:, 0])
    assert encoder_config(enc, "text", dtype="float16", revision=None)["layer"] == "mean-last-2"
    e1 = load_text_encoder(str(folder), layer=1)
    _close(e1.encode(b)["tokens"][mask], hs[1][mask])
    with pytest.raises(BadInputError, match="hidden states"):
        load_text_encoder(str(folder), layer=9).encode(b)
    with pytest.raises(BadInputError, match="last layer"):
        load_image_encoder(str(ckpt("cnn")), layer=-2)
    folder = ckpt("dinov2")  # image layers: registers and CLS stay out of tokens / mean
    ie = load_image_encoder(str(folder), layer=-1)
    pv = ie.preprocess(images)
    with torch.no_grad():
        hs = AutoModel.from_pretrained(folder).eval()(pixel_values=pv, output_hidden_states=True).hidden_states
    got = ie.encode(pv)
    _close(got["tokens"], hs[-1][:, ie.num_prefix_tokens:])
    _close(got["cls"], hs[-1][:, 0])


def test_readable_names(tmp_path, ckpt):
    folder = ckpt("bert")
    assert readable_name(str(folder)) == f"{folder.parent.name}/{folder.name}"
    assert readable_name("bert-base-uncased") == "bert-base-uncased"
    assert readable_name(str(folder), "my-bert") == "my-bert"
    cfg = json.loads((folder / "config.json").read_text())
    named = tmp_path / "x" / "model"
    named.mkdir(parents=True)
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "someone/tiny-bert"}))
    assert readable_name(str(named)) == "someone/tiny-bert"
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "/home/me/ckpt/tiny"}))
    assert readable_name(str(named)) == "x/model"
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "model"}))  # just the folder's name
    assert readable_name(str(named)) == "x/model"
    # a sentence-transformers export names the model it was fine-tuned from: not its own name
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "someone/base-model"}))
    (named / "config_sentence_transformers.json").write_text("{}")
    assert readable_name(str(named)) == "x/model"


def test_identity_rule():
    base = {"model": "/a/bert", "weights_sha256": "aa", "commit_hash": None, "dtype": "float16", "precision": "fp32",
            "pooling": {"cls": "x"}, "max_length": 128}
    assert cf.encoder_difference(base, {**base, "model": "/b/copy"}) == ""  # path: a hint
    assert "weights_sha256" in cf.encoder_difference(base, {**base, "weights_sha256": "bb"})
    assert cf.encoder_difference(base, {**base, "dtype": "float32"}, storage=False) == ""
    assert "dtype" in cf.encoder_difference(base, {**base, "dtype": "float32"})
    assert cf.encoder_difference(base, {**base, "layer": "last"}) == ""  # a missing key means its default
    assert "layer" in cf.encoder_difference(base, {**base, "layer": "-2"})
    hub = {"model": "bert-base-uncased", "weights_sha256": None, "commit_hash": "c1", "revision": "main"}
    assert cf.encoder_difference(hub, {**hub, "revision": "c1"}) == ""
    assert "commit_hash" in cf.encoder_difference(hub, {**hub, "commit_hash": "c2"})
    assert "model" in cf.encoder_difference(hub, {**hub, "model": "roberta-base"})


def test_swin_grid_is_its_own_geometry(ckpt):
    """Swin's grid (patches merged 2x2 per later stage, odd sides rounded up) comes from its adapter's
    grid hook alone: input / 32 for the standard four stages of patch 4, no prefix tokens."""
    from transformers import SwinConfig

    swin, hidden = get_adapter("swin"), lambda n, d: torch.zeros(1, n, d)
    standard = SwinConfig()  # patch 4, depths (2, 2, 6, 2)
    assert swin.grid(standard, hidden(49, 768), (224, 224)) == (0, (7, 7), 768)
    assert swin.grid(standard, hidden(8, 768), (100, 60)) == (0, (4, 2), 768)  # 25x15 -> 13x8 -> 7x4 -> 4x2
    with pytest.raises(BadInputError, match="49 tokens"):
        swin.grid(standard, hidden(49, 768), (256, 256))
    enc = load_image_encoder(str(ckpt("swin")))
    assert (enc.raw_grid, enc.num_prefix_tokens, enc.hidden_size) == ((4, 4), 0, 16)
    with pytest.raises(BadInputError, match="last layer"):  # stages differ in width
        load_image_encoder(str(ckpt("swin")), layer=-2)
