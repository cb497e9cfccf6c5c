"""CLIP two-tower checkpoints: either tower from the whole checkpoint (or a single-tower one).

* ``clip-text``: the text tower. ``cls`` = ``pooler_output`` = the final-layernormed state at the EOS
  position; ``proj`` = ``text_projection(pooler_output)`` (``text_embeds`` before normalisation).
* ``clip-vision``: the vision tower. ``cls`` = ``pooler_output`` = the post-layernorm class token;
  ``proj`` = ``visual_projection(pooler_output)`` (``image_embeds`` before normalisation).

The whole two-tower model is loaded (a tower alone would lose the top-level ``projection_dim``),
then the other tower is dropped to free its memory.
"""

from __future__ import annotations

import torch
from mmcache.extract.adapters.base import ImageAdapter, TextAdapter, auto_load, register_encoder


def _load_two_tower(source: str, config, keep: str, **kw):
    from transformers import AutoModel

    net = auto_load(AutoModel, source, config=config, **kw)
    drop = {"text_model": "vision_model", "vision_model": "text_model"}[keep]
    if hasattr(net, drop):
        setattr(net, drop, torch.nn.Identity())  # forward of the whole model is never called
    return net


@register_encoder
class ClipText(TextAdapter):
    name = "clip-text"
    description = "CLIP text tower; cls = pooled EOS state, proj = text_embeds"
    model_types = ("clip", "clip_text_model")
    cls_is_pooled = True
    has_proj = True
    pooling = {
        "cls": "pooler_output of the CLIP text tower: the final-layernormed state at the EOS position",
        "mean": "mean of last_hidden_state (final layernorm applied) over positions with attention_mask True",
        "tokens": "last_hidden_state, padded to the longest text in the batch; mask True = real token",
        "proj": "text_projection(pooler_output): text_embeds before L2 normalisation",
    }

    def load_model(self, source, config, **kw):
        if config.model_type != "clip":
            return super().load_model(source, config, **kw)
        return _load_two_tower(source, config, "text_model", **kw)

    def tower(self, net):
        return getattr(net, "text_model", net)

    def project(self, net, pooled):
        proj = getattr(net, "text_projection", None)
        return proj(pooled) if proj is not None else None


@register_encoder
class ClipVision(ImageAdapter):
    name = "clip-vision"
    description = "CLIP vision tower; cls = post-layernorm class token, proj = image_embeds"
    model_types = ("clip", "clip_vision_model")
    cls_is_pooled = True
    has_proj = True
    pooling = {
        "cls": "pooler_output of the CLIP vision tower: post_layernorm(class token)",
        "mean": "mean of the patch tokens of last_hidden_state (class token excluded), before patch_pool",
        "tokens": "patch tokens of last_hidden_state in row-major (gh, gw) grid order, avg-pooled by patch_pool",
        "proj": "visual_projection(pooler_output): image_embeds before L2 normalisation",
    }

    def load_model(self, source, config, **kw):
        if config.model_type != "clip":
            return super().load_model(source, config, **kw)
        return _load_two_tower(source, config, "vision_model", **kw)

    def tower(self, net):
        return getattr(net, "vision_model", net)

    def project(self, net, pooled):
        proj = getattr(net, "visual_projection", None)
        return proj(pooled) if proj is not None else None
