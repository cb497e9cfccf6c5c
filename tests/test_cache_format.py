"""The format module on its own (h5py + numpy only): scattered writes, refusals, crash-state reads."""

from __future__ import annotations

import numpy as np
import pytest

from mmcache import cache as cf
from mmcache.cache import h5io
from mmcache.errors import BadInputError, CacheError


def _open(path, n, d=4, length=3, **kw):
    args = dict(ids=[f"s{i}" for i in range(n)], index_fp="idx", modality="text", hidden_size=d, num_tokens=length,
                dtype="float32", config={"model": "m", "max_length": length})
    args.update(kw)
    return cf.FeatureWriter.open(path, **args)


@pytest.mark.parametrize("span_bytes", [h5io._SPAN_RMW_BYTES, 0])  # one read-modify-write of the span / run by run
def test_scattered_rows_land_at_their_rows(tmp_path, monkeypatch, span_bytes):
    monkeypatch.setattr(h5io, "_SPAN_RMW_BYTES", span_bytes)
    n, d, length = 12, 4, 3
    rng = np.random.default_rng(0)
    ref = {k: np.zeros(s, np.float32) for k, s in (("cls", (n, d)), ("mean", (n, d)), ("tokens", (n, length, d)))}
    mask = np.zeros((n, length), bool)
    with _open(tmp_path / "f.h5", n, d, length) as w:
        for rows in (np.array([0, 1, 5, 6, 7, 11]), np.array([2, 9]), np.array([3, 4, 8])):
            vals = {k: rng.standard_normal((rows.size, *v.shape[1:])).astype(np.float32) for k, v in ref.items()}
            m = rng.random((rows.size, length)) < 0.7
            w.write(rows, mask=m, **vals)
            for k, v in vals.items():
                ref[k][rows] = v
            mask[rows] = m
        w.write_failures(np.array([10, 2]), ["bad: two", "bad: ten"])
        assert w.finalize() is True
    with cf.FeatureFile(tmp_path / "f.h5") as ff:
        got = ff.load(("cls", "mean", "tokens", "mask"))
        keep = np.ones(n, bool)
        keep[[2, 10]] = False  # recorded as failures (readers go by `valid`)
        for k in ("cls", "mean", "tokens"):
            np.testing.assert_array_equal(got[k][keep], ref[k][keep])
        np.testing.assert_array_equal(got["mask"][[0, 1, 3]], mask[[0, 1, 3]])
        assert ff.failures() == [("s2", "bad: ten"), ("s10", "bad: two")]
        assert ff.valid.sum() == 10 and ff.complete


def test_mismatch_is_refused_with_exit2_error(tmp_path):
    with _open(tmp_path / "f.h5", 3) as w:
        w.write(np.array([0]), cls=np.ones((1, 4)), mean=np.ones((1, 4)), tokens=np.ones((1, 2, 4)),
                mask=np.ones((1, 2), bool))
    with pytest.raises(cf.CacheMismatchError, match=r"max_length.*--force") as e:
        _open(tmp_path / "f.h5", 3, config={"model": "m", "max_length": 9})
    assert isinstance(e.value, CacheError) and isinstance(e.value, BadInputError)
    with pytest.raises(cf.CacheMismatchError, match="different sample index"):
        _open(tmp_path / "f.h5", 3, index_fp="other")
    with _open(tmp_path / "f.h5", 3) as w:  # same settings: resumes, one row done
        assert w.pending_rows().tolist() == [1, 2] and not w.up_to_date and w.failed_rows().size == 0
    with _open(tmp_path / "f.h5", 3, config={"model": "m", "max_length": 9}, force=True) as w:
        assert w.pending_rows().tolist() == [0, 1, 2]


def test_damaged_file_is_a_cache_error(tmp_path):
    (tmp_path / "text--m.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CacheError, match="--force"):
        _open(tmp_path / "text--m.h5", 3)
    with pytest.raises(CacheError):
        cf.FeatureFile(tmp_path / "text--m.h5")


def test_load_of_an_absent_array_is_a_cache_error(tmp_path):
    """A feature file from another tool without `tokens` gives a clear CacheError, not h5py's KeyError."""
    import h5py
    import pytest

    from mmcache import cache as cf
    from mmcache.errors import CacheError

    path = tmp_path / "text--x.h5"
    with cf.FeatureWriter.open(path, ids=["a", "b"], index_fp="f", modality="text", hidden_size=4, num_tokens=3,
                               config={"m": 1}) as w:
        w.finalize()
    with h5py.File(path, "r+") as f:
        del f["tokens"]
    with cf.FeatureFile(path) as ff, pytest.raises(CacheError, match="no 'tokens' array"):
        ff.load(("tokens",))
