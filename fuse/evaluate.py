"""Scoring a finished run again (``evaluate``): on its own split, another split, or another dataset's
cache made with the same encoders and classes (cross-dataset evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mmcache.extract import cache_format as cf
from mmcache.fuse.config import TrainConfig, load_run_config
from mmcache.fuse.data import MODALITY_ORDER, FusionData, load_data
from mmcache.fuse.engine import build_head, deterministic, predict
from mmcache.fuse.heads import FusionHead, head_uses
from mmcache.fuse.runs import (
    FINISHED_MARKER,
    predictions_csv,
    read_json,
    read_split,
    require_finished,
    write_json,
)
from mmcache.fuse.targets import score_targets
from torch import Tensor

from mmcache.common import atomic_write, resolve_device
from mmcache.errors import BadInputError, PipelineError

__all__ = ["SPLIT_CHOICES", "EvalResult", "evaluate", "load_head"]


@dataclass
class EvalResult:
    """What :func:`evaluate` returns."""

    run_dir: Path
    dataset: str
    split: str
    metrics: dict[str, Any]
    dropped: dict[str, Any]
    predictions_path: Path | None
    metrics_path: Path | None



def load_head(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FusionHead, TrainConfig, dict[str, Any]]:
    """Rebuild a finished run's head with its best weights: (model in eval mode, config, metrics.json)."""
    run_dir = require_finished(run_dir)
    config = load_run_config(run_dir)
    meta = json.loads((run_dir / FINISHED_MARKER).read_text(encoding="utf-8"))
    info = meta["model"]
    outputs = sum(len(c) for c in info["targets"].values()) if info.get("targets") else len(info["classes"])
    model = build_head(config, {"text_dim": info.get("text_dim"), "image_dim": info.get("image_dim")}, outputs)
    from safetensors.torch import load_file

    try:
        state = load_file(str(run_dir / "model.safetensors"))
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError) as e:
        raise PipelineError(f"cannot load weights of run {run_dir}: {e}") from None
    return model.to(device).eval(), config, meta


SPLIT_CHOICES = ("original", "current")


def evaluate(run_dir: str | Path, dataset: str | None = None, split: str = "test", *,
             cache_dir: str | Path | None = None, text_cache: str | Path | None = None,
             image_cache: str | Path | None = None, device: str | None = None, data: FusionData | None = None,
             write: bool = True, split_choice: str | None = None, target: str | None = None) -> EvalResult:
    """Score a finished run again on ``split`` of its own dataset, or of ``dataset`` (cross-dataset).

    The other dataset's caches must come from the same encoders (model ids and hidden sizes as in the
    run's provenance) and have the same classes, in the same order; otherwise :class:`BadInputError`.
    ``target``: score against another target (or task) than the run's own (None), e.g. MVSA ``image_label``
    for a ``sentiment`` run; its classes must equal the run's. With ``write``, the metrics and predictions
    go to ``<run>/evaluations/<dataset>-<split>[-<target>].json|.csv`` (the target named when not the run's).

    On its own dataset the run's split (``split.json``) must still be the cache's: after a re-split
    the run is stale and this raises :class:`BadInputError`, unless ``split_choice`` is ``"original"``
    (score the run's own ``split`` ids) or ``"current"`` (the cache's current split, labelled as a
    different split in the metrics and the file name: ``<dataset>-<split>-current-<fingerprint>``).
    """
    if split_choice not in (None, *SPLIT_CHOICES):
        raise BadInputError(f"split_choice must be one of {', '.join(SPLIT_CHOICES)}, got {split_choice!r}")
    run_dir = Path(run_dir)
    if split not in ("train", "val", "test"):
        raise BadInputError(f"unknown split {split!r}; expected train, val or test")
    model, config, meta = load_head(run_dir, "cpu")
    dev = resolve_device(device or ("auto" if config.device.startswith("cuda") else config.device))
    model.to(dev)
    prov = read_json(run_dir / "provenance.json") or {}
    run_target = meta.get("target") or config.target  # None: a run from before targets (the default label)
    wanted = target or run_target
    same = dataset is None or dataset == config.dataset
    other = config.dataset if same else dataset
    if data is None:
        caches = {"text": text_cache, "image": image_cache}
        for m in MODALITY_ORDER:
            own = getattr(config, f"{m}_cache")
            if caches[m] is not None or not own:
                continue
            if same and Path(own).is_file():  # the run's own files, if still there
                caches[m] = own
            elif not same:  # same encoder, same file name in the other dataset's folder, if there
                twin = Path(cache_dir or config.cache_dir) / other / Path(own).name
                caches[m] = twin if twin.is_file() else None
        data = load_data(other, modalities=config.modalities or sorted(head_uses(config.head)),
                         features=config.features, cache_dir=cache_dir or config.cache_dir,
                         text_cache=caches["text"], image_cache=caches["image"], device=dev, target=wanted)
    else:
        data.to(dev)
    data = data.with_target(wanted) if wanted else data
    _check_compatible(data, config, meta, prov)
    rows, scored = _eval_rows(run_dir, data, split, same, split_choice, prov)
    with deterministic(dev, config.threads):
        probs = predict(model, data, rows, config.eval_batch_size, config.amp)
    rows_np = rows.cpu().numpy()
    labels = data.target_labels.cpu().numpy()[rows_np]
    metrics = score_targets(probs, labels, data.target)
    metrics.update(dataset=data.dataset, split=split, run=run_dir.name, trained_on=config.dataset,
                   trained_target=run_target, dropped=data.dropped, split_scored=scored)
    mpath = ppath = None
    if write:
        out = run_dir / "evaluations"
        out.mkdir(exist_ok=True)
        stem = f"{data.dataset}-{split}" + (f"-current-{scored['fingerprint']}" if scored["which"] == "current" else "")
        stem += f"-{data.target.name}" if target and data.target.name != run_target else ""
        ppath, mpath = out / f"{stem}.csv", out / f"{stem}.json"
        atomic_write(ppath, predictions_csv(data.ids[rows_np], labels, probs, data.target))
        write_json(mpath, metrics)
    return EvalResult(run_dir=run_dir, dataset=data.dataset, split=split, metrics=metrics, dropped=data.dropped,
                      predictions_path=ppath, metrics_path=mpath)


def _eval_rows(run_dir: Path, data: FusionData, split: str, same: bool, choice: str | None,
               prov: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """The rows to score and what they are (``split_scored`` in the metrics): ``which`` = ``run`` (the
    run's split, unchanged in the cache), ``original`` (the run's recorded ids; the cache was re-split),
    ``current`` (the cache's split, which is not the run's) or ``dataset`` (another dataset's split)."""
    cur = {"source": data.split.get("source"), "fingerprint": data.split.get("fingerprint")}
    if not same:
        return data.split_rows[split], {"which": "dataset", **cur}
    rec = read_split(run_dir)
    if rec is None:  # a run made before runs recorded their split: trust only an unchanged index
        then = (prov.get("index") or {}).get("attrs", {}).get("content_fingerprint")
        if then is not None and then == data.index_attrs.get("content_fingerprint"):
            return data.split_rows[split], {"which": "run", **cur}
        if choice != "current":
            raise BadInputError(f"run {run_dir.name} has no split record (made before runs recorded theirs) and "
                                f"the index of {data.dataset} changed since, so its {split} split may hold samples the "
                                "run trained on; pass --current-split to score the cache's current split anyway")
        return data.split_rows[split], {"which": "current", **cur, "note": "the run's own split is unknown"}
    if rec["fingerprint"] == cur["fingerprint"]:
        return data.split_rows[split], {"which": "run", **cur}
    others = set().union(*(rec["ids"].get(s, []) for s in ("train", "val", "test") if s != split))
    leak = sum(i in others for i in data.split_ids[split])  # e.g. now in test, but trained or validated on
    if choice is None:
        raise BadInputError(
            f"the split of {data.dataset} changed since run {run_dir.name} was trained (run: {rec.get('source')}, "
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
        raise BadInputError(f"{len(missing)} of run {run_dir.name}'s {split} samples are no longer in the cache of "
                            f"{data.dataset} (e.g. {', '.join(missing[:3])}): its original split cannot be scored")
    return rows, {"which": "original", "source": rec.get("source"), "fingerprint": rec["fingerprint"],
                  "note": f"the run's own {split} samples; the cache's split is now {cur['fingerprint']}"}


def _check_compatible(data: FusionData, config: TrainConfig, meta: dict[str, Any], prov: dict[str, Any]) -> None:
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
        trained = prov.get("caches", {}).get(m, {})
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
