"""A run's life around its training loop, shared by every trainer (:func:`fuse.train.train` and the
stacked trainer, :mod:`fuse.stack`): :func:`open_run` validates the config against the data and
creates the run folder (config, provenance, split); :func:`finish_run` scores every split with the best
weights and seals the folder (:class:`~mmcache.fuse.runs.RunFolder`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from mmcache.fuse import tracking
from mmcache.fuse.config import TrainConfig
from mmcache.fuse.data import MODALITY_ORDER, FusionData, load_data
from mmcache.fuse.engine import (
    predict,
)
from mmcache.fuse.heads import (
    FusionHead,
    count_parameters,
    head_uses,
)
from mmcache.fuse.runs import (
    RunFolder,
    attach_run_log,
    git_commit,
    library_versions,
    make_run_dir,
)
from mmcache.fuse.targets import check_trainable, score_targets
from torch import Tensor

from mmcache.common import resolve_device, small_model_threads
from mmcache.errors import BadInputError, PipelineError

logger = logging.getLogger(__name__)


def _resolve_with_data(config: TrainConfig, data: FusionData | None, device: torch.device) -> tuple[TrainConfig, FusionData]:
    needed = head_uses(config.head)
    if data is None:
        mods = config.modalities or [m for m in MODALITY_ORDER if m in needed]
        data = load_data(config.dataset, modalities=mods, features=config.features, cache_dir=config.cache_dir,
                         text_cache=config.text_cache, image_cache=config.image_cache, device=device,
                         target=config.target, max_memory=config.max_memory, streamed=config.streamed,
                         shuffle_buffer=config.shuffle_buffer)
    else:
        if data.features != config.features:
            raise BadInputError(f"preloaded data holds {data.features!r} features, config asks for {config.features!r}")
        if config.dataset not in (None, data.dataset):
            raise BadInputError(f"preloaded data is {data.dataset!r}, config asks for {config.dataset!r}")
        if not needed <= set(data.modalities):
            raise BadInputError(f"head {config.head!r} needs {', '.join(sorted(needed))}; preloaded data has "
                                f"{', '.join(data.modalities)}")
        if config.modalities is not None and set(config.modalities) != set(data.modalities):
            raise BadInputError(f"config modalities {config.modalities} differ from the preloaded data's "
                                f"{list(data.modalities)}")
        _check_stream(config, data)
        data.to(device)
        data = data.with_target(config.target)
    paths = {m: (str(md.path) if (md := data.modality(m)) else None) for m in MODALITY_ORDER}
    window = data.stream.buffer_rows if data.stream is not None else config.shuffle_buffer
    resolved = dataclasses.replace(config, dataset=data.dataset, device=str(device), modalities=list(data.modalities),
                                   text_cache=paths["text"], image_cache=paths["image"], target=data.target.name,
                                   streamed=data.stream is not None, shuffle_buffer=window)
    return resolved, data


def _check_stream(config: TrainConfig, data: FusionData) -> None:
    """Preloaded data must be streamed (or not) with the window the config names, if it names one: the
    resolved config.json must describe the order the run is really trained in."""
    plan = data.stream
    if config.streamed is not None and config.streamed != (plan is not None):
        raise BadInputError(f"the config says streamed: {str(config.streamed).lower()}, but the preloaded data is "
                            f"{'streamed' if plan is not None else 'in memory'}")
    if plan is not None and config.shuffle_buffer and config.shuffle_buffer != plan.buffer_rows:
        raise BadInputError(f"the config's shuffle_buffer {config.shuffle_buffer} differs from the preloaded data's "
                            f"stream window of {plan.buffer_rows} rows")


def _provenance(data: FusionData, device: torch.device, threads: int | None) -> dict[str, Any]:
    """``cache_root`` and each feature file's ``path`` are ABSOLUTE: evaluate / analyze / predict find
    the run's own cache from any working folder (:mod:`fuse.scoring`)."""
    caches = {}
    for m in MODALITY_ORDER:
        md = data.modality(m)
        if md is not None:
            caches[m] = {"model": md.model, **md.info, "path": str(Path(md.path).resolve())}
    index_path = Path(data.index_path).resolve()
    return {
        "dataset": data.dataset,
        "cache_root": str(index_path.parent.parent),
        "split": {k: data.split.get(k) for k in ("source", "fingerprint", "counts")},
        "index": {"path": str(index_path), "fingerprint": data.index_fingerprint,
                  "attrs": {k: v for k, v in data.index_attrs.items()}},
        "caches": caches,
        "data": data.summary(),
        "libraries": library_versions(),
        "git_commit": git_commit(),
        "host": {"platform": platform.platform(), "machine": platform.machine(), "torch_threads": threads or torch.get_num_threads(),
                 "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None},
        "argv": sys.argv,
    }




def _check_val(data: FusionData, val_rows: Tensor, allow_no_val: bool) -> None:
    if val_rows.numel():
        return
    counts = "/".join(str(data.split.get("counts", {}).get(s, 0)) for s in ("train", "val", "test"))
    why = (f"{data.dataset} has no validation samples (split {data.split.get('source', '?')}: train/val/test "
           f"{counts}, {data.dropped.get('by_split', {}).get('val', 0)} val samples dropped for a missing modality)")
    if not allow_no_val:
        raise BadInputError(f"{why}: early stopping and model selection need them. Re-split with a validation part "
                            "(extract --resplit --seed N or --split-file PATH), or pass --allow-no-val to train every "
                            "epoch and keep the last epoch's weights")
    logger.warning("%s: --allow-no-val: no early stopping, the last epoch's weights are kept", why)


def _check_expected_split(data: FusionData, expected: dict[str, Any] | None) -> None:
    """A reproduction (``--config runs/R/config.json``) on a cache whose split changed since R: warned,
    not refused (the new run records its own split, so nothing is mislabelled), since its numbers cannot
    equal R's."""
    if expected and expected.get("fingerprint") != data.split.get("fingerprint"):
        logger.warning("the split of %s differs from the one the config's run was trained on (run: %s, fingerprint "
                       "%s; cache now: %s, fingerprint %s): this run does not reproduce it", data.dataset,
                       expected.get("source"), expected.get("fingerprint"), data.split.get("source"),
                       data.split.get("fingerprint"))



def open_run(config: TrainConfig, data: FusionData | None, *, allow_no_val: bool = False,
             expected_split: dict[str, Any] | None = None, state: dict[str, Any] | None = None,
             ) -> tuple[TrainConfig, FusionData, torch.device, Path, int | None]:
    """Validate, resolve against the data, create the run folder and write config.json, provenance.json and
    split.json; returns (config, data, device, run folder, threads). Shared by :func:`train` and the
    stacked trainer (:mod:`fuse.stack`). ``state`` (train's interrupt bookkeeping) gets the run folder."""
    config.validate()
    device = resolve_device(config.device)
    config, data = _resolve_with_data(config, data, device)
    train_rows = data.split_rows["train"]
    if train_rows.numel() == 0:
        raise PipelineError(f"{data.dataset}: no training samples (after dropping {data.dropped['total']} with a "
                            "missing modality)")
    check_trainable(data.target, data.target_labels.cpu().numpy()[train_rows.cpu().numpy()])
    _check_val(data, data.split_rows["val"], allow_no_val)
    _check_expected_split(data, expected_split)

    name = config.run_name or (f"{data.dataset}-{config.head}-{config.features}-s{config.seed}-"
                               f"{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = make_run_dir(Path(config.runs_dir), name)
    config = dataclasses.replace(config, run_name=run_dir.name)
    if state is not None:
        state.update(run_dir=run_dir, epochs=config.epochs, log=attach_run_log(run_dir))
    folder = RunFolder(run_dir)
    folder.write_config(config.to_dict())
    threads = config.threads or (small_model_threads() if device.type == "cpu" else None)
    folder.write_provenance(_provenance(data, device, threads))
    folder.write_split(data.split, data.split_ids)
    tracking.start_run(run_dir, config.to_dict())  # the active run loggers (fuse/tracking.py), if any
    return config, data, device, run_dir, threads


def finish_run(run_dir: Path, config: TrainConfig, data: FusionData, model: FusionHead, history: list[dict[str, Any]],
               best_epoch: int, t_start: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every split with ``model`` (holding the best weights) and write model.safetensors,
    predictions.csv and, last, metrics.json (plus ``extra`` keys); returns the metrics."""
    split_probs = {s: predict(model, data, data.split_rows[s], config.eval_batch_size, config.amp)
                   for s in ("train", "val", "test")}
    train_rows, val_rows, test_rows = (data.split_rows[s] for s in ("train", "val", "test"))
    target = data.target
    labels_np = data.target_labels.cpu().numpy()  # (N, T), < 0 = masked
    val_labels = labels_np[val_rows.cpu().numpy()]
    n_params = count_parameters(model)

    folder = RunFolder(run_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes several in hash order, which would make equal runs' files differ.
    folder.write_model(tensors, {"mmcache": json.dumps({"format": "mmcache-fusion-head", "head": config.head})})
    test_np = test_rows.cpu().numpy()
    folder.write_predictions(data.ids[test_np], labels_np[test_np], split_probs["test"], target)
    metrics = {
        "run": run_dir.name,
        "dataset": data.dataset,
        "head": config.head,
        "features": config.features,
        "seed": config.seed,
        "target": target.name,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": len(history) < config.epochs,
        "val": score_targets(split_probs["val"], val_labels, target) if val_rows.numel() else None,
        "test": score_targets(split_probs["test"], labels_np[test_np], target) if test_rows.numel() else None,
        "train": score_targets(split_probs["train"], labels_np[train_rows.cpu().numpy()], target),
        "samples": {s: int(r.numel()) for s, r in data.split_rows.items()},
        "split": {"source": data.split.get("source"), "fingerprint": data.split.get("fingerprint")},
        "dropped": data.dropped,
        "model": {"head": config.head, "classes": data.classes, "target": target.name, "targets": target.to_dict(),
                  "num_parameters": n_params, **data.dims()},
        "seconds": time.perf_counter() - t_start,
        **(extra or {}),
    }
    folder.finish(metrics)  # metrics.json, then the manifest (last)
    tracking.end_run(run_dir, metrics)  # after the folder is sealed: a tracker never holds up a finished run
    logger.info("run %s: best epoch %d, val macro-F1 %s, test macro-F1 %s", run_dir, best_epoch,
                _fmt(metrics["val"], "macro_f1"), _fmt(metrics["test"], "macro_f1"))
    return metrics


def _fmt(m: dict[str, Any] | None, key: str) -> str:
    return "-" if not m or m.get(key) is None else f"{m[key]:.4f}"


