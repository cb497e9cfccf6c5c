"""`cache merge` without copying: a virtual HDF5 file over the shards (mmcache.cache.virtual).

Values through the virtual file equal the copying merge's bit for bit, for every dataset; the merge is
O(metadata) (fast, < 1 MB); the folder can be moved; a missing, replaced or truncated shard is one
clear error (never HDF5's silent fill values); checksums, `cache verify` and `extract --repair` work
through it; stage two trains on it. Tiny random BERT / DINOv2 checkpoints, an 18-post folder dataset.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import extract_args, tiny_encoders, write_posts

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import CacheError

N = 18


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_encoders(tmp_path_factory.mktemp("models"), seed=31)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_posts(tmp_path_factory.mktemp("vposts"), N, 5, empty_text=11, max_words=20)


def _args(data, models, cache, *extra) -> list[str]:
    return extract_args(data, models, cache, *extra, batch_size=4, max_len=12)


@pytest.fixture(scope="module")
def shards(data, models, tmp_path_factory) -> Path:
    """A dataset folder holding 2 complete shards per modality (never merged: tests copy it)."""
    cache = tmp_path_factory.mktemp("shards")
    for i in range(2):
        assert cli.main(_args(data, models, cache, "--shard", f"{i}/2")) == 0
    folder = cache / data.name
    assert len(cf.list_shard_files(folder)) == 4
    return folder


def _fresh(shards: Path, where: Path) -> Path:
    folder = where / "cache" / shards.name
    shutil.copytree(shards, folder)
    return folder


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _text_file(folder: Path) -> Path:
    return next(p for p in cf.list_feature_files(folder) if p.name.startswith("text--"))


def _shard(merged: Path, i: int) -> Path:
    return merged.with_name(f"{merged.stem}.shard-{i}-of-2.h5")


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: (f[k].asstr()[...] if h5py.check_string_dtype(f[k].dtype) and f[k].dtype.kind == "O" else f[k][...])
                for k in f}


# --------------------------------------------------------------------------------------------- equal to the copy

def test_virtual_merge_equals_copying_merge_bit_for_bit(shards, tmp_path, capsys):
    v, c = _fresh(shards, tmp_path / "v"), _fresh(shards, tmp_path / "c")
    before = _folder_bytes(v)
    assert cli.main(["cache", "merge", str(v)]) == 0
    out = capsys.readouterr().out
    assert out.count("merged 2 shards") == 2 and out.count("shard files kept: the virtual merge reads them") == 2
    assert cli.main(["cache", "merge", "--copy", str(c)]) == 0
    assert capsys.readouterr().out.count("shard files removed") == 2
    assert len(cf.list_shard_files(v)) == 4 and cf.list_shard_files(c) == []
    assert _folder_bytes(v) - before < 1 << 20  # metadata (and ids), not a second copy of the features
    for merged in cf.list_feature_files(v):
        got, want = _datasets(merged), _datasets(c / merged.name)
        assert set(got) == set(want)
        for name, arr in want.items():  # bit for bit, every dataset (ids, rows, checksums included)
            assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
            assert got[name].tobytes() == arr.tobytes() if arr.dtype != object else list(got[name]) == list(arr), name
        with h5py.File(merged, "r") as fv, h5py.File(c / merged.name, "r") as fc:
            assert all(fv[k].is_virtual for k in fv if k != "id") and not fv["id"].is_virtual  # id: copied
            assert fv["checksum"].attrs["fields"] == fc["checksum"].attrs["fields"]
            same = set(fc.attrs) - {"merged_from", "updated"}
            assert all(np.array_equal(fv.attrs[k], fc.attrs[k]) for k in same), same
            assert bool(fv.attrs["virtual"]) and "virtual" not in fc.attrs
            src = json.loads(fv.attrs["merged_from"])
            assert [s["file"] for s in src["shards"]] == [_shard(merged, i).name for i in range(2)]
            assert src["shards"][0]["config_fingerprint"] == fv.attrs["config_fingerprint"]
        with cf.FeatureFile(merged) as ff:
            assert ff.complete and not ff.verify()
    assert (v / cf.FAILURES_NAME).read_text() == (c / cf.FAILURES_NAME).read_text()
    info = cf.format_info(cf.collect(v), width=300)
    assert "complete (virtual, 2 shards)" in info and "virtual over 2 shards" in info
    # merging again is an already-merged no-op that never removes the shards a virtual file reads
    res = cf.merge_shards(_text_file(v), 2, skip_if_merged=True)
    assert res.status == "already merged" and not res.removed_shards and len(cf.list_shard_files(v)) == 4
    # --copy over a virtual merge: the same bytes in one self-contained file, the shards removed
    assert cli.main(["cache", "merge", "--copy", str(v)]) == 0 and cf.list_shard_files(v) == []
    for merged in cf.list_feature_files(v):
        got, want = _datasets(merged), _datasets(c / merged.name)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want if want[k].dtype != object)
        with h5py.File(merged, "r") as f:
            assert "virtual" not in f.attrs and not f["cls"].is_virtual


def test_moved_folder_still_reads(shards, tmp_path, monkeypatch):
    v = _fresh(shards, tmp_path / "a")
    cf.merge_paths([v])
    want = {}
    for p in cf.list_feature_files(v):
        with cf.FeatureFile(p) as ff:
            want[p.name] = ff.load(("cls", "tokens", "mask"), dtype=None)
    moved = tmp_path / "elsewhere" / "deeper" / v.name
    shutil.move(str(v.parent), str(moved.parent))  # the whole cache folder
    monkeypatch.chdir(tmp_path)  # neither the old nor the new folder
    for name, arrays in want.items():
        with cf.FeatureFile(moved / name) as ff:
            got = ff.load(("cls", "tokens", "mask"), dtype=None)
            assert all(np.array_equal(got[k], arrays[k]) for k in arrays) and not ff.verify()


# --------------------------------------------------------------------------------------------- never silently lossy

@pytest.mark.parametrize("fault", ["missing", "replaced", "truncated"])
def test_broken_shard_is_one_clear_error(shards, tmp_path, capsys, fault):
    v = _fresh(shards, tmp_path)
    cf.merge_paths([v])
    merged = _text_file(v)
    s0 = _shard(merged, 0)
    if fault == "missing":
        s0.unlink()
    elif fault == "replaced":
        shutil.copyfile(_shard(merged, 1), s0)
    else:
        with open(s0, "r+b") as fh:
            fh.truncate(s0.stat().st_size // 2)
    word = {"missing": "is missing", "replaced": "was replaced", "truncated": "is truncated"}[fault]
    with pytest.raises(CacheError, match=rf"shard 0 \({s0.name}\) {word}") as e:
        cf.FeatureFile(merged)
    assert "--shard 0/2 --force" in str(e.value) and f"cache merge {v}" in str(e.value)
    with pytest.raises(CacheError, match=word):  # a writer (resume / --repair) is refused too
        cf.FeatureWriter.open(merged, ids=[], index_fp="", modality="text", hidden_size=16, num_tokens=12,
                              config={})
    code = cli.main(["train-fusion", "--head", "basic", "--dataset", v.name, "--cache-dir", str(v.parent),
                     "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err and s0.name in lines[0] and word in lines[0], err
    assert cli.main(["cache", "verify", str(v)]) == 1
    assert f"{merged}: {merged} is a virtual merge" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- verify + repair

def _flip_cls_byte(shard: Path, row: int) -> None:
    """Flip the lowest mantissa bit of ``cls[row, 0]`` in the file's bytes (a finite, wrong value)."""
    with h5py.File(shard, "r") as f:
        ds = f["cls"]
        info = ds.id.get_chunk_info_by_coord((row - row % ds.chunks[0], 0))
        offset = info.byte_offset + (row % ds.chunks[0]) * ds.shape[1] * ds.dtype.itemsize
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 1]))


def test_flipped_byte_in_shard_found_through_virtual_file_and_repaired(shards, data, models, tmp_path, capsys):
    v = _fresh(shards, tmp_path)
    cf.merge_paths([v])
    merged = _text_file(v)
    with cf.FeatureFile(merged) as ff:
        before = ff.load(("cls", "mean", "tokens", "mask"), dtype=None)
        ids = ff.ids
    s1 = _shard(merged, 1)
    with h5py.File(s1, "r") as f:
        target = int(f["row"][2])  # shard 1's third row: its position in the merged file
    _flip_cls_byte(s1, 2)
    assert cli.main(["cache", "verify", str(merged)]) == 1
    out = capsys.readouterr().out
    assert f"{merged}: 1 damaged rows: {ids[target]} (row {target}: cls)" in out and "--repair" in out
    size = merged.stat().st_size
    assert cli.main(_args(data, models, v.parent, "--repair")) == 0  # the unsharded command, through the file
    capsys.readouterr()
    assert cli.main(["cache", "verify", str(v)]) == 0  # the merged file and the shard it wrote into
    with cf.FeatureFile(merged) as ff:
        after = ff.load(("cls", "mean", "tokens", "mask"), dtype=None)
        assert ff.complete and bool(ff.attrs["virtual"]) and merged.stat().st_size < size + (64 << 10)
    for k in before:
        np.testing.assert_allclose(after[k], before[k], atol=1e-5, rtol=1e-5, err_msg=k)
    with h5py.File(s1, "r") as f:  # recomputed into the shard file itself (HDF5 writes through the mapping)
        assert f["cls"][2].tobytes() == after["cls"][target].tobytes()


# --------------------------------------------------------------------------------------------- stage two

def test_stage_two_trains_on_a_virtual_merge(shards, tmp_path, capsys):
    v = _fresh(shards, tmp_path)
    cf.merge_paths([v])
    code = cli.main(["train-fusion", "--head", "basic", "--dataset", v.name, "--cache-dir", str(v.parent),
                     "--runs-dir", str(tmp_path / "runs"), "--run-name", "r", "--dim", "8", "--epochs", "1",
                     "--batch-size", "8", "--device", "cpu", "--threads", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    assert metrics["val"] and "dropped 1 samples with a missing modality (text: 1)" in out  # shard 1's failure


# --------------------------------------------------------------------------------------------- synthetic shards

def _write_shards(folder: Path, rows_of: list[np.ndarray], hidden: int, tokens: int, seed: int = 0) -> list[Path]:
    """Complete shards of a 'd' dataset written with the real FeatureWriter (random finite values)."""
    rng = np.random.default_rng(seed)
    n = len(rows_of)
    paths = []
    for i, rows in enumerate(rows_of):
        path = cf.shard_path(folder.parent, folder.name, "text", "m", i, n)
        k = rows.size
        with cf.FeatureWriter.open(path, ids=[f"s{r}" for r in rows], rows=rows, index_fp="fp", modality="text",
                                   hidden_size=hidden, num_tokens=tokens, dtype="float16", config={"m": 1},
                                   shard=(i, n)) as w:
            for a in range(0, k, 64):
                b = min(k, a + 64)
                w.write(np.arange(a, b), cls=rng.standard_normal((b - a, hidden)),
                        mean=rng.standard_normal((b - a, hidden)), tokens=rng.standard_normal((b - a, tokens, hidden)),
                        mask=rng.random((b - a, tokens)) < 0.8)
            w.finalize()
        paths.append(path)
    return paths


def test_merge_of_tens_of_mb_is_fast_and_small(tmp_path):
    folder = tmp_path / "d"
    _write_shards(folder, [np.arange(0, 320), np.arange(320, 640)], hidden=512, tokens=64)  # 2 x 21 MB
    before = _folder_bytes(folder)
    t0 = time.perf_counter()
    (res,) = cf.merge_paths([folder])
    seconds = time.perf_counter() - t0
    assert res.virtual and res.status == "merged" and seconds < 1.0, seconds
    assert _folder_bytes(folder) - before < 1 << 20
    with cf.FeatureFile(res.path) as ff:
        assert ff.load(("tokens",), dtype=None)["tokens"].shape == (640, 64, 512) and not ff.verify()


def test_every_dataset_is_merged_and_scattered_rows_map_run_by_run(tmp_path):
    """Lean shards (no `tokens`) with an extra bookkeeping dataset, rows interleaved between shards."""
    folder = tmp_path / "d"
    rows_of = [np.asarray([0, 1, 4, 5, 8]), np.asarray([2, 3, 6, 7])]
    paths = _write_shards(folder, rows_of, hidden=4, tokens=3)
    for p, rows in zip(paths, rows_of, strict=True):
        with h5py.File(p, "r+") as f:
            del f["tokens"]
            f.create_dataset("seen", data=rows.astype(np.int32) * 10)
            f["seen"].attrs["note"] = "bookkeeping"
    cf.merge_paths([folder])
    got = _datasets(folder / "text--m.h5")
    assert "tokens" not in got and np.array_equal(got["seen"], np.arange(9) * 10)
    assert np.array_equal(got["row"], np.arange(9)) and list(got["id"]) == [f"s{r}" for r in range(9)]
    with h5py.File(folder / "text--m.h5", "r") as f:
        assert f["seen"].attrs["note"] == "bookkeeping" and f["seen"].is_virtual
    for p, rows in zip(paths, rows_of, strict=True):
        with h5py.File(p, "r") as f:
            assert np.array_equal(got["cls"][rows], f["cls"][...]) and np.array_equal(got["mask"][rows], f["mask"][...])
