"""Training and evaluation of fusion heads on cached features.

``train(config)`` loads what the head needs (:func:`fuse.data.load_data`), trains with AdamW,
linear warm-up then cosine decay, gradient clipping, optional label smoothing and class-balanced loss,
early-stops on validation macro-F1, restores the best-validation weights and scores the test split
ONCE with them. Every run writes a folder (see :func:`train`). ``train(config, data=loaded)`` reuses
tensors already in memory, so an ablation can run many heads/seeds in one process without re-reading
HDF5. ``evaluate(run_dir)`` rebuilds a saved head and scores it again, also on another dataset's cache
made with the same encoders and classes (cross-dataset evaluation).

Determinism: python/numpy/torch are seeded from ``config.seed``, deterministic algorithms are switched
on for the duration of a run, and shuffling uses its own ``torch.Generator``; the same config, seed
and machine give identical numbers. Mixed precision (bf16 autocast) is used on CUDA only.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmcache.extract import cache_format as cf
from mmcache.fuse.data import FEATURES, MODALITY_ORDER, FusionData, load_data
from mmcache.fuse.heads import FusionHead, count_parameters, create_head, head_uses, list_heads
from mmcache.fuse.runs import (
    FINISHED_MARKER,
    attach_run_log,
    check_run_name,
    detach_run_log,
    make_run_dir,
    mark_finished,
    mark_unfinished,
    read_json,
    read_split,
    require_finished,
    write_json,
    write_split,
)
from mmcache.fuse.runs import git_commit as _git_commit
from mmcache.fuse.runs import library_versions as _library_versions
from mmcache.fuse.targets import (
    TargetSet,
    check_trainable,
    class_weights,
    score_targets,
    target_loss,
    target_probs,
)
from torch import Tensor

from mmcache.common import atomic_write, resolve_device, small_model_threads
from mmcache.errors import BadInputError, Interrupted, PipelineError
from mmcache.progress import progress as reporter

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "TrainConfig", "TrainResult", "evaluate", "load_run_config", "resolve_device", "train"]



# --------------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """Everything that determines a run's numbers (plus where it reads and writes).

    ``modalities``: the modalities whose features are loaded and required (a sample missing one is
    dropped); None = the head's own. An ablation sets both so every head sees the same samples.
    ``text_cache`` / ``image_cache``: feature files (None = the only one of that modality in
    ``cache_dir/<dataset>/``). ``patience`` 0 and ``grad_clip`` 0 switch those off. ``threads``: CPU
    threads for the run (1 is often fastest for small heads on a busy machine, and float results can
    depend on it, so it is part of the config; None on a CPU =
    :func:`~mmcache.common.small_model_threads`, recorded in provenance.json).
    """

    head: str = "basic"
    dataset: str | None = None
    features: str = "cls"
    dim: int = 256
    layers: int = 1
    heads: int = 4
    dropout: float = 0.1
    head_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    class_balanced: bool = False
    patience: int = 5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int | None = None
    modalities: list[str] | None = None
    target: str | None = None  # a target or task of the dataset's index (None = its default); resolved in config.json
    text_cache: str | None = None
    image_cache: str | None = None
    cache_dir: str = "cache"
    runs_dir: str = "runs"
    run_name: str | None = None

    # -- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a JSON-like dict; unknown keys or wrong types raise :class:`BadInputError`."""
        if not isinstance(d, dict):
            raise BadInputError(f"a training config must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise BadInputError(f"unknown training config key(s): {', '.join(unknown)}; known: {', '.join(fields)}")
        defaults = cls()
        kw = {k: _coerce(k, v, getattr(defaults, k)) for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise BadInputError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                "expected a JSON training config") from None
        except (OSError, json.JSONDecodeError) as e:
            raise BadInputError(f"cannot read config file {path}: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`BadInputError` for a value no run can use."""
        if self.head not in list_heads():
            raise BadInputError(f"unknown fusion head {self.head!r}; known heads: {', '.join(list_heads())}")
        if self.features not in FEATURES:
            raise BadInputError(f"unknown features {self.features!r}; expected one of {', '.join(FEATURES)}")
        checks = [("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1),
                  ("eval_batch_size", self.eval_batch_size >= 1), ("lr", self.lr > 0),
                  ("weight_decay", self.weight_decay >= 0), ("warmup_frac", 0 <= self.warmup_frac < 1),
                  ("grad_clip", self.grad_clip >= 0), ("label_smoothing", 0 <= self.label_smoothing < 1),
                  ("patience", self.patience >= 0), ("threads", self.threads is None or self.threads >= 1)]
        for name, ok in checks:
            if not ok:
                raise BadInputError(f"invalid {name}: {getattr(self, name)!r}")
        if self.run_name is not None:
            check_run_name(self.run_name)
        if self.modalities is not None:
            bad = set(self.modalities) - set(MODALITY_ORDER)
            if bad or not self.modalities:
                raise BadInputError(f"modalities must be a non-empty subset of text, image; got {self.modalities}")
            missing = head_uses(self.head) - set(self.modalities)
            if missing:
                raise BadInputError(f"head {self.head!r} needs {', '.join(sorted(missing))}, not in modalities "
                                    f"{self.modalities}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check one config value's type against the field default (JSON has no int/float distinction)."""
    if value is None:
        if key in ("dataset", "modalities", "text_cache", "image_cache", "run_name", "threads", "target"):
            return None
        raise BadInputError(f"config key {key!r} may not be null")
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    elif key == "modalities":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif key == "threads":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str) or default is None:
        ok = isinstance(value, str)
    if not ok:
        raise BadInputError(f"config key {key!r}: wrong type {type(value).__name__} ({value!r})")
    return value


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a run saved."""
    return TrainConfig.from_json(Path(run_dir) / "config.json")


# --------------------------------------------------------------------------------------------- results

@dataclass
class TrainResult:
    """What :func:`train` returns; the same numbers are in the run folder."""

    run_dir: Path
    config: TrainConfig  # resolved
    metrics: dict[str, Any]  # metrics.json
    history: list[dict[str, Any]]



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


# --------------------------------------------------------------------------------------------- helpers

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _deterministic(device: torch.device, threads: int | None = None):
    """Deterministic kernels (and ``threads`` CPU threads) for the duration of a run; the process-wide
    settings are restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    threads_before = torch.get_num_threads()
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)
        torch.set_num_threads(threads_before)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel (CPU and CUDA) halves the per-step cost of these small heads, where the
    # optimizer's per-parameter Python loop is a large share of a step (bench: 2.2 -> 1.0 ms/step).
    try:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _build_head(config: TrainConfig, dims: dict[str, int | None], num_classes: int) -> FusionHead:
    """A registry head; for a multi-target run ``num_classes`` is the sum of the targets' class counts and the
    classifier's last linear layer is one linear classifier per target, stacked (see fuse.targets)."""
    uses = head_uses(config.head)
    return create_head(config.head, text_dim=dims["text_dim"] if "text" in uses else None,
                       image_dim=dims["image_dim"] if "image" in uses else None, num_classes=num_classes,
                       dim=config.dim, layers=config.layers, heads=config.heads, dropout=config.dropout,
                       **config.head_options)


@torch.inference_mode()
def predict(model: FusionHead, data: FusionData, rows: Tensor, batch_size: int = 256, amp: bool = True) -> np.ndarray:
    """Class probabilities of ``rows`` ((n,) int64 on the data's device): (n, C) float32 numpy; for a
    multi-target run (n, sum C), a softmax per target block (see fuse.targets)."""
    model.eval()
    sizes = data.target.sizes if data.target is not None else [data.num_classes]
    out = []
    for start in range(0, rows.numel(), batch_size):
        with _autocast(data.device, amp):
            logits = model(*data.batch(rows[start:start + batch_size]))
        out.append(target_probs(logits.float(), sizes).cpu())
    if not out:
        return np.zeros((0, sum(sizes)), dtype=np.float32)
    return torch.cat(out).numpy()


def _predictions_csv(ids: np.ndarray, labels: np.ndarray, probs: np.ndarray, target: TargetSet) -> str:
    """One target: ``id, true, predicted, p_<class>...``. A task: ``id`` then per target, in task order,
    ``<target>:true, <target>:predicted, <target>:p_<class>...`` (``true`` empty where the label is masked).
    labels (n, T) int64; probs (n, sum C)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    multi = target.multi
    head = ["id"]
    for m, classes in zip(target.members, target.classes, strict=True):
        pre = f"{m}:" if multi else ""
        head += [f"{pre}true", f"{pre}predicted", *(f"{pre}p_{c}" for c in classes)]
    w.writerow(head)
    offsets = np.cumsum([0, *target.sizes])
    for i, sid in enumerate(ids):
        row = [sid]
        for j, classes in enumerate(target.classes):
            block = probs[i, offsets[j]:offsets[j + 1]]
            y = int(labels[i, j])
            row += [classes[y] if y >= 0 else "", classes[int(block.argmax())], *(f"{v:.6f}" for v in block)]
        w.writerow(row)
    return buf.getvalue()


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
    caches = {}
    for m in MODALITY_ORDER:
        md = data.modality(m)
        if md is not None:
            caches[m] = {"model": md.model, **md.info}
    return {
        "dataset": data.dataset,
        "split": {k: data.split.get(k) for k in ("source", "fingerprint", "counts")},
        "index": {"path": str(data.index_path), "fingerprint": data.index_fingerprint,
                  "attrs": {k: v for k, v in data.index_attrs.items()}},
        "caches": caches,
        "data": data.summary(),
        "libraries": _library_versions(),
        "git_commit": _git_commit(),
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

    with _deterministic(device, threads):
        _seed_everything(config.seed)
        model = _build_head(config, data.dims(), target.num_outputs).to(device)
        n_params = count_parameters(model)
        optimizer = _adamw(model, config)
        steps_per_epoch = math.ceil(train_rows.numel() / config.batch_size)
        total = steps_per_epoch * config.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(total, round(config.warmup_frac * total)))
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
                with _autocast(device, config.amp):
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
            write_json(run_dir / "history.json", history)
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
    write_json(run_dir / "config.json", config.to_dict())
    threads = config.threads or (small_model_threads() if device.type == "cpu" else None)
    write_json(run_dir / "provenance.json", _provenance(data, device, threads))
    write_split(run_dir, data.split, data.split_ids)
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

    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = run_dir / f".model.safetensors.tmp{os.getpid()}"
    # One metadata key: safetensors writes several in hash order, which would make equal runs' files differ.
    save_file(tensors, str(tmp), metadata={"mmcache": json.dumps({"format": "mmcache-fusion-head", "head": config.head})})
    os.replace(tmp, run_dir / "model.safetensors")
    test_np = test_rows.cpu().numpy()
    atomic_write(run_dir / "predictions.csv",
                  _predictions_csv(data.ids[test_np], labels_np[test_np], split_probs["test"], target))
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
    mark_finished(run_dir, metrics)
    logger.info("run %s: best epoch %d, val macro-F1 %s, test macro-F1 %s", run_dir, best_epoch,
                _fmt(metrics["val"], "macro_f1"), _fmt(metrics["test"], "macro_f1"))
    return metrics


def _fmt(m: dict[str, Any] | None, key: str) -> str:
    return "-" if not m or m.get(key) is None else f"{m[key]:.4f}"


# --------------------------------------------------------------------------------------------- evaluate

def load_head(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FusionHead, TrainConfig, dict[str, Any]]:
    """Rebuild a finished run's head with its best weights: (model in eval mode, config, metrics.json)."""
    run_dir = require_finished(run_dir)
    config = load_run_config(run_dir)
    meta = json.loads((run_dir / FINISHED_MARKER).read_text(encoding="utf-8"))
    info = meta["model"]
    outputs = sum(len(c) for c in info["targets"].values()) if info.get("targets") else len(info["classes"])
    model = _build_head(config, {"text_dim": info.get("text_dim"), "image_dim": info.get("image_dim")}, outputs)
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
    with _deterministic(dev, config.threads):
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
        atomic_write(ppath, _predictions_csv(data.ids[rows_np], labels, probs, data.target))
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
