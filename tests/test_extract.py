"""Stage one end to end: tiny random BERT / DINOv2 / ResNet checkpoints built locally, real HDF5 files.

The cache must equal a direct forward of the same model on the same inputs, survive kill -9, record
bad samples instead of stopping, refuse mismatched reruns and be a no-op when complete.
Fixtures live here (other test files own conftest.py).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mmcache.extract import tiny_models as tm
from mmcache.extract.extraction import ExtractConfig, run_extract, shard_rows, text_batches
from mmcache.extract.images import ImageFailure, load_image
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from mmcache import cache as cf
from mmcache.errors import BadInputError, CacheError

REPO = Path(__file__).resolve().parents[1]
WORDS = ("i love this movie it is great and happy but the weather was awful so we hate rain today "
         "what a wonderful day with friends and family").split()
N_GOOD = 14
MAX_LEN = 24  # some texts are longer: truncation is exercised


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "bert": tm.build_bert(root / "bert", hidden_size=24, num_heads=2, seed=11),
        "dinov2": tm.build_dinov2(root / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32, seed=12),
        "resnet": tm.build_resnet(root / "resnet", hidden_sizes=(8, 12), depths=(1, 1), image_size=32, seed=13),
    }


def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A tiny PNG whose header claims side x side pixels (never decodable, never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _write_dataset(root: Path, bad: bool) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(N_GOOD):
        w, h = int(rng.integers(24, 80)), int(rng.integers(24, 80))
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
        if i % 5 == 3:
            im = im.convert("L")
        name = f"img/s{i:02d}." + ("jpg" if i % 3 == 0 else "png")
        im.save(root / name)
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))
        rows.append({"id": f"s{i:02d}", "text": text, "image": name, "label": ["positive", "neutral", "negative"][i % 3]})
    if bad:
        noisy = rng.integers(0, 256, size=(60, 60, 3), dtype=np.uint8)
        for ext in ("png", "jpg"):
            Image.fromarray(noisy).save(root / f"img/full.{ext}")
            raw = (root / f"img/full.{ext}").read_bytes()
            (root / f"img/trunc.{ext}").write_bytes(raw[: len(raw) // 2])
        (root / "img/notimage.png").write_text("this is not an image\n")
        _png_bomb(root / "img/bomb.png")
        bad_rows = [("b_missing", "hello there", "img/nope.png"), ("b_trunc_png", "good day", "img/trunc.png"),
                    ("b_trunc_jpg", "bad day", "img/trunc.jpg"), ("b_notimage", "so so", "img/notimage.png"),
                    ("b_bomb", "boom", "img/bomb.png"), ("b_empty_text", "", "img/full.png")]
        # interleave so failures sit inside batches, not at the end
        for k, (sid, text, img) in enumerate(bad_rows):
            rows.insert(2 * k + 1, {"id": sid, "text": text, "image": img, "label": "neutral"})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("good"), bad=False)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("bad"), bad=True)


def _cfg(data, cache, models, **kw) -> ExtractConfig:
    base = dict(dataset="folder", data_dir=data, cache_dir=cache, text_model=str(models["bert"]),
                image_model=str(models["dinov2"]), text_max_length=MAX_LEN, dtype="float32", device="cpu",
                batch_size=4, num_workers=0, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


def _file(summary, modality) -> Path:
    return Path(next(m.path for m in summary.modalities if m.modality == modality))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f.keys()}


@pytest.fixture(scope="module")
def good_run(good_data, models, tmp_path_factory):
    """float32, length grouping on, batch 4 (texts grouped across the 14 samples)."""
    cache = tmp_path_factory.mktemp("cache_good")
    return run_extract(_cfg(good_data, cache, models, num_workers=2))


def _manifest(data: Path) -> list[dict]:
    with open(data / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------- values

def test_text_cache_equals_direct_forward(good_run, good_data, models):
    tok = AutoTokenizer.from_pretrained(models["bert"])
    net = AutoModel.from_pretrained(models["bert"]).eval()
    rows = _manifest(good_data)
    with cf.FeatureFile(_file(good_run, "text")) as ff:
        assert list(ff.ids) == [r["id"] for r in rows]  # index order, not length order
        assert ff.complete and ff.valid.all() and ff.num_tokens == MAX_LEN
        got = ff.load(("cls", "mean", "tokens", "mask"))
    lengths = []
    for i, r in enumerate(rows):
        enc = tok([r["text"]], truncation=True, max_length=MAX_LEN, return_tensors="pt")
        with torch.no_grad():
            h = net(**enc).last_hidden_state[0].numpy()
        n = h.shape[0]
        lengths.append(n)
        np.testing.assert_allclose(got["cls"][i], h[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["mean"][i], h.mean(0), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["tokens"][i, :n], h, atol=1e-4, rtol=1e-4)
        assert got["mask"][i, :n].all() and not got["mask"][i, n:].any()
        assert not got["tokens"][i, n:].any()  # padded positions are stored as zeros
    assert max(lengths) == MAX_LEN and min(lengths) < MAX_LEN // 2  # truncation + real padding happened


@pytest.mark.parametrize("kind", ["dinov2", "resnet"])
def test_image_cache_equals_direct_forward(kind, good_run, good_data, models, tmp_path):
    if kind == "dinov2":
        path = _file(good_run, "image")  # made with 2 DataLoader workers
    else:
        path = _file(run_extract(_cfg(good_data, tmp_path, models, modality="image", image_model=str(models["resnet"]),
                                      image_batch_size=5)), "image")
    proc = AutoImageProcessor.from_pretrained(models[kind])
    net = AutoModel.from_pretrained(models[kind]).eval()
    rows = _manifest(good_data)
    with cf.FeatureFile(path) as ff:
        assert list(ff.ids) == [r["id"] for r in rows]
        got = ff.load(("cls", "mean", "tokens", "mask"))
        grid = ff.grid
    for i, r in enumerate(rows):
        img = Image.open(good_data / r["image"]).convert("RGB")
        with torch.no_grad():
            out = net(pixel_values=proc(images=[img], return_tensors="pt")["pixel_values"])
        if kind == "dinov2":
            h = out.last_hidden_state[0].numpy()
            cls, mean, tokens = h[0], h[1:].mean(0), h[1:]
        else:
            fmap = out.last_hidden_state[0]
            cls = mean = out.pooler_output.flatten().numpy()
            tokens = fmap.flatten(1).T.numpy()
        assert tokens.shape[0] == grid[0] * grid[1]
        np.testing.assert_allclose(got["cls"][i], cls, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["mean"][i], mean, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["tokens"][i], tokens, atol=1e-4, rtol=1e-4)
        assert got["mask"][i].all()


def test_float16_cache_within_tolerance_and_grouping_keeps_order(good_run, good_data, models, tmp_path):
    half = run_extract(_cfg(good_data, tmp_path / "h", models, dtype="float16"))
    flat = run_extract(_cfg(good_data, tmp_path / "f", models, modality="text", length_grouping=False, text_batch_size=3))
    for modality in ("text", "image"):
        with cf.FeatureFile(_file(good_run, modality)) as a, cf.FeatureFile(_file(half, modality)) as b:
            assert b.dtype == "float16" and list(a.ids) == list(b.ids)
            x, y = a.load(("cls", "tokens", "mask")), b.load(("cls", "tokens", "mask"), dtype=None)
            assert y["cls"].dtype == np.float16
            np.testing.assert_allclose(y["cls"].astype(np.float32), x["cls"], atol=5e-3, rtol=5e-3)
            np.testing.assert_allclose(y["tokens"].astype(np.float32), x["tokens"], atol=5e-3, rtol=5e-3)
            assert (x["mask"] == y["mask"]).all()
    with cf.FeatureFile(_file(good_run, "text")) as a, cf.FeatureFile(_file(flat, "text")) as b:
        assert list(a.ids) == list(b.ids)
        for k, v in a.load(("cls", "mean", "tokens", "mask")).items():
            np.testing.assert_allclose(b.load((k,))[k], v, atol=1e-5, rtol=1e-5)


def test_text_batch_plan_groups_by_length():
    lengths = np.array([5, 1, 9, 1, 5, 9, 2, 8])
    plan = text_batches(lengths, batch_size=2, window=8)
    assert [sorted(lengths[b].tolist()) for b in plan] == [[1, 1], [2, 5], [5, 8], [9, 9]]
    assert all((np.diff(b) > 0).all() for b in plan)
    assert sorted(np.concatenate(plan).tolist()) == list(range(8))
    assert [b.tolist() for b in text_batches(lengths, 3, 8, grouping=False)] == [[0, 1, 2], [3, 4, 5], [6, 7]]


# --------------------------------------------------------------------------------------------- failures, reruns

@pytest.fixture(scope="module")
def bad_run(bad_data, models, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache_bad")
    cfg = _cfg(bad_data, cache, models, num_workers=2, batch_size=3)
    return cfg, run_extract(cfg)


def test_bad_samples_are_recorded_and_run_completes(bad_run):
    _cfg_, s = bad_run
    by = {m.modality: m for m in s.modalities}
    assert by["image"].complete and by["text"].complete
    assert by["image"].failures == {"missing image file": 1, "truncated image": 2, "cannot identify image": 1,
                                    "decompression bomb": 1}
    assert by["text"].failures == {"empty text": 1}
    assert by["image"].encoded == N_GOOD + 1 and by["image"].failed == 5  # b_empty_text has a good image
    assert by["text"].encoded == N_GOOD + 5 and by["text"].failed == 1
    with cf.FeatureFile(_file(s, "image")) as ff:
        fails = dict(ff.failures())
        assert fails["b_trunc_png"].startswith("truncated image") and fails["b_trunc_jpg"].startswith("truncated image")
        ids, valid, arr = list(ff.ids), ff.valid, ff.load(("cls", "tokens", "mask"))
        assert ff.done.all()
    bad = [ids.index(i) for i in ("b_missing", "b_trunc_png", "b_trunc_jpg", "b_notimage", "b_bomb")]
    assert not valid[bad].any() and valid.sum() == N_GOOD + 1
    assert not arr["cls"][bad].any() and not arr["mask"][bad].any()  # failed rows stay zero / masked out
    assert np.abs(arr["cls"][valid]).sum(1).min() > 0
    with open(s.failures_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["modality"], r["id"]) for r in rows} == {("image", i) for i in
                                                        ("b_missing", "b_trunc_png", "b_trunc_jpg", "b_notimage",
                                                         "b_bomb")} | {("text", "b_empty_text")}
    assert all(r["reason"] for r in rows)


def test_second_run_is_fast_noop(bad_run):
    cfg, first = bad_run
    before = {m: _arrays(_file(first, m)) for m in ("text", "image")}
    t0 = time.perf_counter()
    s = run_extract(cfg)
    assert time.perf_counter() - t0 < 10
    assert s.up_to_date and s.index_status == "unchanged"
    assert all(m.encoded == 0 and m.failed == 0 and m.already_done == m.total for m in s.modalities)
    for m in ("text", "image"):
        after = _arrays(_file(s, m))
        assert all(np.array_equal(before[m][k], after[k]) for k in before[m])


def test_mismatched_rerun_refused_and_force_rebuilds(bad_run, models, tmp_path):
    cfg, first = bad_run
    path = _file(first, "text")
    with pytest.raises(CacheError, match="max_length.*--force") as e:
        run_extract(ExtractConfig(**{**cfg.__dict__, "modality": "text", "text_max_length": MAX_LEN + 8}))
    assert isinstance(e.value, BadInputError)  # the CLI exits 2: the user must choose --force
    # other weights behind the same file name (named alike with --image-name) are refused too
    other = tm.build_dinov2(tmp_path / "elsewhere" / models["dinov2"].name, hidden_size=16, num_heads=2,
                            patch_size=8, image_size=32, seed=99)
    same_name = f"{models['dinov2'].parent.name}/{models['dinov2'].name}"
    with pytest.raises(CacheError, match="different settings.*weights_sha256"):
        run_extract(ExtractConfig(**{**cfg.__dict__, "modality": "image", "image_model": str(other),
                                     "image_name": same_name}))
    s = run_extract(ExtractConfig(**{**cfg.__dict__, "modality": "text", "text_max_length": MAX_LEN + 8, "force": True}))
    assert s.modalities[0].forced and s.modalities[0].complete and s.modalities[0].encoded == N_GOOD + 5
    with cf.FeatureFile(path) as ff:
        assert ff.num_tokens == MAX_LEN + 8


def test_resplit_keeps_features(good_data, models, tmp_path):
    cfg = _cfg(good_data, tmp_path, models, modality="text")
    first = run_extract(cfg)
    split_before = cf.read_index(first.index_path).splits
    with pytest.raises(BadInputError, match="--resplit"):  # another split is never taken silently
        run_extract(ExtractConfig(**{**cfg.__dict__, "seed": 7}))
    assert list(cf.read_index(first.index_path).splits) == list(split_before)
    s = run_extract(ExtractConfig(**{**cfg.__dict__, "seed": 7, "resplit": True}))
    assert s.index_status == "updated" and s.up_to_date
    assert list(cf.read_index(s.index_path).splits) != list(split_before)
    split_file = tmp_path / "split.csv"
    split_file.write_text("id,split\n" + "".join(f"s{i:02d},{'train' if i < 10 else 'test'}\n" for i in range(N_GOOD)))
    s = run_extract(ExtractConfig(**{**cfg.__dict__, "split_file": split_file, "resplit": True}))
    assert s.index_status == "updated" and s.up_to_date
    index = cf.read_index(s.index_path)
    assert str(split_file) in index.attrs["split_source"]
    assert index.split_spec["kind"] == "file" and [h["to"]["kind"] for h in index.split_history] == ["seeded", "file"]


def test_shards_partition_rows_and_match_single_run(good_run, good_data, models, tmp_path):
    assert [shard_rows(10, i, 3).tolist() for i in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    parts = []
    for i in range(2):
        s = run_extract(_cfg(good_data, tmp_path, models, modality="text", shard=(i, 2)))
        path = _file(s, "text")
        assert path.name == f"text--{models['bert'].parent.name}--bert.shard-{i}-of-2.h5" and s.failures_csv is None
        parts.append(path)
    assert cf.list_feature_files(parts[0].parent) == []  # shard files are not mistaken for the full file
    assert cf.list_shard_files(parts[0].parent) == parts
    with cf.FeatureFile(_file(good_run, "text")) as full:
        ref = full.load(("cls", "tokens"))
        ids = list(full.ids)
    for p in parts:
        with cf.FeatureFile(p) as ff:
            assert ff.shard == [parts.index(p), 2] and ff.complete
            rows = ff.rows
            assert list(ff.ids) == [ids[r] for r in rows]
            np.testing.assert_allclose(ff.load(("cls",))["cls"], ref["cls"][rows], atol=1e-5)


# --------------------------------------------------------------------------------------------- kill -9

_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from mmcache.cache import writer
_orig = writer.write_rows
def _slow(ds, rows, sel, values):  # slow every dataset write: the kill lands anywhere in a batch
    _orig(ds, rows, sel, values)
    time.sleep(0.01)
writer.write_rows = _slow
from mmcache.extract.extraction import ExtractConfig, run_extract
run_extract(ExtractConfig(**json.loads(sys.argv[1])))
"""


def test_kill9_then_resume_equals_uninterrupted_run(tmp_path, models):
    data = tmp_path / "demo"
    kw = dict(dataset="demo", data_dir=str(data), options={"n": 60}, text_model=str(models["bert"]),
              image_model=str(models["dinov2"]), device="cpu", batch_size=2, num_workers=0, progress=False)
    ref = run_extract(ExtractConfig(cache_dir=str(tmp_path / "ref"), **kw))  # also generates the demo data
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO)))
    cfg = dict(cache_dir=str(tmp_path / "killed"), **kw)
    target = Path(cfg["cache_dir"]) / "demo" / Path(_file(ref, "image")).name
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    done_at_kill = 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if target.exists():
                try:
                    with h5py.File(target, "r", locking=False) as f:
                        done_at_kill = int(f["done"][...].sum())
                except (OSError, KeyError):
                    done_at_kill = 0
                if done_at_kill >= 10:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"child finished before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL and 10 <= done_at_kill < 60
    with cf.FeatureFile(target) as ff:  # the killed file opens cleanly and is not mistaken for finished
        assert not ff.complete and 0 < ff.done.sum() < 60
    resumed = run_extract(ExtractConfig(**cfg))
    img = next(m for m in resumed.modalities if m.modality == "image")
    assert img.already_done >= 8 and img.encoded == 60 - img.already_done and img.complete
    for modality in ("image", "text"):
        a, b = _arrays(_file(ref, modality)), _arrays(_file(resumed, modality))
        assert set(a) == set(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{modality}/{k} differs after resume"


# --------------------------------------------------------------------------------------------- CLI

def test_cli_extract_demo_end_to_end(tmp_path, capsys):
    from mmcache.extract.datasets.demo import demo_words
    from mmcache.extract.demo_models import ensure_demo_models

    from mmcache import cli

    text_dir, image_dir = ensure_demo_models(tmp_path / "models")
    stamp = (text_dir / tm.MARKER_NAME).stat().st_mtime_ns
    assert ensure_demo_models(tmp_path / "models") == (text_dir, image_dir)
    assert (text_dir / tm.MARKER_NAME).stat().st_mtime_ns == stamp  # idempotent: reused, not rebuilt
    tok = AutoTokenizer.from_pretrained(text_dir)
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in demo_words())
    cache = tmp_path / "cache"
    args = ["extract", "--dataset", "demo", "--data-dir", str(tmp_path / "demo"), "--option", "n=40",
            "--text-model", str(text_dir), "--image-model", str(image_dir), "--cache-dir", str(cache),
            "--num-workers", "1", "--batch-size", "8", "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    # a local folder without a hub-style _name_or_path is named parent/folder
    assert "text--models--bert-demo.h5" in out and "image--models--dinov2-demo.h5" in out and "up to date" not in out
    assert cli.main(args) == 0
    assert capsys.readouterr().out.startswith("up to date")
    assert cli.main([*args, "--text-max-length", "16", "--modality", "text"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["cache", "info", str(cache)]) == 0
    out = capsys.readouterr().out
    for name in ("index.h5", "text--models--bert-demo.h5", "image--models--dinov2-demo.h5", "complete", "(40, 128, 32)"):
        assert name in out
    assert cli.main(["cache", "info", str(cache / "demo" / "text--models--bert-demo.h5"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info[0]["arrays"]["tokens"] == {"shape": [40, 128, 32], "dtype": "float16"} and info[0]["failed"] == 0
    assert cli.main(["cache", "info", str(tmp_path / "nowhere")]) == 2
    assert cli.main([*args, "--modality", "sound"]) == 2
    assert cli.main([*args, "--shard", "3/2"]) == 2


# --------------------------------------------------------------------------------------------- images, format

def test_load_image_reasons(tmp_path):
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # alpha over white
    Image.new("RGB", (50, 40)).save(tmp_path / "big.png")
    with pytest.raises(ImageFailure, match="decompression bomb: 50x40"):
        load_image(tmp_path / "big.png", max_pixels=1000)
    _png_bomb(tmp_path / "bomb.png")
    with pytest.raises(ImageFailure, match="^decompression bomb"):
        load_image(tmp_path / "bomb.png")
    for path, reason in ((None, "no image path"), (tmp_path / "nope.jpg", "missing image file"),
                         (tmp_path, "missing image file")):
        with pytest.raises(ImageFailure, match=reason):
            load_image(path)


def test_shard_path_names(tmp_path):
    assert cf.shard_path(tmp_path, "d", "text", "bert-base-uncased", 0, 1) == cf.feature_path(tmp_path, "d", "text", "bert-base-uncased")
    assert cf.shard_path(tmp_path, "d", "image", "facebook/dinov2-base", 2, 4).name == \
        "image--facebook--dinov2-base.shard-2-of-4.h5"
    with pytest.raises(BadInputError):
        cf.shard_path(tmp_path, "d", "text", "m", 4, 4)
