"""Swin Transformer (hierarchical vision backbone): ``swin``.

Swin has no class token and no single patch size for its output: the image is cut into
``patch_size`` patches, then every stage after the first merges 2x2 neighbouring patches (odd sides
padded first), so the final grid is ``ceil(input / patch_size)`` halved (rounding up) once per merge,
input / 32 for the usual patch 4 and four stages. ``last_hidden_state`` is that grid row-major
(after the final layernorm); ``pooler_output`` its average. The stages differ in width, so only the last
layer is offered.
"""

from __future__ import annotations

import math

from mmcache.extract.adapters.base import ImageAdapter, check_grid, patch_size, register_encoder

from mmcache.errors import BadInputError

SWIN_POOLING = {
    "cls": "pooler_output: average of the final stage's tokens (Swin has no class token); same as mean",
    "mean": "mean of the final stage's tokens of last_hidden_state (final layernorm applied)",
    "tokens": "final stage tokens in row-major (gh, gw) grid order (input / patch_size / 2 per merge), "
              "avg-pooled kernel=stride=patch_pool, ceil_mode",
}


@register_encoder
class SwinImage(ImageAdapter):
    name = "swin"
    description = "Swin Transformer; cls = mean = average of the final stage's tokens"
    model_types = ("swin",)
    pooling = SWIN_POOLING
    cls_is_pooled = True
    supports_layers = False

    def prefix_tokens(self, config) -> int:
        return 0

    def grid(self, config, hidden, input_hw):
        """(1, gh*gw, D) tokens of the last stage: ``patch_size`` patches, then one 2x2 merge per
        stage after the first (``len(config.depths) - 1``), each rounding an odd side up."""
        if hidden.ndim != 3:
            raise BadInputError(f"expected a (B, T, D) token sequence, got {tuple(hidden.shape)}")
        ph, pw = patch_size(config) or (4, 4)
        gh, gw = math.ceil(input_hw[0] / ph), math.ceil(input_hw[1] / pw)
        for _ in range(len(getattr(config, "depths", ())) - 1):
            gh, gw = math.ceil(gh / 2), math.ceil(gw / 2)
        check_grid(hidden, 0, (gh, gw))
        return 0, (gh, gw), int(hidden.shape[2])
