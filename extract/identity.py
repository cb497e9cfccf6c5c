"""What determines an encoder's outputs: the ``config`` stored with every feature file.

A feature file's config holds what its values depend on -- weights (sha256 of a local folder's weight
and vocabulary files; hub id + resolved commit for hub models), family-specific pooling, layer,
tokenizer / processor settings, max length, patch grid, storage dtype and compute precision. Its
fingerprint decides whether extraction may resume a file; the comparison that tolerates mere hints
(which folder path or revision name led to the same weights) is
:func:`mmcache.cache.encoder_difference`, shared with stage two.

Imports hashlib only: the encoder objects are passed in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mmcache import cache as cf

__all__ = ["encoder_config", "image_config", "model_identity", "text_config"]

DECODE_POLICY = "PIL full decode; RGB; alpha composited on white; first frame; no EXIF transpose"
# How images are decoded changes the pixels (draft decoding: mean |difference| ~1/255 on MVSA photos), so
# the policy is part of a file's identity. "full" keeps the string every older file recorded.
DECODE_POLICIES = {
    "full": DECODE_POLICY,
    "draft": "PIL decode, a JPEG at 1/2-1/8 scale (Image.draft) when the resize target is at most half the "
             "source; RGB; alpha composited on white; first frame; no EXIF transpose",
}


def decode_mode(policy: str | None) -> str | None:
    """``"full"`` / ``"draft"`` for a recorded decode policy string (None: unknown or not recorded)."""
    return next((mode for mode, text in DECODE_POLICIES.items() if text == policy), None)
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "tokenizer.json", "vocab.txt", "*.model")
_HASH_CACHE: dict[tuple, str] = {}


def model_identity(model: str) -> tuple[str, str | None]:
    """(identity, weights sha256): a local folder is identified by its resolved path and the hash of
    its weight and vocabulary files (so a rebuilt folder is never mistaken for the old one, and a copy
    of it is recognised); a hub id by itself (its commit hash goes into the config separately)."""
    p = Path(model)
    if not p.is_dir():
        return model, None
    files = sorted({f for pat in _WEIGHT_FILES for f in p.glob(pat) if f.is_file()})
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        _HASH_CACHE[key] = h.hexdigest()[:32]
    return str(p.resolve()), _HASH_CACHE[key]


def _model_config(enc, modality: str, dtype: str, revision: str | None) -> dict[str, Any]:
    """The part of a file's config both modalities share: which weights, computed and stored how.
    Keys a family or option adds (``layer``, ``proj_size``) appear only when not at their default, so
    the configs of files written before they existed stay the same."""
    ident, weights = model_identity(enc.model_id)
    prov = enc.provenance()
    conf = {
        "format_version": cf.FORMAT_VERSION, "modality": modality, "model": ident, "revision": revision,
        "commit_hash": prov.get("commit_hash"), "weights_sha256": weights, "class_name": prov["class_name"],
        "model_type": prov["model_type"], "hidden_size": enc.hidden_size, "dtype": dtype,
        "precision": enc.precision, "pooling": prov["pooling"],
    }
    if getattr(enc, "layer", "last") != "last":
        conf["layer"] = enc.layer
    if getattr(enc, "proj_size", None):
        conf["proj_size"] = enc.proj_size
    return conf


def text_config(enc, *, dtype: str, revision: str | None) -> dict[str, Any]:
    """What determines a text file's values: its identity must match to resume."""
    conf = {
        **_model_config(enc, "text", dtype, revision), "tokenizer_class": type(enc.tokenizer).__name__,
        "max_length": enc.max_length, "truncation": True, "padding": enc.adapter.padding_note,
    }
    return conf


def image_config(enc, *, dtype: str, revision: str | None, decode: str = "draft") -> dict[str, Any]:
    """What determines an image file's values: its identity must match to resume. ``decode``: a key of
    :data:`DECODE_POLICIES`."""
    return {
        **_model_config(enc, "image", dtype, revision), "kind": enc.kind,
        "input_hw": list(enc.input_hw), "raw_grid": list(enc.raw_grid), "grid": list(enc.grid),
        "num_prefix_tokens": enc.num_prefix_tokens, "patch_pool": enc.patch_pool,
        "processor": enc.preprocessor.settings(), "decode": DECODE_POLICIES[decode],
    }


_CONFIGS = {"text": text_config, "image": image_config}


def encoder_config(enc, modality: str, *, dtype: str, revision: str | None, decode: str = "draft") -> dict[str, Any]:
    """:func:`text_config` or :func:`image_config`, by ``modality`` (``decode``: images only)."""
    extra = {"decode": decode} if modality == "image" else {}
    return _CONFIGS[modality](enc, dtype=dtype, revision=revision, **extra)
