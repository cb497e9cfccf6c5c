"""The one door to "a finished run plus the data to score it on" (evaluate, analyze, predict, the API).

:func:`open_for_scoring` checks, in one place and in this order:

1. the run folder: finished, and every file matching its manifest (:meth:`RunFolder.open`, full hash);
2. the cache: the run's recorded ABSOLUTE cache root (``provenance.json`` ``cache_root``; for older
   runs the folder of the recorded feature files), never the current working folder; ``cache_dir``
   given explicitly overrides it. The run's own feature files are used where they still exist, else the
   ones found in that cache (or given explicitly);
3. the features, the target and its classes, and the encoders: each opened feature file must be made
   by the encoder the run was trained on (:func:`~mmcache.cache.encoder_difference`:
   weights hash, tokenizer, pooling, layer ...);
4. the split: on the run's own dataset its ``split.json`` must still be the cache's split, unless
   ``split_choice`` is ``"original"`` (score the run's own ids) or ``"current"`` (the cache's split,
   labelled as different). Every split asked for later (:meth:`Scoring.rows_for`) goes through the same
   check, so analyze's validation split is checked as its test split is.

Every refusal is a one-line :class:`~mmcache.errors.BadInputError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmcache.fuse.config import TrainConfig, load_run_config
from mmcache.fuse.data import MODALITY_ORDER, FusionData, load_data
from mmcache.fuse.engine import build_head
from mmcache.fuse.heads import FusionHead, head_uses
from mmcache.fuse.runs import RunFolder
from torch import Tensor

from mmcache import cache as cf
from mmcache.common import resolve_device
from mmcache.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["SPLIT_CHOICES", "Scoring", "check_compatible", "feature_identity", "load_head", "open_for_scoring",
           "split_rows"]

SPLIT_CHOICES = ("original", "current")
SPLITS = ("train", "val", "test")


@dataclass
class Scoring:
    """What :func:`open_for_scoring` returns: the run, its head and the checked data to score it on.

    ``rows`` (n,) int64 on ``data.device``: the rows of ``split`` to score; ``scored``: what they are
    (``which`` = ``run`` / ``original`` / ``current`` / ``dataset``, source, fingerprint)."""

    run: RunFolder
    model: FusionHead  # eval mode, on ``device``
    config: TrainConfig
    meta: dict[str, Any]  # metrics.json
    provenance: dict[str, Any]
    data: FusionData
    device: torch.device
    split: str
    rows: Tensor
    scored: dict[str, Any]
    same_dataset: bool
    run_target: str | None
    split_choice: str | None = None
    verified: str = "verified"  # or "unverified": a run made before manifests
    explicit: dict[str, bool] = field(default_factory=dict)

    def rows_for(self, split: str) -> tuple[Tensor, dict[str, Any]]:
        """The rows of another ``split``, through the same split check as :attr:`rows`."""
        return split_rows(self.run, self.data, split, self.same_dataset, self.split_choice, self.provenance)

    def features_used(self) -> dict[str, dict[str, Any]]:
        """Per modality: the feature file scored (absolute path) and its identity."""
        return {m: feature_identity(md) for m in MODALITY_ORDER if (md := self.data.modality(m)) is not None}

    def what_was_scored(self, split: str | None = None, rows: Tensor | None = None) -> dict[str, Any]:
        """For outputs: feature files, n scored, n dropped and why (by reason)."""
        split = split or self.split
        rows = self.rows if rows is None else rows
        d = self.data.dropped
        by_reason = {"missing_modality": int(d.get("by_split", {}).get(split, 0)),
                     "no_label": int((d.get("target") or {}).get("rows_without_label", {}).get(split, 0))}
        return {"run_verified": self.verified, "features": self.features_used(), "n_scored": int(rows.numel()),
                "n_dropped": sum(by_reason.values()), "dropped_by_reason": by_reason,
                "dropped_by_modality": dict(d.get("by_modality", {}))}


def feature_identity(md) -> dict[str, Any]:
    """A loaded feature file's path and identity: encoder model, weights sha256 / hub commit, and the
    fingerprint of its whole config."""
    conf = md.info.get("config") or {}
    return {"path": str(Path(md.path).resolve()), "model": md.model, "weights_sha256": conf.get("weights_sha256"),
            "commit_hash": conf.get("commit_hash"), "config_fingerprint": cf.fingerprint(conf) if conf else None}


def load_head(run: str | Path | RunFolder, device: str | torch.device = "cpu", *,
              verify: bool = True) -> tuple[FusionHead, TrainConfig, dict[str, Any]]:
    """Rebuild a finished run's head with its best weights: (model in eval mode, config, metrics.json).
    ``verify``: check the manifest first (full hash); False when the caller already did."""

    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    if verify:
        folder.open(full=True)
    else:
        folder.require_finished()
    config, meta = load_run_config(folder), folder.metrics()
    info = meta["model"]
    outputs = sum(len(c) for c in info["targets"].values()) if info.get("targets") else len(info["classes"])
    model = build_head(config, {"text_dim": info.get("text_dim"), "image_dim": info.get("image_dim")}, outputs)
    try:
        model.load_state_dict(folder.load_model_state(), strict=True)
    except RuntimeError as e:  # shapes or names differ: another head's weights
        first = str(e).strip().splitlines()[0]
        raise BadInputError(f"{folder.path}: its weights do not fit the run's head ({first})") from None
    return model.to(device).eval(), config, meta


def _cache_paths(config: TrainConfig, prov: dict[str, Any], root: Path, other: str, same: bool,
                 explicit_root: bool, given: dict[str, Any]) -> dict[str, Any]:
    """The feature file per modality: given explicitly; else (own dataset, no explicit cache_dir) the
    run's own recorded file, which must still exist for a run that recorded its cache root (no other
    file is silently taken in its place); else the file of the same name in ``root/other``, if there;
    else None (load_data picks the dataset's only file of that modality)."""
    out = dict(given)
    for m in MODALITY_ORDER:
        own = getattr(config, f"{m}_cache")
        if out[m] is not None or not own:
            continue
        recorded = Path(str(((prov.get("caches") or {}).get(m) or {}).get("path") or own))
        if same and not explicit_root and recorded.is_absolute():
            if recorded.is_file():
                out[m] = recorded
                continue
            if prov.get("cache_root"):
                raise BadInputError(f"the run's {m} features {recorded} are gone; give the cache with --cache-dir "
                                    f"(or the file with --{m}-cache)")
        twin = root / other / Path(own).name
        out[m] = twin if twin.is_file() else None
    return out


def open_for_scoring(run: str | Path | RunFolder, *, dataset: str | None = None, split: str = "test",
                     cache_dir: str | Path | None = None, text_cache: str | Path | None = None,
                     image_cache: str | Path | None = None, split_choice: str | None = None,
                     target: str | None = None, device: str | torch.device | None = "cpu",
                     text_model: str | Path | None = None, image_model: str | Path | None = None,
                     data: FusionData | None = None, max_memory: int | None = None) -> Scoring:
    """A finished run and the checked data to score it on (see the module docstring for the checks).

    ``dataset``: another cached dataset (cross-dataset; same encoders and classes), None = the run's own.
    ``target``: score against another target of the index (classes must equal the run's). ``device``
    None: the run's own device kind. ``text_model`` / ``image_model``: accepted for symmetry with
    :func:`mmcache.api.predict` (scoring a cache needs no encoder; the identity check applies as always).
    ``data``: features already loaded (checked like loaded ones). ``max_memory``: bytes the features may take
    in memory (None: the default budget, :func:`fuse.stream.default_budget`); over it they are streamed
    (read block by block in row order), so evaluate / analyze / predict --dataset work on any cache size."""

    del text_model, image_model  # scoring cached features loads no encoder
    if split_choice not in (None, *SPLIT_CHOICES):
        raise BadInputError(f"split_choice must be one of {', '.join(SPLIT_CHOICES)}, got {split_choice!r}")
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r}; expected train, val or test")
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    folder.require_finished()
    verified = folder.verify(full=True)
    model, config, meta = load_head(folder, "cpu", verify=False)
    dev = resolve_device(device or ("auto" if config.device.startswith("cuda") else config.device))
    model.to(dev)
    prov = folder.provenance()
    run_target = meta.get("target") or config.target  # None: a run from before targets (the default label)
    wanted = target or run_target
    same = dataset is None or dataset == config.dataset
    other = config.dataset if same else dataset
    root = Path(cache_dir) if cache_dir is not None else (folder.cache_root() or Path(config.cache_dir))
    given = {"text": text_cache, "image": image_cache}
    if data is None:
        caches = _cache_paths(config, prov, root, other, same, cache_dir is not None, given)
        data = load_data(other, modalities=config.modalities or sorted(head_uses(config.head)),
                         features=config.features, cache_dir=root, text_cache=caches["text"],
                         image_cache=caches["image"], device=dev, target=wanted, max_memory=max_memory)
    else:
        data.to(dev)
    data = data.with_target(wanted) if wanted else data
    check_compatible(data, config, meta, prov)
    rows, scored = split_rows(folder, data, split, same, split_choice, prov)
    return Scoring(run=folder, model=model, config=config, meta=meta, provenance=prov, data=data, device=dev,
                   split=split, rows=rows, scored=scored, same_dataset=same, run_target=run_target,
                   split_choice=split_choice, verified=verified,
                   explicit={m: v is not None for m, v in given.items()})


def split_rows(folder: RunFolder, data: FusionData, split: str, same: bool, choice: str | None,
               prov: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """The rows to score and what they are (``split_scored``): ``which`` = ``run`` (the run's split,
    unchanged in the cache), ``original`` (the run's recorded ids; the cache was re-split), ``current``
    (the cache's split, which is not the run's) or ``dataset`` (another dataset's split)."""
    cur = {"source": data.split.get("source"), "fingerprint": data.split.get("fingerprint")}
    name = folder.name
    if not same:
        return data.split_rows[split], {"which": "dataset", **cur}
    rec = folder.split()
    if rec is None:  # a run made before runs recorded their split: trust only an unchanged index
        then = (prov.get("index") or {}).get("attrs", {}).get("content_fingerprint")
        if then is not None and then == data.index_attrs.get("content_fingerprint"):
            return data.split_rows[split], {"which": "run", **cur}
        if choice != "current":
            raise BadInputError(f"run {name} has no split record (made before runs recorded theirs) and "
                                f"the index of {data.dataset} changed since, so its {split} split may hold samples the "
                                "run trained on; pass --current-split to score the cache's current split anyway")
        return data.split_rows[split], {"which": "current", **cur, "note": "the run's own split is unknown"}
    if rec["fingerprint"] == cur["fingerprint"]:
        return data.split_rows[split], {"which": "run", **cur}
    others = set().union(*(rec["ids"].get(s, []) for s in SPLITS if s != split))
    leak = sum(i in others for i in data.split_ids[split])  # e.g. now in test, but trained or validated on
    if choice is None:
        raise BadInputError(
            f"the split of {data.dataset} changed since run {name} was trained (run: {rec.get('source')}, "
            f"fingerprint {rec['fingerprint']}; cache now: {cur['source']}, fingerprint {cur['fingerprint']}): "
            f"{leak} of the {len(data.split_ids[split])} samples now in {split} were in another of the run's splits "
            f"(trained or validated on). Pass "
            f"--original-split to score the run's own {split} samples (from its split.json), or --current-split to "
            f"score the cache's current {split} split anyway (labelled as a different split)")
    if choice == "current":
        return data.split_rows[split], {"which": "current", **cur, "run_split": rec["fingerprint"],
                                        "seen_in_training": leak,
                                        "note": f"{leak} of these samples were in another of the run's splits"}
    rows, missing = data.rows_of_ids(rec["ids"].get(split, []))
    if missing:
        raise BadInputError(f"{len(missing)} of run {name}'s {split} samples are no longer in the cache of "
                            f"{data.dataset} (e.g. {', '.join(missing[:3])}): its original split cannot be scored")
    return rows, {"which": "original", "source": rec.get("source"), "fingerprint": rec["fingerprint"],
                  "note": f"the run's own {split} samples; the cache's split is now {cur['fingerprint']}"}


def check_compatible(data: FusionData, config: TrainConfig, meta: dict[str, Any], prov: dict[str, Any]) -> None:
    """Features, target classes and encoder identity of ``data`` against the run's record."""
    info = meta["model"]
    if data.features != config.features:
        raise BadInputError(f"data holds {data.features!r} features; the run was trained on {config.features!r}")
    want = list(info["targets"].values()) if info.get("targets") else [info["classes"]]
    have = [list(c) for c in data.target.classes]
    if have != [list(c) for c in want]:
        trained = info.get("target") or "its label"
        raise BadInputError(f"{data.dataset} target {data.target.name!r} has classes {have if len(have) > 1 else have[0]}; "
                            f"the run was trained on {trained!r} with {want if len(want) > 1 else want[0]}")
    for m in sorted(head_uses(config.head)):
        md = data.modality(m)
        if md is None:
            raise BadInputError(f"head {config.head!r} needs {m} features; none loaded")
        _check_encoder(md, m, info, prov.get("caches", {}).get(m, {}))


def _check_encoder(md, m: str, info: dict[str, Any], trained: dict[str, Any]) -> None:
    want_dim, want_model, want_cfg = info.get(f"{m}_dim"), trained.get("model"), trained.get("config")
    if md.hidden_size != want_dim:
        raise BadInputError(f"{md.path}: {m} features are {md.hidden_size}-d; the run was trained on "
                            f"{want_dim}-d (a different encoder)")
    have_cfg = md.info.get("config")
    if want_cfg and have_cfg:  # the identity rule: weights / hub commit, tokenizer, pooling, layer ...
        diff = cf.encoder_difference(want_cfg, have_cfg, storage=False)
        if diff:
            raise BadInputError(f"{md.path} was made with another {m} encoder than the run "
                                f"was trained on ({diff}); extract it with the run's encoder")
    elif want_model and md.model and md.model != want_model:
        raise BadInputError(f"{md.path} was made with {m} encoder {md.model!r}; the run was trained on "
                            f"{want_model!r}")


def split_for_posts(run: str | Path | RunFolder, dataset: str, *, split_file: str | Path | None = None,
                    cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The door's split check for ``predict --dataset`` (which re-encodes a dataset's posts rather than
    reading its cache): on the run's own dataset, the run's ``split.json`` decides which posts are
    ``test`` (returned, and the caller must find those posts). A run made before split records is only
    trusted while its cache index is unchanged (None returned: the index assigns the splits), as in
    :func:`split_rows`; otherwise :class:`BadInputError`. Another dataset, or an explicit
    ``split_file``: None (that dataset's or file's own split)."""
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    config = load_run_config(folder)
    if dataset != config.dataset or split_file is not None:
        return None
    rec = folder.split()
    if rec is not None:
        return rec
    prov = folder.provenance()
    root = Path(cache_dir) if cache_dir is not None else (folder.cache_root() or Path(config.cache_dir))
    index_path = root / dataset / cf.INDEX_NAME
    then = (prov.get("index") or {}).get("attrs", {}).get("content_fingerprint")
    now = cf.read_index(index_path).attrs.get("content_fingerprint") if index_path.is_file() else None
    if then is not None and then == now:
        return None
    raise BadInputError(f"run {folder.name} has no split record (made before runs recorded theirs) and the index "
                        f"of {dataset} changed or is gone since, so its test posts are unknown; give --split-file "
                        "to choose the posts explicitly")
