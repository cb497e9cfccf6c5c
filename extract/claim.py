"""Shards that balance themselves: every worker claims the next free shard through its lock.

The rows are split into ``num_shards`` contiguous shards (:func:`extract.config.shard_rows`, the usual
``*.shard-<i>-of-<n>.h5`` files), many more than workers. A worker (a torchrun rank, a Slurm array
task, any process with ``extract --claim``) goes round the shards from its own offset and, for each,
tries the shard's lock without waiting (:func:`extract.index_prep.shard_lock`: the per-shard lock of
:mod:`mmcache.cache.lock`, a ``flock`` that works on a shared filesystem). A held shard is skipped; a
free one that is not complete is extracted (:func:`extract.extraction.extract_shard`: the resume rules
are unchanged, so a shard a dead worker left half done resumes from its finished batches), then
released. A fast worker simply takes more shards; a slow one holds up the end by one shard at most.

When nothing is claimable but shards are still held, an independent worker polls (every
:data:`POLL_S` seconds, logged) until their holders finish or die: ``kill -9`` drops a ``flock``, so a
dead worker's shard becomes claimable and is finished by someone else. Once every shard is complete,
the worker that gets the folder's exclusive lock merges (:func:`mmcache.cache.merge_shards`); the others
report "merged by another worker". Under torchrun ranks do not poll: a dead rank stops the whole launch
anyway, so a rank with nothing left to claim goes to the end barrier and rank 0 merges
(:mod:`extract.distributed`).

This is the whole mechanism: no scheduler, no queue, no server; the cache folder is the state.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

from mmcache.extract.config import ExtractConfig, ExtractSummary, IndexInfo, ModalitySummary, shard_rows
from mmcache.extract.extraction import (
    extract_shard,
    feature_file,
    holds_fields,
    keep_recorded_decode,
    load_modality_encoder,
    merged_summary,
    reason_kind,
    validate_models,
)
from mmcache.extract.identity import encoder_config
from mmcache.extract.index_prep import disk_full_as_error, prepare_index, shard_lock

from mmcache import cache as cf
from mmcache.cache.lock import LOCK_NAME, CacheBusyError, describe_holder, folder_lock, read_holder

log = logging.getLogger(__name__)

__all__ = ["MIN_SHARD_ROWS", "POLL_S", "SHARDS_PER_WORKER", "claim_modality", "default_num_shards",
           "merge_claimed", "run_claim_extract", "worker_slot"]

# Why these numbers: with k shards per worker a slow worker delays the end by at most one shard, 1/k of
# its fixed share (k = 8: the tail is ~12% of a balanced run's time); 1000 rows per shard keep the
# per-shard costs (a file, a lock, the done check, the merge bookkeeping: well under a second) below ~1%
# of a shard's encoding time even on a GPU (a few seconds per 1000 rows). Tiny datasets get one shard per
# worker, so no worker idles and a torchrun default resumes the same files as a fixed-shard launch.
SHARDS_PER_WORKER = 8
MIN_SHARD_ROWS = 1000
POLL_S = 2.0  # an idle worker retries the held shards this often (one flock attempt each: cheap)
INDEX_WAIT_S = 3600.0  # longest wait for the index lock (another worker writing index.h5, a merge)
_LOG_EVERY_S = 30.0  # a waiting worker says so again this often
_UNKNOWN_WORKERS = 8  # independent --claim workers outside a Slurm array: how many to plan shards for


def default_num_shards(num_samples: int, workers: int) -> int:
    """About ``SHARDS_PER_WORKER`` shards per worker, each of at least ``MIN_SHARD_ROWS`` rows, but at
    least one shard per worker (and never more shards than rows)."""
    by_size = min(SHARDS_PER_WORKER * workers, num_samples // MIN_SHARD_ROWS)
    return max(1, min(num_samples, max(by_size, workers)))


def worker_slot(environ: dict[str, str] | None = None) -> tuple[int | None, int]:
    """(this worker's place, number of workers) of a Slurm array task (``SLURM_ARRAY_TASK_ID`` from
    ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT``); ``(None, 8)`` outside one. Every task of one
    array computes the same default shard count from it."""
    env = os.environ if environ is None else environ
    try:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        slot = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    except (KeyError, ValueError):
        return None, _UNKNOWN_WORKERS
    return (slot % count if count > 0 else None), max(count, 1)


@contextmanager
def waiting_lock(make, what: str, wait_s: float = INDEX_WAIT_S, poll_s: float = POLL_S):
    """Hold the lock ``make()`` returns, retrying every ``poll_s`` while another process holds it
    (logged once); :class:`CacheBusyError` after ``wait_s``."""
    t0 = time.monotonic()
    stack = ExitStack()
    while True:
        try:
            stack.enter_context(make())
            break
        except CacheBusyError as e:
            if time.monotonic() - t0 > wait_s:
                raise
            if time.monotonic() - t0 < poll_s:
                log.info("waiting for %s: %s", what, e)
            time.sleep(poll_s)
    with stack:
        yield


def index_lock(dataset_dir: Path):
    """The lock claim workers write ``index.h5`` under: shared with shard writers (a worker arriving
    late does not wait for the others' shards), exclusive among index writers and against a merge."""
    return folder_lock(dataset_dir, shard_file="index")


# ---------------------------------------------------------------------------------------------- claiming

def _shard_done(cfg: ExtractConfig, modality: str, enc, index: IndexInfo, i: int, n: int) -> bool:
    """Is shard ``i`` of ``n`` complete, for this index and these settings (its own file, or the merged
    file after a merge)? Called with the shard's lock held. No verification read: a resume verifies."""
    path = feature_file(cfg, modality, enc, index.dataset_dir.name, i, n)
    spec = cfg.encoder(modality)
    conf = encoder_config(enc, modality, dtype=cfg.dtype, revision=spec.revision,
                          decode=keep_recorded_decode(cfg, modality, path).decode)
    if not path.exists():
        if n == 1:
            return False
        return merged_summary(cfg, modality, spec.model, shard_rows(index.num_samples, i, n), conf, index,
                               cf.parse_shard_name(path)[0]) is not None
    try:
        with cf.FeatureFile(path) as ff:
            return bool(ff.complete and ff.index_fingerprint == index.fingerprint
                        and not cf.encoder_difference(ff.config, conf) and holds_fields(ff, cfg.fields))
    except cf.CacheError:
        return False  # unreadable: extract_shard says why (or --repair rebuilds it)


def claim_one(cfg: ExtractConfig, modality: str, enc, index: IndexInfo, i: int, n: int, claimed: list[int]):
    """Try shard ``i``: None when another worker holds it, True when it is complete already, else the
    :class:`ModalitySummary` of extracting (or resuming) it (``i`` appended to ``claimed`` first)."""
    lock = ExitStack()
    try:
        lock.enter_context(shard_lock(index.dataset_dir, i, n))
    except CacheBusyError:
        return None
    with lock:
        if _shard_done(cfg, modality, enc, index, i, n):
            return True
        log.info("claimed %s shard %d/%d", modality, i, n)
        claimed.append(i)
        return extract_shard(cfg, modality, i, n, index=index, encoder=enc)


def _log_wait(index: IndexInfo, held: list[int], n: int, poll_s: float) -> None:
    who = []
    for i in held[:3]:
        h = read_holder(index.dataset_dir / f"{LOCK_NAME}-shard-{i}-of-{n}") if n > 1 else None
        who.append(f"{i} ({describe_holder(h)})" if h else str(i))
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    log.info("nothing left to claim; waiting for shard %s%s held by other workers (retrying every %.0f s)",
             ", ".join(who), more, poll_s)


def claim_modality(cfg: ExtractConfig, modality: str, index: IndexInfo, num_shards: int, start: int = 0, *,
                   wait: bool = True, poll_s: float = POLL_S, encoder=None,
                   claimed: list[int] | None = None) -> tuple[ModalitySummary, list[int]]:
    """Claim and extract shards of ``modality`` until none is left: complete, or (``wait=False``) held by
    another worker. Returns this worker's part (counts over the shards it extracted; ``path`` is the
    merged file's) and the shards it extracted, in order (also appended to ``claimed`` as each is taken:
    after an error its last entry names the shard that failed)."""
    enc = encoder or load_modality_encoder(modality, cfg)
    n = num_shards
    pending = [(start + k) % n for k in range(n)]
    parts: list[ModalitySummary] = []
    claimed = [] if claimed is None else claimed
    last_log = float("-inf")
    while pending:
        held = []
        for i in pending:
            got = claim_one(cfg, modality, enc, index, i, n, claimed)
            if got is None:
                held.append(i)
            elif got is not True:
                parts.append(got)
        progressed, pending = len(held) < len(pending), held
        if progressed or not pending:
            continue
        if not wait:
            break
        if time.monotonic() - last_log >= _LOG_EVERY_S:
            _log_wait(index, pending, n, poll_s)
            last_log = time.monotonic()
        time.sleep(poll_s)
    first = feature_file(cfg, modality, enc, index.dataset_dir.name, 0, n)
    target = cf.parse_shard_name(first)[0] if n > 1 else first
    mine = ModalitySummary(modality=modality, model=cfg.encoder(modality).model, path=str(target),
                           total=sum(p.total for p in parts), already_done=sum(p.already_done for p in parts),
                           encoded=sum(p.encoded for p in parts), failed=sum(p.failed for p in parts),
                           seconds=sum(p.seconds for p in parts), repaired=sum(p.repaired for p in parts),
                           samples_per_s=_rate(parts), up_to_date=all(p.up_to_date for p in parts))
    return mine, claimed


def _rate(parts: list[ModalitySummary]) -> float:
    rows = sum(p.encoded + p.failed for p in parts)
    secs = sum((p.encoded + p.failed) / p.samples_per_s for p in parts if p.samples_per_s > 0)
    return rows / secs if secs > 0 else 0.0


# ---------------------------------------------------------------------------------------------- merging

def merge_claimed(target: Path, num_shards: int, *, keep_shards: bool = False, skip_if_merged: bool = True,
                  force: bool = False) -> tuple[cf.MergeResult | None, str]:
    """Merge the shards of ``target`` when this worker gets the folder's exclusive lock: (result, note);
    (None, note) when another worker holds it (it merges) or there is one shard (nothing to merge)."""
    if num_shards == 1:
        return None, f"one shard: {target.name} is the feature file itself"
    try:
        res = cf.merge_shards(target, num_shards, keep_shards=keep_shards, force=force,
                              skip_if_merged=skip_if_merged)
    except CacheBusyError:
        log.info("%s: another worker holds the folder lock; it merges", target.name)
        return None, f"{target.name}: merged by another worker"
    left = "shard files removed" if res.removed_shards else ("shard files kept" if res.shards else "")
    return res, (f"{res.status} {num_shards} shards into {target.name} in {res.seconds:.1f} s"
                 + (f" ({left})" if left else ""))


def combine(parts: list[ModalitySummary], target: Path, num_samples: int,
            res: cf.MergeResult | None) -> ModalitySummary:
    """One modality's summary over every worker's part: counts summed, the rest read from ``target``
    when it is there (merged, by this worker or another)."""
    encoded, failed = sum(p.encoded for p in parts), sum(p.failed for p in parts)
    out = ModalitySummary(
        modality=parts[0].modality, model=parts[0].model, path=str(target), total=num_samples,
        already_done=num_samples - encoded - failed, encoded=encoded, failed=failed,
        seconds=max(p.seconds for p in parts) + (res.seconds if res else 0.0),
        samples_per_s=sum(p.samples_per_s for p in parts), repaired=sum(p.repaired for p in parts),
        up_to_date=all(p.up_to_date for p in parts) and (res is None or res.status == "already merged"),
        forced=any(p.forced for p in parts))
    if target.is_file():
        with cf.FeatureFile(target) as ff:
            out.failures = dict(Counter(reason_kind(r) for _sid, r in ff.failures()))
            out.complete, out.valid = bool(ff.complete), int(ff.valid.sum())
            out.size_bytes = ff.nbytes_on_disk()  # a virtual merge: with its shards
    return out


# ---------------------------------------------------------------------------------------------- a worker

def run_claim_extract(cfg: ExtractConfig, *, keep_shards: bool = False, worker: int | None = None,
                      workers: int | None = None, poll_s: float = POLL_S) -> ExtractSummary:
    """``extract --claim``: one independent worker (a Slurm array task, a process on any machine that
    sees the cache folder). Writes the index under the index lock (workers starting together take turns;
    the first writes it, the others find it unchanged), claims shards of each modality until all are
    complete, then merges unless another worker does. ``worker`` / ``workers``: this worker's start offset
    and the number planned for (default: :func:`worker_slot`)."""
    cfg.validate()
    t0 = time.perf_counter()
    validate_models(cfg)
    slot, count = worker_slot()
    slot, count = (slot if worker is None else worker), (count if workers is None else workers)
    with ExitStack() as lock, disk_full_as_error(Path(cfg.cache_dir)):
        index = prepare_index(cfg, lock=lock, lock_with=lambda d: waiting_lock(
            lambda: index_lock(d), f"the index lock of {d}", poll_s=poll_s))
    n = cfg.claim_shards or default_num_shards(index.num_samples, count)
    start = (slot * n // count) if slot is not None else os.getpid() % n
    log.info("sample index %s: %d samples (%s); claiming from %d shards, starting at %d", index.path,
             index.num_samples, index.status, n, start)
    modalities, notes, failures_csv = [], [index.split_summary] if index.split_summary else [], None
    for modality in ("image", "text"):
        if modality not in cfg.modalities:
            continue
        mine, claimed = claim_modality(cfg, modality, index, n, start, wait=True, poll_s=poll_s)
        target = Path(mine.path)
        res, note = merge_claimed(target, n, keep_shards=keep_shards)
        notes += [f"{modality}: extracted {len(claimed)} of {n} shards"
                  + (f" ({', '.join(map(str, claimed))})" if claimed else ""), f"{modality}: {note}"]
        if res is not None and res.failures_csv is not None:
            failures_csv = str(res.failures_csv)
        modalities.append(combine([mine], target, index.num_samples, res))
    if failures_csv is None and modalities and all(Path(m.path).is_file() for m in modalities):
        failures_csv = str(cf.write_failures_csv(index.dataset_dir))
    return ExtractSummary(dataset=cfg.dataset, cache_dir=str(cfg.cache_dir), index_path=str(index.path),
                          index_status=index.status, num_samples=index.num_samples, shard=(0, 1),
                          modalities=[m for mod in cf.MODALITIES for m in modalities if m.modality == mod],
                          failures_csv=failures_csv, seconds=time.perf_counter() - t0, notes=notes)
