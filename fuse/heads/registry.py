"""The heads registry (timm-style): ``@register_head("name")`` on a :class:`FusionHead` subclass, then
``create_head``, ``list_heads``, ``get_head``, ``head_uses``. Every module of this package is a head
family and is imported on first use of the registry (plus ``mmcache.heads`` plugins), so adding a head
is one new file here (or in a plugin package)."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from typing import TYPE_CHECKING

from torch import nn

from mmcache.errors import BadInputError
from mmcache.plugins import load_plugins

if TYPE_CHECKING:
    from mmcache.fuse.heads.base import FusionHead

logger = logging.getLogger(__name__)

__all__ = ["count_parameters", "create_head", "get_head", "head_uses", "list_heads", "register_head",
           "unregister_head"]

_FAMILIES_LOADED = False


def _discover() -> None:
    """Import every head family module of this package once (each registers its heads), then plugins."""
    global _FAMILIES_LOADED
    if not _FAMILIES_LOADED:
        _FAMILIES_LOADED = True
        import mmcache.fuse.heads as pkg

        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name not in ("registry", "base"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
    load_plugins("mmcache.heads")


_HEADS: dict[str, type[FusionHead]] = {}

# Arguments every head constructor takes; anything else in create_head(**kw) must be a
# keyword the specific head declares, otherwise it is a user error (typo in a config).
_COMMON_ARGS = {"text_dim", "image_dim", "num_classes", "dim", "layers", "heads", "dropout"}


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


def register_head(name: str):
    """Class decorator: register a :class:`FusionHead` subclass under ``name``."""

    def wrap(cls: type[FusionHead]) -> type[FusionHead]:
        if name in _HEADS:
            # A programming error (two heads with one name), not user input.
            raise ValueError(f"fusion head {name!r} is already registered by {_HEADS[name].__name__}")
        if not cls.uses or not set(cls.uses) <= {"text", "image"}:
            raise ValueError(f"head {name!r}: uses must be a non-empty subset of {{'text', 'image'}}")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return wrap


def unregister_head(name: str) -> None:
    """Remove head ``name`` from the registry (a test's or a notebook's temporary head); unknown: no-op."""
    _HEADS.pop(name, None)


def list_heads() -> list[str]:
    """Names of all registered heads (built-in and ``mmcache.heads`` plugins), sorted."""
    _discover()
    return sorted(_HEADS)


def get_head(name: str) -> type[FusionHead]:
    """The class registered as ``name`` (for its hooks: ``uses``, ``explains``, ``stacked_overrides``)."""
    return _lookup(name)


def _lookup(name: str) -> type[FusionHead]:
    _discover()
    try:
        return _HEADS[name]
    except KeyError:
        raise BadInputError(
            f"unknown fusion head {name!r}; known heads: {', '.join(list_heads())}"
        ) from None


def head_uses(name: str) -> set[str]:
    """Modalities head ``name`` reads: ``{"text"}``, ``{"image"}`` or ``{"text", "image"}``."""
    return set(_lookup(name).uses)


def create_head(
    name: str,
    *,
    text_dim: int | None,
    image_dim: int | None,
    num_classes: int,
    dim: int = 256,
    layers: int = 1,
    heads: int = 4,
    dropout: float = 0.1,
    **kw,
) -> FusionHead:
    """Build head ``name``. ``text_dim`` / ``image_dim`` may be None for a modality it ignores.

    Raises :class:`BadInputError` for an unknown name, bad sizes, or an unknown keyword.
    """
    cls = _lookup(name)
    # Only named parameters count: a subclass's **args just forwards the common ones.
    named = {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    }
    unknown = set(kw) - (named - _COMMON_ARGS)
    if unknown:
        raise BadInputError(f"fusion head {name!r} does not take option(s): {', '.join(sorted(unknown))}")
    model = cls(
        text_dim=text_dim,
        image_dim=image_dim,
        num_classes=num_classes,
        dim=dim,
        layers=layers,
        heads=heads,
        dropout=dropout,
        **kw,
    )
    logger.debug("created fusion head %s with %d parameters", name, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


