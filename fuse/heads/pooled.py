"""Pooled heads: text-only and image-only baselines and Basic (concatenation) fusion over masked means."""

from __future__ import annotations

import torch
from mmcache.fuse.heads.base import FusionHead, classifier, masked_mean
from mmcache.fuse.heads.registry import register_head

# --------------------------------------------------------------------------------------
# vector heads: pool first, then an MLP (``layers`` and ``heads`` are unused)
# --------------------------------------------------------------------------------------


class PooledHead(FusionHead):
    """Masked-mean pool each used modality, concat in (text, image) order, MLP classifier."""

    def __init__(self, **args):
        super().__init__(**args)
        in_dim = args["dim"] * len(self.uses)
        self.classifier = classifier(in_dim, args["dim"], args["num_classes"], args["dropout"])

    def _forward(self, text, text_mask, image, image_mask):
        pooled = [masked_mean(x, m) for x, m in ((text, text_mask), (image, image_mask)) if x is not None]
        return self.classifier(torch.cat(pooled, dim=-1)), {}


@register_head("text_only")
class TextOnlyHead(PooledHead):
    """Text baseline: masked-mean of projected text tokens (B, D) -> MLP -> (B, C)."""

    uses = frozenset({"text"})


@register_head("image_only")
class ImageOnlyHead(PooledHead):
    """Image baseline: masked-mean of projected image tokens (B, D) -> MLP -> (B, C)."""

    uses = frozenset({"image"})


@register_head("basic")
class BasicFusionHead(PooledHead):
    """Late fusion (the paper's "basic"): concat of pooled text and image, (B, 2D) -> MLP."""

    uses = frozenset({"text", "image"})


