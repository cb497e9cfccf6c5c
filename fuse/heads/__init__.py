"""Fusion heads: small models trained on cached BERT / DINOv2 features.

One family per file (``pooled``, ``self_attention``, ``dual_attention``), found by the registry
(:mod:`.registry`) on first use; the shared layers are in :mod:`.base`. A timm-style registry: ``@register_head("name")`` on a :class:`FusionHead` subclass, then
``create_head(name, text_dim=..., image_dim=..., num_classes=...)``, ``list_heads()``, and
``head_uses(name)`` so the trainer only loads the modalities a head reads.

Every head has the same forward signature (shapes use B=batch, Lt/Li=text/image tokens,
Dt/Di=feature widths from the cache, D=``dim``, C=``num_classes``, H=``heads``)::

    forward(text, text_mask, image, image_mask, return_attention=False)
        text:       (B, Lt, Dt) float32   or None if the head does not use text
        text_mask:  (B, Lt) bool, True = real token (None = all real)
        image:      (B, Li, Di) float32   or None if the head does not use images
        image_mask: (B, Li) bool, True = real token (None = all real)
        -> logits (B, C) float32, or (logits, attn: dict[str, (B, H, Lq, Lk) float32])

Vector features (CLS / mean) come in as sequences of length 1 with all-True masks, so one
code path serves both cached feature kinds.

Mask convention, everywhere: boolean, True = real token. A row whose mask is all False is a
missing sample for that modality; heads must still return finite logits for it (see
``_masked_mean`` and ``Attention``). Padded positions are zeroed on entry, so garbage
there (even NaN/inf) can never leak into a prediction or a gradient.
"""

from mmcache.fuse.heads.base import (
    Attention,
    FusionHead,
    RunDropout,
    dropout_generator,
    masked_mean,
    set_dropout_generators,
)
from mmcache.fuse.heads.dual_attention import DualAttentionHead
from mmcache.fuse.heads.pooled import BasicFusionHead, ImageOnlyHead, TextOnlyHead
from mmcache.fuse.heads.registry import (
    count_parameters,
    create_head,
    get_head,
    head_uses,
    list_heads,
    register_head,
    unregister_head,
)
from mmcache.fuse.heads.self_attention import SelfAttentionHead

__all__ = ["Attention", "BasicFusionHead", "DualAttentionHead", "FusionHead", "ImageOnlyHead", "RunDropout",
           "SelfAttentionHead", "TextOnlyHead", "count_parameters", "create_head", "dropout_generator", "get_head",
           "head_uses", "list_heads", "masked_mean", "register_head", "set_dropout_generators", "unregister_head"]
