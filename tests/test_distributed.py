"""Stage one across processes: torchrun (2 CPU ranks, gloo) and `--shard i/n` + `cache merge`.

The merged cache must equal a single-process cache value for value, in the same order, and be the
normal feature file stage two reads; a killed rank must leave a resumable shard; merges must refuse
mismatched, missing and incomplete shards by name. Tiny random BERT / DINOv2 checkpoints, a 13-post
folder dataset (one missing image, one empty text), 1 thread per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import extract_args, tiny_encoders, write_posts
from mmcache.extract.distributed import launch_env, rank_device
from mmcache.extract.extraction import ExtractConfig, parse_shard, run_extract

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import BadInputError, CacheError

REPO = Path(__file__).resolve().parents[1]
N = 13  # odd: shards of 6 and 7 rows
MAX_LEN = 16


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_encoders(tmp_path_factory.mktemp("models"), seed=21)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_posts(tmp_path_factory.mktemp("posts"), N, 3, missing_image=4)


def _args(data, models, cache, *extra) -> list[str]:
    return extract_args(data, models, cache, *extra, batch_size=3, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def reference(data, models, tmp_path_factory):
    """The single-process cache: {modality: path}."""
    cache = tmp_path_factory.mktemp("ref")
    s = run_extract(ExtractConfig(dataset="folder", data_dir=data, cache_dir=cache, text_model=str(models["bert"]),
                                  image_model=str(models["dinov2"]), text_max_length=MAX_LEN, dtype="float32",
                                  device="cpu", batch_size=3, num_workers=0, progress=False))
    return {m.modality: Path(m.path) for m in s.modalities}


def _assert_same_cache(got_dir: Path, reference: dict[str, Path]) -> None:
    """Value for value, same order, same identity attributes (a virtual merge has no chunks of its own)."""
    for modality, ref_path in reference.items():
        path = got_dir / ref_path.name
        with h5py.File(ref_path, "r") as a, h5py.File(path, "r") as b:
            assert set(a.keys()) == set(b.keys())
            for key in ("id", "row", "done", "valid", "failure", "mask"):
                assert np.array_equal(a[key][...], b[key][...]), f"{modality}/{key}"
            for key in ("cls", "mean", "tokens"):
                assert a[key].shape == b[key].shape and (b[key].is_virtual or a[key].chunks == b[key].chunks)
                np.testing.assert_allclose(b[key][...], a[key][...], atol=1e-5, rtol=1e-5, err_msg=f"{modality}/{key}")
            for key in ("config_fingerprint", "index_fingerprint", "num_samples", "num_valid", "modality", "dtype"):
                assert a.attrs[key] == b.attrs[key], key
            assert bool(b.attrs["complete"]) and json.loads(b.attrs["shard"]) is None
        with cf.FeatureFile(path) as ff:  # the shards' per-row checksums came along and match the merged rows
            assert ff.has_checksums and not ff.verify()
    assert (got_dir / cf.FAILURES_NAME).read_text() == (ref_path.parent / cf.FAILURES_NAME).read_text()


def _torchrun(script: Path | str, args: list[str], cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max_restarts=0", str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------- torchrun

def test_torchrun_two_ranks_equals_single_process(data, models, reference, tmp_path):
    cache = tmp_path / "cache"
    r = _torchrun(REPO / "cli.py", _args(data, models, cache), cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("[2 ranks]") == 1  # one summary, from rank 0
    assert "merged 2 shards into" in r.stdout and "[rank 1] INFO" not in r.stderr
    folder = cache / data.name
    assert len(cf.list_shard_files(folder)) == 4  # kept: the (default) virtual merge reads them in place
    assert sorted(p.name for p in cf.list_feature_files(folder)) == sorted(p.name for p in reference.values())
    _assert_same_cache(folder, reference)
    # the merged files are the single-process files: a plain extract finds them complete
    s = run_extract(ExtractConfig(dataset="folder", data_dir=data, cache_dir=cache, text_model=str(models["bert"]),
                                  image_model=str(models["dinov2"]), text_max_length=MAX_LEN, dtype="float32",
                                  device="cpu", batch_size=3, num_workers=0, progress=False))
    assert s.up_to_date and s.index_status == "unchanged"
    # relaunching the finished launch is a no-op: every rank finds its rows in the merged files
    r = _torchrun(REPO / "cli.py", _args(data, models, cache), cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("up to date") and "already merged 2 shards" in r.stdout
    _assert_same_cache(folder, reference)


_CRASH = """
import os, sys
sys.path.insert(0, {repo!r})
from mmcache import cache as cf
from mmcache.errors import PipelineError
_write, _calls = cf.FeatureWriter.write, [0]
def write(self, rows, **kw):  # rank 1 dies hard (kill -9) or raises, after {after} batches
    _write(self, rows, **kw)
    _calls[0] += 1
    if os.environ.get("RANK") == "1" and _calls[0] == {after}:
        if {mode!r} == "kill":
            os.kill(os.getpid(), 9)
        raise PipelineError("disk full (test)")
cf.FeatureWriter.write = write
from mmcache import cli
sys.exit(cli.main())
"""


def test_killed_rank_relaunch_finishes_missing_work(data, models, reference, tmp_path):
    cache = tmp_path / "cache"
    folder = cache / data.name
    crash = tmp_path / "crash_cli.py"
    crash.write_text(_CRASH.format(repo=str(REPO), mode="kill", after=2))
    # fixed shards (--no-claim): claiming, rank 0 may take both shards before rank 1 writes a batch, and
    # nothing is killed (a killed claim worker is tests/test_claim.py's case)
    r = _torchrun(crash, _args(data, models, cache, "--no-claim"), cache)
    assert r.returncode != 0
    shard1 = folder / reference["image"].name.replace(".h5", ".shard-1-of-2.h5")
    with cf.FeatureFile(shard1) as ff:  # left resumable: opens cleanly, partly done, not complete
        assert not ff.complete and 0 < ff.done.sum() < len(ff.ids)
    assert cf.list_feature_files(folder) == []  # nothing merged
    r = _torchrun(REPO / "cli.py", _args(data, models, cache, "--json", "--keep-shards", "--no-claim"), cache)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    img = next(m for m in summary["modalities"] if m["modality"] == "image")
    assert summary["ranks"] == 2 and img["complete"] and img["total"] == N
    assert 0 < img["already_done"] < N and img["encoded"] + img["failed"] == N - img["already_done"]
    _assert_same_cache(folder, reference)
    assert len(cf.list_shard_files(folder)) == 4  # --keep-shards


def test_failing_rank_is_named_by_rank0(data, models, tmp_path):
    cache = tmp_path / "cache"
    crash = tmp_path / "raise_cli.py"
    crash.write_text(_CRASH.format(repo=str(REPO), mode="raise", after=1))
    # fixed shards (--no-claim): claiming, rank 0 could go on to finish the shard rank 1 failed on
    r = _torchrun(crash, _args(data, models, cache, "--modality", "text", "--no-claim"), cache)
    assert r.returncode == 1
    assert "error: 1 of 2 ranks failed: rank 1 (shard 1/2): PipelineError: disk full (test)" in r.stderr
    assert "rerun the same launch" in r.stderr
    shards = cf.list_shard_files(cache / data.name)
    assert [cf.describe(p)["complete"] for p in shards] == [True, False]


# --------------------------------------------------------------------------------------------- --shard + cache merge

def test_shard_runs_then_cache_merge_equal_single_process(data, models, reference, tmp_path, capsys):
    cache = tmp_path / "cache"
    folder = cache / data.name
    assert cli.main(_args(data, models, cache, "--shard", "1", "--num-shards", "2")) == 0
    assert "[shard 1/2]" in capsys.readouterr().out
    assert cli.main(["cache", "merge", str(folder)]) == 1  # shard 0 missing: named, with the command to run
    err = capsys.readouterr().err
    assert f"shard 0 (image--{models['dinov2'].parent.name}--dinov2.shard-0-of-2.h5)" in err and "--shard i/2" in err
    assert cli.main(_args(data, models, cache, "--shard", "0/2")) == 0
    capsys.readouterr()
    assert cli.main(["cache", "merge", str(folder), "--keep-shards"]) == 0
    out = capsys.readouterr().out
    assert out.count("merged 2 shards") == 2 and "shard files kept" in out
    _assert_same_cache(folder, reference)
    # the same merge again: fine; then a copying merge without --keep-shards removes the shards
    assert cli.main(["cache", "merge", "--copy", *map(str, cf.list_shard_files(folder))]) == 0
    assert "shard files removed" in capsys.readouterr().out and cf.list_shard_files(folder) == []
    _assert_same_cache(folder, reference)
    # a shard rerun after the merge is a no-op (its rows are in the merged file); nothing left to merge
    assert cli.main(_args(data, models, cache, "--shard", "0/2", "--json")) == 0
    assert all(m["up_to_date"] for m in json.loads(capsys.readouterr().out)["modalities"])
    assert cf.list_shard_files(folder) == []
    assert cli.main(["cache", "merge", str(folder)]) == 0
    assert "nothing to merge" in capsys.readouterr().out


def test_merge_refuses_mismatched_and_incomplete_shards(data, models, tmp_path, capsys):
    cache = tmp_path / "cache"
    folder = cache / data.name
    text = ["--modality", "text"]
    assert cli.main(_args(data, models, cache, *text, "--shard", "0/2")) == 0
    assert cli.main(_args(data, models, cache, *text, "--shard", "1/2", "--text-max-length", "12")) == 0
    capsys.readouterr()
    assert cli.main(["cache", "merge", str(folder)]) == 2  # CacheMismatchError: bad input, exit 2
    err = capsys.readouterr().err
    assert "refusing to merge" in err and "different settings" in err and "max_length" in err
    assert len(cf.list_shard_files(folder)) == 2 and cf.list_feature_files(folder) == []  # nothing touched
    assert cli.main(_args(data, models, cache, *text, "--shard", "1/2", "--force")) == 0  # rebuilt to match
    shard1 = cf.list_shard_files(folder)[1]
    with h5py.File(shard1, "r+") as f:  # as if its run had been killed before the last batch
        f["done"][-2:] = False
        f.attrs["complete"] = False
    capsys.readouterr()
    with pytest.raises(CacheError, match=r"incomplete shards: shard 1 \(text--\w+--bert.shard-1-of-2.h5\): 5 of 7 rows "
                                         r"done.*--shard 1/2"):
        cf.merge_paths([folder])
    assert cli.main(_args(data, models, cache, *text, "--shard", "1/2", "--json")) == 0  # resumes the 2 rows
    assert json.loads(capsys.readouterr().out)["modalities"][0]["already_done"] == 5
    (res,) = cf.merge_paths([folder])
    assert res.status == "merged" and res.num_samples == N and res.num_failed == 1
    assert res.virtual and not res.removed_shards and len(cf.list_shard_files(folder)) == 2  # read in place


def test_merge_groups_and_refusals(tmp_path):
    def shard(i, n, rows, ids, cfg=None):
        path = cf.shard_path(tmp_path, "d", "text", "m", i, n)
        with cf.FeatureWriter.open(path, ids=ids, rows=np.asarray(rows), index_fp="fp", modality="text",
                                   hidden_size=2, num_tokens=2, dtype="float32", config=cfg or {"m": 1},
                                   shard=(i, n)) as w:
            w.write(np.arange(len(rows)), cls=np.ones((len(rows), 2)), mean=np.ones((len(rows), 2)),
                    tokens=np.ones((len(rows), 2, 2)), mask=np.ones((len(rows), 2), bool))
            w.finalize()
        return path

    folder = tmp_path / "d"
    a = shard(0, 2, [0, 1], ["a", "b"])
    b = shard(1, 2, [1, 2], ["b", "c"])  # overlaps shard 0
    with pytest.raises(CacheError, match="shards 0 and 1 overlap"):
        cf.merge_paths([folder])
    b.unlink()
    shard(0, 3, [0], ["a"])
    with pytest.raises(BadInputError, match="split 2 .* and 3"):
        cf.merge_paths([folder])
    assert cf.shard_groups([a]) == [(folder / "text--m.h5", 2)]
    assert cf.parse_shard_name(a) == (folder / "text--m.h5", 0, 2) and cf.parse_shard_name(folder / "text--m.h5") is None
    (folder / "notes.h5").touch()
    with pytest.raises(BadInputError, match="not a shard file"):
        cf.shard_groups([folder / "notes.h5"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no shard files"):
        cf.merge_paths([tmp_path / "empty"])


def test_launch_env_shard_spec_and_device():
    assert launch_env({}) is None
    env = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.is_main) == (3, 4, 1, 2, False)
    with pytest.raises(BadInputError):
        launch_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert parse_shard(None) == (0, 1) and parse_shard("2/4") == (2, 4) and parse_shard("2", 4) == (2, 4)
    for spec, n in (("2", None), ("2/4", 3), ("4/4", None), ("x", None), (None, 4)):
        with pytest.raises(BadInputError):
            parse_shard(spec, n)
    assert rank_device("cpu", 1) == "cpu" and rank_device("cuda:0", 3) == "cuda:0"
