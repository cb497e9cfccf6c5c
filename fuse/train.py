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
machine give identical numbers alone, in a stack, or resumed. Streamed features (over ``max_memory``) are
trained in an order set by ``streamed``, ``shuffle_buffer`` and ``stream_seed``; the first two are written
resolved into config.json, so the free memory that chose them is not part of the numbers
(:mod:`fuse.stream`). Mixed precision (bf16 autocast) is used on CUDA only.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mmcache.fuse import tracking
from mmcache.fuse.config import TrainConfig, load_run_config
from mmcache.fuse.data import FusionData
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
    count_parameters,
    dropout_generator,
    set_dropout_generators,
)
from mmcache.fuse.runs import (
    RunFolder,
    detach_run_log,
    mark_unfinished,
)
from mmcache.fuse.session import finish_run, open_run
from mmcache.fuse.stack import can_stack, fit_members
from mmcache.fuse.stream import epoch_batches
from mmcache.fuse.targets import class_weights, score_targets, target_loss

from mmcache.errors import Interrupted, PipelineError
from mmcache.progress import progress as reporter

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "load_run_config", "train"]


# --------------------------------------------------------------------------------------------- results

@dataclass
class TrainResult:
    """What :func:`train` returns; the same numbers are in the run folder."""

    run_dir: Path
    config: TrainConfig  # resolved
    metrics: dict[str, Any]  # metrics.json
    history: list[dict[str, Any]]



# --------------------------------------------------------------------------------------------- train

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
        tracking.close_run(state.get("run_dir"))  # interrupted or failed: the loggers keep what they got
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
        stream_gen = torch.Generator().manual_seed(config.stream_seed)  # used when the features are streamed
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
            loss_sum = torch.zeros((), device=device)
            with epoch_batches(data, train_rows, config.batch_size, [shuffle], stream_gen, epoch,
                               config.stream_seed) as batches:
                for rows_m, resident in batches:
                    rows = rows_m[0]
                    with autocast(device, config.amp):
                        logits = model(*data.batch(rows, resident))
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
            tracking.log_epoch(run_dir, epoch, row)
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


