"""Frozen encoders for stage one: a text encoder and an image encoder of any registered family.

Both wrap Hugging Face checkpoints (a hub id or a local folder written by ``save_pretrained``), loaded
with ``trust_remote_code=False``, in eval mode, float32 weights, and return CPU float32 features:

* text  -> ``cls`` (B, D), ``mean`` (B, D), ``tokens`` (B, L, D), ``mask`` (B, L) bool
* image -> ``cls`` (B, D), ``mean`` (B, D), ``tokens`` (B, T, D), ``mask`` (B, T) bool
* both, when the checkpoint has a joint-space projection (CLIP) -> ``proj`` (B, P)

Mask convention everywhere: boolean, True = real token.

What differs between families (which class loads the checkpoint, what ``cls`` is, leading non-patch
tokens, padding) lives in the adapters of :mod:`extract.adapters`, recognised by ``config.model_type``;
the text and image encoders are :mod:`extract.text_encoder` and :mod:`extract.image_encoder`, on the shared
:mod:`extract.runtime` (precision, device copies, layer choice) and :mod:`extract.hub` (finding a
checkpoint); this module loads an encoder from what a cache recorded (:class:`EncoderSpec`).

This module imports torch and transformers; :mod:`extract` itself stays import-light.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mmcache.extract.adapters import get_adapter
from mmcache.extract.hub import hub_reachable, looks_like_path
from mmcache.extract.identity import decode_mode, encoder_config
from mmcache.extract.image_encoder import ImageEncoder, ImagePreprocessor, image_parts, load_image_encoder
from mmcache.extract.runtime import PRECISIONS, resolve_precision
from mmcache.extract.text_encoder import TextEncoder, load_text_encoder, text_parts

from mmcache import cache as cf
from mmcache.cache.encoder import EncoderSpec, readable_name
from mmcache.cache.export import imported_encoder_error
from mmcache.common import resolve_device
from mmcache.errors import BadInputError, ModelLoadError

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "ImageEncoder", "ImagePreprocessor", "TextEncoder", "create_encoder", "hub_reachable", "load_encoder",
           "load_encoder_from_provenance", "load_image_encoder", "load_text_encoder", "load_tokenizer", "readable_name",
           "resolve_device", "resolve_precision", "validate_encoder"]


# --------------------------------------------------------------------------------------------------
# before any work; rebuilding from a cache


_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json")


def validate_encoder(modality: str, model: str, revision: str | None = None) -> str:
    """Check that ``model`` is found, of a known family of ``modality``, and its tokenizer / image
    processor loads, without reading the weights (seconds, not the model's load time). Returns the
    family name; raises as :func:`load_text_encoder` / :func:`load_image_encoder` would."""
    model = str(model)
    parts = text_parts(model, revision) if modality == "text" else image_parts(model, revision)
    if os.path.isdir(model) and not any(next(Path(model).glob(p), None) for p in _WEIGHTS):
        raise ModelLoadError(f"could not load {modality} model {model!r}: the folder has no weights "
                             "(model.safetensors or pytorch_model.bin)")
    return parts[1].name


def load_encoder(spec: EncoderSpec, *, device: str = "cpu", precision: str | None = None):
    """Load the encoder ``spec`` describes, asked or recorded: from :attr:`~EncoderSpec.source` at
    :attr:`~EncoderSpec.load_revision`, with its layer, name and max length (text) / patch pool (image).
    ``precision`` defaults to the spec's (fp32 when it has none)."""
    if not spec.source:
        raise BadInputError(f"the {spec.modality} provenance names no model (model_id / resolved_path)")
    kw: dict[str, Any] = dict(device=device, precision=precision or spec.precision or "fp32",
                              revision=spec.load_revision, layer=spec.layer or "last", name=spec.name or None)
    if spec.modality == "text":
        return load_text_encoder(spec.source, max_length=int(spec.max_length or 128), **kw)
    return load_image_encoder(spec.source, patch_pool=int(spec.patch_pool or 1), **kw)


def load_tokenizer(spec: EncoderSpec):
    """The tokenizer of a text encoder ``spec`` (``AutoTokenizer`` from :attr:`~EncoderSpec.source` at
    :attr:`~EncoderSpec.load_revision`, the same rule as :func:`load_encoder`; never remote code).
    Raises what transformers raises when it cannot be loaded."""
    from transformers import AutoTokenizer

    if not spec.source:
        raise BadInputError("the text provenance names no model (model_id / resolved_path)")
    local = os.path.isdir(spec.source)
    if not local and looks_like_path(spec.source):
        raise ModelLoadError(f"could not load the tokenizer {spec.source!r}: no such folder")
    # Offline (or the hub unreachable): never wait on network retries for a hub id, as load_config does.
    return AutoTokenizer.from_pretrained(spec.source, revision=spec.load_revision, trust_remote_code=False,
                                         local_files_only=local or not hub_reachable())


def load_encoder_from_provenance(modality: str | EncoderSpec, provenance: dict | None = None, *,
                                 config: dict | None = None, device: str = "cpu", precision: str | None = None):
    """Rebuild the exact encoder a feature file was made with, from its recorded ``provenance`` (and
    ``config``, to verify: :func:`mmcache.cache.encoder_difference`); or pass an
    :class:`~mmcache.cache.EncoderSpec` (:meth:`~mmcache.cache.EncoderSpec.from_provenance`) instead of
    ``modality, provenance``.

    The model is loaded as :func:`load_encoder` does (the recorded folder while it exists, else the
    model as given, at the recorded hub commit) with the recorded max length / patch pool / layer /
    name. With ``config`` (the file's ``config`` attribute), the rebuilt encoder's identity must match
    it: weights hash (local folders), hub id + commit, tokenizer / processor settings, pooling, layer;
    otherwise :class:`BadInputError` naming what differs. ``precision`` defaults to the recorded one on
    CUDA (fp32 on CPU). :func:`load_encoder_for_cache` does this for a file path.
    """


    spec = modality if isinstance(modality, EncoderSpec) else EncoderSpec.from_provenance(modality, provenance, config)
    if msg := imported_encoder_error(spec.modality, spec.to_provenance()):  # `cache import`: no encoder to load
        raise BadInputError(msg)
    enc = load_encoder(spec, device=device, precision=precision)
    if spec.family and spec.family != enc.family:
        get_adapter(spec.family)  # an unknown recorded family is its own error
        raise BadInputError(f"{spec.source!r} now loads as family {enc.family!r}; the cache was made with "
                            f"{spec.family!r}")
    if config is not None:
        decode = decode_mode(config.get("decode")) or "full"  # the recorded policy: predict decodes the same way
        mine = encoder_config(enc, spec.modality, dtype=config.get("dtype", "float16"), revision=config.get("revision"),
                              decode=decode)
        diff = cf.encoder_difference(config, mine, storage=False)
        if diff:
            raise BadInputError(f"{spec.source!r} is not the {spec.modality} encoder the cache was made with: {diff}")
    return enc


def load_encoder_for_cache(path: str | os.PathLike, *, device: str = "cpu", precision: str | None = None):
    """:func:`load_encoder_from_provenance` for the feature file at ``path`` (its modality, provenance
    and config)."""

    with cf.FeatureFile(path) as ff:
        spec, conf = cf.EncoderSpec.from_provenance(ff.modality, ff.provenance, ff.config), ff.config
    return load_encoder_from_provenance(spec, config=conf, device=device, precision=precision)


def create_encoder(modality: str, model: str, **kwargs):
    """Load ``model`` (hub id or local folder) as a ``modality`` encoder through the adapter that
    recognises its config: :func:`load_text_encoder` / :func:`load_image_encoder`."""
    if modality == "text":
        return load_text_encoder(model, **kwargs)
    if modality == "image":
        return load_image_encoder(model, **kwargs)
    raise BadInputError(f"modality must be 'text' or 'image', got {modality!r}")
