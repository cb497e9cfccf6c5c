"""SigLIP two-tower checkpoints (incl. the fixed-resolution SigLIP 2 ones, model_type "siglip"):
either tower from the whole checkpoint (or a single-tower one).

* ``siglip-vision``: no class token; ``cls`` = ``pooler_output`` = the attention-pooling head over
  the patch tokens (SigLIP's image embedding); ``mean``/``tokens`` from the patch tokens.
* ``siglip-text``: texts are padded to ``max_length`` and the model attends to the padding, as SigLIP
  was trained (and its pooled state is the last position's); ``cls`` = ``pooler_output`` =
  ``head(last_hidden_state[:, -1])``; ``mean``/``tokens`` use only the real tokens.

SigLIP has no separate projection: its joint-space embeddings are the pooled outputs, so no ``proj``.
NaFlex SigLIP 2 checkpoints (model_type "siglip2": variable patch counts) are not supported.
"""

from __future__ import annotations

import torch
from mmcache.extract.adapters.base import ImageAdapter, TextAdapter, auto_load, register_encoder


def _load_tower(source: str, config, keep: str, **kw):
    from transformers import AutoModel

    net = auto_load(AutoModel, source, config=config, **kw)
    drop = {"text_model": "vision_model", "vision_model": "text_model"}[keep]
    if hasattr(net, drop):
        setattr(net, drop, torch.nn.Identity())
    return getattr(net, keep, net)


@register_encoder
class SiglipVision(ImageAdapter):
    name = "siglip-vision"
    description = "SigLIP vision tower; cls = the attention-pooling head's output"
    model_types = ("siglip", "siglip_vision_model")
    cls_is_pooled = True
    pooling = {
        "cls": "pooler_output of the SigLIP vision tower: its multihead attention-pooling head (the image embedding)",
        "mean": "mean of the patch tokens of last_hidden_state (post-layernorm), before patch_pool",
        "tokens": "patch tokens of last_hidden_state in row-major (gh, gw) grid order, avg-pooled by patch_pool",
    }

    def prefix_tokens(self, config) -> int:
        return 0

    def load_model(self, source, config, **kw):
        return _load_tower(source, config, "vision_model", **kw)


@register_encoder
class SiglipText(TextAdapter):
    name = "siglip-text"
    description = "SigLIP text tower; padded to max_length as trained; cls = the pooled last state"
    model_types = ("siglip", "siglip_text_model")
    cls_is_pooled = True
    fixed_length = True
    pass_mask = False
    padding_note = "right to max_length, attended by the model as trained; token states at mask False stored as 0"
    pooling = {
        "cls": "pooler_output of the SigLIP text tower: head(last_hidden_state[:, -1]) with texts padded to max_length",
        "mean": "mean of last_hidden_state over the real tokens (padding excluded)",
        "tokens": "last_hidden_state of the real tokens; mask True = real token",
    }

    def load_model(self, source, config, **kw):
        return _load_tower(source, config, "text_model", **kw)
