"""Training of one fusion head on cached features (``train-fusion``).

``train(config)`` loads what the head needs (:func:`fuse.data.load_data`), trains with AdamW,
linear warm-up then cosine decay, gradient clipping, optional label smoothing and class-balanced loss,
early-stops on validation macro-F1, restores the best-validation weights and scores the test split
ONCE with them. Every run writes a folder (see :func:`train`). ``train(config, data=loaded)`` reuses
tensors already in memory, so an ablation can run many heads/seeds in one process without re-reading
HDF5. Scoring a saved run again is :mod:`fuse.evaluate`.

Determinism: a run's numbers are a function of its config, data and seed alone. Init is seeded from
``config.seed``, shuffling and dropout masks come from the run's own ``torch.Generator`` s, deterministic
algorithms are switched on for the duration of a run; a head that can be stacked is trained as a stack of
one (:func:`fuse.stack.fit_members`), the path every ablation stack takes, so the same config, seed and
machine give identical numbers alone, in a stack, or resumed. Mixed precision (bf16 autocast) is used on CUDA only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mmcache.fuse.config import TrainConfig, load_run_config
from mmcache.fuse.data import MODALITY_ORDER, FusionData, load_data
from mmcache.fuse.engine import (
    adamw,
    autocast,
    build_head,
    deterministic,
    lr_lambda,
    predict,
    seed_everything,
)
from mmcache.fuse.heads import (
    FusionHead,
    count_parameters,
    dropout_generator,
    head_uses,
    set_dropout_generators,
)
from mmcache.fuse.runs import (
    RunFolder,
    attach_run_log,
    detach_run_log,
    git_commit,
    library_versions,
    make_run_dir,
    mark_unfinished,
)
from mmcache.fuse.targets import check_trainable, class_weights, score_targets, target_loss
from torch import Tensor

from mmcache.common import resolve_device, small_model_threads
from mmcache.errors import BadInputError, Interrupted, PipelineError
from mmcache.progress import progress as reporter

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "finish_run", "load_run_config", "open_run", "resolve_device", "train"]


# --------------------------------------------------------------------------------------------- results

@dataclass
class TrainResult:
    """What :func:`train` returns; the same numbers are in the run folder."""

    run_dir: Path
    config: TrainConfig  # resolved
    metrics: dict[str, Any]  # metrics.json
    history: list[dict[str, Any]]



def _resolve_with_data(config: TrainConfig, data: FusionData | None, device: torch.device) -> tuple[TrainConfig, FusionData]:
    needed = head_uses(config.head)
    if data is None:
        mods = config.modalities or [m for m in MODALITY_ORDER if m in needed]
        data = load_data(config.dataset, modalities=mods, features=config.features, cache_dir=config.cache_dir,
                         text_cache=config.text_cache, image_cache=config.image_cache, device=device,
                         target=config.target)
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
        data.to(device)
        data = data.with_target(config.target)
    paths = {m: (str(md.path) if (md := data.modality(m)) else None) for m in MODALITY_ORDER}
    resolved = dataclasses.replace(config, dataset=data.dataset, device=str(device), modalities=list(data.modalities),
                                   text_cache=paths["text"], image_cache=paths["image"], target=data.target.name)
    return resolved, data


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



# --------------------------------------------------------------------------------------------- train

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


def train(config: TrainConfig, data: FusionData | None = None, *, progress: bool | None = False,
          allow_no_val: bool = False,
          expected_split: dict[str, Any] | None = None) -> TrainResult:
    """Train one head and write its run folder; returns the resolved config, metrics and history.

    ``data``: features already loaded by :func:`fuse.data.load_data` (moved to the run's device in
    place); they must be the config's ``features`` and hold every modality the head uses. Samples
    missing any loaded modality are left out, so for comparable ablations load both modalities once.

    Files in ``runs/<name>/`` (``name`` default ``<dataset>-<head>-<features>-s<seed>-<timestamp>``,
    suffixed ``-2``, ``-3`` ... if taken): ``config.json`` (resolved), ``provenance.json`` (caches,
    index fingerprint, library versions), ``history.json`` (per epoch), ``model.safetensors``
    (best-validation weights), ``predictions.csv`` (test samples: id, true, predicted, p_<class>...),
    ``split.json`` (the split's source, fingerprint and ids) and, written last so that its presence
    means the run finished, ``metrics.json`` (val at the best epoch, test, train). The folder holds an
    ``UNFINISHED`` marker until then; on Ctrl-C it is kept, marked, and
    :class:`~mmcache.errors.Interrupted` says so.

    An empty validation split is a :class:`BadInputError` unless ``allow_no_val`` (then every epoch
    runs and the last one's weights are kept). ``expected_split``: a ``split.json`` record the run is
    meant to reproduce; a different cache split is warned about. ``progress``: False = silent; None =
    a tqdm bar on a terminal, a line every 10 s otherwise (steps done / total, rate, ETA, epoch,
    losses, val macro-F1).
    """
    state: dict[str, Any] = {}
    try:
        return _train(config, data, progress, allow_no_val, expected_split, state)
    except KeyboardInterrupt:
        run_dir, history = state.get("run_dir"), state.get("history") or []
        if run_dir is None:
            raise Interrupted("training stopped before its run folder was created; nothing to keep") from None
        if "bar" in state:
            state["bar"].close(finished=False)  # the closing progress line: where the run stood
        mark_unfinished(run_dir, f"interrupted after {len(history)} of {state['epochs']} epochs")
        raise Interrupted(f"run folder {run_dir} kept and marked unfinished after {len(history)} of "
                          f"{state['epochs']} epochs (a rerun trains it anew)") from None
    finally:
        detach_run_log(state.get("log"))


def _train(config: TrainConfig, data: FusionData | None, progress: bool | None, allow_no_val: bool,
           expected_split: dict[str, Any] | None, state: dict[str, Any]) -> TrainResult:
    t_start = time.perf_counter()
    config, data, device, run_dir, threads = open_run(config, data, allow_no_val=allow_no_val,
                                                      expected_split=expected_split, state=state)
    train_rows, val_rows, test_rows = (data.split_rows[s] for s in ("train", "val", "test"))
    target = data.target
    labels_np = data.target_labels.cpu().numpy()  # (N, T), < 0 = masked

    with deterministic(device, threads):
        from mmcache.fuse.stack import can_stack  # fuse.stack imports this module

        if can_stack(config):
            return _train_as_stack_of_one(config, data, run_dir, progress, state, t_start)
        seed_everything(config.seed)
        model = build_head(config, data.dims(), target.num_outputs).to(device)
        set_dropout_generators(model, [dropout_generator(config.seed, device)])
        n_params = count_parameters(model)
        optimizer = adamw(model, config)
        steps_per_epoch = math.ceil(train_rows.numel() / config.batch_size)
        total = steps_per_epoch * config.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, round(config.warmup_frac * total)))
        weights = class_weights(data.target_labels[train_rows], target.sizes) if config.class_balanced else None
        shuffle = torch.Generator().manual_seed(config.seed)
        logger.info("training %s on %s, target %s (%s features): %d train / %d val / %d test samples, %d parameters, %s",
                    config.head, data.dataset, target.name, config.features, train_rows.numel(), val_rows.numel(),
                    test_rows.numel(), n_params, device)

        history: list[dict[str, Any]] = []
        state["history"] = history
        best_f1, best_epoch, best_state, since_best = -1.0, 0, None, 0
        val_labels = labels_np[val_rows.cpu().numpy()]
        bar = reporter(total, f"train {config.head} on {data.dataset}", "step", enabled=progress)
        state["bar"] = bar
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = train_rows[torch.randperm(train_rows.numel(), generator=shuffle).to(device)]
            loss_sum = torch.zeros((), device=device)
            for start in range(0, order.numel(), config.batch_size):
                rows = order[start:start + config.batch_size]
                with autocast(device, config.amp):
                    logits = model(*data.batch(rows))
                loss = target_loss(logits.float(), data.target_labels[rows], target.sizes, weights,
                                   config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * rows.numel()
                bar.update(1, epoch=f"{epoch}/{config.epochs}")
            train_loss = float(loss_sum) / train_rows.numel()
            if not math.isfinite(train_loss):
                raise PipelineError(f"training loss became {train_loss} in epoch {epoch}; try a lower --lr")
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
            if val_rows.numel():
                vm = score_targets(predict(model, data, val_rows, config.eval_batch_size, config.amp), val_labels,
                                   target)
                row.update(val_loss=vm["loss"], val_accuracy=vm["accuracy"], val_macro_f1=vm["macro_f1"],
                           val_weighted_f1=vm["weighted_f1"])
                if target.multi:
                    row["val_target_macro_f1"] = {m: v["macro_f1"] for m, v in vm["targets"].items()}
                improved = vm["macro_f1"] > best_f1
            else:
                improved = True
            row.update(lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
            history.append(row)
            RunFolder(run_dir).write_history(history)
            if improved:
                best_f1, best_epoch, since_best = row.get("val_macro_f1", -1.0), epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            logger.debug("epoch %d: %s", epoch, row)
            bar.set_postfix(loss=train_loss, val_loss=row.get("val_loss", float("nan")),
                            val_macro_f1=row.get("val_macro_f1", float("nan")))
            if config.patience and since_best >= config.patience:
                logger.info("early stop after epoch %d (best val macro-F1 %.4f at epoch %d)", epoch, best_f1, best_epoch)
                break
        bar.close()

        model.load_state_dict(best_state)
        metrics = finish_run(run_dir, config, data, model, history, best_epoch, t_start)
    return TrainResult(run_dir=run_dir, config=config, metrics=metrics, history=history)


def _train_as_stack_of_one(config: TrainConfig, data: FusionData, run_dir: Path, progress: bool | None,
                           state: dict[str, Any], t_start: float) -> TrainResult:
    """Train a stackable head through the stacked trainer as a stack of one member: the same kernels, loss,
    clipping and AdamW as every stack, so this run's numbers are bit for bit those of the same config in
    an ablation's stack of any size (and ``train-fusion --config runs/R/config.json`` reproduces R)."""
    from mmcache.fuse.stack import fit_members

    history: list[dict[str, Any]] = []
    state["history"] = history
    total = math.ceil(data.split_rows["train"].numel() / config.batch_size) * config.epochs
    bar = reporter(total, f"train {config.head} on {data.dataset}", "step", enabled=progress)
    state["bar"] = bar
    logger.info("training %s on %s, target %s (%s features): %s train / %s val / %s test samples, %s", config.head,
                data.dataset, data.target.name, config.features, *(data.split_rows[s].numel()
                                                                   for s in ("train", "val", "test")), data.device)
    stack, fit = fit_members([config], [run_dir], data, histories=[history],
                             on_step=lambda epoch: bar.update(1, epoch=f"{epoch}/{config.epochs}"))
    if 0 in fit.errors:
        raise PipelineError(fit.errors[0])
    bar.close()
    if len(history) < config.epochs:
        logger.info("early stop after epoch %d (best at epoch %d)", len(history), fit.best_epoch[0])
    model = build_head(config, data.dims(), data.target.num_outputs).to(data.device)
    model.load_state_dict(stack.state_dict(fit.best[0]))
    metrics = finish_run(run_dir, config, data, model, history, fit.best_epoch[0], t_start)
    return TrainResult(run_dir=run_dir, config=config, metrics=metrics, history=history)


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
    logger.info("run %s: best epoch %d, val macro-F1 %s, test macro-F1 %s", run_dir, best_epoch,
                _fmt(metrics["val"], "macro_f1"), _fmt(metrics["test"], "macro_f1"))
    return metrics


def _fmt(m: dict[str, Any] | None, key: str) -> str:
    return "-" if not m or m.get(key) is None else f"{m[key]:.4f}"


