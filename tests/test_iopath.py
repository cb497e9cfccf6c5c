"""Extraction's input/output path: the fast image preprocessing against every registered image family's
own processor, JPEG draft decoding, --num-workers auto, tokenization in a thread, the write-behind thread
(coalesced blocks, its failures surfacing as the same error, nothing finished lost on an interrupt)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from mmcache.extract import batches as eb
from mmcache.extract import tiny_models as tm
from mmcache.extract.adapters import list_encoders
from mmcache.extract.extraction import ExtractConfig, run_extract
from mmcache.extract.image_encoder import FAST_TOLERANCE, ImagePreprocessor
from mmcache.extract.images import load_image
from PIL import Image
from transformers import AutoImageProcessor

from mmcache import cache as cf
from mmcache.errors import BadInputError, DiskFullError, Interrupted


def _build_swin(out):
    from transformers import SwinConfig, SwinModel, ViTImageProcessor

    torch.manual_seed(8)
    SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                         window_size=2)).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


#: image family -> a tiny checkpoint with that family's image processor (a new family must be added here)
IMAGE_FAMILIES = {
    "dinov2": lambda d: tm.build_dinov2(d / "dinov2", patch_size=14, image_size=224, resize_shortest_edge=256),
    "vit": lambda d: tm.build_vit(d / "vit", hidden_size=16, num_heads=2, patch_size=8, image_size=32),
    "cnn": lambda d: tm.build_resnet(d / "resnet", hidden_sizes=(8, 12), depths=(1, 1), image_size=32),
    "clip-vision": lambda d: tm.build_clip(d / "clip"),
    "siglip-vision": lambda d: tm.build_siglip(d / "siglip"),
    "swin": lambda d: _build_swin(d / "swin"),
}


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like RGB: smooth colour field plus noise (detail at every scale)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(base).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("family", list_encoders("image"))
def test_fast_preprocessing_equals_each_image_familys_processor(family, tmp_path):
    assert family in IMAGE_FAMILIES, f"image family {family!r} has no tiny checkpoint in this test"
    pre = ImagePreprocessor(AutoImageProcessor.from_pretrained(IMAGE_FAMILIES[family](tmp_path)))
    assert pre.fast is not None, f"{family}: the fast path does not cover its processor"
    shapes = [(640, 480), (333, 517), (97, 61), (300, 300)]
    batch = torch.empty((len(shapes), 3, *pre.fast.out_hw))
    for j, (w, h) in enumerate(shapes):
        img = _photo(w, h, seed=j)
        pre.into(img, batch[j])
        ref = pre([img])[0]
        assert batch[j].shape == ref.shape
        assert float((batch[j] - ref).abs().max()) <= FAST_TOLERANCE, (family, w, h)


def test_a_processor_the_fast_path_does_not_cover_runs_itself(tmp_path):
    proc = AutoImageProcessor.from_pretrained(IMAGE_FAMILIES["vit"](tmp_path))
    proc.size = {"shortest_edge": 40, "longest_edge": 60}  # aspect-keeping, capped: not covered
    pre = ImagePreprocessor(proc)
    assert pre.fast is None
    img = _photo(90, 50)
    assert torch.equal(pre.one(img), pre([img])[0])


def test_jpeg_decoded_at_reduced_scale_only_when_the_target_is_at_most_half(tmp_path):
    pre = ImagePreprocessor(AutoImageProcessor.from_pretrained(IMAGE_FAMILIES["dinov2"](tmp_path)))
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    _photo(1200, 900).save(big, quality=92)
    _photo(400, 300).save(small, quality=92)
    drafted = load_image(big, draft=pre.fast.draft_size)
    assert drafted.size == (600, 450)  # 1/2 scale: the largest still >= the 341 x 256 resize target
    assert load_image(small, draft=pre.fast.draft_size).size == (400, 300)  # 256 > 300 / 2: full decode
    # Stated tolerance of draft decoding against the processor on the full decode: mean |diff| below
    # 2/255 of the pixel range (normalised units: / std ~0.226), no pixel beyond 25%.
    full = pre([load_image(big)])[0]
    fast = pre.one(drafted)
    diff = (fast - full).abs() * 0.226
    assert float(diff.mean()) < 2 / 255 and float(diff.max()) < 0.25


def test_num_workers_auto_from_cores_and_device():
    cores = len(__import__("os").sched_getaffinity(0))
    assert eb.resolve_workers("auto", torch.device("cpu"), 1000) == cores
    assert eb.resolve_workers("auto", torch.device("cuda"), 1000) == max(1, min(16, cores - 1))
    assert eb.resolve_workers("auto", torch.device("cpu"), 1) == 1  # never more than batches
    assert eb.resolve_workers(0, torch.device("cpu"), 5) == 0
    cfg = ExtractConfig(dataset="demo", num_workers="3")
    cfg.validate()
    assert cfg.num_workers == 3
    for bad in (-1, "many"):
        with pytest.raises(BadInputError, match="--num-workers"):
            ExtractConfig(dataset="demo", num_workers=bad).validate()


def test_collate_right_pads_like_row_by_row():
    class Tok:
        pad_token_id = 7

    class Ad:
        fixed_length = False

    enc = type("E", (), {"tokenizer": Tok(), "adapter": Ad(), "max_length": 9})()
    from mmcache.extract.text_encoder import TextEncoder

    ids = [[1, 2, 3], [4], [5, 6, 8, 9, 10]]
    out = TextEncoder.collate(enc, ids)
    assert out["input_ids"].tolist() == [[1, 2, 3, 7, 7], [4, 7, 7, 7, 7], [5, 6, 8, 9, 10]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long


def test_prefetch_raises_the_producers_error_in_order_and_stops_early():
    def items():
        yield 1
        yield 2
        raise ValueError("tokenizer broke")

    got = []
    with pytest.raises(ValueError, match="tokenizer broke"):
        for x in eb.prefetch(items(), depth=1):
            got.append(x)
    assert got == [1, 2]
    gen = eb.prefetch(iter(range(10_000)), depth=2)
    assert next(gen) == 0
    gen.close()  # joins the thread: returns, does not hang on the full queue


def test_merge_orders_rows_and_pads_tokens():
    a = (np.array([5, 9]), {"cls": np.ones((2, 2)), "tokens": np.ones((2, 1, 2)), "mask": np.ones((2, 1), bool)})
    b = (np.array([2, 7]), {"cls": np.zeros((2, 2)), "tokens": np.zeros((2, 3, 2)), "mask": np.ones((2, 3), bool)})
    rows, vals = eb._merge([a, b])
    assert rows.tolist() == [2, 5, 7, 9]
    assert vals["tokens"].shape == (4, 3, 2) and vals["mask"][1].tolist() == [True, False, False]
    assert vals["cls"][:, 0].tolist() == [0, 1, 0, 1]


# --------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"bert": tm.build_bert(root / "bert", hidden_size=24, num_heads=2, seed=11),
            "dinov2": tm.build_dinov2(root / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32,
                                      seed=12)}


def _cfg(tmp_path, models, cache="cache", **kw):
    base = dict(dataset="demo", data_dir=str(tmp_path.parent / "demo_io"), options={"n": 40}, cache_dir=str(tmp_path / cache),
                text_model=str(models["bert"]), image_model=str(models["dinov2"]), device="cpu", batch_size=4,
                num_workers=0, progress=False, text_max_length=16)
    base.update(kw)
    return ExtractConfig(**base)


def _arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("cls", "mean", "tokens", "mask", "done", "valid", "failure", "checksum")}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    s = run_extract(_cfg(tmp, models))
    return {m.modality: _arrays(m.path) for m in s.modalities}


@pytest.mark.parametrize("modality", ["image", "text"])
def test_disk_full_in_the_writer_thread_is_one_error_and_keeps_finished_batches(modality, models, reference,
                                                                                tmp_path, monkeypatch):
    real, calls = cf.FeatureWriter.write, {"n": 0}

    def filling_up(self, rows, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(self, rows, **kw)

    monkeypatch.setattr(cf.FeatureWriter, "write", filling_up)
    with pytest.raises(DiskFullError):
        run_extract(_cfg(tmp_path, models, modality=modality))
    monkeypatch.undo()
    path = next((tmp_path / "cache").rglob(f"{modality}--*.h5"))
    with cf.FeatureFile(path) as ff:
        kept = int(ff.done.sum())
    assert 0 < kept < 40  # the blocks written before the failure stay done
    s = run_extract(_cfg(tmp_path, models, modality=modality))
    assert s.modalities[0].already_done == kept and s.modalities[0].complete
    got = _arrays(s.modalities[0].path)
    for k, v in reference[modality].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_any_writer_thread_error_surfaces_unchanged(models, tmp_path, monkeypatch):
    def broken(self, rows, **kw):
        raise ValueError("checksum writer broke")

    monkeypatch.setattr(cf.FeatureWriter, "write", broken)
    with pytest.raises(ValueError, match="checksum writer broke"):
        run_extract(_cfg(tmp_path, models, modality="text"))


@pytest.mark.parametrize("modality", ["image", "text"])
def test_interrupt_during_a_forward_writes_every_batch_already_computed(modality, models, reference, tmp_path,
                                                                       monkeypatch):
    from mmcache.extract.image_encoder import ImageEncoder
    from mmcache.extract.text_encoder import TextEncoder

    cls = ImageEncoder if modality == "image" else TextEncoder
    real, real_put, calls, computed = cls.forward, eb.WriteBehind.put, {"n": 0}, []

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C in a forward while earlier batches are queued or being written
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    def put(self, rows, *a):
        computed.extend(rows.tolist())
        return real_put(self, rows, *a)

    monkeypatch.setattr(cls, "forward", interrupted)
    monkeypatch.setattr(eb.WriteBehind, "put", put)
    with pytest.raises(Interrupted):
        run_extract(_cfg(tmp_path, models, modality=modality))
    monkeypatch.undo()
    path = next((tmp_path / "cache").rglob(f"{modality}--*.h5"))
    with h5py.File(path, "r") as f:
        done = f["done"][...]
    assert len(computed) >= 8 and done[computed].all()  # every computed batch was written before the stop
    s = run_extract(_cfg(tmp_path, models, modality=modality))
    got = _arrays(s.modalities[0].path)
    for k, v in reference[modality].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_workers_and_auto_give_the_same_file_as_the_main_process(models, reference, tmp_path):
    s = run_extract(_cfg(tmp_path, models, modality="image", num_workers="auto"))
    got = _arrays(s.modalities[0].path)
    for k, v in reference["image"].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_ctrl_c_while_waiting_for_the_writer_still_writes_every_queued_batch():
    import _thread
    import time

    class SlowWriter:  # a FeatureWriter stand-in; the first write presses Ctrl-C in the main thread
        def __init__(self):
            self.rows = []

        def write(self, rows, **kw):
            time.sleep(0.05)  # meanwhile every batch is queued and the main thread waits in __exit__
            if len(self.rows) == 2:
                _thread.interrupt_main()
            self.rows.extend(rows.tolist())

        def write_failures(self, rows, reasons):
            raise AssertionError("no failures here")

    bar = type("Bar", (), {"update": lambda self, n: None})()
    w = SlowWriter()
    out = lambda b: eb.to_host({"cls": torch.ones(b, 2), "mean": torch.ones(b, 2),  # noqa: E731
                                "tokens": torch.ones(b, 3, 2), "mask": torch.ones(b, 3, dtype=torch.bool)}, "float16")
    with pytest.raises(KeyboardInterrupt):
        with eb.WriteBehind(w, "float16", bar, coalesce=False) as wb:
            for b0 in range(0, 12, 2):
                wb.put(np.arange(b0, b0 + 2), out(2), [], 2)
    assert sorted(w.rows) == list(range(12)) and wb.encoded == 12


def test_decode_policy_is_recorded_and_an_existing_file_keeps_its_own(models, tmp_path):
    """Draft decoding changes pixels, so the policy is part of a file's identity: a file made with full
    decodes (every file made before draft decoding existed) is resumed / kept with full decodes, never
    mixed and never refused; --force redoes it with the asked policy; predict decodes as recorded."""
    from mmcache.extract.identity import DECODE_POLICIES, decode_mode

    from mmcache import cache as cf

    first = run_extract(_cfg(tmp_path, models, modality="image", decode="full")).modalities[0]
    with cf.FeatureFile(first.path) as ff:
        assert decode_mode(ff.config["decode"]) == "full" and ff.config["decode"] == DECODE_POLICIES["full"]
    again = run_extract(_cfg(tmp_path, models, modality="image")).modalities[0]  # asks for draft (the default)
    assert again.path == first.path and again.up_to_date and again.encoded == 0  # kept as made, not refused
    with cf.FeatureFile(first.path) as ff:
        assert decode_mode(ff.config["decode"]) == "full"
    run_extract(_cfg(tmp_path, models, modality="image", force=True))
    with cf.FeatureFile(first.path) as ff:
        assert decode_mode(ff.config["decode"]) == "draft"
    with pytest.raises(BadInputError, match="--decode"):
        _cfg(tmp_path, models, decode="fast").validate()
