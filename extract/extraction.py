"""Stage one: run the frozen encoders over a dataset once, into the resumable HDF5 cache.

Entry points:

* :func:`run_extract` -- what ``cli.py extract`` calls: write the sample index, then extract each
  requested modality (image first, then text: one model in memory at a time, and the image
  DataLoader forks before the Rust tokenizer starts its thread pool), then ``failures.csv``.
* :func:`prepare_index` -- read the dataset, assign splits, write ``index.h5`` (only when it changed).
* :func:`extract_shard` -- the unit of work: one modality, shard ``i`` of ``n``. Shard ``i`` owns the
  *contiguous* block of index rows ``[i*N//n, (i+1)*N//n)`` (:func:`shard_rows`) and writes its own
  file (:func:`mmcache.cache.shard_path`); shard 0 of 1 is the normal, unsharded file.

Batching is a fixed plan, independent of what is already done, so a resumed run recomputes whole
batches of the same composition and ends bit-identical to an uninterrupted one (with the same batch
sizes; other batch sizes agree to float tolerance):

* image: consecutive blocks of ``image_batch_size`` file rows; decoding + preprocessing in DataLoader
  workers (failures come back as markers, never exceptions), overlapped with the forward pass;
* text: windows of ``length_window`` consecutive non-empty rows; inside a window rows are sorted by
  token length (stable) and cut into batches of ``text_batch_size``, so a batch pads to similar
  lengths. Each batch is written in ascending row order; values land at their own rows.

Stored token states at padded positions (mask False) are zero, so they do not depend on batching.

This module imports torch / transformers (through :mod:`extract.encoders`); readers of the cache need
only :mod:`mmcache.cache`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from mmcache.extract.batches import progress_bar, run_image, run_text, text_batches
from mmcache.extract.config import (
    EMPTY_TEXT,
    MODALITY_CHOICES,
    ExtractConfig,
    ExtractSummary,
    IndexInfo,
    ModalitySummary,
    format_extract_summary,
    parse_shard,
    reason_kind,
    shard_rows,
)
from mmcache.extract.identity import decode_mode, encoder_config
from mmcache.extract.index_prep import (
    disk_full_as_error,
    file_provenance,
    load_index_info,
    prepare_index,
    shard_lock,
)

from mmcache import cache as cf
from mmcache.cache.lock import CacheBusyError
from mmcache.cache.names import field_arrays
from mmcache.errors import BadInputError, CacheError, Interrupted, PipelineError

log = logging.getLogger(__name__)

# The records and the index step live in extract/config.py and extract/index_prep.py; they are named
# here too because this module is stage one's entry point (ExtractConfig, run_extract, extract_shard).
__all__ = ["EMPTY_TEXT", "MODALITY_CHOICES", "ExtractConfig", "ExtractSummary", "IndexInfo", "ModalitySummary",
           "extract_shard", "format_extract_summary", "load_index_info", "parse_shard", "prepare_index",
           "reason_kind", "run_extract", "shard_rows", "text_batches", "validate_models"]

# ---------------------------------------------------------------------------------------------- one shard

@contextmanager
def torch_threads(enc, modality: str, cfg: ExtractConfig):
    """On a CPU device, run the forward with ``cfg.threads`` torch threads (default: torch's own, i.e.
    all cores), restoring the process setting after. Measured side by side on an idle 2-core machine
    (small preset, 128 images): 2 workers + 2 threads 31 samples/s, 2 workers + 1 thread 18.5, against a
    forward-only limit of 37 at 2 threads: decoding is ~10% of the forward's cost, so giving it whole
    cores halves throughput. On a machine busy with other jobs, oversubscribed OpenMP threads spin and
    a lower ``--threads`` can be much faster."""
    import torch

    if enc.device.type != "cpu":
        yield None
        return
    old = torch.get_num_threads()
    want = cfg.threads or old
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(old)


def load_modality_encoder(modality: str, cfg: ExtractConfig):
    # encoders import transformers (seconds): loaded when an extraction runs, not when its records are read
    from mmcache.extract.encoders import load_encoder

    return load_encoder(cfg.encoder(modality), device=cfg.device)


def file_slug(enc, cfg: ExtractConfig, modality: str) -> str:
    """The ``<slug>`` of ``<modality>--<slug>.h5``: the encoder's readable name (``--text-name`` /
    ``--image-name``, else :func:`extract.encoders.readable_name`), plus ``.<layer>`` when not the last."""
    slug = cf.name_slug(enc.name)
    layer = cfg.encoder(modality).layer
    if layer == "last":
        return slug
    return f"{slug}.{layer}" if layer.startswith("mean") else f"{slug}.layer{layer}"


def feature_file(cfg: ExtractConfig, modality: str, enc, dataset: str, shard_index: int, num_shards: int) -> Path:
    """Where this modality's file goes: the readable name's file, or a file of the same encoder under
    its older name (the model folder's last component) when only that exists."""
    spec = cfg.encoder(modality)
    path = cf.shard_path(cfg.cache_dir, dataset, modality, spec.model, shard_index, num_shards,
                         slug=file_slug(enc, cfg, modality))
    legacy = cf.shard_path(cfg.cache_dir, dataset, modality, spec.model, shard_index, num_shards)
    if legacy != path and legacy.exists() and not path.exists() and spec.layer == "last" and not spec.name:
        log.info("using %s (named before encoders had readable names)", legacy.name)
        return legacy
    return path


#: modality -> (tokens per row, patch grid or None) of a loaded encoder
TOKEN_LAYOUT = {"text": lambda enc: (enc.max_length, None), "image": lambda enc: (enc.num_tokens, tuple(enc.grid))}


def extract_shard(cfg: ExtractConfig, modality: str, shard_index: int = 0, num_shards: int = 1,
                  index: IndexInfo | None = None, encoder=None, paths: dict[str, Path] | None = None
                  ) -> ModalitySummary:
    """Extract ``modality`` for shard ``shard_index`` of ``num_shards`` into its own file
    (:func:`~mmcache.cache.shard_path`); shard 0 of 1 writes the normal feature file.

    Resumes a matching unfinished file, is a no-op for a complete one, and raises
    :class:`~mmcache.cache.CacheMismatchError` for a file made with other settings (unless
    ``cfg.force``). ``encoder`` reuses an already loaded encoder of the right modality; ``paths``, when
    given, gets ``paths[modality]`` = the file as soon as it is known (what an interrupted run reports)."""

    cfg.validate()
    if modality not in cf.MODALITIES:
        raise BadInputError(f"unknown modality {modality!r}")
    t0 = time.perf_counter()
    index = index or prepare_index(cfg)
    rows = shard_rows(index.num_samples, shard_index, num_shards)
    asked = cfg.encoder(modality)
    model = asked.model
    enc = encoder or load_modality_encoder(modality, cfg)
    path = feature_file(cfg, modality, enc, index.dataset_dir.name, shard_index, num_shards)
    cfg = keep_recorded_decode(cfg, modality, path)
    conf = encoder_config(enc, modality, dtype=cfg.dtype, revision=asked.revision, decode=cfg.decode)
    if paths is not None:
        paths[modality] = path
    if num_shards > 1 and not path.exists() and not cfg.force:
        merged = merged_summary(cfg, modality, model, rows, conf, index, cf.parse_shard_name(path)[0])
        if merged is not None:
            merged.seconds = time.perf_counter() - t0
            return merged
    ids = [index.ids[r] for r in rows]
    num_tokens, grid = TOKEN_LAYOUT[modality](enc)
    summary = ModalitySummary(modality=modality, model=model, path=str(path), total=len(rows), forced=cfg.force)
    fields = _fields_for(cfg, modality, enc)
    needed = cf.planned_bytes(len(rows), enc.hidden_size, num_tokens, cfg.dtype,
                              None if fields is None else field_arrays(fields), enc.proj_size or 0)
    with shard_lock(index.dataset_dir, shard_index, num_shards), disk_full_as_error(path, needed):
        if cfg.repair:
            _set_aside_unreadable(path)
        _write_shard(cfg, modality, path, rows, ids, index, enc, conf, num_tokens, grid, summary,
                     (shard_index, num_shards) if num_shards > 1 else None, fields)
    with cf.FeatureFile(path) as ff:
        summary.complete = ff.complete
        summary.valid = int(ff.valid.sum())
        summary.failures = dict(Counter(reason_kind(r) for _sid, r in ff.failures()))
        summary.size_bytes = ff.nbytes_on_disk()
    summary.seconds = time.perf_counter() - t0
    return summary


def _fields_for(cfg: ExtractConfig, modality: str, enc) -> tuple[str, ...] | None:
    """``--fields`` for this modality's file (None: everything / what an existing file stores); ``proj``
    of an encoder without a projection is refused (exit 2)."""
    if cfg.fields is not None and "proj" in cfg.fields and not enc.proj_size:
        raise BadInputError(f"--fields proj: the {modality} encoder {enc.name} has no joint-space projection "
                            "(only CLIP-style checkpoints do); ask for cls, mean or tokens")
    return cfg.fields


def keep_recorded_decode(cfg: ExtractConfig, modality: str, path: Path) -> ExtractConfig:
    """``cfg`` with the image decode policy an existing file recorded (a file made before draft decoding
    resumes with full decodes: one file never mixes the two); ``--force`` starts over with the asked one."""
    if modality != "image" or cfg.force or not path.is_file():
        return cfg
    try:
        with cf.FeatureFile(path) as ff:
            recorded = decode_mode(ff.config.get("decode"))
    except CacheError:  # unreadable: the usual checks in _write_shard say what to do
        return cfg
    if recorded and recorded != cfg.decode:
        log.info("%s was made with %s image decoding: kept for this file (--force to redo it with %s)", path,
                 recorded, cfg.decode)
        return dataclasses.replace(cfg, decode=recorded)
    return cfg


def _set_aside_unreadable(path: Path) -> None:
    """``--repair``: a feature file HDF5 cannot open at all is renamed ``<name>.damaged-<time>`` (kept
    for inspection) so that it is rebuilt; damaged rows of a readable file are repaired in place."""
    if not path.exists():
        return
    try:
        cf.FeatureFile(path).close()
    except cf.CacheError as e:

        if isinstance(e, CacheBusyError):
            raise
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        log.warning("%s cannot be opened (%s); moved it to %s and rebuilding it", path, e, aside.name)


def _verify_for_resume(writer: cf.FeatureWriter, summary: ModalitySummary) -> None:
    """Check every done row; damaged ones (checksum mismatch, NaN/Inf) lose their done bit, so the
    run recomputes them like rows a crash left unfinished."""
    if not writer.done_mask().any():
        return
    t = time.perf_counter()
    damage = writer.verify()
    if not damage.verifiable:
        log.warning("%s has no checksums (written by an older version): only NaN/Inf can be detected; "
                    "`extract --force` rebuilds it with them", writer.path)
    if damage:
        log.warning("%s: %s; recomputing them", writer.path, damage.describe())
        writer.mark_damaged(damage)
        summary.repaired = int(damage.rows.size)
    log.info("verified %s in %.2f s", writer.path, time.perf_counter() - t)


def _write_shard(cfg: ExtractConfig, modality: str, path: Path, rows, ids, index: IndexInfo, enc, conf: dict,
                 num_tokens: int, grid, summary: ModalitySummary, shard, fields=None) -> None:
    """Open (create / resume / verify / add ``fields``) ``path`` and compute every row that is not done
    in some field group (an add computes every row, but writes only the added arrays)."""
    import torch

    with cf.FeatureWriter.open(path, ids=ids, rows=rows, index_fp=index.fingerprint, modality=modality,
                               hidden_size=enc.hidden_size, num_tokens=num_tokens, dtype=cfg.dtype, config=conf,
                               provenance=file_provenance(enc, cfg, index), grid=grid, force=cfg.force,
                               shard=shard, proj_size=enc.proj_size, fields=fields) as writer:
        writer.rewrite_done = False  # finished rows in a recomputed batch keep their bytes (see _write_groups)
        _verify_for_resume(writer, summary)
        done = writer.done_mask()
        redo = writer.todo_mask(retry_failed=cfg.retry_failed)
        summary.already_done = int((~redo).sum())
        if writer.up_to_date and not redo.any():
            summary.up_to_date = True
            log.info("%s is up to date", path)
        else:
            if done.any():
                log.info("resuming %s: %d of %d rows done", path, int(done.sum()), len(done))
            t_loop = time.perf_counter()
            with progress_bar(int(redo.sum()), f"{modality} {path.stem}", cfg.progress) as bar, torch.inference_mode(), \
                    torch_threads(enc, modality, cfg) as threads:
                if modality == "text":
                    texts = [index.texts[r] for r in rows]
                    summary.encoded, summary.failed = run_text(writer, enc, texts, redo, cfg, bar)
                else:
                    files = [index.image_files[r] for r in rows]
                    summary.encoded, summary.failed = run_image(writer, enc, files, redo, cfg, bar)
            loop_s = time.perf_counter() - t_loop
            summary.samples_per_s = (summary.encoded + summary.failed) / loop_s if loop_s > 0 else 0.0
            writer.finalize({"last_run": {
                "encoded": summary.encoded, "failed": summary.failed, "seconds": round(loop_s, 3),
                "samples_per_s": round(summary.samples_per_s, 2), "device": str(enc.device),
                "batch_size": cfg.batch_size_for(modality),
                "num_workers": cfg.num_workers, "threads": threads, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})


def holds_fields(ff: cf.FeatureFile, fields) -> bool:
    """Does ``ff`` hold every one of ``fields`` (``--fields``; None: whatever it stores), each complete? A
    lean file asked for more is not up to date: the missing fields are added (only they are computed)."""
    if fields is None:
        return True
    done = ff.fields_complete()
    return all(done.get(k, False) for k in fields)


def merged_summary(cfg: ExtractConfig, modality: str, model: str, rows: np.ndarray, conf: dict,
                    index: IndexInfo, full: Path) -> ModalitySummary | None:
    """A shard whose file is gone because it was merged already: when the merged file is complete,
    made with the same settings for the same index (and ``--retry-failed`` has nothing to redo in
    these rows), the shard is up to date; returns its summary, else None (extract the shard)."""
    if not full.exists():
        return None
    try:
        with cf.FeatureFile(full) as ff:
            a = ff.attrs
            if not (ff.complete and not cf.encoder_difference(ff.config, conf) and holds_fields(ff, cfg.fields)
                    and a.get("index_fingerprint") == index.fingerprint and len(ff.ids) == index.num_samples):
                return None
            valid, done = ff.valid[rows], ff.done[rows]
            if cfg.retry_failed and (done & ~valid).any():
                return None
            mine = set(ff.ids[rows])
            failures = dict(Counter(reason_kind(r) for sid, r in ff.failures() if sid in mine))
    except cf.CacheError:
        return None
    log.info("%s already holds shard rows %d..%d: up to date", full, int(rows[0]) if rows.size else 0,
             int(rows[-1]) if rows.size else 0)
    return ModalitySummary(modality=modality, model=model, path=str(full), total=len(rows),
                           already_done=len(rows), valid=int(valid.sum()), failures=failures,
                           size_bytes=full.stat().st_size, complete=True, up_to_date=True)


def validate_models(cfg: ExtractConfig) -> None:
    """Before any work: each requested model is found, of a known family of its modality, and its
    tokenizer / image processor loads (a bad ``--text-model`` is reported before the image pass)."""
    from mmcache.extract.encoders import validate_encoder  # transformers: only when models are checked

    for modality in ("image", "text"):
        if modality in cfg.modalities:
            spec = cfg.encoder(modality)
            log.debug("%s model %s: %s family", modality, spec.model,
                      validate_encoder(modality, spec.model, spec.revision))


def _kept(cfg: ExtractConfig, paths: dict[str, Path], stopped: str) -> str:
    """What an interrupted run leaves: rows saved per modality file (every finished batch is kept);
    ``paths`` = the files :func:`extract_shard` named before it was stopped."""
    parts = []
    for modality in cfg.modalities:
        path = paths.get(modality)
        if path is None:
            parts.append(f"{modality} not started")
            continue
        try:  # unlocked read: image workers forked while the file was open may still hold its lock
            with cf.FeatureFile(path, locking=False) as ff:
                parts.append(f"{modality} {int(ff.done.sum())}/{len(ff.ids)} rows in {path}")
        except (cf.CacheError, OSError):
            parts.append(f"{modality} not started" if modality != stopped else f"{modality} 0 rows")
    return "extraction stopped; kept " + ", ".join(parts)


def _refuse_if_nothing_usable(summaries: list[ModalitySummary], failures_csv: str) -> None:
    """Raise :class:`PipelineError` when no requested modality has a single row with features (every row a
    failure, e.g. every image missing): a cache nothing can train on is not a success. The files (failures
    included) are kept, and ``failures.csv`` already lists why each row failed."""
    if not summaries or any(m.valid for m in summaries):
        return
    reasons = Counter()
    for m in summaries:
        reasons.update({f"{m.modality}: {why}": n for why, n in m.failures.items()})
    common = (f"; most common failure: {reasons.most_common(1)[0][0]} ({reasons.most_common(1)[0][1]} of "
              f"{sum(reasons.values())})" if reasons else "")
    rows = max(m.total for m in summaries)
    raise PipelineError(f"nothing usable was written: every one of the {rows} rows failed for "
                        f"{' and '.join(m.modality for m in summaries)}{common}; see {failures_csv}")


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Index, then each requested modality (image before text), then ``failures.csv`` (unsharded
    runs only: a sharded run leaves that to the merge). Returns the summary; raises
    :class:`BadInputError` / :class:`PipelineError` (incl. :class:`CacheError`). With ``cfg.claim``:
    one worker claiming shards (:func:`extract.claim.run_claim_extract`)."""
    cfg.validate()
    if cfg.claim:
        from mmcache.extract.claim import run_claim_extract  # claim imports this module

        return run_claim_extract(cfg)
    if cfg.claim_shards is not None and cfg.claim_shards != 1:
        raise BadInputError(f"--num-shards {cfg.claim_shards} needs --shard i (one fixed shard) or --claim "
                            "(claim shards until all are done)")
    t0 = time.perf_counter()
    validate_models(cfg)
    with ExitStack() as lock, disk_full_as_error(Path(cfg.cache_dir)):
        index = prepare_index(cfg, lock=lock)
        log.info("sample index %s: %d samples (%s)", index.path, index.num_samples, index.status)
        i, n = cfg.shard
        results, paths = {}, {}
        for modality in ("image", "text"):
            if modality in cfg.modalities:
                try:
                    results[modality] = extract_shard(cfg, modality, i, n, index=index, paths=paths)
                except KeyboardInterrupt:
                    raise Interrupted(_kept(cfg, paths, modality)) from None
        failures_csv = None
        if n == 1:
            failures_csv = str(cf.write_failures_csv(index.dataset_dir))
            _refuse_if_nothing_usable([results[m] for m in cfg.modalities], failures_csv)
    return ExtractSummary(
        dataset=cfg.dataset, cache_dir=str(cfg.cache_dir), index_path=str(index.path),
        index_status=index.status, num_samples=index.num_samples, shard=(i, n),
        modalities=[results[m] for m in cf.MODALITIES if m in results], failures_csv=failures_csv,
        seconds=time.perf_counter() - t0,
        notes=[index.split_summary, *(f"warning: {w}" for w in index.split_notes)] if index.split_summary else [],
    )

