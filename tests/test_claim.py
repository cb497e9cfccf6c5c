"""Shards that balance themselves (extract/claim.py): workers claim the next free shard through its lock.

Held shards are skipped and retried, a dead holder's shard is reclaimed and resumed (its finished rows
kept), two independent `extract --claim` processes (one killed mid-shard) end with the single-process
cache, and a torchrun launch with 2 gloo ranks claiming from 4 shards equals a single process. Tiny
random BERT / DINOv2 checkpoints, a 13-post folder dataset, 1 thread per process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import extract_args, extract_cfg, tiny_encoders, write_posts
from mmcache.extract.claim import claim_modality, default_num_shards, worker_slot
from mmcache.extract.distributed import LaunchEnv, run_distributed_extract
from mmcache.extract.extraction import ExtractConfig, prepare_index, run_extract

from mmcache import cache as cf
from mmcache import cli
from mmcache.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]
N = 13
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_encoders(tmp_path_factory.mktemp("models"), seed=41)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_posts(tmp_path_factory.mktemp("posts"), N, 4)


def _cfg(data, models, cache, **kw) -> ExtractConfig:
    return extract_cfg(data, models, cache, **kw)


def _args(data, models, cache, *extra) -> list[str]:
    return extract_args(data, models, cache, *extra)


@pytest.fixture(scope="module")
def reference(data, models, tmp_path_factory):
    """The single-process cache, both modalities: {modality: path}."""
    s = run_extract(_cfg(data, models, tmp_path_factory.mktemp("ref")))
    return {m.modality: Path(m.path) for m in s.modalities}


def _assert_same(path: Path, ref: Path) -> None:
    with h5py.File(ref, "r") as a, h5py.File(path, "r") as b:
        for key in ("id", "row", "done", "valid", "failure", "mask"):
            assert np.array_equal(a[key][...], b[key][...]), key
        for key in ("cls", "mean", "tokens"):
            np.testing.assert_allclose(b[key][...], a[key][...], atol=1e-5, rtol=1e-5, err_msg=key)
        assert a.attrs["config_fingerprint"] == b.attrs["config_fingerprint"] and bool(b.attrs["complete"])
    with cf.FeatureFile(path) as ff:
        assert ff.has_checksums and not ff.verify()


_HOLD = """
import sys
sys.path.insert(0, {repo!r})
from mmcache.extract.index_prep import shard_lock
with shard_lock({folder!r}, {i}, {n}):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def _hold(folder: Path, i: int, n: int) -> subprocess.Popen:
    """Another live worker holding shard ``i`` of ``n``."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=str(REPO), folder=str(folder), i=i, n=n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


# --------------------------------------------------------------------------------------------- in process

def test_default_shard_count_and_slurm_slot():
    assert default_num_shards(13, 2) == 2  # tiny: one per worker
    assert default_num_shards(1, 4) == 1  # never more shards than rows
    assert default_num_shards(20_000, 2) == 16  # 8 per worker (1250 rows each)
    assert default_num_shards(5_000, 2) == 5  # at least 1000 rows per shard
    assert worker_slot({}) == (None, 8)
    assert worker_slot({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "8"}) == (3, 8)


def test_claim_skips_held_shards_then_reclaims_a_dead_holders(data, models, reference, tmp_path, caplog):
    cfg = _cfg(data, models, tmp_path / "cache", modality="text")
    index = prepare_index(cfg)
    holder = _hold(index.dataset_dir, 1, 4)
    try:
        mine, claimed = claim_modality(cfg, "text", index, 4, start=2, wait=False)
        assert claimed == [2, 3, 0]  # from its offset, round the ring; held shard 1 skipped, not waited for
        assert mine.encoded + mine.failed == N - 3  # every row but shard 1's (rows 3..5)
        assert not (index.dataset_dir / reference["text"].name.replace(".h5", ".shard-1-of-4.h5")).exists()
        # the holder dies without releasing (kill -9): the kernel drops its flock; a waiting worker takes over
        threading.Timer(1.0, holder.kill).start()
        caplog.set_level(logging.INFO, logger="mmcache.extract.claim")
        t0 = time.monotonic()
        mine, claimed = claim_modality(cfg, "text", index, 4, start=0, wait=True, poll_s=0.2)
        assert claimed == [1] and time.monotonic() - t0 >= 0.9
        assert "waiting for shard 1" in caplog.text and f"pid {holder.pid}" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    # everything complete now: a third worker finds nothing to do
    mine, claimed = claim_modality(cfg, "text", index, 4, start=1, wait=False)
    assert claimed == [] and mine.up_to_date
    res = cf.merge_shards(Path(mine.path), 4)
    assert res.status == "merged"
    _assert_same(Path(mine.path), reference["text"])


# --------------------------------------------------------------------------------------------- processes

_WORKER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from mmcache import cache as cf
from mmcache.extract import claim
marker = Path({marker!r})
if {stall!r}:  # worker 0: stalls after its first write (the test then kills it with -9)
    _write = cf.FeatureWriter.write
    def write(self, rows, **kw):
        _write(self, rows, **kw)
        marker.touch()
        time.sleep(600)
    cf.FeatureWriter.write = write
else:  # worker 1: claims only once worker 0 is inside its first shard (the index race stays)
    _claim = claim.claim_modality
    def claim_modality(*a, **kw):
        while not marker.exists():
            time.sleep(0.05)
        return _claim(*a, **kw)
    claim.claim_modality = claim_modality
from mmcache import cli
from mmcache.errors import BadInputError
sys.exit(cli.main())
"""


def test_two_claim_workers_one_killed_mid_shard(data, models, reference, tmp_path):
    cache = tmp_path / "cache"
    folder = cache / data.name
    args = _args(data, models, cache, "--modality", "text", "--claim", "--num-shards", "2", "--keep-shards")
    procs = []
    for slot in (0, 1):  # started together: both race for index.h5 (one writes it, the other waits, none fails)
        script = tmp_path / f"worker{slot}.py"
        script.write_text(_WORKER.format(repo=str(REPO), marker=str(tmp_path / "first-write"), stall=slot == 0))
        env = {**os.environ, **ENV, "SLURM_ARRAY_TASK_ID": str(slot), "SLURM_ARRAY_TASK_COUNT": "2"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args, *(["--json"] if slot else [])],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    dying, survivor = procs
    try:
        err1 = []
        for line in survivor.stderr:  # the survivor finished shard 1 and waits for shard 0, held by worker 0
            err1.append(line)
            if "waiting for shard 0" in line:
                break
        assert f"pid {dying.pid}" in err1[-1], "".join(err1)[-3000:]
        dying.kill()  # kill -9 mid-shard: the kernel drops its locks
        out1, rest = survivor.communicate(timeout=120)
        err1 = "".join(err1) + rest
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert dying.returncode == -signal.SIGKILL
    assert survivor.returncode == 0, err1[-3000:]
    summary = json.loads(out1)
    (text,) = summary["modalities"]
    # worker 0 started at shard 0 (rows 0..5) and was killed after its first write (a batch or two of one
    # row): the survivor resumed that shard from there and did every other row; nothing was recomputed
    k = text["already_done"]
    assert text["complete"] and text["total"] == N and 0 < k < 6 and text["encoded"] + text["failed"] == N - k
    assert "text: extracted 2 of 2 shards (1, 0)" in summary["notes"]
    assert "recovered a stale cache lock" in err1
    shard0 = folder / reference["text"].name.replace(".h5", ".shard-0-of-2.h5")
    info = cf.describe(shard0)  # --keep-shards: the reclaimed shard's own record of its last run
    assert info["complete"] and info["last_run"]["encoded"] + info["last_run"]["failed"] == 6 - k
    _assert_same(folder / reference["text"].name, reference["text"])


def test_claim_bad_flags_exit_2(data, models, tmp_path, capsys):
    cache = tmp_path / "cache"
    for extra, words in ((["--claim", "--shard", "0/2"], "not --shard"),
                         (["--claim", "--force"], "cannot be combined with --claim"),
                         (["--claim", "--num-shards", "0"], "--num-shards must be a positive integer"),
                         (["--num-shards", "4"], "needs --shard i (one fixed shard) or --claim")):
        assert cli.main(_args(data, models, cache, "--modality", "text", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and "Traceback" not in err, (extra, err)
    assert not list(cache.glob("*/*.h5"))  # refused before any work
    # under torchrun (checked before the process group starts): --num-shards needs claiming
    ranks = LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2)
    for kw, words in ((dict(claim=False, claim_shards=4), "drop --no-claim"),
                      (dict(force=True, claim_shards=4), "rebuilds its fixed shard")):
        with pytest.raises(BadInputError, match=words):
            run_distributed_extract(_cfg(data, models, cache, **kw), ranks)


# --------------------------------------------------------------------------------------------- torchrun

def test_torchrun_ranks_claim_shards_and_equal_single_process(data, models, reference, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, **ENV}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           str(REPO / "cli.py"), *_args(data, models, cache, "--num-shards", "4", "--json")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["ranks"] == 2 and all(m["complete"] and m["encoded"] + m["failed"] == N for m in summary["modalities"])
    assert sum("merged 4 shards into" in n for n in summary["notes"]) == 2
    folder = cache / data.name
    assert len(cf.list_shard_files(folder)) == 8  # the virtual merge reads them where they are: kept
    for ref in reference.values():
        _assert_same(folder / ref.name, ref)
