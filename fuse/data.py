"""Stage-two data: find a dataset's caches, prove they line up, load them once into tensors.

Reads only the cache (:mod:`mmcache.cache`: h5py + numpy), never images or encoders, and never
imports transformers. Every array a run needs is read whole, once, into a torch tensor; batches are
then made by indexing those tensors (:meth:`FusionData.batch`), so no HDF5 read happens per batch.

What is loaded depends on ``features``:

* ``cls`` / ``mean``: only that (N, D) array per modality, seen by the heads as a sequence of one
  token, (N, 1, D) with an all-True (N, 1) mask. The ``tokens`` array is never touched.
* ``proj``: the same with the (N, P) joint-space embedding of checkpoints that have a projection
  (CLIP); the width seen by the heads is then P.
* ``tokens``: ``tokens`` (N, L, D) and ``mask`` (N, L) bool, True = real token.

Over the memory budget (``max_memory``) the feature arrays are not read whole but streamed
(:mod:`fuse.stream`): ``x`` is then a :class:`~fuse.stream.StreamedArray` and :attr:`FusionData.stream` the
plan the trainers draw their batches from; ``mask``, ``valid`` and labels stay in memory.

Samples whose required modality is missing in the cache (``valid`` False: unreadable image, empty
text, ...) are dropped from every split and counted in :attr:`FusionData.dropped`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmcache.fuse.stream import default_budget, plan_stream, resolve_window
from mmcache.fuse.targets import TargetSet, resolve_target, target_report
from torch import Tensor

from mmcache import cache as cf
from mmcache.cache.blocks import array_nbytes
from mmcache.errors import BadInputError, CacheError, MissingCacheError

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "SPLITS", "FusionData", "ModalityData", "choose_streaming", "extract_command", "find_cache",
           "list_cached_datasets", "load_data", "resolve_dataset"]

FEATURES = ("cls", "mean", "tokens", "proj")  # proj: joint-space embeddings, only in CLIP-style caches
SPLITS = ("train", "val", "test")
MODALITY_ORDER = ("text", "image")


def extract_command(dataset: str, provenance: dict[str, Any] | None = None) -> str:
    """The command that creates a dataset's cache, for error messages; given a feature file's
    provenance, the exact command line that wrote it (models, cache folder and all), which resumes it."""
    command = (provenance or {}).get("command")
    if command:
        return f"`{command}`"
    return f"`make extract DATASET={dataset}` (or `python cli.py extract --dataset {dataset}`)"


# --------------------------------------------------------------------------------------------- finding

def list_cached_datasets(cache_dir: str | Path) -> list[str]:
    """Dataset folders under ``cache_dir`` that hold a sample index, sorted."""
    d = Path(cache_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / cf.INDEX_NAME).is_file())


def resolve_dataset(cache_dir: str | Path, dataset: str | None) -> str:
    """``dataset`` itself, or the only dataset cached under ``cache_dir`` when None.

    Raises :class:`CacheError` when nothing is cached, :class:`BadInputError` when several are
    (listing them) or when the named one is not cached but others are.
    """
    found = list_cached_datasets(cache_dir)
    if dataset is not None:
        if dataset not in found:
            have = f" (cached: {', '.join(found)})" if found else ""
            raise MissingCacheError(f"no cache for dataset {dataset!r} in {cache_dir}/{have}; create it with "
                             f"{extract_command(dataset)}")
        return dataset
    if not found:
        raise MissingCacheError(f"no dataset cache in {cache_dir}/; create one with {extract_command('<name>')}")
    if len(found) > 1:
        raise BadInputError(f"several datasets are cached in {cache_dir}/: {', '.join(found)}; pick one with --dataset")
    return found[0]


def find_cache(cache_dir: str | Path, dataset: str, modality: str, given: str | Path | None = None) -> Path:
    """The feature file of ``modality`` for ``dataset``: ``given`` if set (a path, or a file name inside
    ``cache/<dataset>/``), else the only ``<modality>--*.h5`` file there.

    Raises :class:`CacheError` if there is none (naming the extract command) and
    :class:`BadInputError` if there are several (listing them) or ``given`` does not exist.
    """
    folder = Path(cache_dir) / dataset
    flag = f"--{modality}-cache"
    if given is not None:
        p = Path(given)
        if not p.is_file() and (folder / p).is_file():
            p = folder / p
        if not p.is_file():
            raise BadInputError(f"{flag} {given}: no such file")
        return p
    files = [p for p in cf.list_feature_files(folder) if p.name.split("--")[0] == modality]
    if not files:
        raise MissingCacheError(f"no {modality} feature cache in {folder}/; create it with {extract_command(dataset)}")
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise BadInputError(f"several {modality} caches in {folder}/: {names}; pick one with {flag}")
    return files[0]


# --------------------------------------------------------------------------------------------- data

@dataclass
class ModalityData:
    """One modality's features for every sample of the index, in index order.

    x: (N, L, D) in the stored dtype (float16 usually, float32 if the cache was written so); L = 1 for
    cls/mean. Streamed (over the memory budget): a :class:`~fuse.stream.StreamedArray` of that shape. :meth:`FusionData.batch` casts to float32 (exact), so keeping float16 halves memory and
    changes no number.
    mask: (N, L) bool, True = real token.  valid: (N,) bool, features present.
    """

    modality: str
    path: Path
    x: Tensor  # or a fuse.stream.StreamedArray
    mask: Tensor
    valid: Tensor
    hidden_size: int
    model: str | None
    info: dict[str, Any]  # the file's config, provenance and shape attributes (for provenance.json)

    @property
    def trim(self) -> bool:
        return self.x.shape[1] > 1


@dataclass
class FusionData:
    """Everything a run reads, in memory. Rows are positions in the sample index.

    ``split_rows[s]``: (n_s,) int64 rows of split ``s`` whose modalities in :attr:`modalities` are all
    valid and that have a label for at least one target of :attr:`target`. ``target_labels``: (N, T)
    int64, class ids per member target, < 0 = masked (missing / outside the classes). ``labels`` (N,) and
    ``classes`` are the first member's (the only one for a single target). ``ids``: (N,) object str.
    ``dropped``: counts of samples removed for a missing modality, by split and modality, and under
    ``"target"`` the masked labels per target and reason and the rows left without any label.
    :meth:`with_target` gives the same features with another target's labels (no re-read).
    """

    dataset: str
    classes: list[str]
    features: str
    modalities: tuple[str, ...]
    ids: np.ndarray
    labels: Tensor
    split_rows: dict[str, Tensor]
    text: ModalityData | None
    image: ModalityData | None
    index_path: Path
    index_fingerprint: str
    index_attrs: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, Any] = field(default_factory=dict)
    # The index's split (the only place stage two takes it from): {"spec", "source", "fingerprint", "counts"}
    # and the sample ids of train / val / test in index order (before dropping samples missing a modality).
    split: dict[str, Any] = field(default_factory=dict)
    split_ids: dict[str, list[str]] = field(default_factory=dict)
    target: TargetSet | None = None
    target_labels: Tensor | None = None
    index: cf.SampleIndex | None = field(default=None, repr=False)
    stream: Any = field(default=None, repr=False)  # a fuse.stream.StreamPlan when features are streamed

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def with_target(self, name: str | None) -> FusionData:
        """The same loaded features labelled with target (or task) ``name`` (None = the default): a new
        :class:`FusionData` sharing the feature tensors. Unknown name: :class:`BadInputError`."""
        if self.index is None:
            raise BadInputError("this data was not loaded from a cache index; cannot change its target")
        if self.target is not None and name == self.target.name:
            return self
        return _attach_target(dataclasses.replace(self), name)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def modality(self, name: str) -> ModalityData | None:
        return self.text if name == "text" else self.image

    def dims(self) -> dict[str, int | None]:
        """``{"text_dim": Dt or None, "image_dim": Di or None}`` for :func:`fuse.heads.create_head`."""
        return {f"{m}_dim": (md.hidden_size if (md := self.modality(m)) else None) for m in MODALITY_ORDER}

    def to(self, device: str | torch.device) -> FusionData:
        """Move every tensor to ``device`` (in place; returns self). Floats keep their dtype."""
        device = torch.device(device)
        if device == self.device:
            return self
        self.labels = self.labels.to(device)
        if self.target_labels is not None:
            self.target_labels = self.target_labels.to(device)
        self.split_rows = {k: v.to(device) for k, v in self.split_rows.items()}
        for md in (self.text, self.image):
            if md is not None:
                md.x, md.mask, md.valid = md.x.to(device), md.mask.to(device), md.valid.to(device)
        return self

    def batch(self, rows: Tensor, resident: dict[str, Tensor] | None = None
              ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Features of ``rows`` ((B,) int64, on :attr:`device`) as the heads take them:
        ``text (B, Lt, Dt) float32, text_mask (B, Lt) bool, image (B, Li, Di) float32, image_mask``;
        None for a modality not loaded. Token sequences are cut to the batch's longest real length
        (padding never changes a prediction, so this only saves time). ``resident``: the rows' features
        already read ({modality: (B, L, D)}, a streamed batch) instead of ``x[rows]``."""
        out: list[Tensor | None] = []
        for md in (self.text, self.image):
            if md is None:
                out += [None, None]
                continue
            x = resident[md.modality] if resident is not None else md.x[rows]
            m = md.mask[rows]
            if md.trim:
                used = m.any(0)
                length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
                x, m = x[:, :length], m[:, :length]
            out += [x.float(), m]
        return out[0], out[1], out[2], out[3]

    def usable(self) -> Tensor:
        """(N,) bool on :attr:`device`: every loaded modality present and a label for at least one target."""
        ok = torch.ones(len(self.ids), dtype=torch.bool, device=self.device)
        for md in (self.text, self.image):
            if md is not None:
                ok &= md.valid
        if self.target_labels is not None:
            ok &= (self.target_labels >= 0).any(1)
        return ok

    def rows_of_ids(self, ids: list[str]) -> tuple[Tensor, list[str]]:
        """Rows ((n,) int64 on :attr:`device`, ascending) of ``ids`` whose loaded modalities are all
        present, and the ids the index does not hold at all."""
        where = {str(sid): r for r, sid in enumerate(self.ids)}
        missing = [str(i) for i in ids if str(i) not in where]
        rows = torch.as_tensor(sorted(where[str(i)] for i in ids if str(i) in where), dtype=torch.int64,
                               device=self.device)
        return rows[self.usable()[rows]], missing

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what was loaded and how many samples each split keeps."""
        extra = {"streamed": self.stream.summary()} if self.stream is not None else {}
        return {
            **extra,
            "dataset": self.dataset, "features": self.features, "modalities": list(self.modalities),
            "target": self.target.name if self.target else None,
            "targets": self.target.to_dict() if self.target else None, "classes": self.classes, "samples": {s: int(r.numel()) for s, r in self.split_rows.items()},
            "dropped": self.dropped,
            "caches": {m: str(md.path) for m in MODALITY_ORDER if (md := self.modality(m))},
        }


def _file_info(ff: cf.FeatureFile) -> dict[str, Any]:
    return {"path": str(ff.path), "modality": ff.modality, "hidden_size": ff.hidden_size,
            "num_tokens": ff.num_tokens, "dtype": ff.dtype, "grid": ff.grid,
            "index_fingerprint": ff.index_fingerprint, "config": ff.config, "provenance": ff.provenance,
            "created": ff.attrs.get("created"), "updated": ff.attrs.get("updated")}


def _model_of(ff: cf.FeatureFile) -> str | None:
    return cf.EncoderSpec.from_provenance(ff.modality, ff.provenance, ff.config).model


def load_modality(path: Path, modality: str, index: cf.SampleIndex, features: str, dataset: str,
                  streamed: bool = False) -> ModalityData:
    """One modality's arrays, checked against the index. ``streamed``: the feature array itself is not read
    (``x`` is set by the caller to a stream); the mask is."""
    with cf.FeatureFile(path) as ff:
        if ff.modality != modality:
            raise BadInputError(f"{path} holds {ff.modality} features, not {modality}")
        if not ff.complete:
            done = int(ff.done.sum())
            raise CacheError(f"{path} is unfinished ({done} of {len(index)} samples done); rerun "
                             f"{extract_command(dataset, ff.provenance)} to resume it")
        if ff.index_fingerprint != index.fingerprint or not np.array_equal(ff.ids, index.ids):
            raise CacheError(f"{path} was made for a different sample index than {dataset}/{cf.INDEX_NAME} "
                             f"(fingerprint {ff.index_fingerprint} vs {index.fingerprint}); rerun "
                             f"{extract_command(dataset)}")
        valid = ff.valid
        fields = ("tokens", "mask") if features == "tokens" else (features,)
        if features == "proj" and not ff.config.get("proj_size"):
            raise BadInputError(f"{path} has no proj array: its {modality} encoder has no joint-space projection "
                                "(only CLIP-style checkpoints do); use --features cls, mean or tokens")
        if streamed:  # only the small arrays; x is the caller's StreamedArray
            fields = ("mask",) if features == "tokens" else ()
        arrays = ff.load(fields, dtype=None)  # stored dtype; batches are cast to float32
        if streamed:
            n, d = len(index), int(ff.config["proj_size"]) if features == "proj" else ff.hidden_size
            mask = (torch.from_numpy(arrays["mask"]) if features == "tokens"
                    else torch.ones((n, 1), dtype=torch.bool))
            x = torch.empty((0, mask.shape[1], d), dtype=torch.float16)  # replaced by the stream
        elif features == "tokens":
            x, mask = torch.from_numpy(arrays["tokens"]), torch.from_numpy(arrays["mask"])
        else:
            x = torch.from_numpy(arrays[features]).unsqueeze(1)  # (N, 1, D)
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
        logger.debug("loaded %s %s %s from %s", modality, features, tuple(x.shape), path)
        return ModalityData(modality=modality, path=path, x=x, mask=mask, valid=torch.from_numpy(valid),
                            hidden_size=int(x.shape[-1]), model=_model_of(ff), info=_file_info(ff))


def load_data(dataset: str | None = None, *, modalities: set[str] | tuple[str, ...] | list[str],
              features: str = "cls", cache_dir: str | Path = "cache", text_cache: str | Path | None = None,
              image_cache: str | Path | None = None, device: str | torch.device = "cpu",
              target: str | None = None, max_memory: int | None = None, streamed: bool | None = None,
              shuffle_buffer: int | None = None) -> FusionData:
    """Load ``features`` of ``modalities`` for ``dataset`` (None: the only cached one) onto ``device``,
    labelled with ``target`` (a target or task name of the index; None = its default).

    Features stay in the stored dtype (float16 usually: half the memory of float32); batches are cast
    to float32 on the fly, which is exact, so the numbers are the same as with float32 arrays. Samples of train/val/test missing any of ``modalities`` are dropped
    and counted; split ``none`` is not used.
    ``max_memory``: bytes the feature arrays may take (None: :func:`fuse.stream.default_budget`); more than
    that and they are streamed from the files instead (:mod:`fuse.stream`; the decision is logged).
    ``streamed`` / ``shuffle_buffer``: a run's recorded choice (see :func:`choose_streaming`), None = auto.
    Raises :class:`CacheError` for missing / unfinished / misaligned caches, :class:`BadInputError` for
    ambiguous or unknown choices.
    """
    if features not in FEATURES:
        raise BadInputError(f"unknown --features {features!r}; expected one of {', '.join(FEATURES)}")
    mods = tuple(m for m in MODALITY_ORDER if m in set(modalities))
    if not mods or set(modalities) - set(MODALITY_ORDER):
        raise BadInputError(f"modalities must be a non-empty subset of text, image; got {sorted(modalities)}")
    given = {"text": text_cache, "image": image_cache}
    if dataset is None:
        # An explicit cache file pins the dataset folder it sits in.
        pinned = [Path(g) for m in mods if (g := given[m]) is not None and Path(g).is_file()]
        dataset = (cf.read_index(pinned[0].parent / cf.INDEX_NAME).dataset if pinned
                   else resolve_dataset(cache_dir, None))
        if pinned:
            cache_dir = pinned[0].parent.parent
    folder = Path(cache_dir) / dataset
    index_path = folder / cf.INDEX_NAME
    if not index_path.is_file():
        resolve_dataset(cache_dir, dataset)  # raises with the list of cached datasets
    index = cf.read_index(index_path)
    resolve_target(index, target)  # an unknown target fails before any feature is read
    paths = {m: find_cache(cache_dir, dataset, m, given[m]) for m in mods}
    budget = max_memory if max_memory is not None else default_budget(torch.device(device))
    streamed, _, needed, resident = _choose(_array_sizes(paths, features), features, budget, streamed, shuffle_buffer)
    logger.info("%s %s features need %.1f MiB, memory budget %.1f MiB: %s", dataset, features, needed / 2**20,
                budget / 2**20, "streamed from the cache files" if streamed else "read into memory")
    loaded = {m: load_modality(paths[m], m, index, features, dataset, streamed) for m in mods}
    plan = plan_stream(paths, features, resident, budget, needed, shuffle_buffer) if streamed else None
    if plan is not None:
        for m, arr in plan.arrays.items():
            loaded[m].x = arr
        logger.info("streaming: shuffle buffer %d rows, %d blocks of %d rows read ahead", plan.buffer_rows,
                    plan.prefetch, plan.block_rows)

    labels = torch.from_numpy(np.asarray(index.labels, dtype=np.int64))
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(index.classes)):
        raise CacheError(f"{index_path}: labels outside 0..{len(index.classes) - 1}")
    data = FusionData(dataset=dataset, classes=list(index.classes), features=features, modalities=mods,
                      ids=index.ids, labels=labels, split_rows={}, text=loaded.get("text"),
                      image=loaded.get("image"), index_path=index_path, index_fingerprint=index.fingerprint,
                      index_attrs=dict(index.attrs), split=index.split_info(), split_ids=index.split_ids(),
                      index=index, stream=plan)
    data = _attach_target(data, target)
    return data.to(device)


def require_features(cache_dir: str | Path, dataset: str, modalities, features: str,
                     given: dict[str, str | Path | None] | None = None) -> None:
    """Check, without reading any feature, that the caches of ``modalities`` store ``features`` (a lean
    cache may not): :class:`~mmcache.cache.MissingFieldsError` (exit 2) naming what the file stores and the
    ``extract --fields`` command that adds the rest. What an ablation asks before it trains anything."""
    arrays = ("tokens", "mask") if features == "tokens" else (features,)
    for m in MODALITY_ORDER:
        if m in set(modalities):
            with cf.FeatureFile(find_cache(cache_dir, dataset, m, (given or {}).get(m))) as ff:
                ff.require_fields(arrays)


def choose_streaming(paths: dict[str, Path], features: str, budget: int, streamed: bool | None = None,
                     shuffle_buffer: int | None = None) -> tuple[bool, int | None]:
    """(streamed, shuffle window rows or None in memory) of the ``features`` of ``paths`` within ``budget``
    bytes, without reading any feature: what a run records in its config.json, and what the ablation key of
    a grid cell is computed from before it trains. ``streamed`` None: streamed when the feature arrays need
    more than the budget; True / False: a run's recorded choice, kept (False over the budget is a
    :class:`BadInputError` naming it, not a silently different run). ``shuffle_buffer``: rows, None / 0 =
    auto (:func:`fuse.stream.resolve_window`); one over what the budget allows is a :class:`BadInputError`."""
    streamed, window, _, _ = _choose(_array_sizes(paths, features), features, budget, streamed, shuffle_buffer)
    return streamed, window


def _array_sizes(paths: dict[str, Path], features: str) -> list[tuple[int, tuple[int, ...]]]:
    """(bytes as stored, shape) of each file's ``features`` array: metadata only, read once per decision."""
    return [array_nbytes(p, features) for p in paths.values()]


def _choose(arrays: list[tuple[int, tuple[int, ...]]], features: str, budget: int, streamed: bool | None,
            shuffle_buffer: int | None) -> tuple[bool, int | None, int, int]:
    """:func:`choose_streaming` on the sizes of :func:`_array_sizes`, plus the bytes the feature arrays
    need and the bytes that stay in memory when they are streamed (the (N, L) bool masks plus ~64 bytes a
    sample of ids, labels and split rows)."""
    n = max((shape[0] for _, shape in arrays if shape), default=0)
    needed = sum(nbytes for nbytes, _ in arrays)
    resident = 64 * n + sum(shape[0] * shape[1] for _, shape in arrays if features == "tokens" and len(shape) == 3)
    if streamed is None:
        streamed = needed > budget
    elif not streamed and needed > budget:
        raise BadInputError(f"the config says streamed: false (trained in memory), but its {features} features "
                            f"need {needed:,} bytes, over the memory budget of {budget:,} (--max-memory; default "
                            f"half of the free memory); give --max-memory {needed} or more to reproduce it")
    if not streamed:
        return False, None, needed, resident
    row_bytes = sum(nbytes // max(1, shape[0]) for nbytes, shape in arrays if shape)
    return True, resolve_window(budget, resident, row_bytes, n, shuffle_buffer), needed, resident


def _attach_target(data: FusionData, name: str | None) -> FusionData:
    """Set ``data``'s target, labels, split rows and drop counts for target ``name`` (in place; returns it).

    A row is kept when its modalities are valid and at least one member target has a label; labels that
    are missing or outside the classes are masked (< 0), counted per target and reason, never a class."""
    index = data.index
    target, labels2d = resolve_target(index, name)
    device = data.labels.device
    ok = torch.ones(len(index), dtype=torch.bool)
    for md in (data.text, data.image):
        if md is not None:
            ok &= md.valid.cpu()
    has_label = torch.from_numpy((labels2d >= 0).any(axis=1))
    splits = np.asarray(index.splits, dtype=object)
    split_rows, dropped = {}, {"total": 0, "by_split": {}, "by_modality": {m: 0 for m in data.modalities}}
    no_label = {}
    for s in SPLITS:
        in_split = torch.from_numpy(splits == s)
        split_rows[s] = torch.nonzero(in_split & ok & has_label).flatten().to(device)
        n_drop = int((in_split & ~ok).sum())
        dropped["by_split"][s] = n_drop
        dropped["total"] += n_drop
        no_label[s] = int((in_split & ok & ~has_label).sum())
        for m in data.modalities:
            dropped["by_modality"][m] += int((in_split & ~data.modality(m).valid.cpu()).sum())
    dropped["unassigned"] = int((~np.isin(splits, SPLITS)).sum())
    dropped["target"] = {"name": target.name, "masked": target_report(target, labels2d, splits),
                         "rows_without_label": no_label}
    if dropped["total"]:
        logger.info("%s: dropped %d samples with a missing modality (%s)", data.dataset, dropped["total"],
                    ", ".join(f"{m}: {n}" for m, n in dropped["by_modality"].items() if n))
    for m, per in dropped["target"]["masked"].items():
        logger.warning("%s target %s: labels masked (not a class): %s", data.dataset, m,
                       "; ".join(f"{why} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items() if v)})"
                                 for why, c in per.items()))
    target_labels = torch.from_numpy(labels2d).to(device)
    data.target, data.target_labels, data.labels = target, target_labels, target_labels[:, 0]
    data.classes, data.split_rows, data.dropped = list(target.classes[0]), split_rows, dropped
    return data
