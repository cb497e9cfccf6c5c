"""The encoder family registry (timm-style): ``register_encoder`` / ``list_encoders`` /
``create_encoder``. One module per family; importing this package imports (and so registers) every
module in it, and the first registry use loads the ``mmcache.encoders`` plugins.

>>> from mmcache.extract.adapters import list_encoders, create_encoder
>>> list_encoders("image")
['clip-vision', 'cnn', 'dinov2', 'siglip-vision', 'swin', 'vit']
>>> enc = create_encoder("image", "openai/clip-vit-base-patch32")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import pkgutil

from mmcache.extract.adapters.base import (
    EncoderAdapter,
    ImageAdapter,
    TextAdapter,
    UnknownFamilyError,
    find_adapter,
    get_adapter,
    list_encoders,
    parse_layer,
    register_encoder,
    select_layer,
)

# Every module here but base holds families that register themselves on import: found, not listed, so a
# new family is one new module. (Plugins come through the mmcache.encoders entry points, see base.)
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["EncoderAdapter", "ImageAdapter", "TextAdapter", "UnknownFamilyError", "create_encoder", "find_adapter",
           "get_adapter", "list_encoders", "parse_layer", "register_encoder", "select_layer"]


def create_encoder(modality: str, model: str, **kwargs):
    """Load ``model`` (hub id or local folder) as a ``modality`` encoder through the adapter that
    recognises its config: :func:`extract.encoders.load_text_encoder` / ``load_image_encoder``."""
    from mmcache.extract.encoders import load_image_encoder, load_text_encoder

    if modality == "text":
        return load_text_encoder(model, **kwargs)
    if modality == "image":
        return load_image_encoder(model, **kwargs)
    raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
