"""The sample index of an extraction: read the dataset, assign the split, write ``index.h5`` when it
changed (:func:`prepare_index`), and the per-file plumbing an extraction shares (the folder lock of a
shard, disk-full as one error, a feature file's provenance)."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.extract.config import ExtractConfig, IndexInfo
from mmcache.extract.datasets import load_dataset
from mmcache.extract.split_policy import decide_split

from mmcache import cache as cf
from mmcache.cache.lock import folder_lock
from mmcache.errors import BadInputError

log = logging.getLogger(__name__)

__all__ = ["cache_name", "disk_full_as_error", "file_provenance", "load_index_info", "prepare_index", "shard_lock"]

# ---------------------------------------------------------------------------------------------- index

def cache_name(cfg: ExtractConfig, root: Path) -> str:
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


def prepare_index(cfg: ExtractConfig, lock: ExitStack | None = None, lock_with=None) -> IndexInfo:
    """Read the dataset, decide the split (:func:`extract.split_policy.decide_split`: the stored split
    is kept unless another is asked for with ``resplit``) and (re)write ``<cache>/<name>/index.h5``
    when its content changed. Image paths are stored relative to the dataset folder (absolute if
    outside it). ``lock``: take the cache folder's write lock (:func:`shard_lock`) into it before anything
    is read or written there; ``lock_with(dataset_dir)``: the lock to take instead (claim workers: the
    index lock of :mod:`extract.claim`)."""

    result = load_dataset(cfg.dataset, cfg.data_dir, **cfg.options)
    root = Path(result.root)
    dataset_dir = Path(cfg.cache_dir) / cache_name(cfg, root)
    if lock is not None:
        lock.enter_context(lock_with(dataset_dir) if lock_with else shard_lock(dataset_dir, *cfg.shard))
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


def shard_lock(dataset_dir: Path, shard_index: int, num_shards: int):
    """The cache folder's write lock: exclusive, or shared with the other shards of a sharded run
    (each shard exclusively holds its own); see :mod:`mmcache.cache.lock`."""
    return folder_lock(dataset_dir, shard_file=f"shard-{shard_index}-of-{num_shards}" if num_shards > 1 else None)


@contextmanager
def disk_full_as_error(path: Path, needed: int | None = None):
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


def file_provenance(enc, cfg: ExtractConfig, index: IndexInfo) -> dict[str, Any]:
    import h5py
    import PIL

    return {**enc.provenance(), "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
            "numpy_version": np.__version__, "pillow_version": PIL.__version__, "dataset": cfg.dataset,
            "dataset_root": str(index.dataset_dir), "written_by": "mmcache extract",
            "max_image_pixels": cfg.max_image_pixels, "max_resized_pixels": cfg.max_resized_pixels,
            "command": cfg.command}


