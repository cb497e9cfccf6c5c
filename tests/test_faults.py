"""Faults injected into stage one, and what must happen (issue 10, items 3, 5, 6, 8):

* flipped bytes in a feature file: found by checksum on load, by `cache verify` and by `cache info`
  (small arrays), never trained on, recomputed by a plain rerun / `--repair` to the reference values;
* two writers: the second is refused (exit 2, naming the holder), `--force` too; a stale lock is
  recovered; readers of other, complete files keep working;
* disk full: before allocating (injected free space) and mid-run (injected ENOSPC): one `error:` line
  with the bytes, nothing left that blocks a plain rerun, which ends equal to a run that had space;
* a 60000 x 1 PNG: recorded as `image_too_large`, every other sample cached.

Tiny random BERT / DINOv2 built locally, a 12-post folder dataset, float32, batch 4, no workers.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import one_error_line as _one_error_line
from conftest import run_cli as _run
from mmcache.extract import tiny_models as tm
from mmcache.extract.extraction import ExtractConfig, run_extract
from mmcache.extract.images import ImageFailure, check_resized, load_image, resize_plan
from PIL import Image

from mmcache import cache as cf
from mmcache.cache import integrity as ci
from mmcache.cache import writer
from mmcache.cache.lock import CacheBusyError, folder_lock
from mmcache.errors import BadInputError, CacheError, DiskFullError

N = 12
WORDS = "i love this great day but hate the awful rain so sad today with friends".split()


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"bert": tm.build_bert(root / "bert", hidden_size=16, num_heads=2, seed=31),
            "dinov2": tm.build_dinov2(root / "dinov2", hidden_size=16, num_heads=2, patch_size=8, image_size=32,
                                      seed=32)}


def _write_posts(root: Path, extra: list[dict] | None = None) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(N):
        name = f"img/p{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, size=(int(rng.integers(20, 50)), 30, 3), dtype=np.uint8)).save(root / name)
        rows.append({"id": f"p{i:02d}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))),
                     "image": name, "label": ["positive", "neutral", "negative"][i % 3]})
    rows[5:5] = extra or []
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_posts(tmp_path_factory.mktemp("posts"))


def _cfg(data: Path, cache: Path, models, **kw) -> ExtractConfig:
    base = dict(dataset="folder", data_dir=data, cache_dir=cache, name="posts", text_model=str(models["bert"]),
                image_model=str(models["dinov2"]), text_max_length=16, dtype="float32", device="cpu",
                batch_size=4, num_workers=0, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


def _argv(data: Path, cache: Path, models, *extra: str) -> list[str]:
    return ["extract", "-d", "folder", "--data-dir", str(data), "--cache-dir", str(cache), "--name", "posts",
            "--text-model", str(models["bert"]), "--image-model", str(models["dinov2"]), "--text-max-length", "16",
            "--dtype", "float32", "--device", "cpu", "--batch-size", "4", "--num-workers", "0", "--no-progress",
            *extra]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f.keys()}


def _feature_files(cache: Path) -> dict[str, Path]:
    return {p.name.split("--")[0]: p for p in cf.list_feature_files(cache / "posts")}


def _assert_equal_to(cache: Path, reference: Path) -> None:
    got, ref = _feature_files(cache), _feature_files(reference)
    assert set(got) == set(ref) == {"text", "image"}
    for modality in ref:
        a, b = _arrays(ref[modality]), _arrays(got[modality])
        assert set(a) == set(b) and "checksum" in a
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{modality}/{k} differs from the reference run"


@pytest.fixture(scope="module")
def reference(data, models, tmp_path_factory):
    cache = tmp_path_factory.mktemp("reference")
    run_extract(_cfg(data, cache, models))
    return cache


@pytest.fixture
def cache(reference, tmp_path):
    """A fresh copy of the reference cache (tests damage it)."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    return out






def _flip(path: Path, name: str, row: int, nbytes: int = 4096) -> None:
    """Overwrite ``nbytes`` raw bytes of dataset ``name`` from the start of ``row`` (HDF5 untouched)."""
    with h5py.File(path, "r") as f:
        ds = f[name]
        info = ds.id.get_chunk_info_by_coord((0,) * ds.ndim)
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
        chunk_rows = ds.chunks[0]
        assert row < chunk_rows, "the test flips bytes inside the first chunk"
        offset, end = info.byte_offset + row * row_bytes, info.byte_offset + info.size
    nbytes = min(nbytes, end - offset)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(nbytes)
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in old))


# --------------------------------------------------------------------------------------------- item 3: flipped bytes

def test_flipped_bytes_are_found_never_trained_on_and_repaired(cache, reference, data, models, capsys):
    image = _feature_files(cache)["image"]
    with h5py.File(image, "r") as f:
        row_bytes = f["tokens"].dtype.itemsize * int(np.prod(f["tokens"].shape[1:]))
    _flip(image, "tokens", 6)  # 4 KiB in the middle of the file's token data
    damaged = list(range(6, 6 + -(-4096 // row_bytes)))
    ids = [f"p{i:02d}" for i in range(N)]
    with cf.FeatureFile(image) as ff:
        assert ff.complete  # the attribute cannot know ...
        with pytest.raises(CacheError, match=r"damaged rows.*--repair") as e:
            ff.load(("tokens", "mask"))  # ... but loading the arrays does
        assert all(ids[r] in str(e.value) for r in damaged) and str(image) in str(e.value)
        ff.load(("cls",))  # the other arrays are intact and still load

    code, out, _err = _run(capsys, "cache", "verify", str(cache))
    assert code == 1 and "damaged" in out and all(ids[r] in out for r in damaged) and "--repair" in out
    code, out, _err = _run(capsys, "cache", "verify", "--dataset", "posts", "--cache-dir", str(cache), "--json")
    entries = {Path(e["path"]).name.split("--")[0]: e for e in json.loads(out)}
    assert code == 1 and entries["text"]["status"] == "ok" and entries["image"]["status"] == "damaged"
    assert [d["row"] for d in entries["image"]["damaged"]] == damaged

    # stage two refuses instead of training on garbage (and does not blame the learning rate)
    code, _out, err = _run(capsys, "train-fusion", "--head", "image_only", "--features", "tokens", "--epochs", "1",
                           "--cache-dir", str(cache), "--runs-dir", str(cache.parent / "runs"), "--quiet")
    line = _one_error_line(err)
    assert code == 1 and "damaged rows" in line and "lr" not in line and not (cache.parent / "runs").exists()

    # a plain rerun finds and recomputes exactly those rows: equal to the untouched reference
    s = run_extract(_cfg(data, cache, models))
    by = {m.modality: m for m in s.modalities}
    assert by["image"].repaired == len(damaged) and by["image"].encoded == len(damaged) and by["text"].up_to_date
    _assert_equal_to(cache, reference)
    code, out, _err = _run(capsys, "cache", "verify", str(cache))
    assert code == 0 and "damaged" not in out.replace("damaged rows", "")


def test_cache_info_flags_damage_in_small_arrays_and_repair_flag(cache, reference, data, models, capsys):
    text = _feature_files(cache)["text"]
    _flip(text, "cls", 2, nbytes=16)
    code, out, _err = _run(capsys, "cache", "info", str(cache))
    assert code == 0 and "DAMAGED (1 rows" in out
    code, out, _err = _run(capsys, *_argv(data, cache, models, "--repair", "--modality", "text"))
    assert code == 0 and "repaired" in out and "text: 1" in out
    _assert_equal_to(cache, reference)


def test_repair_rebuilds_a_file_hdf5_cannot_open(cache, reference, data, models, capsys):
    image = _feature_files(cache)["image"]
    raw = bytearray(image.read_bytes())
    raw[:512] = b"\0" * 512  # the superblock: HDF5 cannot open the file at all
    image.write_bytes(bytes(raw))
    code, _out, err = _run(capsys, *_argv(data, cache, models))
    assert code == 1 and "--repair" in _one_error_line(err), err
    code, _out, _err = _run(capsys, *_argv(data, cache, models, "--repair"))
    assert code == 0 and len(list((cache / "posts").glob("image--*.damaged-*"))) == 1  # kept for inspection
    _assert_equal_to(cache, reference)


def test_nan_in_a_file_without_checksums_is_damage(tmp_path):
    path = tmp_path / "text--old.h5"
    with cf.FeatureWriter.open(path, ids=["a", "b", "c"], index_fp="f", modality="text", hidden_size=4, num_tokens=2,
                               config={"m": 1}) as w:
        w.write(np.arange(3), cls=np.ones((3, 4)), mean=np.ones((3, 4)), tokens=np.ones((3, 2, 4)),
                mask=np.ones((3, 2), bool))
        w.finalize()
        with pytest.raises(ValueError, match="non-finite"):  # the writer never stores NaN as values
            w.write(np.array([0]), cls=np.full((1, 4), np.nan), mean=np.ones((1, 4)), tokens=np.ones((1, 2, 4)),
                    mask=np.ones((1, 2), bool))
    with h5py.File(path, "r+") as f:  # as an older version wrote it, then damaged
        del f["checksum"]
        f["tokens"][1, 0, 0] = np.inf
    with cf.FeatureFile(path) as ff:
        assert not ff.has_checksums
        ff.load(("cls",))  # unverifiable but loadable
        with pytest.raises(CacheError, match=r"1 damaged rows.*b \(row 1\)"):
            ff.load(("tokens",))
    e = {x["status"] for x in __import__("mmcache.cache.info", fromlist=["verify"]).verify(path)}
    assert e == {"damaged"}


# --------------------------------------------------------------------------------------------- item 5: two writers

_WRITER = """
import sys, h5py
sys.path.insert(0, {repo!r})
from mmcache.cache.lock import folder_lock
with folder_lock({folder!r}):  # what an extract holds (and the file it writes, when given)
    f = h5py.File({path!r}, "r+") if {path!r} else None
    print("writing", flush=True)
    sys.stdin.readline()
"""


@contextmanager
def _holder(folder: Path, path: Path | None = None):
    """Another process holding the folder's write lock (and ``path`` open for writing) meanwhile."""
    repo = str(Path(__file__).resolve().parents[1])
    script = _WRITER.format(repo=repo, folder=str(folder), path=str(path) if path else "")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        yield proc
    finally:
        proc.communicate("done\n", timeout=30)
    assert proc.returncode == 0


def test_second_writer_refused_even_with_force_and_nothing_lost(cache, data, models, capsys):
    before = {m: _arrays(p) for m, p in _feature_files(cache).items()}
    with _holder(cache / "posts") as other:
        holder = json.loads((cache / "posts" / ".lock").read_text())
        assert holder["pid"] == other.pid and holder["host"] == socket.gethostname() and "-c" in holder["command"]
        for extra in ((), ("--force",)):
            code, _out, err = _run(capsys, *_argv(data, cache, models, *extra))
            line = _one_error_line(err)
            assert code == 2 and f"in use by pid {other.pid} on host {socket.gethostname()} since" in line
            assert "(command: " in line and "Loading weights" not in err  # refused before any model loads
        with pytest.raises(CacheBusyError):
            cf.merge_shards(_feature_files(cache)["image"], 2)
    for m, p in _feature_files(cache).items():  # --force deleted nothing
        assert all(np.array_equal(before[m][k], v) for k, v in _arrays(p).items())
    assert (cache / "posts" / ".lock").read_text() == ""  # released: the next run just works
    assert run_extract(_cfg(data, cache, models)).up_to_date


def test_stale_lock_of_a_dead_process_is_recovered(cache, data, models, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (cache / "posts" / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                        "command": "extract (killed)", "since": "earlier"}))
    with caplog.at_level("WARNING"):
        s = run_extract(_cfg(data, cache, models))
    assert s.up_to_date and "recovered a stale cache lock" in caplog.text and f"pid {pid}" in caplog.text




def test_readers_of_complete_files_work_while_another_modality_is_written(cache, capsys):
    from mmcache.fuse.data import load_data

    with _holder(cache / "posts", _feature_files(cache)["image"]) as writer:
        text = load_data("posts", modalities=("text",), features="tokens", cache_dir=cache)
        assert text.text.x.shape[0] == N  # the complete text file reads fine
        with pytest.raises(CacheBusyError, match=f"being written by pid {writer.pid}"):
            load_data("posts", modalities=("image",), cache_dir=cache)
        code, _out, err = _run(capsys, "train-fusion", "--head", "image_only", "--epochs", "1", "--cache-dir",
                               str(cache), "--runs-dir", str(cache.parent / "runs"), "--quiet")
        line = _one_error_line(err)
        assert code == 2 and f"being written by pid {writer.pid}" in line and "--force" not in line
        code, out, _err = _run(capsys, "cache", "info", str(cache))
        assert code == 0 and "being written" in out


def test_shard_writers_share_the_folder_but_not_a_shard(tmp_path):
    folder = tmp_path / "posts"
    with folder_lock(folder, shard_file="shard-0-of-2"), folder_lock(folder, shard_file="shard-1-of-2"):
        pass  # re-entrant in one process; across processes below
    code = ("import sys; sys.path.insert(0, {repo!r}); from mmcache.cache.lock import folder_lock\n"
            "with folder_lock({folder!r}, shard_file={shard!r}): print('ok')")
    repo = str(Path(__file__).resolve().parents[1])

    def other(shard):
        return subprocess.run([sys.executable, "-c", code.format(repo=repo, folder=str(folder), shard=shard)],
                              capture_output=True, text=True)

    with folder_lock(folder, shard_file="shard-0-of-2"):
        assert other("shard-1-of-2").stdout.strip() == "ok"  # another shard of the same run
        busy = other("shard-0-of-2")  # the same shard twice
        assert busy.returncode != 0 and "CacheBusyError" in busy.stderr and f"pid {os.getpid()}" in busy.stderr
        assert "CacheBusyError" in other(None).stderr  # an unsharded writer next to a shard run
    assert other(None).stdout.strip() == "ok"


# --------------------------------------------------------------------------------------------- item 6: disk full

def test_too_little_free_space_is_one_error_and_a_rerun_completes(data, models, reference, tmp_path, capsys,
                                                                  monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(ci, "_free_bytes", lambda folder: 1000)
    code, _out, err = _run(capsys, *_argv(data, cache, models))
    line = _one_error_line(err)
    assert code == 1 and "not enough disk space" in line and "needs" in line and "1,000 available" in line
    assert not list((cache / "posts").glob("*--*")) and not list((cache / "posts").glob(".*.creating-*"))
    monkeypatch.undo()
    assert run_extract(_cfg(data, cache, models)).modalities[0].complete
    _assert_equal_to(cache, reference)


def test_enospc_while_creating_leaves_nothing_behind(data, models, reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real = cf.FeatureWriter.create_arrays

    def full(f, *a, **kw):
        real(f, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cf.FeatureWriter, "create_arrays", staticmethod(full))
    with pytest.raises(DiskFullError, match=r"disk full writing .*needs [\d,]+ bytes") as raised:
        run_extract(_cfg(data, cache, models, modality="image"))
    assert str(raised.value).endswith("; rerun the same command to resume")  # what an API caller reads
    assert not list((cache / "posts").glob("*--*")) and not list((cache / "posts").glob(".image*"))
    monkeypatch.undo()
    run_extract(_cfg(data, cache, models))
    _assert_equal_to(cache, reference)


def test_enospc_mid_run_keeps_finished_batches(data, models, reference, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    real, calls = writer.write_rows, {"n": 0}

    def filling_up(ds, rows, sel, values):
        if ds.name == "/tokens" and "image--" in ds.file.filename:
            calls["n"] += 1
            if calls["n"] == 2:  # the second image batch hits a full disk (HDF5 words it its own way)
                raise OSError("Can't write data (file write failed: errno = 28, error message = "
                              "'No space left on device')")
        real(ds, rows, sel, values)

    monkeypatch.setattr(writer, "write_rows", filling_up)
    code, _out, err = _run(capsys, *_argv(data, cache, models))
    line = _one_error_line(err)  # the CLI spells out the command to rerun
    assert code == 1 and "disk full writing" in line and "rerun `" in line and " extract " in line
    with cf.FeatureFile(_feature_files(cache)["image"]) as ff:
        assert not ff.complete and ff.done.sum() == 4  # the first batch is kept
    monkeypatch.undo()
    s = run_extract(_cfg(data, cache, models))
    img = next(m for m in s.modalities if m.modality == "image")
    assert img.already_done == 4 and img.encoded == N - 4 and img.complete
    _assert_equal_to(cache, reference)


# --------------------------------------------------------------------------------------------- item 8: shape bombs

def test_resize_plan_and_cap():
    dinov2 = {"do_resize": True, "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}
    assert resize_plan(dinov2) == (256, None)
    assert resize_plan({"size": {"shortest_edge": 224}, "crop_pct": 0.875}) == (256, None)  # ConvNeXt / ResNet
    assert resize_plan({"size": {"height": 224, "width": 224}}) is None  # fixed size: shape cannot explode
    assert resize_plan({"do_resize": False, "size": {"shortest_edge": 224}}) is None
    check_resized(640, 480, (256, None), 4_000_000)
    with pytest.raises(ImageFailure, match=r"^image_too_large: 60000x1 would be resized to 15360000x256"):
        check_resized(60000, 1, (256, None), 4_000_000)
    check_resized(60000, 1, (256, 1333), 4_000_000)  # a longest-edge cap keeps it small


def test_60000x1_png_is_a_recorded_failure_and_the_rest_is_cached(models, tmp_path):
    root = tmp_path / "posts"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (60000, 1), (200, 10, 10)).save(root / "img/strip.png")
    assert (root / "img/strip.png").stat().st_size < 2000
    with pytest.raises(ImageFailure, match="image_too_large"):
        load_image(root / "img/strip.png", resize=(32, None))
    _write_posts(root, extra=[{"id": "strip", "text": "a very long image", "image": "img/strip.png",
                               "label": "neutral"}])
    s = run_extract(_cfg(root, tmp_path / "cache", models, num_workers=1))
    image = next(m for m in s.modalities if m.modality == "image")
    assert image.complete and image.failures == {"image_too_large": 1} and image.valid == N
    with open(s.failures_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["reason"].split(":")[0]) for r in rows] == [("strip", "image_too_large")]
    with cf.FeatureFile(image.path) as ff:
        ids, valid = list(ff.ids), ff.valid
        assert not valid[ids.index("strip")] and valid.sum() == N


def test_bad_values_for_new_options_exit_2(capsys, data, models, tmp_path):
    code, _out, err = _run(capsys, *_argv(data, tmp_path / "c", models, "--max-resized-pixels", "0"))
    assert code == 2 and "--max-resized-pixels" in _one_error_line(err)
    assert issubclass(CacheBusyError, BadInputError)
