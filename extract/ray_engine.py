"""Stage one on a Ray cluster: ``extract --engine ray`` (the optional ``mmcache[ray]`` extra).

Ray Data runs the shards; the cache folder stays the state, exactly as with ``--claim``
(:mod:`extract.claim`):

1. the driver validates the models and writes ``index.h5`` once (:func:`extract.index_prep.prepare_index`);
2. ``ray.data.from_items(shard ids).map_batches(ShardExtractor, batch_size=1)`` on a pool of actors:
   each actor loads its encoders once, then for each shard id (image, then text) takes the shard's lock
   (waiting while another actor holds it), skips a complete shard and otherwise calls
   :func:`extract.extraction.extract_shard`, whose resume rules are unchanged. A task Ray retries on
   another node (a dead node, a preempted GPU) or runs twice finds the shard complete or half done and
   does only what is missing; the lock keeps two actors off one shard;
3. the driver merges the shards (:func:`mmcache.cache.merge_shards`, virtual unless ``copy``) and
   rewrites ``failures.csv``.

Ray gives what the lock alone does not: retries across nodes and autoscaled GPU pools. There is no
scheduler here. Shard ids come from ``from_items`` rather than ``ray.data.range``: a range's read task
needs a CPU of its own, and on a small cluster whose CPUs the actors hold it never runs (a deadlock).

Every node must see the cache folder and the dataset at the same paths. ``ray`` is imported only here,
only when called.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from mmcache.extract.claim import POLL_S, claim_one, combine, default_num_shards, merge_claimed
from mmcache.extract.config import ExtractConfig, ExtractSummary, ModalitySummary
from mmcache.extract.extraction import feature_file, load_modality_encoder, validate_models
from mmcache.extract.index_prep import disk_full_as_error, load_index_info, prepare_index

from mmcache import cache as cf
from mmcache.errors import BadInputError, PipelineError

log = logging.getLogger(__name__)

__all__ = ["ShardExtractor", "run_ray_extract"]

INSTALL_HINT = "install the ray extra: pip install 'mmcache[ray]'"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 -- the `data` part of the extra
    except ImportError as e:
        raise BadInputError(f"--engine ray needs Ray Data ({e}); {INSTALL_HINT}") from None
    return ray


class ShardExtractor:
    """One Ray actor: encoders loaded once (per modality, on first use), then one shard per batch.

    ``__call__`` takes ``{"shard": (1,) int}`` and returns it with ``"summaries"``: (1,) str, the JSON
    of ``{modality: {"target": merged file, "part": ModalitySummary or None (the shard was complete)}}``,
    or ``{"error": {...}}`` when the shard raised a :class:`PipelineError`."""

    def __init__(self, cfg: ExtractConfig, index_path: str, fingerprint: str, num_shards: int):
        self.cfg = dataclasses.replace(cfg, progress=False)  # no bars from actors
        self.index = load_index_info(index_path)
        if self.index.fingerprint != fingerprint:
            raise PipelineError(f"{index_path} changed after the driver wrote it; rerun the command")
        self.n = num_shards
        self.encoders: dict = {}

    def __call__(self, batch: dict) -> dict:
        out = []
        for i in batch["shard"]:
            done = {}
            try:
                for modality in ("image", "text"):  # image first: the DataLoader forks before the tokenizer's threads
                    if modality in self.cfg.modalities:
                        got, target = self._shard(modality, int(i))
                        part = None if got is True else dataclasses.asdict(got)
                        done[modality] = {"target": str(target), "part": part}
            except PipelineError as e:
                # returned, not raised: Ray would retry it in vain (bad input, a mismatching cache) and its
                # wrapper loses the type the CLI maps to an exit code. Other shards go on.
                done = {"error": {"shard": int(i), "type": type(e).__name__, "message": str(e),
                                  "bad_input": isinstance(e, BadInputError)}}
            out.append(json.dumps(done))
        return {"shard": batch["shard"], "summaries": out}

    def _shard(self, modality: str, i: int):
        """(True when shard ``i`` was complete, else the summary of extracting it; the merged file's path).
        Waits while another actor (a duplicate of this task) holds the shard's lock, so a task ends only
        once its shard is complete."""
        if modality not in self.encoders:
            self.encoders[modality] = load_modality_encoder(modality, self.cfg)
        enc = self.encoders[modality]
        path = feature_file(self.cfg, modality, enc, self.index.dataset_dir.name, i, self.n)
        target = cf.parse_shard_name(path)[0] if self.n > 1 else path
        while True:
            got = claim_one(self.cfg, modality, enc, self.index, i, self.n, [])
            if got is not None:
                return got, target
            time.sleep(POLL_S)


def _check(cfg: ExtractConfig) -> None:
    cfg.validate()
    if cfg.shard != (0, 1) or cfg.claim:
        raise BadInputError("--engine ray hands out the shards itself: give --num-shards n, not --shard / --claim")
    if cfg.force or cfg.retry_failed:
        # a retried task cannot tell a shard rebuilt by this run from an old one: it would rebuild it again
        raise BadInputError("--force / --retry-failed cannot be combined with --engine ray; run them once with "
                            "the local engine")


def _gpus_per_worker(cfg: ExtractConfig) -> int:
    """1 when the encoders run on CUDA (``cuda``, ``cuda:N``, or ``auto`` with a GPU on the driver), else 0."""
    if cfg.device.startswith("cuda"):
        return 1
    if cfg.device != "auto":
        return 0
    import torch

    return int(torch.cuda.is_available())


@contextmanager
def _cluster(ray, address: str | None):
    """Connect to ``address`` (an existing cluster), or reuse this process's Ray, or start a local one
    (shut down after). A local cluster's workers get this checkout on their path, so they import the
    same mmcache as the driver."""
    if ray.is_initialized():
        yield
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        import mmcache

        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": str(Path(mmcache.__file__).resolve().parents[1])}}
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PipelineError(f"cannot start or reach the Ray cluster {address or '(local)'}: {e}") from e
    try:
        yield
    finally:
        ray.shutdown()


def _default_concurrency(ray, gpus: int) -> int:
    """One actor per GPU of the cluster (GPU workers), else per CPU."""
    res = ray.cluster_resources()
    return max(1, int(res.get("GPU", 0)) if gpus else int(res.get("CPU", 1)))


def _run_actors(ray, cfg: ExtractConfig, index, n: int, concurrency: int, gpus: int) -> list[dict]:
    """Every shard through the actor pool; the per-shard results, as dicts. Raises once all shards ran:
    :class:`BadInputError` when every failed shard failed on bad input, else :class:`PipelineError`."""
    from ray.data import ActorPoolStrategy

    concurrency = min(concurrency, n)  # an actor without a shard would only load encoders
    ray.data.DataContext.get_current().enable_progress_bars = bool(cfg.progress)
    ds = ray.data.from_items([{"shard": i} for i in range(n)]).map_batches(
        ShardExtractor, batch_size=1, compute=ActorPoolStrategy(size=concurrency), num_gpus=gpus,
        fn_constructor_kwargs=dict(cfg=cfg, index_path=str(index.path), fingerprint=index.fingerprint, num_shards=n))
    log.info("ray: %d shards on %d actors (%d GPU each)", n, concurrency, gpus)
    try:
        rows = ds.take_all()
    except Exception as e:  # noqa: BLE001 -- a Ray failure (a node lost beyond its retries, an actor that cannot start)
        first = " ".join(str(e).split())[:500]
        raise PipelineError(f"the Ray extraction failed: {type(e).__name__}: {first}. Finished shards are kept; "
                            "rerun to finish the rest") from e
    results = [json.loads(r["summaries"]) for r in rows]
    failed = sorted((r["error"] for r in results if "error" in r), key=lambda f: f["shard"])
    if failed:
        which = "; ".join(f"shard {f['shard']}/{n}: {f['type']}: {f['message']}" for f in failed)
        cls = BadInputError if all(f["bad_input"] for f in failed) else PipelineError
        raise cls(f"{len(failed)} of {n} shards failed: {which}. Finished shards are kept; fix the cause and rerun")
    return results


def run_ray_extract(cfg: ExtractConfig, *, num_shards: int | None = None, concurrency: int | None = None,
                    num_gpus_per_worker: int | None = None, address: str | None = None,
                    keep_shards: bool = False) -> ExtractSummary:
    """``extract --engine ray``: see the module docstring. ``num_shards`` (default ``cfg.claim_shards``,
    else ~8 per actor, >= 1000 rows each), ``concurrency``: actors (default: the cluster's GPUs, or
    CPUs), ``num_gpus_per_worker``: default 1 on CUDA, else 0; ``address``: an existing cluster
    (``auto``, ``ray://host:10001``), default a local one. Returns the summary of the merged files."""
    _check(cfg)
    ray = _import_ray()
    t0 = time.perf_counter()
    validate_models(cfg)
    with disk_full_as_error(Path(cfg.cache_dir)):
        index = prepare_index(cfg)
    gpus = _gpus_per_worker(cfg) if num_gpus_per_worker is None else num_gpus_per_worker
    with _cluster(ray, address):
        concurrency = concurrency or _default_concurrency(ray, gpus)
        n = num_shards or cfg.claim_shards or default_num_shards(index.num_samples, concurrency)
        log.info("sample index %s: %d samples (%s); %d shards", index.path, index.num_samples, index.status, n)
        results = _run_actors(ray, cfg, index, n, concurrency, gpus)
    modalities, notes, failures_csv = [], [index.split_summary] if index.split_summary else [], None
    for modality in cf.MODALITIES:
        if modality not in cfg.modalities:
            continue
        mine = [r[modality] for r in results]
        parts = [ModalitySummary(**m["part"]) for m in mine if m["part"] is not None]
        extracted = len(parts)
        target = Path(mine[0]["target"])
        parts = parts or [ModalitySummary(modality=modality, model=cfg.encoder(modality).model, path=str(target),
                                          total=0, up_to_date=True)]
        res, note = merge_claimed(target, n, keep_shards=keep_shards)
        notes += [f"{modality}: ray extracted {extracted} of {n} shards", f"{modality}: {note}"]
        if res is not None and res.failures_csv is not None:
            failures_csv = str(res.failures_csv)
        modalities.append(combine(parts, target, index.num_samples, res))
    if failures_csv is None and modalities and all(Path(m.path).is_file() for m in modalities):
        failures_csv = str(cf.write_failures_csv(index.dataset_dir))
    return ExtractSummary(dataset=cfg.dataset, cache_dir=str(cfg.cache_dir), index_path=str(index.path),
                          index_status=index.status, num_samples=index.num_samples, shard=(0, 1),
                          modalities=modalities, failures_csv=failures_csv, seconds=time.perf_counter() - t0,
                          notes=notes)
