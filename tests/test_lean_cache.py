"""Lean caches (`extract --fields`): only the asked arrays are stored, fields are added later into the
same file without rewriting what it holds (crash-safe), and stage two / export refuse a missing field
with one line naming the command that adds it. Tiny random BERT built locally; text only (fast)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from mmcache.extract import tiny_models as tm
from mmcache.extract.extraction import ExtractConfig, run_extract

from mmcache import cache as cf
from mmcache.cache.reader import MissingFieldsError
from mmcache.cli import main
from mmcache.errors import BadInputError

WORDS = "good bad happy sad great awful love hate fine meh sunny rainy calm angry".split()
N = 24


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tm.build_bert(tmp_path_factory.mktemp("models") / "bert", hidden_size=24, num_heads=2, seed=11)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "label"])
        w.writeheader()
        for i in range(N):
            w.writerow({"id": f"s{i:02d}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))),
                        "image": "", "label": ["positive", "neutral", "negative"][i % 3]})
    return root


def _cfg(data, cache, bert, **kw) -> ExtractConfig:
    base = dict(dataset="folder", data_dir=data, cache_dir=cache, text_model=str(bert), modality="text",
                text_max_length=16, dtype="float32", device="cpu", batch_size=4, num_workers=0, progress=False)
    return ExtractConfig(**{**base, **kw})


def _path(summary) -> Path:
    return Path(summary.modalities[0].path)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f if isinstance(f[k], h5py.Dataset)}


@pytest.fixture(scope="module")
def full(data, bert, tmp_path_factory):
    return _arrays(_path(run_extract(_cfg(data, tmp_path_factory.mktemp("full"), bert))))


@pytest.fixture()
def lean(data, bert, tmp_path):
    return _path(run_extract(_cfg(data, tmp_path / "cache", bert, fields="cls,mean")))


def test_lean_file_stores_only_the_asked_arrays_with_equal_values(lean, full):
    a = _arrays(lean)
    assert "tokens" not in a and "mask" not in a and "cls" in a and "mean" in a
    np.testing.assert_array_equal(a["cls"], full["cls"])
    np.testing.assert_array_equal(a["mean"], full["mean"])
    with cf.FeatureFile(lean) as ff:
        assert ff.fields == ("cls", "mean") and ff.complete and ff.fields_complete() == {"cls": True, "mean": True}
        assert ff.verify().rows.size == 0 and ff.load(("cls",))["cls"].shape == (N, 24)
    assert cf.planned_bytes(N, 24, 16, "float32", ("cls", "mean")) < cf.planned_bytes(N, 24, 16, "float32")


def test_unknown_field_and_proj_without_projection_exit_2(data, bert, tmp_path):
    with pytest.raises(BadInputError, match="unknown field"):
        run_extract(_cfg(data, tmp_path, bert, fields="cls,patches"))
    with pytest.raises(BadInputError, match="no joint-space projection"):
        run_extract(_cfg(data, tmp_path, bert, fields="cls,proj"))


def test_adding_tokens_later_keeps_stored_bytes_and_equals_a_full_extract(lean, full, data, bert, caplog):
    before = _arrays(lean)
    s = run_extract(_cfg(data, lean.parent.parent, bert, fields="cls,mean,tokens"))
    after = _arrays(lean)
    for k in ("cls", "mean", "valid", "done", "checksum"):
        assert before[k].tobytes() == after[k].tobytes(), k
    np.testing.assert_array_equal(after["tokens"], full["tokens"])
    np.testing.assert_array_equal(after["mask"], full["mask"])
    assert after["done.1"].all() and s.modalities[0].encoded == N
    with cf.FeatureFile(lean) as ff:
        assert ff.fields == ("cls", "mean", "tokens") and all(ff.fields_complete().values())
    # a subset request on the fuller file just uses it
    caplog.set_level("INFO")
    s = run_extract(_cfg(data, lean.parent.parent, bert, fields="cls"))
    assert s.up_to_date and "also stores mean, tokens: kept" in caplog.text


def test_flipped_bytes_in_an_added_array_are_found_and_repaired(lean, full, data, bert, capsys):
    run_extract(_cfg(data, lean.parent.parent, bert, fields="cls,mean,tokens"))
    with h5py.File(lean, "r+") as f:
        row = f["tokens"][5]
        row[0, 0] += 1.0
        f["tokens"][5] = row
    before = _arrays(lean)
    assert main(["cache", "verify", str(lean)]) == 1
    out = capsys.readouterr().out
    assert "damaged" in out and "s05 (row 5: tokens)" in out
    run_extract(_cfg(data, lean.parent.parent, bert))  # a plain rerun repairs; no --fields: keeps what is stored
    after = _arrays(lean)
    np.testing.assert_array_equal(after["tokens"], full["tokens"])
    assert before["cls"].tobytes() == after["cls"].tobytes() and before["done"].all()


def test_stage_two_and_export_on_a_lean_cache(lean, tmp_path, capsys):
    cache = lean.parent.parent
    args = ["train-fusion", "--head", "text_only", "--epochs", "1", "--cache-dir", str(cache),
            "--runs-dir", str(tmp_path / "runs"), "--quiet", "--device", "cpu"]
    assert main([*args, "--features", "tokens"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "stores cls, mean but this needs tokens" in err[0] and "--fields cls,mean,tokens" in err[0]
    assert "python cli.py extract --dataset folder" in err[0] and "--text-max-length 16 --dtype float32" in err[0]
    assert main([*args, "--features", "cls"]) == 0
    capsys.readouterr()
    export_err = _export_refusal(cache, lean, tmp_path, capsys)
    assert "--fields cls,mean,tokens" in export_err
    # the command the message names works as it is: it adds tokens, then the tokens head trains
    command = err[0].split("`")[1].split()
    assert command[:3] == ["python", "cli.py", "extract"] and main(command[2:] + ["--no-progress"]) == 0
    with cf.FeatureFile(lean) as ff:
        assert ff.fields == ("cls", "mean", "tokens") and all(ff.fields_complete().values())
    assert main([*args, "--features", "tokens"]) == 0
    capsys.readouterr()
    assert main(["cache", "info", str(cache)]) == 0
    assert "fields cls, mean, tokens\n" in capsys.readouterr().out


def test_ablate_refuses_a_features_mode_the_lean_cache_lacks_before_training(lean, tmp_path, capsys):
    """A grid asking `tokens` of a `cls,mean` cache is exit 2 with the one line naming the add command,
    before any run trains (not a grid of failed cells after the others were trained)."""
    cache, runs = lean.parent.parent, tmp_path / "runs"
    code = main(["ablate", "--heads", "text_only", "--features", "cls,tokens", "--seeds", "1", "--epochs", "1",
                 "--cache-dir", str(cache), "--runs-dir", str(runs), "--results-dir", str(tmp_path / "results"),
                 "--no-probe", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("INFO")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert "stores cls, mean but this needs tokens" in err[0] and "--fields cls,mean,tokens" in err[0]
    assert not runs.exists() or not any(runs.iterdir())


def _export_refusal(cache: Path, lean: Path, tmp_path: Path, capsys) -> str:
    code = main(["cache", "export", "--dataset", lean.parent.name, "--cache-dir", str(cache), "--out",
                 str(tmp_path / "x"), "--fields", "tokens"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and not (tmp_path / "x").exists()
    assert main(["cache", "info", str(cache)]) == 0
    assert "fields cls, mean  (lean" in capsys.readouterr().out
    return err[0]


_KILL = textwrap.dedent("""
    import os, signal, sys
    import mmcache.extract.batches as b
    from mmcache import cache as cf
    from mmcache.extract.extraction import ExtractConfig, run_extract
    init = b.WriteBehind.__init__
    def one_batch_per_write(self, *a, **k):
        k["block_bytes"] = 1  # every batch its own write: the kill lands between batches
        init(self, *a, **k)
    b.WriteBehind.__init__ = one_batch_per_write
    write, calls = cf.FeatureWriter._write_groups, [0]
    def killing(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, *a, **k)
    cf.FeatureWriter._write_groups = killing
    run_extract(ExtractConfig(dataset="folder", data_dir=sys.argv[1], cache_dir=sys.argv[2], text_model=sys.argv[3],
                              modality="text", text_max_length=16, dtype="float32", device="cpu", batch_size=4,
                              num_workers=0, progress=False, fields="cls,mean,tokens", length_grouping=False))
""")


def test_kill_9_during_the_add_keeps_stored_fields_and_the_rerun_resumes(lean, full, data, bert):
    cache = lean.parent.parent
    before = _arrays(lean)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILL, str(data), str(cache), str(bert)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with cf.FeatureFile(lean) as ff:  # the existing fields stay readable and trainable
        assert ff.complete and ff.fields_complete() == {"cls": True, "mean": True, "tokens": False}
        np.testing.assert_array_equal(ff.load(("cls",))["cls"], full["cls"])
        with pytest.raises(MissingFieldsError, match="only for some rows.*--fields cls,mean,tokens"):
            ff.load(("tokens", "mask"))
        part = ff._f["done.1"][...]
    assert 0 < part.sum() < N
    s = run_extract(_cfg(data, cache, bert, fields="cls,mean,tokens", length_grouping=False))
    assert s.modalities[0].encoded == N - part.sum()  # only the rows the kill left
    after = _arrays(lean)
    assert before["cls"].tobytes() == after["cls"].tobytes()
    # other batch composition than the full extract (no length grouping): equal to float tolerance
    np.testing.assert_allclose(after["tokens"], full["tokens"], atol=1e-5)
    with cf.FeatureFile(lean) as ff:
        assert all(ff.fields_complete().values()) and ff.verify().rows.size == 0


def _writer(path: Path, **kw) -> cf.FeatureWriter:
    return cf.FeatureWriter.open(path, ids=[f"r{i}" for i in range(6)], index_fp="f", modality="text",
                                 hidden_size=4, num_tokens=3, dtype="float32", config={"m": 1}, **kw)


def _batch(rows, t: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = len(rows)
    return {"cls": rng.normal(size=(b, 4)), "mean": rng.normal(size=(b, 4)), "tokens": rng.normal(size=(b, t, 4)),
            "mask": np.ones((b, t), bool)}


def test_a_row_failing_while_fields_are_added_is_no_longer_valid(tmp_path):
    """E.g. an image deleted between the lean extract and the add: its added fields would be zeros, so
    the row stops being valid (its checksum follows, verify stays clean); other rows are untouched."""
    path = tmp_path / "text--x.h5"
    rows = np.arange(6)
    with _writer(path, fields=("cls", "mean")) as w:
        v = _batch(rows)
        w.write(rows, cls=v["cls"], mean=v["mean"])
        assert w.finalize()
    before = _arrays(path)
    with _writer(path, fields=("cls", "mean", "tokens")) as w:
        assert w.todo_mask().all() and w.arrays == ("cls", "mean", "tokens", "mask")
        w.write_failures(np.array([2]), ["unreadable image: gone"])
        ok = np.array([0, 1, 3, 4, 5])
        v = _batch(ok)
        w.write(ok, **v)
        assert w.finalize() and not w.todo_mask().any()
    after = _arrays(path)
    assert after["cls"].tobytes() == before["cls"].tobytes()
    assert after["valid"].tolist() == [True, True, False, True, True, True]
    np.testing.assert_array_equal(after["tokens"][ok, :2], v["tokens"].astype(np.float32))
    with cf.FeatureFile(path) as ff:
        assert ff.verify().rows.size == 0 and ff.failures() == [("r2", "unreadable image: gone")]


def test_fields_parse_and_flow_through_the_extract_config_file(tmp_path):
    from mmcache import configfile

    assert "fields" in configfile.extract_keys()
    (tmp_path / "e.yaml").write_text("dataset: demo\nfields: [mean, cls]\n")
    file = configfile.read_extract(tmp_path / "e.yaml")
    cfg = ExtractConfig(**{k: v for k, v in configfile.resolve_extract({}, file, {}).items() if k not in
                           configfile.EXTRACT_RUN_KEYS and k != "shard"})
    cfg.validate()
    assert cfg.fields == ("cls", "mean")
    assert ExtractConfig(dataset="demo").fields is None  # default: everything, exactly as before


def test_default_file_keeps_the_layout_of_files_written_before_lean_caches(tmp_path):
    """No --fields: the same arrays and checksum columns as before (one field group); a file without
    the new `fields` attribute (written before) reports every field it holds, complete."""
    with _writer(tmp_path / "a.h5") as w:
        v = _batch(np.arange(6))
        w.write(np.arange(6), **v)
        w.finalize()
    with h5py.File(tmp_path / "a.h5", "r+") as f:
        assert sorted(k for k in f) == ["checksum", "cls", "done", "failure", "id", "mask", "mean", "row", "tokens",
                                        "valid"]
        assert f["checksum"].attrs["fields"] == '["cls", "mean", "tokens", "mask", "valid"]'
        del f.attrs["fields"]  # as an older writer left it
    with cf.FeatureFile(tmp_path / "a.h5") as ff:
        assert ff.fields == ("cls", "mean", "tokens") and all(ff.fields_complete().values())
        np.testing.assert_array_equal(ff.load(("tokens",))["tokens"][:, :2], v["tokens"].astype(np.float32))


@pytest.mark.parametrize("copy", [False, True], ids=["virtual", "copy"])
def test_lean_shards_merge_virtual_and_copied(data, bert, lean, tmp_path, copy):
    """Shards of a lean extract merge (every array a shard holds, whatever it stores) into the values of
    the unsharded lean file; shards of different --fields are refused by a copying merge."""
    cache = tmp_path / "sharded"
    for i in range(2):
        run_extract(_cfg(data, cache, bert, fields="cls,mean", shard=(i, 2)))
    folder = cache / data.name
    (res,) = cf.merge_paths([folder], copy=copy)
    got, want = _arrays(res.path), _arrays(lean)
    assert set(got) == set(want) and "tokens" not in got
    for name in ("cls", "mean", "valid", "done", "checksum"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with cf.FeatureFile(res.path) as ff:
        assert ff.fields == ("cls", "mean") and ff.complete and not ff.verify()


def test_adding_tokens_to_a_claimed_lean_cache_merges_them_again(data, bert, full, tmp_path):
    """Fields added to the shards of a merged lean cache reach the merged file: the shards' complete lean
    files are not "up to date" for a request with more fields, and a merge whose shards gained arrays is
    made again (not reported "already merged")."""
    cache = tmp_path / "claimed"
    first = run_extract(_cfg(data, cache, bert, fields="cls,mean", claim=True, claim_shards=2))
    merged = _path(first)
    assert "tokens" not in _arrays(merged)
    cls_before = _arrays(merged)["cls"]
    second = run_extract(_cfg(data, cache, bert, fields="cls,mean,tokens", claim=True, claim_shards=2))
    assert _path(second) == merged
    got = _arrays(merged)
    np.testing.assert_array_equal(got["cls"], cls_before)
    np.testing.assert_array_equal(got["tokens"], full["tokens"])
    np.testing.assert_array_equal(got["mask"], full["mask"])
    with cf.FeatureFile(merged) as ff:
        assert ff.fields == ("cls", "mean", "tokens") and all(ff.fields_complete().values()) and not ff.verify()
