"""Registry-parametrized tests for fuse.heads (in the style of timm's test_models.py).

Every registered head is run on both feature kinds the cache stores: vector (CLS / mean,
passed as L=1 with all-True masks) and token sequences (ragged masks). Dt != Di so a head
that mixes up the two projections fails loudly.
"""

import pytest
import torch
from mmcache.fuse.heads import count_parameters, create_head, get_head, head_uses, list_heads

from mmcache.errors import BadInputError

HEADS = list_heads()
EXPLAINING = [h for h in HEADS if get_head(h).explains]  # the hook, not a list of names
KINDS = ["vector", "token"]
DT, DI, C, B, DIM, NHEADS = 24, 40, 3, 5, 32, 4
TEXT_LENS = [7, 3, 1, 5, 2]  # ragged: Lt = 7
IMAGE_LENS = [9, 4, 6, 1, 8]  # ragged: Li = 9


def _build(name, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(text_dim=DT, image_dim=DI, num_classes=C, dim=DIM, layers=2, heads=NHEADS, dropout=0.1)
    args.update(kw)
    return create_head(name, **args)


def _mask(lens, L):
    """(len(lens), L) bool, True = real."""
    return torch.arange(L)[None, :] < torch.tensor(lens)[:, None]


def _inputs(kind, seed=1):
    """text (B, Lt, DT) float32, text_mask (B, Lt) bool, image (B, Li, DI) float32, image_mask."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vector":
        tm, im = torch.ones(B, 1, dtype=torch.bool), torch.ones(B, 1, dtype=torch.bool)
    else:
        tm, im = _mask(TEXT_LENS, 7), _mask(IMAGE_LENS, 9)
    text = torch.randn(B, tm.shape[1], DT, generator=g)
    image = torch.randn(B, im.shape[1], DI, generator=g)
    return text, tm, image, im


def _pad(x, mask, extra, fill):
    """Append `extra` padded positions (mask False) holding `fill`, and overwrite existing pads."""
    x = x.masked_fill(~mask[..., None], fill)
    pad = torch.full((x.shape[0], extra, x.shape[2]), fill)
    return torch.cat([x, pad], 1), torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)


def test_registry_lists_all_heads_sorted():
    assert HEADS == sorted(HEADS)
    assert set(HEADS) >= {"text_only", "image_only", "basic", "self_attention", "dual_attention"}


def test_head_uses():
    assert head_uses("text_only") == {"text"}
    assert head_uses("image_only") == {"image"}
    for name in ("basic", "self_attention", "dual_attention"):
        assert head_uses(name) == {"text", "image"}
    head_uses("basic").add("audio")  # a copy: callers cannot corrupt the registry
    assert head_uses("basic") == {"text", "image"}


def test_unknown_name_lists_known_heads():
    for call in (lambda: create_head("nope", text_dim=DT, image_dim=DI, num_classes=C), lambda: head_uses("nope")):
        with pytest.raises(BadInputError) as err:
            call()
        assert "nope" in str(err.value)
        assert all(name in str(err.value) for name in HEADS)


def test_bad_config_is_bad_input():
    with pytest.raises(BadInputError, match="colour"):
        _build("basic", colour="red")
    with pytest.raises(BadInputError, match="divisible"):
        _build("self_attention", dim=30, heads=4)
    with pytest.raises(BadInputError, match="text_dim"):
        _build("text_only", text_dim=None)
    _build("text_only", image_dim=None)  # the unused modality's width may be unknown


def test_bad_inputs_are_rejected():
    text, tm, image, im = _inputs("token")
    with pytest.raises(BadInputError, match="image"):
        _build("basic")(text, tm, None, None)
    with pytest.raises(BadInputError, match="bool"):
        _build("basic")(text, tm.long(), image, im)
    with pytest.raises(BadInputError, match="24"):
        _build("basic")(image, im, image, im)


@pytest.mark.parametrize("name", [h for h in HEADS if len(head_uses(h)) == 1])
def test_unused_modality_may_be_none(name):
    text, tm, image, im = _inputs("token")
    args = (text, tm, None, None) if head_uses(name) == {"text"} else (None, None, image, im)
    assert _build(name).eval()(*args).shape == (B, C)


@pytest.mark.parametrize("name", HEADS)
def test_count_parameters_and_determinism(name):
    a, b, c = _build(name, seed=3), _build(name, seed=3), _build(name, seed=4)
    assert count_parameters(a) == sum(p.numel() for p in a.parameters()) > 0
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", HEADS)
def test_forward_backward(name, kind):
    model = _build(name).train()
    text, tm, image, im = _inputs(kind)
    text.requires_grad_(True)
    image.requires_grad_(True)
    logits = model(text, tm, image, im)
    assert logits.shape == (B, C) and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, torch.arange(B) % C).backward()
    for pname, p in model.named_parameters():
        # Cross-attention over a single key (vector features) has softmax weight 1 whatever
        # the query is, so the query path is skipped there and gets no gradient at all.
        dead_query = kind == "vector" and name == "dual_attention" and (".norm_q." in pname or ".attn.q." in pname)
        if dead_query:
            assert p.grad is None or not p.grad.any(), f"{pname} should not matter for a single key"
            continue
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gradient is all zero"
    for x, m, modality in ((text, tm, "text"), (image, im, "image")):
        if modality in head_uses(name):
            assert (x.grad[~m] == 0).all(), "padded positions must not receive gradient"
            assert x.grad[m].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("fill", [1e4, float("nan")])
def test_padding_never_changes_prediction(name, kind, fill):
    model = _build(name).eval()
    text, tm, image, im = _inputs(kind)
    with torch.no_grad():
        ref = model(text, tm, image, im)
        padded = model(*_pad(text, tm, 3, fill), *_pad(image, im, 4, fill))
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", HEADS)
def test_return_attention(name, kind):
    model = _build(name).eval()
    text, tm, image, im = _inputs(kind)
    tm[1] = False  # one sample with no text: its image->text rows must be all zero
    with torch.no_grad():
        logits, attn = model(text, tm, image, im, return_attention=True)
        # The plain call takes the fused kernel: same values up to float rounding.
        torch.testing.assert_close(logits, model(text, tm, image, im), atol=1e-5, rtol=0)
    if not get_head(name).explains:
        assert attn == {}
        return
    Lt, Li = tm.shape[1], im.shape[1]
    if name == "self_attention":
        key_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool), tm, im], 1)
        expected = {f"layer{n}": (key_mask, (B, NHEADS, 1 + Lt + Li, 1 + Lt + Li)) for n in range(2)}
    else:
        expected = {}
        for n in range(2):
            expected[f"text_to_image{n}"] = (im, (B, NHEADS, Lt, Li))
            expected[f"image_to_text{n}"] = (tm, (B, NHEADS, Li, Lt))
    assert set(attn) == set(expected)
    for key, (kmask, shape) in expected.items():
        w = attn[key]
        assert w.shape == shape and w.dtype == torch.float32, key
        has_key = kmask.any(1)[:, None, None].float()  # rows with no real key sum to 0
        torch.testing.assert_close(w.sum(-1), has_key.expand(B, NHEADS, shape[2]), atol=1e-5, rtol=0)
        on_padding = torch.where(kmask[:, None, None, :], torch.zeros(()), w)
        assert on_padding.abs().max() < 1e-6, f"{key} attends to padding"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", HEADS)
def test_all_masked_rows_stay_finite(name, mode):
    model = _build(name).train(mode == "train")
    text, tm, image, im = _inputs("token")
    tm[0] = False  # missing text
    im[1] = False  # missing image
    tm[2] = False  # missing both
    im[2] = False
    logits = model(text, tm, image, im)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _task(name, kind, n=64, seed=0, label=None):
    """Tiny synthetic task: bit a lives in text, bit b in image (feature 0 of every real token).

    Label = a for text_only, b for image_only, a XOR b for fusion heads (needs both inputs
    and a non-linear interaction).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "vector":
        tm, im = torch.ones(n, 1, dtype=torch.bool), torch.ones(n, 1, dtype=torch.bool)
    else:
        tm = _mask(torch.randint(1, 8, (n,), generator=g).tolist(), 7)
        im = _mask(torch.randint(1, 10, (n,), generator=g).tolist(), 9)
    a, b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    text = 0.5 * torch.randn(n, tm.shape[1], DT, generator=g)
    image = 0.5 * torch.randn(n, im.shape[1], DI, generator=g)
    text[..., 0] += 2.0 * (2 * a[:, None] - 1)
    image[..., 0] += 2.0 * (2 * b[:, None] - 1)
    uses = label or head_uses(name)
    y = a if uses == {"text"} else b if uses == {"image"} else a ^ b
    return (text, tm, image, im), y


def _fit(name, kind, label=None, steps=400):
    """Train with Adam until >= 95% train accuracy; return (accuracy, steps taken, model)."""
    model = _build(name, num_classes=2, layers=1, dropout=0.0)
    inputs, y = _task(name, kind, label=label)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    acc = 0.0
    for step in range(steps):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(*inputs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 19:
            with torch.no_grad():
                acc = (model.eval()(*inputs).argmax(-1) == y).float().mean().item()
            if acc >= 0.95:
                break
    return acc, step + 1, model


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", HEADS)
def test_overfits_tiny_task(name, kind):
    acc, steps, _ = _fit(name, kind)
    assert acc >= 0.95, f"{name}/{kind}: train accuracy {acc:.2f} after {steps} steps"


@pytest.mark.slow
def test_xor_task_needs_both_modalities():
    """Control: 64 samples can be memorised from text alone, so check held-out accuracy:
    a fusion head generalises the XOR rule, a text-only head stays at chance."""
    both = {"text", "image"}
    held_out, y = _task("basic", "token", n=256, seed=9, label=both)
    for name, lo, hi in (("basic", 0.85, 1.0), ("text_only", 0.0, 0.7)):
        _, _, model = _fit(name, "token", label=both)
        with torch.no_grad():
            acc = (model.eval()(*held_out).argmax(-1) == y).float().mean().item()
        assert lo <= acc <= hi, f"{name}: held-out XOR accuracy {acc:.2f}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", HEADS)
def test_fused_attention_path_matches_explicit_one(name, kind):
    """Training and plain prediction take the fused SDPA kernel (no weights); return_attention takes
    the explicit path. Both must give the same logits, masks and missing rows included."""
    model = _build(name).eval()
    text, tm, image, im = _inputs(kind)
    tm = tm.clone()
    tm[0] = False  # one sample missing its text
    with torch.no_grad():
        fast = model(text, tm, image, im)
        slow, _ = model(text, tm, image, im, return_attention=True)
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()


def test_attention_heads_explain_and_others_do_not():
    assert set(EXPLAINING) >= {"self_attention", "dual_attention"}
    assert not {"basic", "text_only", "image_only"} & set(EXPLAINING)
    text, tm, image, im = _inputs("token")
    with pytest.raises(NotImplementedError, match="basic"):
        _build("basic").explain(text, tm, image, im)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", EXPLAINING)
def test_explain_contract(name, kind):
    """Every head that explains: shares in [0, 1] per post, weights over each modality's tokens that
    are zero on padding, a missing modality gets share 0, and explaining never changes the logits."""
    model = _build(name).eval()
    text, tm, image, im = _inputs(kind)
    tm = tm.clone()
    tm[1] = False  # one post without text
    with torch.no_grad():
        before = model(text, tm, image, im)
    got = model.explain(text, tm, image, im)
    assert got["text_weights"].shape == tm.shape and got["image_weights"].shape == im.shape
    for key in ("text_share", "image_share"):
        assert got[key].shape == (B,) and ((got[key] >= 0) & (got[key] <= 1 + 1e-6)).all(), key
    assert got["text_share"][1] == 0 and (got["text_weights"][1] == 0).all()
    assert (got["text_weights"][~tm] == 0).all() and (got["image_weights"][~im] == 0).all()
    if got["self_share"] is not None:  # a summary token: the three shares are the whole attention
        torch.testing.assert_close(got["text_share"] + got["image_share"] + got["self_share"], torch.ones(B))
    with torch.no_grad():  # no hook or attention-weights switch left behind
        torch.testing.assert_close(model(text, tm, image, im), before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
