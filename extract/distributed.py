"""Stage one across GPUs and machines: ``torchrun ... cli.py extract ...``.

torchrun starts one process per GPU and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``). :func:`run_distributed_extract` turns that into the shard logic of
:mod:`extract.extraction`:

1. rank 0 reads the dataset and writes ``index.h5`` (only rank 0 writes it: no races); every rank
   learns the outcome through one broadcast (a barrier), then the others read the index file;
2. each rank claims shards (:mod:`extract.claim`): ``--num-shards`` contiguous shards (default: ~8 per
   rank, >= 1000 rows each), each rank taking the next one whose lock is free, starting at its own
   block, so a slow node no longer holds the rest; a rank with nothing left to claim goes to the end
   barrier. With ``--no-claim`` (and with ``--force`` / ``--retry-failed``) rank ``r`` extracts the
   fixed shard ``r`` of ``WORLD_SIZE``. Either way the single-process resume rules hold: a complete
   shard is a no-op, an interrupted one resumes;
3. one gather (a barrier) collects every rank's outcome; then rank 0 merges the shards into the normal
   feature file (:func:`mmcache.cache.merge_shards`: a virtual merge over the shard files, which stay
   and hold the data) and rewrites ``failures.csv``.

There are no collectives during the work, only at the start and the end, and the process group's
timeout is long (:data:`DEFAULT_TIMEOUT_S`): a rank that finishes early waits for the slowest one
(with claiming: for the last shard the others hold).
A rank that dies (``kill -9``, out of memory) makes torchrun stop the others; every shard file stays
resumable, so relaunching the same command finishes only the missing work. A rank that fails with an
error reports it in the final gather, and rank 0 names it.

The cache folder (and the dataset) must be on a filesystem every node sees at the same path.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from mmcache.extract.claim import (
    claim_modality,
    combine,
    default_num_shards,
    merge_claimed,
    run_claim_extract,
)
from mmcache.extract.extraction import (
    ExtractConfig,
    ExtractSummary,
    ModalitySummary,
    extract_shard,
    load_index_info,
    prepare_index,
    run_extract,
    validate_models,
)

from mmcache import cache as cf
from mmcache.errors import BadInputError, PipelineError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT_S", "BACKENDS", "LaunchEnv", "launch_env", "run_distributed_extract"]

DEFAULT_TIMEOUT_S = 48 * 3600  # longest wait at the start / end barrier (a slow rank's whole shard)
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv | None:
    """The torchrun environment of this process, or None when not launched by torchrun (no
    ``RANK`` / ``WORLD_SIZE``)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise BadInputError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local):
        raise BadInputError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local, local_world_size=local_world)


def rank_device(device: str, local_rank: int) -> str:
    """The device this rank computes on: ``auto`` / ``cuda`` -> ``cuda:<LOCAL_RANK>`` when CUDA is
    available (``auto`` falls back to ``cpu``); ``cpu`` and an explicit ``cuda:N`` are kept."""
    import torch

    if device not in ("auto", "cuda"):
        return device
    if not torch.cuda.is_available():
        if device == "cuda":
            raise BadInputError("--device cuda requested but CUDA is not available; use 'cpu' or 'auto'")
        return "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise BadInputError(f"LOCAL_RANK {local_rank} has no GPU: {count} visible on this node. Launch at most "
                            f"{count} processes per node (--nproc_per_node), or use --device cpu")
    return f"cuda:{local_rank}"


def _backend(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise BadInputError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    return "nccl" if device.startswith("cuda") else "gloo"


@contextmanager
def _process_group(backend: str, device: str, timeout_s: float):
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if backend == "nccl":
        dev = torch.device(device)
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise PipelineError(f"cannot start the {backend} process group: {' '.join(str(e).split())[:300]}") from e
    try:
        yield dist
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _describe_error(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "type": type(e).__name__, "error": str(e), "bad_input": isinstance(e, BadInputError)}


def run_distributed_extract(cfg: ExtractConfig, env: LaunchEnv | None = None, *, keep_shards: bool = False,
                            backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> ExtractSummary:
    """Run this process's part of a torchrun launch; see the module docstring.

    Rank 0 returns the summary of the merged files (``ranks`` = world size); other ranks return
    their own shard's summary. Without torchrun (or with one process) this is :func:`run_extract`.
    Raises :class:`BadInputError` / :class:`PipelineError` like :func:`run_extract`; on rank 0 also
    when another rank failed (naming it)."""
    env = env or launch_env()
    cfg = replace(cfg)
    cfg.validate()
    if env is not None:
        cfg.device = rank_device(cfg.device, env.local_rank)
    if env is None or env.world_size == 1:
        if cfg.claim:
            return run_claim_extract(cfg, keep_shards=keep_shards)
        return run_extract(cfg)
    if cfg.shard != (0, 1):
        raise BadInputError("--shard cannot be combined with torchrun: each rank extracts the shard of its RANK")
    claiming = _claiming(cfg)
    if timeout_s <= 0:
        raise BadInputError(f"the process group timeout must be positive, got {timeout_s}")
    validate_models(cfg)  # every rank, before the process group: a bad model fails fast everywhere
    rank, world = env.rank, env.world_size
    if not env.is_main and cfg.progress is None:
        cfg.progress = False  # one set of progress bars (rank 0's) on a shared terminal
    t0 = time.perf_counter()
    with _process_group(_backend(backend, cfg.device), cfg.device, timeout_s) as dist:
        # 1. rank 0 writes the index; the broadcast doubles as the start barrier
        index = None
        first: BaseException | None = None
        msg: list[Any] = [None]
        if env.is_main:
            try:
                index = prepare_index(cfg)
                msg[0] = {"ok": True, "path": str(index.path), "fingerprint": index.fingerprint,
                          "status": index.status}
                log.info("sample index %s: %d samples (%s); %d ranks", index.path, index.num_samples,
                         index.status, world)
            except Exception as e:  # noqa: BLE001 -- reported to the other ranks, then re-raised
                first, msg[0] = e, _describe_error(e)
        dist.broadcast_object_list(msg, src=0)
        if first is not None:
            raise first
        if not msg[0]["ok"]:
            raise PipelineError(f"rank 0 could not prepare the sample index: {msg[0]['error']}")
        if index is None:
            index = load_index_info(msg[0]["path"])
            if index.fingerprint != msg[0]["fingerprint"]:
                raise PipelineError(f"{index.path} changed while the launch started; rerun it")
            index.status = msg[0]["status"]

        # 2. this rank's shard (or the shards it claims); no collectives while working
        n = (cfg.claim_shards or default_num_shards(index.num_samples, world)) if claiming else world
        results: dict[str, ModalitySummary] = {}
        error: BaseException | None = None
        taken: list[int] = []  # the shards this rank claimed, the one it works on last
        try:
            for modality in ("image", "text"):
                if modality in cfg.modalities:
                    results[modality] = _work(cfg, modality, index, rank, world, n, claiming, taken)
            mine: dict[str, Any] = {"ok": True, "summaries": {m: asdict(s) for m, s in results.items()}}
        except Exception as e:  # noqa: BLE001 -- reported to rank 0 at the end barrier, then re-raised
            error, mine = e, _describe_error(e)
        mine["rank"] = rank
        mine["where"] = f"shard {taken[-1] if claiming and taken else rank}/{n}"
        statuses: list[Any] = [None] * world
        dist.all_gather_object(statuses, mine)  # the end barrier
    if error is not None:
        raise error
    if not env.is_main:
        return ExtractSummary(dataset=cfg.dataset, cache_dir=str(cfg.cache_dir), index_path=str(index.path),
                              index_status=index.status, num_samples=index.num_samples, shard=(rank, world),
                              modalities=[results[m] for m in cf.MODALITIES if m in results], failures_csv=None,
                              seconds=time.perf_counter() - t0)
    failed = [s for s in statuses if not s["ok"]]
    if failed:
        which = "; ".join(f"rank {s['rank']} ({s['where']}): {s['type']}: {s['error']}" for s in failed)
        cls = BadInputError if all(s["bad_input"] for s in failed) else PipelineError
        raise cls(f"{len(failed)} of {world} ranks failed: {which}. Finished batches are saved; fix the cause and "
                  "rerun the same launch to finish the missing work")

    # 3. rank 0 merges
    modalities, notes, failures_csv = [], [], None
    for modality in cf.MODALITIES:
        if modality not in cfg.modalities:
            continue
        parts = [ModalitySummary(**s["summaries"][modality]) for s in statuses]
        target = Path(parts[0].path)  # a shard file (or the merged file, when already merged)
        target = cf.parse_shard_name(target)[0] if cf.parse_shard_name(target) else target
        all_done = all(p.up_to_date for p in parts)
        res, note = merge_claimed(target, n, keep_shards=keep_shards, skip_if_merged=all_done, force=cfg.force)
        if res is not None and res.failures_csv is not None:
            failures_csv = str(res.failures_csv)
        notes.append(f"{modality}: {note}")
        modalities.append(combine(parts, target, index.num_samples, res))
    if failures_csv is None and modalities:
        failures_csv = str(cf.write_failures_csv(index.dataset_dir))
    return ExtractSummary(dataset=cfg.dataset, cache_dir=str(cfg.cache_dir), index_path=str(index.path),
                          index_status=index.status, num_samples=index.num_samples, shard=(0, 1),
                          modalities=modalities, failures_csv=failures_csv, seconds=time.perf_counter() - t0,
                          ranks=world, notes=notes)


def _claiming(cfg: ExtractConfig) -> bool:
    """Claim shards under torchrun? ``--claim`` / ``--no-claim``; by default yes, except with ``--force`` /
    ``--retry-failed`` (which a claim cannot do once per shard: each rank gets its fixed shard then)."""
    if cfg.claim is not None:
        if not cfg.claim and cfg.claim_shards not in (None, 1):
            raise BadInputError("--num-shards without --shard needs claiming: drop --no-claim (under torchrun each "
                                "rank then claims from that many shards)")
        return cfg.claim
    if cfg.force or cfg.retry_failed:
        if cfg.claim_shards not in (None, 1):
            raise BadInputError("--num-shards cannot be combined with --force / --retry-failed under torchrun: "
                                "each rank rebuilds its fixed shard")
        return False
    return True


def _work(cfg: ExtractConfig, modality: str, index, rank: int, world: int, n: int, claiming: bool,
          taken: list[int]) -> ModalitySummary:
    """This rank's part of ``modality``: its fixed shard, or the shards it claims from ``n`` (starting
    at its own block, ``rank * n // world``, so ranks do not contend for the first shards; each appended
    to ``taken`` when claimed)."""
    if not claiming:
        return extract_shard(cfg, modality, rank, world, index=index)
    before = len(taken)
    mine, _ = claim_modality(cfg, modality, index, n, rank * n // world, wait=False, claimed=taken)
    log.info("rank %d extracted %d of %d %s shards (%s)", rank, len(taken) - before, n, modality,
             ", ".join(map(str, taken[before:])) or "none")
    return mine
