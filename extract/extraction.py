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

import logging
import os
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.extract.identity import (  # noqa: F401 -- DECODE_POLICY, image_config, text_config: public here too
    DECODE_POLICY,
    encoder_config,
    image_config,
    text_config,
)
from mmcache.extract.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_RESIZED_PIXELS,
    ImageFailure,
    load_image,
    resize_plan,
)

from mmcache import cache as cf
from mmcache.cache.lock import folder_lock
from mmcache.errors import BadInputError, Interrupted, PipelineError, ResumableError

log = logging.getLogger(__name__)

__all__ = [
    "ExtractConfig",
    "ExtractSummary",
    "IndexInfo",
    "ModalitySummary",
    "extract_shard",
    "format_extract_summary",
    "load_index_info",
    "parse_shard",
    "prepare_index",
    "run_extract",
    "shard_rows",
]

MODALITY_CHOICES = ("text", "image", "both")
EMPTY_TEXT = "empty text"


# ---------------------------------------------------------------------------------------------- config

@dataclass
class ExtractConfig:
    """Everything one extraction run needs. Only some fields determine the cached values (see
    :func:`text_config` / :func:`image_config`); batch sizes, workers and device do not."""

    dataset: str
    data_dir: str | Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # dataset reader options (--option K=V)
    cache_dir: str | Path = "cache"
    name: str | None = None  # cache folder name; default: dataset name (folder datasets: the folder's name)
    modality: str = "both"  # text | image | both
    text_model: str = "bert-base-uncased"
    image_model: str = "facebook/dinov2-base"
    text_revision: str | None = None
    image_revision: str | None = None
    text_layer: str = "last"  # hidden states stored: last | k | -k | mean-last-k (see extract.adapters.parse_layer)
    image_layer: str = "last"
    text_name: str | None = None  # what files and tables call the encoder (default: encoders.readable_name)
    image_name: str | None = None
    text_max_length: int = 128
    dtype: str = "float16"  # storage dtype of cls / mean / tokens
    precision: str = "auto"  # compute precision: auto | fp32 | bf16 | fp16
    device: str = "auto"
    batch_size: int = 32
    text_batch_size: int | None = None  # default: batch_size
    image_batch_size: int | None = None  # default: batch_size
    num_workers: int = 2  # image decoding processes (0 = in the main process)
    threads: int | None = None  # CPU device: torch threads for the forward; None = torch's default (all cores)
    patch_pool: int = 1
    force: bool = False
    retry_failed: bool = False  # recompute rows recorded as failures (e.g. after fixing the files)
    repair: bool = False  # also rebuild a feature file HDF5 cannot open (damaged rows: every run repairs)
    split_file: str | Path | None = None
    seed: int | None = None  # None: not asked (the cache's split is kept; a new cache gets seed 0)
    resplit: bool = False  # replace the cache's split by the one asked for (--seed / --split-file)
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS  # cap on what the processor's resize makes of an image
    image_timeout_s: float = 60.0  # per image, inside a worker process
    loader_timeout_s: float = 600.0  # DataLoader: longest wait for one batch before giving up
    length_grouping: bool = True
    length_window: int | None = None  # rows per length-sorting window; default 64 * text_batch_size
    progress: bool | None = None  # tqdm bars: None = only on a terminal
    shard: tuple[int, int] = (0, 1)  # (shard_index, num_shards)
    command: str | None = None  # the command line of this run: stored in provenance, quoted by resume hints

    def validate(self) -> None:
        if self.modality not in MODALITY_CHOICES:
            raise BadInputError(f"--modality must be one of {', '.join(MODALITY_CHOICES)}, got {self.modality!r}")
        if self.dtype not in cf.DTYPES:
            raise BadInputError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        for key in ("batch_size", "text_batch_size", "image_batch_size", "length_window"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise BadInputError(f"{key.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"--threads must be >= 1, got {self.threads}")
        if self.num_workers < 0:
            raise BadInputError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.patch_pool < 1:
            raise BadInputError(f"--patch-pool must be >= 1, got {self.patch_pool}")
        if self.text_max_length < 2:
            raise BadInputError(f"--text-max-length must be >= 2, got {self.text_max_length}")
        if self.max_image_pixels < 1:
            raise BadInputError(f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_resized_pixels < 1:
            raise BadInputError(f"--max-resized-pixels must be >= 1, got {self.max_resized_pixels}")
        from mmcache.extract.adapters.base import parse_layer

        self.text_layer, self.image_layer = parse_layer(self.text_layer), parse_layer(self.image_layer)
        for key in ("text_name", "image_name"):
            if getattr(self, key) is not None and not str(getattr(self, key)).strip():
                raise BadInputError(f"--{key.replace('_', '-')} must not be empty")
        i, n = self.shard
        if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
            raise BadInputError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text", "image") if self.modality == "both" else (self.modality,)

    @property
    def text_bs(self) -> int:
        return self.batch_size_for("text")

    @property
    def image_bs(self) -> int:
        return self.batch_size_for("image")

    def batch_size_for(self, modality: str) -> int:
        """``--text-batch-size`` / ``--image-batch-size``, else ``--batch-size``."""
        return getattr(self, f"{_checked(modality)}_batch_size") or self.batch_size

    def encoder(self, modality: str) -> cf.EncoderSpec:
        """The encoder asked for ``modality``: ``--text-model``, ``--text-revision``, ``--text-layer``,
        ``--text-name``, ``--text-max-length`` (or the image twins and ``--patch-pool``), as one record."""
        m = _checked(modality)
        size = {"text": {"max_length": self.text_max_length}, "image": {"patch_pool": self.patch_pool}}[m]
        return cf.EncoderSpec(modality=m, model=str(getattr(self, f"{m}_model")),
                              revision=getattr(self, f"{m}_revision"), layer=getattr(self, f"{m}_layer"),
                              name=getattr(self, f"{m}_name"), precision=self.precision, **size)


def _checked(modality: str) -> str:
    if modality not in cf.MODALITIES:
        raise BadInputError(f"unknown modality {modality!r}; expected one of {', '.join(cf.MODALITIES)}")
    return modality


def parse_shard(spec: str | None, num_shards: int | None = None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; or ``spec="i"`` with ``num_shards=n`` (job arrays: ``--shard
    $TASK_ID --num-shards 8``). Neither -> ``(0, 1)``."""
    if spec is None:
        if num_shards is not None and num_shards != 1:
            raise BadInputError(f"--num-shards {num_shards} needs --shard i (which shard this process runs)")
        return 0, 1
    try:
        if "/" in spec:
            i, n = (int(x) for x in spec.split("/"))
            if num_shards is not None and num_shards != n:
                raise BadInputError(f"--shard {spec} disagrees with --num-shards {num_shards}")
        elif num_shards is not None:
            i, n = int(spec), num_shards
        else:
            raise BadInputError(f"--shard {spec}: give i/n (e.g. 0/4) or add --num-shards n")
    except ValueError:
        raise BadInputError(f"--shard expects i/n (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise BadInputError(f"--shard {i}/{n}: need 0 <= i < n")
    return i, n


def shard_rows(num_samples: int, shard_index: int, num_shards: int) -> np.ndarray:
    """(M,) int64 index rows of shard ``shard_index`` of ``num_shards``: the contiguous block
    ``[i*N//n, (i+1)*N//n)``. The blocks of all shards partition ``range(N)`` in order."""
    if not (0 <= shard_index < num_shards):
        raise BadInputError(f"shard {shard_index} of {num_shards} does not exist")
    lo = shard_index * num_samples // num_shards
    hi = (shard_index + 1) * num_samples // num_shards
    return np.arange(lo, hi, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- summary

@dataclass
class ModalitySummary:
    """One modality file after a run. Counts are rows of this file (a shard holds a subset)."""

    modality: str
    model: str
    path: str
    total: int = 0
    already_done: int = 0  # rows done before this run (features or failure), not recomputed
    encoded: int = 0  # rows newly written with features this run
    failed: int = 0  # rows newly recorded as failures this run
    valid: int = 0  # rows with features in the file after the run
    failures: dict[str, int] = field(default_factory=dict)  # all failed rows in the file, by reason kind
    seconds: float = 0.0  # wall time incl. model loading
    samples_per_s: float = 0.0  # (encoded + failed) / time of the encode loop
    size_bytes: int = 0
    complete: bool = False
    up_to_date: bool = False  # nothing to do: the file was already complete
    forced: bool = False
    repaired: int = 0  # rows found damaged (checksum mismatch, NaN/Inf) and recomputed this run


@dataclass
class IndexInfo:
    path: Path
    dataset_dir: Path
    status: str  # "written" | "unchanged" | "updated" (labels/splits/extras) | "replaced" (samples changed)
    fingerprint: str
    num_samples: int
    ids: list[str]
    texts: list[str]
    image_files: list[str | None]  # absolute paths for loading (None: no image path)
    split_status: str = "kept"  # new | kept | same | resplit (extract.split_policy.SplitDecision)
    split_notes: list[str] = field(default_factory=list)  # warnings about the split (empty val, re-split, ...)
    split_summary: str = ""  # "split: <source>; train/val/test a/b/c (kept)"


@dataclass
class ExtractSummary:
    dataset: str
    cache_dir: str
    index_path: str
    index_status: str
    num_samples: int
    shard: tuple[int, int]
    modalities: list[ModalitySummary]
    failures_csv: str | None
    seconds: float
    ranks: int = 1  # processes of a torchrun launch whose shards were merged into these files
    notes: list[str] = field(default_factory=list)  # e.g. what the merge did

    @property
    def up_to_date(self) -> bool:
        return all(m.up_to_date for m in self.modalities)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["up_to_date"] = self.up_to_date
        return d


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "failed"


def format_extract_summary(s: ExtractSummary) -> str:
    """The closing summary the CLI prints: one table row per modality, then failures by reason."""
    from mmcache.tables import format_table, human_bytes

    names = ", ".join(Path(m.path).name for m in s.modalities)
    head = (f"up to date: {s.cache_dir}/{Path(s.index_path).parent.name} ({names})" if s.up_to_date else
            f"extracted {s.dataset}: {s.num_samples} samples into {Path(s.index_path).parent}")
    if s.shard[1] > 1:
        head += f" [shard {s.shard[0]}/{s.shard[1]}]"
    if s.ranks > 1:
        head += f" [{s.ranks} ranks]"
    out = [head, f"index: {s.index_path} ({s.index_status})", ""]
    rows = []
    for m in sorted(s.modalities, key=lambda m: cf.MODALITIES.index(m.modality)):
        rows.append([m.modality, Path(m.path).name, m.total, m.already_done, m.encoded, m.failed,
                     sum(m.failures.values()), m.valid, "yes" if m.complete else "NO",
                     f"{m.seconds:.1f}", "-" if m.up_to_date else f"{m.samples_per_s:.1f}",
                     human_bytes(m.size_bytes)])
    out.append(format_table(["modality", "file", "total", "done before", "encoded", "failed now",
                             "failed all", "valid", "complete", "seconds", "samples/s", "size"], rows))
    fail_rows = [[m.modality, reason, n] for m in s.modalities for reason, n in sorted(m.failures.items())]
    if fail_rows:
        out += ["", format_table(["modality", "failure", "count"], fail_rows)]
    out += s.notes
    repaired = [f"{m.modality}: {m.repaired}" for m in s.modalities if m.repaired]
    if repaired:
        out.append(f"repaired (damaged rows found by checksum and recomputed): {', '.join(repaired)}")
    if s.failures_csv and fail_rows:  # the file always exists; point at it only when it lists something
        out.append(f"failures: {s.failures_csv}")
    out.append(f"total time {s.seconds:.1f} s")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- index

def _cache_name(cfg: ExtractConfig, root: Path) -> str:
    if cfg.name:
        name = cfg.name
    elif cfg.dataset == "folder":
        base = root if root.is_dir() else root.parent
        name = base.resolve().name or "folder"
    else:
        name = cfg.dataset
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise BadInputError(f"cache name {name!r} must be a plain folder name")
    return name


def _read_old_index(path: Path) -> cf.SampleIndex | None:
    if not path.exists():
        return None
    try:
        return cf.read_index(path)
    except cf.CacheError as e:
        log.warning("rewriting unreadable sample index %s (%s)", path, e)
        return None


def prepare_index(cfg: ExtractConfig, lock: ExitStack | None = None) -> IndexInfo:
    """Read the dataset, decide the split (:func:`extract.split_policy.decide_split`: the stored split
    is kept unless another is asked for with ``resplit``) and (re)write ``<cache>/<name>/index.h5``
    when its content changed. Image paths are stored relative to the dataset folder (absolute if
    outside it). ``lock``: take the cache folder's write lock (:func:`_lock`) into it before anything
    is read or written there."""
    from mmcache.extract.datasets import load_dataset
    from mmcache.extract.split_policy import decide_split

    result = load_dataset(cfg.dataset, cfg.data_dir, **cfg.options)
    root = Path(result.root)
    dataset_dir = Path(cfg.cache_dir) / _cache_name(cfg, root)
    if lock is not None:
        lock.enter_context(_lock(dataset_dir, *cfg.shard))
    path = dataset_dir / cf.INDEX_NAME
    old = _read_old_index(path)
    splits = decide_split(result.samples, old, split_file=cfg.split_file, seed=cfg.seed, resplit=cfg.resplit,
                          index_path=path)
    for w in splits.warnings:
        log.warning("%s", w)
    base = (root if root.is_dir() else root.parent).resolve()
    samples = result.samples
    ids = [s.id for s in samples]
    texts = [s.text or "" for s in samples]
    files: list[str | None] = [str(s.image_path) if s.image_path else None for s in samples]
    rel = ["" if f is None else _stored_image_path(f, base) for f in files]
    labels = [int(s.label) for s in samples]
    split_list = [splits.assignment[s.id] for s in samples]
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s.extra if k not in keys]
    extra = {k: [s.extra.get(k) for s in samples] for k in keys}
    codes = result.target_codes()
    targets = {t.name: (list(t.classes), codes[t.name]) for t in result.targets}
    attrs = {"root": str(base), "reader": cfg.dataset, "reader_options": result.options,
             "split_source": splits.source, "load_report": result.report.to_dict(),
             "default_target": result.targets[0].name, "tasks": {k: list(v) for k, v in result.tasks.items()}}
    content = cf.fingerprint({"ids": ids, "texts": texts, "images": rel, "labels": labels, "splits": split_list,
                              "classes": list(result.classes), "extra": extra, "attrs": attrs,
                              "split_spec": splits.spec, "targets": targets})
    old_fp = old.fingerprint if old is not None else None
    if old is not None and old.attrs.get("content_fingerprint") == content:
        status, fp = "unchanged", old_fp
    else:
        fp = cf.write_index(path, dataset=result.dataset, classes=list(result.classes), ids=ids, labels=labels,
                            splits=split_list, texts=texts, image_paths=rel, extra=extra,
                            attrs={**attrs, "content_fingerprint": content}, split_spec=splits.spec,
                            split_history=splits.history, targets=targets)
        status = "written" if old_fp is None else ("updated" if old_fp == fp else "replaced")
        if status == "replaced":
            log.warning("sample index %s changed (ids, texts or image paths): existing feature files will be "
                        "refused until rebuilt with --force", path)
    return IndexInfo(path=path, dataset_dir=dataset_dir, status=status, fingerprint=fp, num_samples=len(ids),
                     ids=ids, texts=texts, image_files=files, split_status=splits.status,
                     split_notes=list(splits.warnings), split_summary=_split_summary(splits))


def _stored_image_path(file: str, base: Path) -> str:
    """``file`` relative to ``base`` (absolute if outside it), as the index stores it. A path that cannot
    be resolved (a symlink loop) is kept as written: extraction records it as an unreadable image."""
    path = Path(file)
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError):  # symlink loop: RuntimeError before Python 3.13, OSError after
        try:
            resolved = path.parent.resolve() / path.name  # the loop is the file itself (the usual case)
        except (RuntimeError, OSError):  # ... or a folder on its way
            resolved = Path(os.path.normpath(os.path.abspath(path)))
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return str(resolved)


def _split_summary(splits) -> str:
    counts = cf.split_counts(list(splits.assignment.values()))
    text = "/".join(str(counts[s]) for s in cf.SPLIT_NAMES) + (f" (+{counts['none']} none)" if "none" in counts else "")
    how = {"new": "new", "kept": "kept from the cache", "same": "as stored", "resplit": "RE-SPLIT"}[splits.status]
    return f"split: {splits.source}; train/val/test {text} ({how})"


def _lock(dataset_dir: Path, shard_index: int, num_shards: int):
    """The cache folder's write lock: exclusive, or shared with the other shards of a sharded run
    (each shard exclusively holds its own); see :mod:`mmcache.cache.lock`."""
    return folder_lock(dataset_dir, shard_file=f"shard-{shard_index}-of-{num_shards}" if num_shards > 1 else None)


@contextmanager
def _disk_full_as_error(path: Path, needed: int | None = None):
    """ENOSPC anywhere inside (HDF5 words it its own way) -> one :class:`DiskFullError`."""
    try:
        yield
    except OSError as e:
        if cf.is_disk_full(e):
            raise cf.disk_full_error(path, needed, e) from None
        raise


def load_index_info(path: str | Path) -> IndexInfo:
    """The :class:`IndexInfo` of an existing ``index.h5``, without reading the dataset (ranks other
    than 0 of a torchrun launch: rank 0 wrote it). Image paths resolve against the stored root."""
    path = Path(path)
    idx = cf.read_index(path)
    root = Path(str(idx.attrs.get("root", path.parent)))
    files: list[str | None] = [str(root / p) if p else None for p in idx.image_paths]
    return IndexInfo(path=path, dataset_dir=path.parent, status="unchanged", fingerprint=idx.fingerprint,
                     num_samples=len(idx), ids=list(idx.ids), texts=list(idx.texts), image_files=files)


def _provenance(enc, cfg: ExtractConfig, index: IndexInfo) -> dict[str, Any]:
    import h5py
    import PIL

    return {**enc.provenance(), "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
            "numpy_version": np.__version__, "pillow_version": PIL.__version__, "dataset": cfg.dataset,
            "dataset_root": str(index.dataset_dir), "written_by": "mmcache extract",
            "max_image_pixels": cfg.max_image_pixels, "max_resized_pixels": cfg.max_resized_pixels,
            "command": cfg.command}


# ---------------------------------------------------------------------------------------------- writing

def _write_batch(writer: cf.FeatureWriter, rows: np.ndarray, out: dict, dtype: str) -> tuple[int, list[tuple[int, str]]]:
    """Cast to the storage dtype, zero padded token states, route non-finite rows to failures.

    ``rows`` (B,) ascending file rows; ``out`` from an encoder: cls/mean (B, D), tokens (B, T, D) float32
    tensors, mask (B, T) bool. Returns (rows written with features, [(row, reason)] failures)."""
    mask = out["mask"].numpy().astype(bool)
    cls = out["cls"].numpy().astype(dtype)
    mean = out["mean"].numpy().astype(dtype)
    tokens = out["tokens"].numpy().astype(dtype)
    proj = out["proj"].numpy().astype(dtype) if "proj" in out else None
    tokens[~mask] = 0
    finite = (np.isfinite(cls).all(1) & np.isfinite(mean).all(1)
              & np.isfinite(tokens.reshape(len(rows), -1)).all(1))
    if proj is not None:
        finite &= np.isfinite(proj).all(1)
    failures: list[tuple[int, str]] = []
    if not finite.all():
        reason = f"non-finite features (overflow in {dtype} storage or reduced precision)"
        failures = [(int(r), reason) for r in rows[~finite]]
        rows, cls, mean, tokens, mask = rows[finite], cls[finite], mean[finite], tokens[finite], mask[finite]
        proj = proj[finite] if proj is not None else None
    if rows.size:
        writer.write(rows, cls=cls, mean=mean, tokens=tokens, mask=mask, proj=proj)
    return int(rows.size), failures


def _record_failures(writer: cf.FeatureWriter, failures: list[tuple[int, str]]) -> None:
    if failures:
        rows, reasons = zip(*failures, strict=True)
        writer.write_failures(np.asarray(rows, dtype=np.int64), list(reasons))


def _bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar on a terminal, a progress line every 10 s in a log file (None), nothing (False)."""
    from mmcache.progress import progress as reporter

    return reporter(total, f"extract {desc}", "sample", enabled=progress)


# ---------------------------------------------------------------------------------------------- text

def text_batches(lengths: np.ndarray, batch_size: int, window: int, grouping: bool = True) -> list[np.ndarray]:
    """The fixed batch plan over ``len(lengths)`` items: windows of ``window`` consecutive items,
    each sorted by length (stable) when ``grouping``, cut into ``batch_size`` batches. Returns
    positions into ``lengths``, each batch ascending."""
    plan = []
    for w0 in range(0, len(lengths), window):
        pos = np.arange(w0, min(w0 + window, len(lengths)))
        if grouping:
            pos = pos[np.argsort(lengths[pos], kind="stable")]
        for b0 in range(0, len(pos), batch_size):
            plan.append(np.sort(pos[b0:b0 + batch_size]))
    return plan


def _run_text(writer, enc, texts: list[str], redo: np.ndarray, cfg: ExtractConfig, bar) -> tuple[int, int]:
    nonempty = np.asarray([i for i, t in enumerate(texts) if t.strip()], dtype=np.int64)
    empty = np.asarray([i for i, t in enumerate(texts) if not t.strip()], dtype=np.int64)
    todo_empty = empty[redo[empty]] if empty.size else empty
    _record_failures(writer, [(int(r), EMPTY_TEXT) for r in todo_empty])
    bar.update(len(todo_empty))
    encoded, failed = 0, len(todo_empty)
    bs = cfg.text_bs
    window = cfg.length_window or 64 * bs
    tok = enc.tokenizer
    for w0 in range(0, len(nonempty), window):
        wrows = nonempty[w0:w0 + window]
        if not redo[wrows].any():
            continue
        ids = tok([texts[r] for r in wrows], truncation=True, max_length=enc.max_length, padding=False,
                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths = np.asarray([len(x) for x in ids])
        for pos in text_batches(lengths, bs, len(wrows), cfg.length_grouping):
            rows = wrows[pos]
            if not redo[rows].any():
                continue
            out = enc.encode(enc.collate([ids[p] for p in pos]))  # right-padded, as TextEncoder.tokenize
            n_ok, fails = _write_batch(writer, rows, out, cfg.dtype)
            _record_failures(writer, fails)
            pending = int(redo[rows].sum())
            encoded += min(n_ok, pending)
            failed += len(fails)
            bar.update(pending)
    return encoded, failed


# ---------------------------------------------------------------------------------------------- image

class ImageRows:
    """Map-style dataset over file rows: decode + preprocess one image, never raise.

    ``__getitem__(row)`` -> ``(row, pixels (3, H, W) float32 or None, failure reason or None)``.
    Runs in DataLoader worker processes; holds only paths and the (picklable) preprocessor."""

    def __init__(self, files: list[str | None], preprocessor, max_pixels: int, timeout_s: float | None,
                 max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS) -> None:
        self.files, self.preprocessor = files, preprocessor
        self.max_pixels, self.timeout_s = max_pixels, timeout_s
        self.resize, self.max_resized_pixels = resize_plan(preprocessor.settings()), max_resized_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int):
        try:
            img = load_image(self.files[row], max_pixels=self.max_pixels, timeout_s=self.timeout_s,
                             resize=self.resize, max_resized_pixels=self.max_resized_pixels)
        except ImageFailure as e:
            return row, None, str(e)
        except Exception as e:  # noqa: BLE001 -- a worker must never die on one sample
            return row, None, f"unreadable image: {type(e).__name__}: {e}"
        try:
            return row, self.preprocessor.one(img), None
        except Exception as e:  # noqa: BLE001
            return row, None, f"preprocessing failed: {type(e).__name__}: {' '.join(str(e).split())[:100]}"


def collate_image_rows(items):
    """-> (rows (B',) int64 ndarray ascending, pixels (B', 3, H, W) float32 or None, [(row, reason)])."""
    import torch

    items = sorted(items, key=lambda t: t[0])
    ok = [(r, x) for r, x, why in items if why is None]
    failures = [(int(r), why) for r, _x, why in items if why is not None]
    rows = np.asarray([r for r, _x in ok], dtype=np.int64)
    pixels = torch.stack([x for _r, x in ok]) if ok else None
    return rows, pixels, failures


def _run_image(writer, enc, files: list[str | None], redo: np.ndarray, cfg: ExtractConfig, bar) -> tuple[int, int]:
    from torch.utils.data import DataLoader

    bs = cfg.image_bs
    plan = [np.arange(b0, min(b0 + bs, len(files))) for b0 in range(0, len(files), bs)]
    plan = [b.tolist() for b in plan if redo[b].any()]
    if not plan:
        return 0, 0
    workers = min(cfg.num_workers, len(plan))
    loader = DataLoader(
        ImageRows(files, enc.preprocessor, cfg.max_image_pixels, cfg.image_timeout_s, cfg.max_resized_pixels),
        batch_sampler=plan, num_workers=workers, collate_fn=collate_image_rows,
        pin_memory=enc.device.type == "cuda", timeout=cfg.loader_timeout_s if workers else 0,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    encoded = failed = 0
    it = iter(loader)
    try:
        for batch in plan:
            try:
                rows, pixels, fails = next(it)
            except StopIteration:  # pragma: no cover -- the sampler fixes the number of batches
                break
            except RuntimeError as e:
                raise ResumableError(f"image loading stopped: {' '.join(str(e).split())[:200]}. Finished "
                                     "batches are saved") from e
            pending = int(redo[np.asarray(batch)].sum())
            n_ok = 0
            if pixels is not None:
                out = enc.encode(pixels)  # inference mode: set by extract_shard around the loop
                n_ok, more = _write_batch(writer, rows, out, cfg.dtype)
                fails = fails + more
            _record_failures(writer, fails)
            encoded += min(n_ok, pending)
            failed += len(fails)
            bar.update(pending)
    finally:
        del it  # shuts the worker processes down
    return encoded, failed


# ---------------------------------------------------------------------------------------------- one shard

@contextmanager
def _torch_threads(enc, modality: str, cfg: ExtractConfig):
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


def _load_encoder(modality: str, cfg: ExtractConfig):
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


def _feature_file(cfg: ExtractConfig, modality: str, enc, dataset: str, shard_index: int, num_shards: int) -> Path:
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
_TOKEN_LAYOUT = {"text": lambda enc: (enc.max_length, None), "image": lambda enc: (enc.num_tokens, tuple(enc.grid))}


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
    enc = encoder or _load_encoder(modality, cfg)
    conf = encoder_config(enc, modality, dtype=cfg.dtype, revision=asked.revision)
    path = _feature_file(cfg, modality, enc, index.dataset_dir.name, shard_index, num_shards)
    if paths is not None:
        paths[modality] = path
    if num_shards > 1 and not path.exists() and not cfg.force:
        merged = _merged_summary(cfg, modality, model, rows, conf, index, cf.parse_shard_name(path)[0])
        if merged is not None:
            merged.seconds = time.perf_counter() - t0
            return merged
    ids = [index.ids[r] for r in rows]
    num_tokens, grid = _TOKEN_LAYOUT[modality](enc)
    summary = ModalitySummary(modality=modality, model=model, path=str(path), total=len(rows), forced=cfg.force)
    needed = cf.planned_bytes(len(rows), enc.hidden_size, num_tokens, cfg.dtype)
    with _lock(index.dataset_dir, shard_index, num_shards), _disk_full_as_error(path, needed):
        if cfg.repair:
            _set_aside_unreadable(path)
        _write_shard(cfg, modality, path, rows, ids, index, enc, conf, num_tokens, grid, summary,
                     (shard_index, num_shards) if num_shards > 1 else None)
    with cf.FeatureFile(path) as ff:
        summary.complete = ff.complete
        summary.valid = int(ff.valid.sum())
        summary.failures = dict(Counter(reason_kind(r) for _sid, r in ff.failures()))
    summary.size_bytes = path.stat().st_size
    summary.seconds = time.perf_counter() - t0
    return summary


def _set_aside_unreadable(path: Path) -> None:
    """``--repair``: a feature file HDF5 cannot open at all is renamed ``<name>.damaged-<time>`` (kept
    for inspection) so that it is rebuilt; damaged rows of a readable file are repaired in place."""
    if not path.exists():
        return
    try:
        cf.FeatureFile(path).close()
    except cf.CacheError as e:
        from mmcache.cache.lock import CacheBusyError

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
        writer.mark_not_done(damage.rows)
        summary.repaired = int(damage.rows.size)
    log.info("verified %s in %.2f s", writer.path, time.perf_counter() - t)


def _write_shard(cfg: ExtractConfig, modality: str, path: Path, rows, ids, index: IndexInfo, enc, conf: dict,
                 num_tokens: int, grid, summary: ModalitySummary, shard) -> None:
    """Open (create / resume / verify) ``path`` and compute every row that is not done."""
    import torch

    with cf.FeatureWriter.open(path, ids=ids, rows=rows, index_fp=index.fingerprint, modality=modality,
                               hidden_size=enc.hidden_size, num_tokens=num_tokens, dtype=cfg.dtype, config=conf,
                               provenance=_provenance(enc, cfg, index), grid=grid, force=cfg.force,
                               shard=shard, proj_size=enc.proj_size) as writer:
        _verify_for_resume(writer, summary)
        done = writer.done_mask()
        redo = ~done
        if cfg.retry_failed:
            redo[writer.failed_rows()] = True
        summary.already_done = int((~redo).sum())
        if writer.up_to_date and not redo.any():
            summary.up_to_date = True
            log.info("%s is up to date", path)
        else:
            if done.any():
                log.info("resuming %s: %d of %d rows done", path, int(done.sum()), len(done))
            t_loop = time.perf_counter()
            with _bar(int(redo.sum()), f"{modality} {path.stem}", cfg.progress) as bar, torch.inference_mode(), \
                    _torch_threads(enc, modality, cfg) as threads:
                if modality == "text":
                    texts = [index.texts[r] for r in rows]
                    summary.encoded, summary.failed = _run_text(writer, enc, texts, redo, cfg, bar)
                else:
                    files = [index.image_files[r] for r in rows]
                    summary.encoded, summary.failed = _run_image(writer, enc, files, redo, cfg, bar)
            loop_s = time.perf_counter() - t_loop
            summary.samples_per_s = (summary.encoded + summary.failed) / loop_s if loop_s > 0 else 0.0
            writer.finalize({"last_run": {
                "encoded": summary.encoded, "failed": summary.failed, "seconds": round(loop_s, 3),
                "samples_per_s": round(summary.samples_per_s, 2), "device": str(enc.device),
                "batch_size": cfg.batch_size_for(modality),
                "num_workers": cfg.num_workers, "threads": threads, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})


def _merged_summary(cfg: ExtractConfig, modality: str, model: str, rows: np.ndarray, conf: dict,
                    index: IndexInfo, full: Path) -> ModalitySummary | None:
    """A shard whose file is gone because it was merged already: when the merged file is complete,
    made with the same settings for the same index (and ``--retry-failed`` has nothing to redo in
    these rows), the shard is up to date; returns its summary, else None (extract the shard)."""
    if not full.exists():
        return None
    try:
        with cf.FeatureFile(full) as ff:
            a = ff.attrs
            if not (ff.complete and not cf.encoder_difference(ff.config, conf)
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
    from mmcache.extract.encoders import validate_encoder

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
    :class:`BadInputError` / :class:`PipelineError` (incl. :class:`CacheError`)."""
    cfg.validate()
    t0 = time.perf_counter()
    validate_models(cfg)
    with ExitStack() as lock, _disk_full_as_error(Path(cfg.cache_dir)):
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

