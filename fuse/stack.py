"""Train several members of one config (seeds, learning rates, weight decays) as ONE stacked model.

A *stack* is a list of :class:`~mmcache.fuse.train.TrainConfig` that differ only in ``seed``, ``lr``,
``weight_decay`` and their run folder (:func:`stack_key` says which configs may share one). Every member:

* is initialised exactly as :func:`~mmcache.fuse.train.train` initialises it (seeded build of the head);
* draws its own data order from its own ``torch.Generator(seed)``, as ``train`` does;
* gets its own AdamW step (per-member lr, weight decay, warm-up + cosine schedule) and its own gradient
  clipping by its own gradient norm;
* early-stops on its own validation macro-F1 (a finished member leaves the stack, its best weights kept);
* writes its own run folder through :func:`~mmcache.fuse.session.open_run` /
  :func:`~mmcache.fuse.session.finish_run`: same files, same ``config.json``, so tables, reuse, resume,
  ``--shard`` and ``evaluate`` cannot tell a stacked run from a single one.

How: all members' parameters live in ONE flat leaf tensor ``(M, P)`` (member x parameter). A copy of the
head whose ``nn.Linear`` / ``nn.LayerNorm`` are replaced by stacked versions (weights ``(M, out, in)``,
batched matmuls) runs the head's own forward code on a batch of ``M * b`` rows laid out member-major:
member m's ``b`` samples are rows ``m*b .. (m+1)*b - 1``. Everything per sample (attention, masks, GELU,
pooling) runs once for all members; every Linear is one ``baddbmm``. The optimizer is a handful of
element-wise ops on ``(M, P)``, the per-member grad norm one reduction. (Measured on this 2-core CPU,
``torch.func.vmap`` over ``functional_call`` was 1.2-3x SLOWER than separate models, so it is not used.)

A run's numbers are a function of its config, data and seed alone, not of the stack it was trained in:
every member draws its init, batch order and dropout masks (:class:`~mmcache.fuse.heads.RunDropout`) from
its own seed, and on CPU every Linear runs one ``addmm`` per member (the kernel a plain Linear runs), so a
member is bit for bit the same alone, in a stack of any size and composition, or retrained after a resume.
:func:`fuse.train.train` trains a stackable head as a stack of one (:func:`fit_members`), so
``train-fusion --config`` reproduces an ablation run bit for bit (``tests/test_determinism.py``). On CUDA
the float32 Linear is one ``baddbmm`` for all members (one launch), whose sums may differ from a stack of
another size in the last bits (tolerance: probabilities within 1e-4, ``tests/test_stack.py``).

Heads whose parameters are not all inside Linear / LayerNorm modules say how to stack them with their
``stacked_overrides()`` hook (:class:`~fuse.heads.FusionHead`; self attention's fusion token and modality
embeddings have one); a head without one is reported by :func:`can_stack` and trained one model per run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mmcache.fuse import tracking
from mmcache.fuse.config import TrainConfig
from mmcache.fuse.data import FusionData
from mmcache.fuse.engine import autocast, build_head, deterministic, lr_lambda, seed_everything
from mmcache.fuse.heads import Attention, FusionHead, dropout_generator, set_dropout_generators
from mmcache.fuse.runs import RunFolder, attach_run_log, detach_run_log
from mmcache.fuse.session import finish_run, open_run
from mmcache.fuse.stacked_layers import StackedLayerNorm, StackedLinear, stacked_values
from mmcache.fuse.stream import epoch_batches
from mmcache.fuse.targets import class_weights, score_targets, target_loss, target_probs
from torch import Tensor, nn

from mmcache.errors import BadInputError, PipelineError

logger = logging.getLogger(__name__)

__all__ = ["STACK_AXES", "Fit", "MemberResult", "can_stack", "fit_members", "max_members", "member_bytes", "probe_step_seconds", "stack_key",
           "train_stack"]

# Config fields that may differ inside one stack (plus where the run goes).
STACK_AXES = ("seed", "lr", "weight_decay")
_NOT_KEY = STACK_AXES + ("run_name", "runs_dir")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as train() uses them


def stack_key(config: TrainConfig) -> str:
    """Configs with equal keys can be trained in one stack."""
    d = config.to_dict()
    for k in _NOT_KEY:
        d.pop(k, None)
    return repr(sorted(d.items()))


@dataclass
class MemberResult:
    """One member's outcome: ``metrics`` when it finished, ``error`` when it failed."""

    config: TrainConfig
    run_dir: Path | None
    metrics: dict[str, Any] | None
    error: str | None
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------- stacked modules

_SUPPORTED_LEAVES = (nn.Linear, nn.LayerNorm)


def _unsupported(model: FusionHead) -> list[str]:
    """Parameters the stacked conversion cannot handle (empty: the head can be stacked)."""
    adapted = bool(type(model).stacked_overrides())  # the head's own parameters are handled by its overrides
    bad = []
    for name, mod in model.named_modules():
        if isinstance(mod, _SUPPORTED_LEAVES) or not mod._parameters:
            continue
        if mod is model and adapted:
            continue
        bad += [f"{name}.{p}".lstrip(".") for p in mod._parameters]
    return bad


_CAN_STACK: dict[str, bool] = {}


def can_stack(config: TrainConfig) -> bool:
    """True when ``config.head`` can be trained in a stack (checked once per head on a tiny instance)."""
    if config.head not in _CAN_STACK:
        tiny = build_head(dataclasses.replace(config, dim=8, heads=2), {"text_dim": 4, "image_dim": 4}, 3)
        _CAN_STACK[config.head] = not _unsupported(tiny)
    return _CAN_STACK[config.head]


class _Stack:
    """The stacked model: parameters ``flat`` (M, P) and a head copy whose weights are leaf views of
    it, so the optimizer, clipping and early-stopping bookkeeping are a few ops on (M, P)."""

    def __init__(self, models: list[FusionHead]):
        first = models[0]
        self.names = [n for n, _ in first.named_parameters()]
        self.shapes = [p.shape for _, p in first.named_parameters()]
        self.sizes = [p.numel() for _, p in first.named_parameters()]
        self.module = self._convert(copy.deepcopy(first))
        self.param_bufs: list[tuple[nn.Module, str]] = []
        for name in self.names:
            owner, _, attr = name.rpartition(".")
            self.param_bufs.append((self.module.get_submodule(owner) if owner else self.module, attr))
        with torch.no_grad():
            self.set_flat(torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]))

    @staticmethod
    def _convert(model: FusionHead) -> FusionHead:
        if _unsupported(model):
            raise BadInputError(f"head {model.name!r} cannot be stacked (parameters {_unsupported(model)})")
        for name, mod in list(model.named_modules()):
            if isinstance(mod, (nn.Linear, nn.LayerNorm)):
                new = StackedLinear() if isinstance(mod, nn.Linear) else StackedLayerNorm(mod.eps)
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, attr, new)
            elif isinstance(mod, Attention):
                mod._values = types.MethodType(stacked_values, mod)
        for mod in model.modules():  # what is left (adapter heads' own parameters) becomes plain attributes
            for attr in list(mod._parameters):
                del mod._parameters[attr]
        for attr, fn in type(model).stacked_overrides().items():
            setattr(model, attr, types.MethodType(fn, model))
        return model

    @property
    def members(self) -> int:
        return self.flat.shape[0]

    def set_flat(self, flat: Tensor) -> None:
        """Use ``flat`` (M, P) as the parameters; binds the module's weights to leaf views of it."""
        self.flat = flat.detach().contiguous()
        self.grad = torch.zeros_like(self.flat)
        m, off = self.flat.shape[0], 0
        self.leaves, self.grad_views = [], []
        for (mod, attr), shape, n in zip(self.param_bufs, self.shapes, self.sizes, strict=True):
            leaf = self.flat[:, off:off + n].view(m, *shape).requires_grad_(True)
            mod.__dict__[attr] = leaf
            self.leaves.append(leaf)
            self.grad_views.append(self.grad[:, off:off + n].view(m, *shape))
            if isinstance(mod, StackedLinear):
                mod.__dict__[f"{attr}_grad"] = self.grad_views[-1]
            off += n

    def gradient(self, loss: Tensor) -> Tensor:
        """d loss / d flat in the (M, P) buffer ``grad``. Linear layers write theirs there directly; the
        few others are copied in. (``.backward()`` would allocate a buffer per parameter strided like its
        (M, P) view and copy into it, every step: on a CPU that costs more than the matmuls.)"""
        grads = torch.autograd.grad(loss, self.leaves, allow_unused=True)
        self.unused = [leaf for leaf, g in zip(self.leaves, grads, strict=True) if g is None]
        for view, g in zip(self.grad_views, grads, strict=True):
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
        return self.grad

    def keep(self, rows: list[int]) -> None:
        """Drop every member row not in ``rows`` (finished members leave the stack)."""
        self.set_flat(self.flat[torch.tensor(rows, device=self.flat.device)])

    def state_dict(self, row: Tensor) -> dict[str, Tensor]:
        """One member's weights from its (P,) row, keyed as the head's own state_dict."""
        out, off = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.sizes, strict=True):
            out[name] = row[off:off + n].view(shape).clone()
            off += n
        return out


# --------------------------------------------------------------------------------------------- memory

def member_bytes(config: TrainConfig, data: FusionData, num_params: int) -> int:
    """Rough bytes one member adds to a stack: parameters, gradient, Adam moments, best copy (5 x P x 4)
    plus the activations of one training batch (~24 tensors of batch x tokens x dim per layer, float32).
    An estimate to size stacks against free memory; the bench measures the real peak RSS."""
    tokens = sum(md.x.shape[1] for md in (data.text, data.image) if md is not None) + 1
    per_layer = 24 * config.batch_size * tokens * config.dim * 4
    return 5 * num_params * 4 + per_layer * (config.layers + 1)


def available_memory(device: torch.device) -> int:
    """Bytes free for a stack: ``torch.cuda.mem_get_info`` on CUDA, MemAvailable of /proc/meminfo on
    Linux (psutil is not a dependency), else 4 GiB."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError as e:  # not Linux, or /proc hidden: a conservative guess instead
        logger.debug("no /proc/meminfo (%s); assuming 4 GiB free", e)
    return 4 << 30


def max_members(config: TrainConfig, data: FusionData, fraction: float = 0.5) -> int:
    """How many members of ``config`` fit in ``fraction`` of the free memory (at least 1)."""
    model = build_head(config, data.dims(), data.target.num_outputs)
    per = member_bytes(config, data, sum(p.numel() for p in model.parameters()))
    return max(1, int(fraction * available_memory(data.device) // per))


# --------------------------------------------------------------------------------------------- training

def _check_stack(configs: list[TrainConfig]) -> None:
    if not configs:
        raise BadInputError("a stack needs at least one member")
    keys = {stack_key(c) for c in configs}
    if len(keys) > 1:
        raise BadInputError(f"configs of one stack may differ only in {', '.join(STACK_AXES)}")
    if not can_stack(configs[0]):
        raise BadInputError(f"head {configs[0].head!r} cannot be stacked; train it with train()")


def _adamw_step(flat: Tensor, g: Tensor, state: dict[str, Tensor], lr: list[float], wd: list[float],
                step: int) -> None:
    """torch's AdamW (non-amsgrad) on parameters ``flat`` (M, P) with gradients ``g``, each member its own
    ``lr`` and weight decay: torch's fused kernel (one pass over each member row's memory, as ``train()``'s
    fused AdamW), called once per distinct (lr, weight decay) -- once for a stack of seeds, which on a GPU
    is one launch instead of M -- or the same formula in plain ops on a device without that kernel."""
    b1, b2 = ADAM_BETAS
    groups: dict[tuple[float, float], list[int]] = {}
    for k, key in enumerate(zip(lr, wd, strict=True)):
        groups.setdefault(key, []).append(k)
    step_t = torch.full((), float(step), device=flat.device)  # a fill, not a host-to-device copy
    done = 0
    try:
        for (lr_k, wd_k), rows in groups.items():
            torch._fused_adamw_([flat[k] for k in rows], [g[k] for k in rows], [state["m"][k] for k in rows],
                                [state["v"][k] for k in rows], [], [step_t] * len(rows), lr=lr_k, beta1=b1,
                                beta2=b2, weight_decay=wd_k, eps=ADAM_EPS, amsgrad=False, maximize=False,
                                grad_scale=None, found_inf=None)
            done += 1
        return
    except (NotImplementedError, RuntimeError) as e:  # as train()'s _adamw: a device without the kernel
        if done:  # some members were already updated: not a missing kernel
            raise
        logger.debug("no fused AdamW on %s (%s): plain ops", flat.device, e)
    lr_t = torch.tensor(lr, dtype=flat.dtype, device=flat.device)[:, None]
    wd_t = torch.tensor(wd, dtype=flat.dtype, device=flat.device)[:, None]
    with torch.no_grad():
        flat.mul_(1 - lr_t * wd_t)
        state["m"].lerp_(g, 1 - b1)
        state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["v"].sqrt() / math.sqrt(1 - b2 ** step)).add_(ADAM_EPS)
        flat.sub_(state["m"] / denom * (lr_t / (1 - b1 ** step)))


def train_stack(configs: list[TrainConfig], data: FusionData | None = None, *, eval_rows: int = 4096,
                allow_no_val: bool = False) -> list[MemberResult]:
    """Train ``configs`` (one stack, see :func:`stack_key`) together; one run folder per member.

    ``data`` and ``allow_no_val`` as for :func:`~mmcache.fuse.train.train`. ``eval_rows``: at most this many
    samples (each times the members) per evaluation forward. A member whose loss becomes non-finite fails alone (its result carries the error,
    its folder has no metrics.json); the others go on. Returns the members' results in input order.
    """
    _check_stack(configs)
    t_start = time.perf_counter()

    opened, logs = [], []
    try:
        for c in configs:
            c, data, device, run_dir, threads = open_run(c, data, allow_no_val=allow_no_val)
            opened.append((c, run_dir))
            logs.append(attach_run_log(run_dir))  # each member's train.log: the stack's log lines
        return _train_opened(opened, data, device, threads, t_start, eval_rows)
    finally:
        for _, run_dir in opened:
            tracking.close_run(run_dir)  # members that failed or were interrupted (finished ones are closed)
        for handler in logs:
            detach_run_log(handler)


def _build_stack(configs: list[TrainConfig], data: FusionData, device: torch.device) -> _Stack:
    """Each member's head initialised from its own seed exactly as :func:`fuse.train.train` does, stacked."""
    models = []
    for c in configs:
        seed_everything(c.seed)
        models.append(build_head(c, data.dims(), data.target.num_outputs).to(device))
    return _Stack(models)


def _train_opened(opened: list[tuple[TrainConfig, Path]], data: FusionData, device: torch.device, threads: int | None,
                  t_start: float, eval_rows: int) -> list[MemberResult]:
    configs, run_dirs = [c for c, _ in opened], [d for _, d in opened]
    with deterministic(device, threads):
        stack, fit = fit_members(configs, run_dirs, data, eval_rows)
        errors = {i: f"PipelineError: {msg}" for i, msg in fit.errors.items()}
        return _finish_members(stack, configs, run_dirs, data, fit.best, fit.best_epoch, fit.histories, errors,
                               fit.done_at, t_start)


@dataclass
class Fit:
    """What :func:`fit_members` leaves: per member (input order) its best weights ``best`` (M, P) rows, best
    epoch, history, the error text of a member that failed, and when each member left the stack."""

    best: Tensor
    best_epoch: list[int]
    histories: list[list[dict[str, Any]]]
    errors: dict[int, str]
    done_at: dict[int, float]


def fit_members(configs: list[TrainConfig], run_dirs: list[Path], data: FusionData, eval_rows: int = 4096,
                histories: list[list[dict[str, Any]]] | None = None, on_step=None) -> tuple[_Stack, Fit]:
    """Build and train the stack of ``configs`` (opened runs, in ``run_dirs``; call inside
    :func:`~mmcache.fuse.engine.deterministic`). Also :func:`fuse.train.train`'s trainer for a stackable head,
    as a stack of one: every member draws its init, batch order and dropout masks from its own seed and is
    computed by per-member kernels on CPU, so its numbers are the same alone, in any stack, and resumed.
    ``histories``: lists to append the epochs' rows to (train's interrupt handling reads them);
    ``on_step(epoch)``: called after every optimizer step (a progress bar)."""
    stack = _build_stack(configs, data, data.device)
    return stack, _fit(stack, configs, run_dirs, data, eval_rows, histories, on_step)


def _fit(stack: _Stack, configs: list[TrainConfig], run_dirs: list[Path], data: FusionData, eval_rows: int,
         histories: list[list[dict[str, Any]]] | None, on_step) -> Fit:

    cfg, n_all, device = configs[0], len(configs), data.device
    train_rows, val_rows = data.split_rows["train"], data.split_rows["val"]
    n_train = train_rows.numel()
    val_labels = data.target_labels.cpu().numpy()[val_rows.cpu().numpy()]  # (n_val, T), < 0 = masked
    total = math.ceil(n_train / cfg.batch_size) * cfg.epochs
    schedule = lr_lambda(total, round(cfg.warmup_frac * total))
    weight = class_weights(data.target_labels[train_rows], data.target.sizes) if cfg.class_balanced else None
    gens = [torch.Generator().manual_seed(c.seed) for c in configs]  # batch order, as train() always drew it
    # Streamed features: one order for the whole stack, from the run's stream_seed (part of the stack key).
    stream_gen = torch.Generator().manual_seed(cfg.stream_seed) if data.stream is not None else None
    drop_gens = [dropout_generator(c.seed, device) for c in configs]
    lengths = _run_lengths(data)
    with torch.no_grad():
        stack.set_flat(stack.flat.to(device))
    state = {"m": torch.zeros_like(stack.flat), "v": torch.zeros_like(stack.flat)}
    fit = Fit(stack.flat.clone(), [0] * n_all, histories if histories is not None else [[] for _ in configs], {}, {})
    active = list(range(n_all))  # member ids, in stack row order
    best_f1, since = [-1.0] * n_all, [0] * n_all
    step = 0
    logger.info("training a stack of %d %s on %s (%s features): %d train samples, %s", n_all, cfg.head, data.dataset,
                cfg.features, n_train, device)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        stack.module.train()
        set_dropout_generators(stack.module, [drop_gens[i] for i in active])
        m = len(active)
        loss_sum = torch.zeros(m, device=device)
        lr_m, wd_m = [configs[i].lr for i in active], [configs[i].weight_decay for i in active]
        with epoch_batches(data, train_rows, cfg.batch_size, [gens[i] for i in active], stream_gen, epoch,
                           cfg.stream_seed) as batches:
            for rows, resident in batches:  # rows (M, b); resident: streamed features of rows[0] or None
                f = schedule(step)
                loss = _train_step(stack, data, rows, cfg, weight, state, [lr * f for lr in lr_m], wd_m, step + 1,
                                   lengths, resident)
                step += 1
                loss_sum += loss * rows.shape[1]
                if on_step is not None:
                    on_step(epoch)
        train_loss = (loss_sum / n_train).tolist()
        lr_now = [lr * schedule(step) for lr in lr_m]
        val_probs = _predict_stack(stack, data, val_rows, cfg, eval_rows) if val_rows.numel() else None
        seconds = time.perf_counter() - t0
        leaving = []
        for k, i in enumerate(active):
            if not math.isfinite(train_loss[k]):
                fit.errors[i] = f"training loss became {train_loss[k]} in epoch {epoch}; try a lower --lr"
                leaving.append(k)
                continue
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss[k]}
            improved = True
            if val_probs is not None:
                vm = score_targets(val_probs[k], val_labels, data.target)
                row.update(val_loss=vm["loss"], val_accuracy=vm["accuracy"], val_macro_f1=vm["macro_f1"],
                           val_weighted_f1=vm["weighted_f1"])
                if data.target.multi:
                    row["val_target_macro_f1"] = {t: v["macro_f1"] for t, v in vm["targets"].items()}
                improved = vm["macro_f1"] > best_f1[i]
            row.update(lr=lr_now[k], seconds=seconds / m)
            fit.histories[i].append(row)
            RunFolder(run_dirs[i]).write_history(fit.histories[i])
            tracking.log_epoch(run_dirs[i], epoch, row)
            if improved:
                best_f1[i], fit.best_epoch[i], since[i] = row.get("val_macro_f1", -1.0), epoch, 0
                fit.best[i] = stack.flat[k]
            else:
                since[i] += 1
            if (configs[i].patience and since[i] >= configs[i].patience) or epoch == cfg.epochs:
                leaving.append(k)
        for k in leaving:
            fit.done_at[active[k]] = time.perf_counter()
        if leaving:
            keep = [k for k in range(len(active)) if k not in leaving]
            active = [active[k] for k in keep]
            if not active:
                break
            idx = torch.tensor(keep, device=device)
            with torch.no_grad():
                stack.keep(keep)
            state = {k: v[idx] for k, v in state.items()}
    return fit


def _run_lengths(data: FusionData) -> dict[str, int]:
    """Token length each trimmed modality's training batches are cut to: the longest real length over the
    training split. ``FusionData.batch`` cuts to the batch's longest, which in a stack is the longest over
    every member's rows: the tensors' shapes, so dropout mask draws and reduction orders, would depend on
    the other members. A length fixed per run keeps most of the saving (caches pad to a maximum no sample
    of the split may reach)."""
    rows, out = data.split_rows["train"], {}
    for name, md in (("text", data.text), ("image", data.image)):
        if md is not None and md.trim:
            used = md.mask[rows].any(0)
            out[name] = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return out


def _train_batch(data: FusionData, rows: Tensor, lengths: dict[str, int] | None,
                 resident: dict[str, Tensor] | None = None) -> tuple:
    """``data.batch(rows)`` with token sequences cut to ``lengths`` (:func:`_run_lengths`) instead of the
    batch's own longest; ``lengths`` None: ``data.batch``. ``resident``: the features of ``rows``
    ({modality: (M*b, L, D)}, a streamed batch) instead of ``x[rows]``."""
    if lengths is None:
        return data.batch(rows, resident)
    out: list[Tensor | None] = []
    for name, md in (("text", data.text), ("image", data.image)):
        if md is None:
            out += [None, None]
            continue
        n = lengths.get(name, md.x.shape[1])
        x = md.x[rows, :n] if resident is None else resident[name][:, :n]
        out += [x.float().contiguous(), md.mask[rows, :n]]
    return tuple(out)


def _train_step(stack: _Stack, data: FusionData, rows: Tensor, cfg: TrainConfig, weight: list | None,
                state: dict[str, Tensor], lr: list[float], wd: list[float], step: int,
                lengths: dict[str, int] | None = None, resident: dict[str, Tensor] | None = None) -> Tensor:
    """One optimizer step of every member on its own batch ``rows`` (M, b); returns the losses (M,).
    ``lengths``: token lengths to cut to (:func:`_train_batch`). ``resident``: streamed features of the
    batch every member shares ({modality: (b, L, D)}; then every row of ``rows`` is the same)."""
    m, b = rows.shape
    if resident is not None and m > 1:  # member-major, as rows.reshape(-1)
        resident = {k: v.repeat(m, *([1] * (v.dim() - 1))) for k, v in resident.items()}
    with autocast(data.device, cfg.amp):
        logits = stack.module(*_train_batch(data, rows.reshape(-1), lengths, resident))
    loss = _member_losses(logits.float().view(m, b, -1), data.target_labels[rows], data.target.sizes, weight,
                          cfg.label_smoothing)
    grad = stack.gradient(loss.sum())
    if cfg.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_, per member
        norm = grad.norm(dim=1, keepdim=True)
        grad.mul_((cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0))
    # A parameter no output reached this step (dual attention's queries over a single key) has no
    # gradient in train(), where AdamW skips it: no weight decay either. Row-wise AdamW would decay it,
    # so it is put back. (Its Adam moments see a zero gradient and stay zero.)
    with torch.no_grad():
        untouched = [(leaf, leaf.clone()) for leaf in stack.unused]
        _adamw_step(stack.flat, grad, state, lr, wd, step)
        for leaf, before in untouched:
            leaf.copy_(before)
    return loss.detach()


def probe_step_seconds(configs: list[TrainConfig], data: FusionData, threads: int, steps: int = 3) -> float:
    """Seconds of one stacked training step of ``configs`` with ``threads`` CPU threads (after one warm-up
    step; nothing is written). The ablation scheduler's measurement for threads vs parallel stacks."""
    _check_stack(configs)
    cfg = configs[0]
    device = data.device
    with deterministic(device, threads):
        stack = _build_stack(configs, data, device)
        set_dropout_generators(stack.module, [dropout_generator(c.seed, device) for c in configs])
        state = {"m": torch.zeros_like(stack.flat), "v": torch.zeros_like(stack.flat)}
        lr, wd = [c.lr for c in configs], [c.weight_decay for c in configs]
        train_rows = data.split_rows["train"]
        gen = torch.Generator().manual_seed(0)
        lengths, times = _run_lengths(data), []
        for k in range(steps + 1):
            rows = torch.stack([train_rows[torch.randperm(train_rows.numel(), generator=gen)[:cfg.batch_size]
                                .to(device)] for _ in configs])
            t0 = time.perf_counter()
            _train_step(stack, data, rows, cfg, None, state, lr, wd, k + 1, lengths)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def _member_losses(logits: Tensor, labels: Tensor, sizes: list[int], weights: list[Tensor | None] | None,
                   smoothing: float) -> Tensor:
    """Each member's loss exactly as train() computes it (:func:`fuse.targets.target_loss`):
    logits (M, b, sum C), labels (M, b, T) -> (M,).

    One target: one cross-entropy over all M*b rows, reduced per member as ``cross_entropy``'s mean does
    (sum of per-sample losses over sum of the label weights), with no host sync (``target_loss`` checks
    for masked labels with one: on a GPU that is a stall per member per step); masked labels (< 0) get
    weight 0 here. Several targets: ``target_loss`` per member."""
    m, b, c = logits.shape
    if len(sizes) == 1:
        w = (weights or [None])[0]
        y = labels[..., 0].reshape(-1)
        real = y >= 0
        per = F.cross_entropy(logits.reshape(m * b, c), y.clamp(min=0), weight=w, reduction="none",
                              label_smoothing=smoothing)  # (M*b,) already times w[y]
        denom = (real.to(per.dtype) if w is None else w[y.clamp(min=0)] * real).view(m, b).sum(1)
        return (per * real).view(m, b).sum(1) / denom
    return torch.stack([target_loss(lg, y, sizes, weights, smoothing) for lg, y in zip(logits, labels, strict=True)])


@torch.inference_mode()
def _predict_stack(stack: _Stack, data: FusionData, rows: Tensor, cfg: TrainConfig,
                   eval_rows: int) -> list[np.ndarray]:
    """Every active member's class probabilities of ``rows``: M arrays (n, C) float32."""
    stack.module.eval()
    m = stack.members
    # Samples per forward, the same whatever the stack's size: a member's val numbers (and so its early
    # stopping) must not depend on how many members share its forward. Memory: M x chunk rows.
    chunk = max(1, min(cfg.eval_batch_size, eval_rows))
    out = []
    for start in range(0, rows.numel(), chunk):
        part = rows[start:start + chunk]
        batch = [None if t is None else t.repeat(m, *([1] * (t.dim() - 1))) for t in data.batch(part)]
        with autocast(data.device, cfg.amp):
            logits = stack.module(*batch)
        out.append(target_probs(logits.float(), data.target.sizes).view(m, part.numel(), -1).cpu())
    probs = torch.cat(out, dim=1).numpy() if out else np.zeros((m, 0, data.target.num_outputs), np.float32)
    stack.module.train()
    return list(probs)


def _finish_members(stack: _Stack, configs: list[TrainConfig], run_dirs: list[Path], data: FusionData, best: Tensor,
                    best_epoch: list[int], histories: list[list[dict[str, Any]]], errors: dict[int, str],
                    done_at: dict[int, float], t_start: float) -> list[MemberResult]:
    """Each finished member: a head of its own with its best weights, scored and written as train() does."""
    results = []
    wall = time.perf_counter() - t_start
    for i, (c, run_dir) in enumerate(zip(configs, run_dirs, strict=True)):
        if i in errors:
            results.append(MemberResult(c, run_dir, None, errors[i], histories[i]))
            continue
        model = build_head(c, data.dims(), data.target.num_outputs).to(data.device)
        model.load_state_dict(stack.state_dict(best[i]))
        share = (done_at.get(i, t_start + wall) - t_start) / len(configs)
        try:
            metrics = finish_run(run_dir, c, data, model, histories[i], best_epoch[i], time.perf_counter() - share,
                                 extra={"stack": {"members": len(configs), "wall_seconds": wall}})
        except (OSError, PipelineError) as e:
            results.append(MemberResult(c, run_dir, None, f"{type(e).__name__}: {e}", histories[i]))
            continue
        results.append(MemberResult(c, run_dir, metrics, None, histories[i]))
    return results
