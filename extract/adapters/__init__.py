"""The encoder family registry (timm-style): ``register_encoder`` / ``list_encoders`` / ``get_adapter``
(loading a model through its family is :func:`mmcache.extract.encoders.create_encoder`). One module per family; importing this package imports (and so registers) every
module in it, and the first registry use loads the ``mmcache.encoders`` plugins.

>>> from mmcache.extract.adapters import list_encoders
>>> from mmcache.extract.encoders import create_encoder
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

__all__ = ["EncoderAdapter", "ImageAdapter", "TextAdapter", "UnknownFamilyError", "find_adapter",
           "get_adapter", "list_encoders", "parse_layer", "register_encoder", "select_layer"]
