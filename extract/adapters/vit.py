"""ViT-style vision backbones whose ``cls`` is the class token of the last hidden states.

* ``dinov2``: DINOv2, with or without register tokens (registers are not patches: left out of
  ``mean`` and ``tokens``).
* ``vit``: ViT, DeiT (class + distillation token), and other plain ViTs.
"""

from __future__ import annotations

from typing import ClassVar

from mmcache.extract.adapters.base import ImageAdapter, register_encoder

VIT_POOLING = {
    "cls": "last_hidden_state[:, 0] -- the CLS token (final layernorm applied by the model)",
    "mean": "mean of the patch tokens (CLS, distillation and register tokens excluded), before patch_pool",
    "tokens": "patch tokens in row-major (gh, gw) grid order, avg-pooled kernel=stride=patch_pool, ceil_mode",
}


@register_encoder
class Dinov2Image(ImageAdapter):
    name = "dinov2"
    description = "DINOv2 (+registers); cls = the CLS token after the final layernorm"
    model_types = ("dinov2", "dinov2_with_registers")
    pooling = VIT_POOLING


@register_encoder
class VitImage(ImageAdapter):
    name = "vit"
    description = "ViT / DeiT; cls = the CLS token after the final layernorm"
    model_types = ("vit", "deit", "vit_msn")
    pooling = VIT_POOLING
    _extra: ClassVar[dict[str, int]] = {"deit": 1}  # distillation token after CLS

    def prefix_tokens(self, config) -> int:
        return super().prefix_tokens(config) + self._extra.get(config.model_type, 0)
