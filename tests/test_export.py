"""Features out of the cache and back (mmcache/cache/export.py, `cache export` / `cache import`): per
format, export -> import gives the same arrays and train-fusion runs on the imported cache; features a
user already has (parquet with ids, in another order, some missing) join an existing index; imported
files say so in their provenance, and the one place that needs the encoder (predict) says why it cannot.
The parquet and hf tests skip when pyarrow / datasets are not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli as _run
from mmcache.fuse.synthetic import make_cache

import mmcache.api as api
from mmcache import cache as cf
from mmcache.errors import BadInputError

FIELDS = ("cls", "mean", "tokens", "mask")
TRAIN = ["--head", "basic", "--features", "cls", "--dim", "8", "--attention-heads", "2", "--epochs", "2",
         "--batch-size", "16", "--device", "cpu", "--threads", "1", "--quiet", "--json"]




@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    make_cache(root, "synth", n=40, dt=8, di=8, lt=4, li=3, text_invalid=(3,))
    return root


def _needs(fmt):
    if fmt in ("parquet", "hf"):
        pytest.importorskip("pyarrow")
    if fmt == "hf":
        pytest.importorskip("datasets")


@pytest.mark.parametrize("fmt", ["npy", "parquet", "hf"])
def test_export_import_round_trip_then_train(cache, tmp_path, capsys, fmt):
    _needs(fmt)
    out = tmp_path / "exp"
    code, stdout, err = _run(capsys, "cache", "export", "-d", "synth", "--cache-dir", cache, "--format", fmt,
                             "--fields", ",".join(FIELDS), "--out", out)
    assert code == 0, err
    assert "exported 40 samples" in stdout
    meta = json.loads((out / "metadata.json").read_text()) if fmt != "parquet" else None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        assert sorted(p.name for p in out.iterdir()) == ["image.parquet", "text.parquet"]
        meta = json.loads(pq.read_schema(out / "text.parquet").metadata[b"mmcache"])
    assert meta["modalities"]["text"]["provenance"] == {"model_id": "tiny/text-enc"}  # provenance travels
    assert meta["classes"] == ["negative", "neutral", "positive"]
    # into a fresh cache root: the export's ids, labels, split and classes become the index
    root2 = tmp_path / "cache2"
    froms = [out / "text.parquet", out / "image.parquet"] if fmt == "parquet" else [out]
    code, stdout, err = _run(capsys, "cache", "import", "-d", "synth", "--cache-dir", root2,
                             *[a for p in froms for a in ("--from", p)])
    assert code == 0, err
    assert stdout.count("written: ") == 2 and "index written" in stdout and "identity cannot be checked" in stdout
    one = api.load_cache("synth", cache_dir=cache, fields=FIELDS)
    two = api.load_cache("synth", cache_dir=root2, fields=FIELDS)
    for key in ("id", "label", "split"):
        np.testing.assert_array_equal(one.index[key].astype(str), two.index[key].astype(str))
    for m in ("text", "image"):
        np.testing.assert_array_equal(one.valid[m], two.valid[m])  # text row 3 stays a failure
        for f in FIELDS:
            assert two.features[m][f].dtype == one.features[m][f].dtype
            np.testing.assert_array_equal(one.features[m][f], two.features[m][f])
        assert two.info[m]["provenance"]["family"] == "imported"
        assert two.info[m]["provenance"]["origin"]["provenance"] == one.info[m]["provenance"]
    assert not two.valid["text"][3]
    # stage two on the imported cache: the same samples and numbers as on the original
    metrics = []
    for root in (cache, root2):
        code, stdout, err = _run(capsys, "train-fusion", "-d", "synth", "--cache-dir", root,
                                 "--runs-dir", tmp_path / "runs", *TRAIN)
        assert code == 0, err
        metrics.append(json.loads(stdout))
    assert metrics[1]["samples"] == metrics[0]["samples"] and metrics[1]["dropped"] == metrics[0]["dropped"]
    assert metrics[1]["test"] == metrics[0]["test"] and metrics[1]["test"]["n"] == 8
    # the same inputs again: nothing rewritten
    code, stdout, err = _run(capsys, "cache", "import", "-d", "synth", "--cache-dir", root2,
                             *[a for p in froms for a in ("--from", p)])
    assert code == 0 and stdout.count("up to date: ") == 2, err


def test_user_parquet_joins_an_existing_index(cache, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "c"
    make_cache(root, "synth", n=40, dt=8, di=8, lt=4, li=3)  # index + extract-made files
    idx = cf.read_index(root / "synth" / cf.INDEX_NAME)
    rng = np.random.default_rng(0)
    order = rng.permutation(40)[:35]  # shuffled, 5 ids missing
    emb = rng.normal(size=(40, 6)).astype(np.float32)
    emb[order[0], 2] = np.nan  # a broken row: recorded as a failure, never stored as values
    table = pa.table({"id": [str(idx.ids[i]) for i in order],
                      "cls": pa.FixedSizeListArray.from_arrays(pa.array(emb[order].reshape(-1)), 6)})
    pq.write_table(table, tmp_path / "mine.parquet")
    code, out, err = _run(capsys, "cache", "import", "-d", "synth", "--cache-dir", root, "--from",
                          tmp_path / "mine.parquet", "--modality", "text", "--name", "my-encoder")
    assert code == 0, err
    path = root / "synth" / "text--my-encoder.h5"
    assert f"written: {path} (text, 34 of 40 index rows with features, 6 without; index existing)" in out
    with cf.FeatureFile(path) as ff:
        got = ff.load(("cls", "mean", "tokens", "mask"), dtype=None)
        valid, prov, conf = ff.valid, ff.provenance, ff.config
        assert ff.complete and ff.has_checksums and not ff.verify()
    expect = np.zeros(40, bool)
    expect[order[1:]] = True
    np.testing.assert_array_equal(valid, expect)
    np.testing.assert_array_equal(got["cls"][order[1:]], emb[order[1:]])
    np.testing.assert_array_equal(got["mean"], got["cls"])  # derived, and said so
    assert prov["derived"]["mean"] == "copy of cls" and "cls as one token" in prov["derived"]["tokens"]
    assert prov["family"] == "imported" and "not verifiable" in prov["identity"] and conf["family"] == "imported"
    failures = (root / "synth" / cf.FAILURES_NAME).read_text()
    assert "imported: non-finite values" in failures and failures.count("id not in the imported file") == 5
    # two text files now: pick the imported one; stage two trains on it
    code, out, err = _run(capsys, "train-fusion", "-d", "synth", "--cache-dir", root, "--text-cache",
                          path.name, "--runs-dir", tmp_path / "runs", *TRAIN)
    assert code == 0, err
    # a second import under that name from other files is refused (and the first file kept) ...
    emb2 = tmp_path / "other.parquet"
    pq.write_table(table.slice(0, 10), emb2)
    code, out, err = _run(capsys, "cache", "import", "-d", "synth", "--cache-dir", root, "--from", emb2,
                          "--modality", "text", "--name", "my-encoder")
    assert code == 2 and "--force" in err
    with cf.FeatureFile(path) as ff:
        assert int(ff.valid.sum()) == 34
    # ... and unknown ids are bad input, naming them
    bad = pa.table({"id": ["nope-1", str(idx.ids[0])], "cls": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(12, np.float32)), 6)})
    pq.write_table(bad, tmp_path / "bad.parquet")
    code, out, err = _run(capsys, "cache", "import", "-d", "synth", "--cache-dir", root, "--from",
                          tmp_path / "bad.parquet", "--modality", "text", "--name", "x")
    assert code == 2 and "nope-1" in err and err.count("\n") == 1


def test_imported_encoder_cannot_be_rebuilt_and_says_why(cache, tmp_path):
    from mmcache.extract.encoders import load_encoder_for_cache

    api.export_cache("synth", out=tmp_path / "exp", cache_dir=cache, fields=("cls",))
    res = api.import_cache("synth", [tmp_path / "exp"], cache_dir=tmp_path / "c2")
    assert {r.modality for r in res} == {"text", "image"}
    with pytest.raises(BadInputError, match="were imported .*not known to mmcache"):
        load_encoder_for_cache(res[0].path, device="cpu")
    info = cf.collect(tmp_path / "c2")  # cache info on imported files: no crash, the family shown
    text = cf.format_info(info)
    assert "imported" in text


def test_import_without_an_index_needs_labels(tmp_path):
    np.save(tmp_path / "ids.npy", np.asarray(["a", "b"]))
    np.save(tmp_path / "text.cls.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(BadInputError, match="no sample index"):
        api.import_cache("mine", [tmp_path], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "mine" / cf.INDEX_NAME).exists()


def test_missing_optional_package_names_the_extra(cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(BadInputError, match=r"mmcache\[export\]"):
        api.export_cache("synth", out=tmp_path / "x", cache_dir=cache, format="parquet")
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_export_bad_fields_and_format(cache, tmp_path, capsys):
    code, out, err = _run(capsys, "cache", "export", "-d", "synth", "--cache-dir", cache, "--fields", "cls,pixels",
                          "--out", tmp_path / "o")
    assert code == 2 and "pixels" in err
    code, out, err = _run(capsys, "cache", "export", "-d", "synth", "--cache-dir", cache, "--format", "csv",
                          "--out", tmp_path / "o")
    assert code == 2 and "parquet" in err


def test_npy_export_is_plain_numpy(cache, tmp_path):
    res = api.export_cache("synth", out=tmp_path / "e", cache_dir=cache, fields=("cls", "mask"), modalities=("text",))
    assert sorted(p.name for p in res.files) == ["ids.npy", "labels.npy", "metadata.json", "split.npy",
                                                 "text.cls.npy", "text.mask.npy", "text.valid.npy"]
    cls = np.load(tmp_path / "e" / "text.cls.npy", allow_pickle=False)
    with h5py.File(cache / "synth" / "text--tiny--text-enc.h5", "r") as f:
        np.testing.assert_array_equal(cls, f["cls"][...])
        assert cls.dtype == np.float16
    assert np.load(tmp_path / "e" / "ids.npy", allow_pickle=False)[0] == "synth-0000"
