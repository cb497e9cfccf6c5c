"""The ablation grid: every head x features x encoder x seed (x --lrs / --dims / --dropouts) of the
cached datasets as :class:`GridRun` cells, each with a key that hashes its config and the data it reads,
and the status of its run folder (:func:`run_status`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.fuse.config import TrainConfig
from mmcache.fuse.data import FEATURES, choose_streaming, extract_command, list_cached_datasets
from mmcache.fuse.heads import head_uses, list_heads
from mmcache.fuse.runs import RunFolder
from mmcache.fuse.stream import default_budget
from mmcache.fuse.targets import available_targets, resolve_target

from mmcache import cache as cf
from mmcache.common import resolve_device
from mmcache.errors import BadInputError, CacheError, MissingCacheError

logger = logging.getLogger(__name__)

DEFAULT_FEATURES = ("cls", "tokens")
DEFAULT_SEEDS = 5
# Not in the key: where runs go and what they run on. max_memory neither: it decides the numbers only through
# `streamed` and `shuffle_buffer`, which the grid resolves from it and which are (see _comparable).
KEY_EXCLUDED = ("runs_dir", "run_name", "device", "threads", "cache_dir", "max_memory")
MODALITIES = ("text", "image")


# --------------------------------------------------------------------------------------------- grid

@dataclass(frozen=True)
class Encoder:
    """One (text file, image file) pair of a dataset: a value of the encoder axis."""

    text: str | None  # feature file paths; None: the dataset has no complete file of that modality
    image: str | None

    @staticmethod
    def slug(path: str | None) -> str:
        if path is None:
            return "none"
        name = Path(path).name
        return name.split("--", 1)[1][:-3] if name.endswith(".h5") and "--" in name else name

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]

    @property
    def label(self) -> str:
        """Readable: the encoders' names as extraction wrote them into the file names
        (``text--owner--name.h5`` -> ``owner/name``), any family mixed with any other."""
        return f"{self.slug(self.text).replace('--', '/')} + {self.slug(self.image).replace('--', '/')}"

    @property
    def tag(self) -> str:
        return f"{self.slug(self.text)}+{self.slug(self.image)}"


@dataclass
class GridRun:
    """One cell of the grid: its config, key and run folder."""

    dataset: str
    head: str
    features: str
    encoder: Encoder
    seed: int
    config: TrainConfig  # dataset, head, features, seed, modalities, cache files set; run_name = folder name
    key: str
    run_dir: Path
    split_fingerprint: str | None = None  # the cache's split: a finished run made on another one is stale
    target: str | None = None  # the target / task (resolved name); its table is per (dataset, target)
    default_target: str | None = None  # the dataset's default target (runs on it keep their old keys)
    variant: str = ""  # values of the --dims / --dropouts axes ("dim 128, dropout 0.1"); "" without them

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def group(self) -> tuple[str, str, str, str]:
        """Runs with one group share their data: (dataset, features, text file, image file)."""
        return (self.dataset, self.features, self.encoder.text, self.encoder.image)

    @property
    def row_key(self) -> tuple[str, str, str, str]:
        """One table row: (head, features, encoder, variant); the --lrs values of a row are a choice."""
        return (self.head, self.features, self.encoder.label, self.variant)

    @property
    def table(self) -> str:
        """Name of the table this run belongs to: the dataset, or ``<dataset>-<target>`` off the default."""
        return self.dataset if self.target in (None, self.default_target) else f"{self.dataset}-{self.target}"

    def sort_key(self) -> tuple:
        return (self.dataset, self.target or "", self.encoder.label, self.features, self.head, self.variant,
                self.config.lr, self.seed)


def _comparable(config: TrainConfig | dict[str, Any], default_target: str | None = None) -> dict[str, Any]:
    """The config fields that determine a run's numbers, feature files by name. The target is left out
    when it is the dataset's default (so runs from before targets existed keep their keys); ``streamed`` and
    ``shuffle_buffer`` count only when the run streamed."""
    d = dict(config.to_dict() if isinstance(config, TrainConfig) else config)
    for k in KEY_EXCLUDED:
        d.pop(k, None)
    if d.get("target") in (None, default_target):
        d.pop("target", None)
    if d.get("stream_seed") == 0:  # added later: old runs keep their keys
        d.pop("stream_seed", None)
    # A streamed run's order is drawn per window: the window is in the key, with the fact that it streamed (a
    # full window is not the in-memory order). In memory both are left out: those runs, and the runs from
    # before they were recorded, keep their keys.
    streamed, window = d.pop("streamed", None), d.pop("shuffle_buffer", None)
    if streamed:
        d["streamed"] = {"shuffle_buffer": window}
    for m in MODALITIES:
        if d.get(f"{m}_cache"):
            d[f"{m}_cache"] = Path(d[f"{m}_cache"]).name
    if d.get("modalities"):
        d["modalities"] = sorted(d["modalities"])
    return d


def run_key(config: TrainConfig, data_fingerprint: str, default_target: str | None = None) -> str:
    """10 hex of SHA-256 over the comparable config and the data fingerprint."""
    payload = json.dumps({"config": _comparable(config, default_target), "data": data_fingerprint}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:10]


def index_fingerprint(index: cf.SampleIndex) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([index.fingerprint, list(index.classes)]).encode("utf-8"))
    h.update(np.asarray(index.labels, dtype=np.int64).tobytes())
    h.update("\n".join(map(str, index.splits)).encode("utf-8"))
    return h.hexdigest()[:16]


def _grid_targets(index: cf.SampleIndex, names: list[str] | None) -> tuple[dict[str, str], str]:
    """({target: label fingerprint}, default target) of ``index``. The default target's labels are
    ``label`` (already in the index fingerprint): fingerprint ""; unknown names: BadInputError."""
    default = available_targets(index)[2]
    out = {}
    for name in dict.fromkeys(names or [default]):
        target, labels = resolve_target(index, name)
        out[target.name] = "" if target.name == default else hashlib.sha256(
            json.dumps(target.to_dict()).encode("utf-8") + labels.tobytes()).hexdigest()[:16]
    return out, default


def _encoders(cache_dir: Path, dataset: str, explicit: bool) -> tuple[list[Encoder], dict[str, str]]:
    """Every (text, image) pair of complete feature files, and each file's settings fingerprint."""
    folder = cache_dir / dataset
    files: dict[str, list[str]] = {m: [] for m in MODALITIES}
    fps: dict[str, str] = {}
    for p in cf.list_feature_files(folder):
        try:
            with cf.FeatureFile(p) as ff:
                complete, modality, provenance = ff.complete, ff.modality, ff.provenance
                fps[str(p)] = f"{ff.attrs.get('config_fingerprint')}/{ff.index_fingerprint}"
        except CacheError as e:
            logger.warning("%s: skipped (%s)", p, e)
            continue
        if not complete:
            logger.warning("%s is unfinished: left out of the ablation; resume it with %s", p,
                           extract_command(dataset, provenance))
            continue
        files.setdefault(modality, []).append(str(p))
    if not any(files.get(m) for m in MODALITIES):
        msg = (f"{dataset}: no complete feature file in {folder}/; create them with {extract_command(dataset)}")
        if explicit:
            raise MissingCacheError(msg)
        logger.warning("%s; skipped", msg)
        return [], fps
    # a dataset with one modality only: the heads that need only that one run (the others are skipped)
    texts, images = sorted(files["text"]) or [None], sorted(files["image"]) or [None]
    return [Encoder(t, i) for t, i in product(texts, images)], fps


def _skip_reason(head: str, enc: Encoder, dataset: str) -> str | None:
    missing = sorted(head_uses(head) - set(enc.modalities))
    if not missing:
        return None
    return (f"needs {' and '.join(missing)} features; {dataset} has no complete {' or '.join(missing)} feature file "
            f"(create it with {extract_command(dataset)})")


def expand_grid(base: TrainConfig | None = None, *, datasets: list[str] | None = None, heads: list[str] | None = None,
                features: list[str] | tuple[str, ...] = DEFAULT_FEATURES, seeds: list[int] | int = DEFAULT_SEEDS,
                cache_dir: str | Path = "cache", runs_dir: str | Path = "runs/ablate",
                skipped: list[dict[str, Any]] | None = None, targets: list[str] | None = None,
                lrs: list[float] | None = None, dims: list[int] | None = None,
                dropouts: list[float] | None = None) -> list[GridRun]:
    """Every run of the grid, sorted by (dataset, target, encoder, features, head, variant, lr, seed).

    A dataset with features of one modality only gets the heads that need only that modality; each
    head left out is appended to ``skipped`` (``{"dataset", "head", "reason"}``) when given.

    ``base``: the training config every run starts from (default: train-fusion's defaults); its
    dataset, head, features, seed, modalities, cache files, cache/runs dirs and run name are replaced
    by the grid's. ``seeds``: a count n (seeds 0..n-1) or a list. ``targets``: targets / tasks of each
    dataset's index (None: its default). Unknown heads / features / targets are :class:`BadInputError`; a
    named dataset without a complete cache is :class:`CacheError`.
    ``lrs``: learning rates to choose from on validation (one row per head, see :func:`aggregate`);
    ``dims`` / ``dropouts``: plain axes (a row each). None = the base's value, and run names stay as
    without the axis.
    """
    base = base or TrainConfig()
    cache_dir = Path(cache_dir)
    if base.head not in list_heads():  # a --config naming a head that does not exist is a typo, not a default
        raise BadInputError(f"the base config names unknown head {base.head!r}; known heads: {', '.join(list_heads())}")
    if base.features not in FEATURES:
        raise BadInputError(f"the base config names unknown features {base.features!r}; expected one of "
                            f"{', '.join(FEATURES)}")
    heads = list(dict.fromkeys(heads)) if heads else list_heads()
    unknown = [h for h in heads if h not in list_heads()]
    if unknown:
        raise BadInputError(f"unknown head(s) {', '.join(unknown)}; known heads: {', '.join(list_heads())}")
    features = list(dict.fromkeys(features))
    bad = [f for f in features if f not in FEATURES]
    if bad or not features:
        raise BadInputError(f"unknown features {', '.join(bad) or '(none)'}; expected some of {', '.join(FEATURES)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(dict.fromkeys(int(s) for s in seeds))
    if not seed_list:
        raise BadInputError("no seeds: give at least one (--seeds 1)")
    axes = [_axis("lrs", lrs, base.lr, "lr"), _axis("dims", dims, base.dim, "d"), _axis("dropouts", dropouts, base.dropout, "p")]
    cached = list_cached_datasets(cache_dir)
    explicit = bool(datasets)
    if explicit:
        names = list(dict.fromkeys(datasets))
        missing = [d for d in names if d not in cached]
        if missing:
            have = f" (cached: {', '.join(cached)})" if cached else ""
            raise MissingCacheError(f"no cache for dataset(s) {', '.join(missing)} in {cache_dir}/{have}; create it with "
                             f"{extract_command(missing[0])}")
    else:
        names = cached
        if not names:
            raise MissingCacheError(f"no dataset cache in {cache_dir}/; create one with {extract_command('<name>')}")

    # One budget for the whole grid, resolved now: how each cell streams is part of its key, and a worker
    # loading its data later (with other free memory) must choose the same.
    budget = base.max_memory if base.max_memory is not None else default_budget(resolve_device(base.device))
    runs: list[GridRun] = []
    skips: list[dict[str, Any]] = []
    for dataset in names:
        index = cf.read_index(cache_dir / dataset / cf.INDEX_NAME)
        index_fp, split_fp = index_fingerprint(index), index.split_fingerprint
        target_fps, default = _grid_targets(index, targets)
        encoders, file_fps = _encoders(cache_dir, dataset, explicit)
        memory = {(enc, feat): _memory_fields(base, enc, feat, budget) for enc in encoders for feat in features}
        for enc in encoders:
            for head in heads:
                reason = _skip_reason(head, enc, dataset)
                if reason and not any(x["dataset"] == dataset and x["head"] == head for x in skips):
                    skips.append({"dataset": dataset, "head": head, "reason": reason})
        for target, enc, feat, head, seed, lr, dim, dropout in product(target_fps, encoders, features, heads,
                                                                        seed_list, *(a[0] for a in axes)):
            if _skip_reason(head, enc, dataset):
                continue
            cfg = dataclasses.replace(base, dataset=dataset, head=head, features=feat, seed=seed,
                                      modalities=enc.modalities, text_cache=enc.text, image_cache=enc.image,
                                      cache_dir=str(cache_dir), run_name=None, target=target, lr=lr, dim=dim,
                                      dropout=dropout, **memory[(enc, feat)])
            cfg.validate()
            data_fp = "|".join([index_fp, *(file_fps[getattr(enc, m)] for m in enc.modalities)]) + (
                f"|{target_fps[target]}" if target_fps[target] else "")
            key = run_key(cfg, data_fp, default)
            tag = "" if target == default else f"{target}-"
            tags = "".join(f"-{t}{v:g}" for (_, given, t), v in zip(axes, (lr, dim, dropout), strict=True) if given)
            name = f"{head}-{feat}-{tag}{enc.tag}{tags}-s{seed}-{key}"
            run_dir = Path(runs_dir) / dataset / name
            cfg = dataclasses.replace(cfg, runs_dir=str(run_dir.parent), run_name=name)
            variant = ", ".join(f"{what} {v:g}" for what, (_, given, _t), v in
                                zip(("dim", "dropout"), axes[1:], (dim, dropout), strict=True) if given)
            runs.append(GridRun(dataset=dataset, head=head, features=feat, encoder=enc, seed=seed, config=cfg,
                                key=key, run_dir=run_dir, split_fingerprint=split_fp, target=target,
                                default_target=default, variant=variant))
    if skipped is not None:
        skipped.extend(skips)
    if not runs:
        why = "; ".join(f"{x['dataset']}: {x['head']} {x['reason']}" for x in skips[:3])
        raise MissingCacheError(f"nothing to run in {cache_dir}/" + (f" ({why})" if why else ": no complete feature files"))
    runs.sort(key=GridRun.sort_key)
    return runs


def _memory_fields(base: TrainConfig, enc: Encoder, features: str, budget: int) -> dict[str, Any]:
    """The memory fields of the cells of one data group: the grid's budget, whether they stream and the
    shuffle window (:func:`fuse.data.choose_streaming`; an explicit window over the budget: BadInputError)."""
    paths = {m: Path(getattr(enc, m)) for m in enc.modalities}
    streamed, window = choose_streaming(paths, features, budget, base.streamed, base.shuffle_buffer)
    return {"max_memory": budget, "streamed": streamed,
            "shuffle_buffer": window if streamed else base.shuffle_buffer}


def _axis(name: str, values: list | None, default: Any, tag: str) -> tuple[list, bool, str]:
    """(values, given, name tag) of an optional sweep axis; bad values are :class:`BadInputError`."""
    if not values:
        return [default], False, tag
    values = list(dict.fromkeys(values))
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in values):
        raise BadInputError(f"--{name}: expected non-negative numbers, got {values}")
    return values, True, tag


def shard_runs(runs: list[GridRun], shard: tuple[int, int] | None) -> list[GridRun]:
    """Configs i, i+n, i+2n, ... of the sorted grid for shard (i, n)."""
    if shard is None:
        return list(runs)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise BadInputError(f"--shard {i}/{n}: need 0 <= i < n")
    return list(runs[i::n])


# --------------------------------------------------------------------------------------------- run status

def run_status(run: GridRun) -> str:
    """``finished`` (sealed, its files matching the manifest by the fast size + mtime check of
    :meth:`~mmcache.fuse.runs.RunFolder.verify`, and a matching config.json), ``stale`` (finished, but
    its split.json is not the cache's split: rerun), ``failed`` (error.json, no metrics), ``unfinished``
    (a folder without either, e.g. marked UNFINISHED by Ctrl-C, a finished run whose config differs, or
    one whose files no longer match its manifest: it is retrained) or ``missing``."""
    folder = RunFolder(run.run_dir)
    state = folder.state()
    if state != "finished":
        return state
    saved = folder.saved_config()
    if not (saved is not None and (_comparable(saved, run.default_target)
                                   == _comparable(run.config, run.default_target))):
        return "unfinished"
    if not folder.is_intact():
        return "unfinished"
    rec = folder.split()  # None: made before runs recorded their split; the key (it hashes the split) vouches
    if run.split_fingerprint and rec is not None and rec["fingerprint"] != run.split_fingerprint:
        return "stale"
    return "finished"
