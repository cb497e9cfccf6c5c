"""``extract --engine ray`` (extract/ray_engine.py): Ray Data actors extract shards under the shard lock.

A local Ray cluster (2 CPUs, started by the function), 2 shards on 2 actors, text + image: the merged
cache equals a single-process extract's and a rerun is a no-op. Without ray installed, `--engine ray`
exits 2 with the install hint. Tiny random BERT / DINOv2 checkpoints, a 13-post folder dataset.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import extract_args, extract_cfg, tiny_encoders, write_posts
from mmcache.extract.extraction import ExtractConfig, run_extract

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import BadInputError, PipelineError

N = 13


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_encoders(tmp_path_factory.mktemp("models"), seed=41)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_posts(tmp_path_factory.mktemp("posts"), N, 4)


def _cfg(data, models, cache, **kw) -> ExtractConfig:
    return extract_cfg(data, models, cache, threads=1, **kw)


def _args(data, models, cache) -> list[str]:
    return extract_args(data, models, cache, "--threads", "1")


def _assert_same(path: Path, ref: Path) -> None:
    with h5py.File(ref, "r") as a, h5py.File(path, "r") as b:
        for key in ("id", "row", "done", "valid", "failure", "mask"):
            assert np.array_equal(a[key][...], b[key][...]), key
        for key in ("cls", "mean", "tokens"):
            np.testing.assert_allclose(b[key][...], a[key][...], atol=1e-5, rtol=1e-5, err_msg=key)
        assert a.attrs["config_fingerprint"] == b.attrs["config_fingerprint"] and bool(b.attrs["complete"])
    with cf.FeatureFile(path) as ff:
        assert ff.has_checksums and not ff.verify()


@pytest.mark.slow
def test_ray_two_actors_two_shards_equal_single_process_and_rerun_is_noop(data, models, tmp_path, capsys):
    pytest.importorskip("ray.data")
    from mmcache.extract.ray_engine import run_ray_extract

    ref = {m.modality: Path(m.path) for m in run_extract(_cfg(data, models, tmp_path / "ref")).modalities}
    # a fault in one shard: text shard 1 is not HDF5. It is named; the other shards finish and are kept
    folder = Path(ref["text"]).parent.name
    bad = tmp_path / "ray" / folder / f"{ref['text'].stem}.shard-1-of-2.h5"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not hdf5")
    with pytest.raises(PipelineError, match=r"1 of 2 shards failed: shard 1/2: .*") as err:
        run_ray_extract(_cfg(data, models, tmp_path / "ray"), num_shards=2, concurrency=2)
    assert not isinstance(err.value, BadInputError) and "Traceback" not in str(err.value)
    bad.unlink()
    s = run_ray_extract(_cfg(data, models, tmp_path / "ray"), num_shards=2, concurrency=2)
    assert [m.modality for m in s.modalities] == list(cf.MODALITIES)
    for m in s.modalities:  # only text shard 1 was left: rows 6..12
        assert (m.encoded + m.failed, m.complete, m.up_to_date) == ((N - N // 2, True, False) if m.modality == "text"
                                                                   else (0, True, False)), m
        assert Path(m.path).name == ref[m.modality].name and not cf.parse_shard_name(Path(m.path))
        _assert_same(Path(m.path), ref[m.modality])
    assert len(list(Path(s.index_path).parent.glob("*.shard-*-of-2.h5"))) == 4  # virtual merge: kept
    assert "text: ray extracted 1 of 2 shards" in s.notes and "image: ray extracted 0 of 2 shards" in s.notes, s.notes

    # the rerun goes through the command line: `--engine ray` finds every shard complete and merged
    assert cli.main([*_args(data, models, tmp_path / "ray"), "--engine", "ray", "--num-shards", "2", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    for m in again["modalities"]:
        assert (m["encoded"], m["up_to_date"], m["already_done"]) == (0, True, N), m
        _assert_same(Path(m["path"]), ref[m["modality"]])
    assert any("already merged" in n for n in again["notes"]) and any("0 of 2 shards" in n for n in again["notes"])


def test_engine_ray_without_ray_exits_2(data, models, tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_ray(name, *args, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert cli.main([*_args(data, models, tmp_path), "--engine", "ray", "--num-shards", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mmcache[ray]'" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*/index.h5"))  # refused before any work
