"""Convolutional backbones: ``last_hidden_state`` is a (B, C, h, w) feature map, ``pooler_output`` its
global average. Per-layer choice is not offered (stages differ in width)."""

from __future__ import annotations

from mmcache.extract.adapters.base import ImageAdapter, register_encoder

from mmcache.errors import BadInputError

CNN_POOLING = {
    "cls": "global average pool of the final feature map (pooler_output flattened); same as mean",
    "mean": "global average pool of the final feature map (pooler_output flattened)",
    "tokens": "final (C, h, w) feature map avg-pooled kernel=stride=patch_pool (ceil_mode), flattened row-major to (h*w, C)",
}


@register_encoder
class CnnImage(ImageAdapter):
    name = "cnn"
    description = "ResNet / ConvNeXt(V2) / RegNet / BiT; cls = mean = global average pool"
    model_types = ("resnet", "convnext", "convnextv2", "regnet", "bit")
    pooling = CNN_POOLING
    kind = "cnn"
    supports_layers = False

    def prefix_tokens(self, config) -> int:
        return 0

    def grid(self, config, hidden, input_hw):
        """A (1, C, h, w) feature map: no prefix tokens, grid (h, w), width C."""
        if hidden.ndim != 4:
            raise BadInputError(f"expected a (B, C, h, w) feature map, got {tuple(hidden.shape)}")
        return 0, (int(hidden.shape[2]), int(hidden.shape[3])), int(hidden.shape[1])
