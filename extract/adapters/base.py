"""What an encoder family adapter is, and the registry of them.

An adapter knows one family of checkpoints (recognised by ``config.model_type``): how to load the
network and its tokenizer / image processor (always ``trust_remote_code=False``), how to run it, and
what ``cls`` / ``mean`` / ``tokens`` / ``proj`` mean for it. :mod:`extract.encoders` does everything
that is the same for all families (devices, precision, padding, layer choice, storage); an image family's
patch-grid geometry is its :meth:`ImageAdapter.grid` hook.

Adding a family = one module in this package with a ``@register_encoder`` class (found by the package
without a list; an installed plugin registers through the ``mmcache.encoders`` entry-point group), plus
one tiny checkpoint builder entry in ``tests/test_adapters.py`` (see the README, "Add an encoder family").
"""

from __future__ import annotations

import logging
import math
import re
from typing import ClassVar

from mmcache.errors import BadInputError, ModelLoadError
from mmcache.plugins import load_plugins

log = logging.getLogger(__name__)

__all__ = ["EncoderAdapter", "ImageAdapter", "TextAdapter", "UnknownFamilyError", "find_adapter", "get_adapter",
           "list_encoders", "parse_layer", "register_encoder", "select_layer"]

_REGISTRY: dict[str, EncoderAdapter] = {}


class UnknownFamilyError(BadInputError):
    """A checkpoint whose ``model_type`` no registered adapter knows (exit 2)."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- layers

_LAYER = re.compile(r"^(last|-?\d+|mean-last-(\d+))$")


def parse_layer(spec: str | int | None) -> str:
    """Normalise a ``--text-layer`` / ``--image-layer`` value.

    ``"last"`` (default, None): the model's ``last_hidden_state`` exactly as returned (final norm
    included where the model applies one). ``"k"`` / ``"-k"``: ``hidden_states[k]`` (0 = embeddings,
    -1 = the last block's raw output, before any final norm). ``"mean-last-k"``: the mean of
    ``hidden_states[-k:]``.
    """
    s = "last" if spec is None else str(spec).strip().lower()
    m = _LAYER.match(s)
    if not m or (m.group(2) is not None and int(m.group(2)) < 1):
        raise BadInputError(f"layer {spec!r}: use 'last', an integer (negative = from the end) or 'mean-last-K'")
    return s if s == "last" or s.startswith("mean") else str(int(s))


def select_layer(out, layer: str):
    """The hidden states ``layer`` (from :func:`parse_layer`) names, from a model output that holds
    ``last_hidden_state`` and, for other layers, ``hidden_states``. (B, L, D) float32."""
    if layer == "last":
        return out.last_hidden_state.float()
    states = getattr(out, "hidden_states", None)
    if not states:
        raise BadInputError(f"layer {layer!r}: this model does not return per-layer hidden states")
    n = len(states)
    if layer.startswith("mean-last-"):
        k = int(layer.rsplit("-", 1)[1])
        if k > n:
            raise BadInputError(f"layer {layer!r}: the model has only {n} hidden states (embeddings + {n - 1} layers)")
        return sum(s.float() for s in states[-k:]) / k
    i = int(layer)
    if not -n <= i < n:
        raise BadInputError(f"layer {i}: the model has {n} hidden states (0 = embeddings .. {n - 1}, or -1 .. -{n})")
    return states[i].float()


# --------------------------------------------------------------------------------------------- adapters

class EncoderAdapter:
    """Base of every family. Subclasses set the class attributes and override the hooks they need.

    ``name``: the registry key (shown in errors and provenance). ``modality``: "text" or "image".
    ``model_types``: the ``config.model_type`` values this family loads. ``pooling``: what each stored
    array means (goes into the cache config; changing the text changes the config fingerprint).
    ``cls_is_pooled``: ``cls`` is the model's ``pooler_output`` (else the first token of the chosen
    hidden states). ``has_proj``: the checkpoint has a joint-space projection, stored as ``proj``.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    pooling: ClassVar[dict[str, str]] = {}
    cls_is_pooled: ClassVar[bool] = False
    has_proj: ClassVar[bool] = False
    supports_layers: ClassVar[bool] = True

    def recognises(self, config) -> bool:
        return getattr(config, "model_type", None) in self.model_types

    # -- loading
    def load_model(self, source: str, config, **kw):
        """The network, float32, eval mode. Default: ``AutoModel`` (sdpa attention where supported)."""
        from transformers import AutoModel

        return auto_load(AutoModel, source, config=config, **kw)

    def tower(self, net):
        """The module to call (a two-tower checkpoint's text or vision tower)."""
        return net

    def project(self, net, pooled):
        """(B, P) joint-space embedding from ``pooled`` (B, D), when :attr:`has_proj`."""
        return None


class TextAdapter(EncoderAdapter):
    """A text family. ``fixed_length``: pad every text to ``max_length`` (models trained that way and
    pooling at a fixed position); ``pass_mask``: give the model the attention mask (else it attends
    to padding too, as it was trained); ``first_token``: sequences must start with the tokenizer's
    cls / bos token (checked on load, since ``cls`` is that token's state)."""

    modality = "text"
    fixed_length: ClassVar[bool] = False
    pass_mask: ClassVar[bool] = True
    first_token: ClassVar[bool] = False
    padding_note: ClassVar[str] = "right; token states at mask False positions stored as 0"

    def load_tokenizer(self, source: str, **kw):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kw)
        except (OSError, ValueError, KeyError, ImportError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"could not load the tokenizer of text model {source!r}: {one_line(e)}") from e

    def check_tokenizer(self, tok, source: str) -> None:
        if not self.first_token:
            return
        probe = tok(["good"], return_tensors=None)["input_ids"][0]
        first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        if first is None or not probe or probe[0] != first:
            raise BadInputError(f"text model {source!r} does not start sequences with a [CLS] / <s> token, "
                                f"which the {self.name} family's cls feature is")

    def run(self, net, input_ids, attention_mask, hidden: bool):
        """Forward of the text tower; ``attention_mask`` (B, L) int64 or None."""
        kw = {"attention_mask": attention_mask} if attention_mask is not None else {}
        return self.tower(net)(input_ids=input_ids, output_hidden_states=hidden, **kw)


class ImageAdapter(EncoderAdapter):
    """An image family. ``kind``: "vit" (a token sequence: ``prefix_tokens`` leading non-patch tokens,
    then the patch grid row-major) or "cnn" (a (B, C, h, w) feature map)."""

    modality = "image"
    kind: ClassVar[str] = "vit"

    def prefix_tokens(self, config) -> int:
        """Leading non-patch tokens (CLS, distillation, registers) of ``last_hidden_state``."""
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)

    def load_processor(self, source: str, **kw):
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(source, trust_remote_code=False, **kw)
        except (OSError, ValueError, KeyError, ImportError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"could not load the image processor of image model {source!r}: "
                                 f"{one_line(e)}") from e

    def run(self, net, pixel_values, hidden: bool):
        return self.tower(net)(pixel_values=pixel_values, output_hidden_states=hidden)

    def grid(self, config, hidden, input_hw: tuple[int, int]) -> tuple[int, tuple[int, int], int]:
        """The layout of ``last_hidden_state`` of a dummy forward on an ``input_hw`` (H, W) image:
        ``(prefix tokens, raw grid (gh, gw), hidden size)``; :class:`BadInputError` (without the model's
        name: the caller adds it) when the output does not fit this family's geometry.

        Default, for a plain ViT: ``hidden`` (1, prefix + gh*gw, D) float32 with one patch per
        ``patch_size`` pixels (a square grid when the config has no patch size). A family with another
        geometry (a CNN's feature map, Swin's merged patches) overrides this in its own module."""
        if hidden.ndim != 3:
            raise BadInputError(f"expected a (B, T, D) token sequence, got {tuple(hidden.shape)}")
        prefix = self.prefix_tokens(getattr(config, "vision_config", None) or config)
        n_patches = int(hidden.shape[1]) - prefix
        ps = patch_size(config)
        if ps is not None:
            raw_grid = (input_hw[0] // ps[0], input_hw[1] // ps[1])
        else:
            side = math.isqrt(max(n_patches, 0))
            raw_grid = (side, side)
        check_grid(hidden, prefix, raw_grid)
        return prefix, raw_grid, int(hidden.shape[2])


def patch_size(config) -> tuple[int, int] | None:
    """(ph, pw) pixels per patch of a vision config (or a two-tower config's ``vision_config``)."""
    config = getattr(config, "vision_config", None) or config
    p = getattr(config, "patch_size", None)
    if isinstance(p, int):
        return p, p
    if isinstance(p, (list, tuple)) and len(p) == 2:
        return int(p[0]), int(p[1])
    return None


def check_grid(hidden, prefix: int, raw_grid: tuple[int, int]) -> None:
    """:class:`BadInputError` unless ``hidden`` (B, T, D) holds ``prefix`` tokens + the ``raw_grid`` patches."""
    if raw_grid[0] * raw_grid[1] != int(hidden.shape[1]) - prefix:
        raise BadInputError(f"returned {hidden.shape[1]} tokens, which do not form {prefix} leading token(s) + a "
                            f"{raw_grid[0]}x{raw_grid[1]} patch grid; unsupported backbone")


def auto_load(auto_cls, source: str, **kw):
    """``auto_cls.from_pretrained`` with sdpa attention where the architecture supports it, float32,
    eval mode; every failure is one :class:`ModelLoadError` line."""
    kw = {**kw, "trust_remote_code": False}
    try:
        try:
            net = auto_cls.from_pretrained(source, attn_implementation="sdpa", **kw)
        except (ValueError, ImportError, TypeError) as e:
            log.info("sdpa attention unavailable for %s (%s); using the default", source, one_line(e, 120))
            net = auto_cls.from_pretrained(source, **kw)
    except (OSError, ValueError, KeyError, ImportError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"could not load model {source!r}: {one_line(e)}") from e
    return net.float().eval()


# --------------------------------------------------------------------------------------------- registry

def register_encoder(cls: type[EncoderAdapter]) -> type[EncoderAdapter]:
    """Class decorator: add an adapter to the registry (its ``name`` must be new)."""
    if not cls.name or cls.modality not in ("text", "image") or not cls.model_types:
        raise ValueError(f"{cls.__name__}: an adapter needs a name, a modality and model_types")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"encoder family {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def list_encoders(modality: str | None = None) -> list[str]:
    """Registered family names (of one modality; built-in and ``mmcache.encoders`` plugins), sorted."""
    load_plugins("mmcache.encoders")
    return sorted(n for n, a in _REGISTRY.items() if modality in (None, a.modality))


def get_adapter(name: str) -> EncoderAdapter:
    load_plugins("mmcache.encoders")
    if name not in _REGISTRY:
        raise UnknownFamilyError(f"unknown encoder family {name!r}; known: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def _known(modality: str) -> str:
    return "; ".join(f"{n} ({', '.join(_REGISTRY[n].model_types)})" for n in list_encoders(modality))


def find_adapter(modality: str, config, source: str) -> EncoderAdapter:
    """The adapter of ``modality`` that recognises ``config``; :class:`BadInputError` for a checkpoint of
    the other modality, :class:`UnknownFamilyError` (listing the known families) for an unknown one."""
    mtype = getattr(config, "model_type", None)
    for name in list_encoders(modality):
        if _REGISTRY[name].recognises(config):
            return _REGISTRY[name]
    other = "image" if modality == "text" else "text"
    if any(_REGISTRY[n].recognises(config) for n in list_encoders(other)):
        raise BadInputError(f"{source!r} is a {mtype!r} {other} model, not a {modality} encoder; "
                            f"pass it as --{other}-model")
    raise UnknownFamilyError(
        f"{modality} model {source!r} is a {mtype!r} checkpoint, which no {modality} encoder adapter knows. "
        f"Known {modality} families: {_known(modality)}. To add one, write one module in "
        "extract/adapters/ with a @register_encoder class (docs/extending.md: 'Add an encoder family')")
