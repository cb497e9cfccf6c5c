"""The training engine shared by every trainer (train, the stacked trainer, the bench): seeding,
deterministic kernels, autocast, the optimizer, the learning-rate schedule, head building and batched
prediction. Public on purpose: :mod:`fuse.train`, :mod:`fuse.stack` and :mod:`bench.grid` import these
rather than each other's private helpers.

Mixed precision (bf16 autocast) is used on CUDA only.
"""

from __future__ import annotations

import contextlib
import math
import os
import random

import numpy as np
import torch
from mmcache.fuse.config import TrainConfig
from mmcache.fuse.data import FusionData
from mmcache.fuse.heads import FusionHead, create_head, head_uses
from mmcache.fuse.targets import target_probs
from torch import Tensor

__all__ = ["adamw", "autocast", "build_head", "deterministic", "lr_lambda", "predict", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(device: torch.device, threads: int | None = None):
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


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernel (CPU and CUDA) halves the per-step cost of these small heads, where the
    # optimizer's per-parameter Python loop is a large share of a step (bench: 2.2 -> 1.0 ms/step).
    try:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_head(config: TrainConfig, dims: dict[str, int | None], num_classes: int) -> FusionHead:
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
        with autocast(data.device, amp):
            logits = model(*data.batch(rows[start:start + batch_size]))
        out.append(target_probs(logits.float(), sizes).cpu())
    if not out:
        return np.zeros((0, sum(sizes)), dtype=np.float32)
    return torch.cat(out).numpy()

