"""One typed record of an encoder across the stages: :class:`EncoderSpec`.

An encoder is *asked* for by the extract options (``--text-model``, ``--text-revision``, ``--text-layer``,
``--text-name`` and the image twins: :meth:`ExtractConfig.encoder <mmcache.extract.extraction.ExtractConfig.encoder>`)
and *recorded* in every feature file's ``provenance`` (and ``config``) after loading. Everything that
reads a recorded encoder goes through :meth:`EncoderSpec.from_provenance`, so the rules that pick
where to load it from (:attr:`~EncoderSpec.source`), at which revision (:attr:`~EncoderSpec.load_revision`)
and what to call it (:attr:`~EncoderSpec.display_name`) exist once.

Stdlib only (the cache contract never imports torch or transformers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcache.errors import BadInputError

__all__ = ["EncoderSpec", "readable_name"]

_MODALITIES = ("text", "image")

#: Spec field -> provenance key, for the provenance keys the spec owns (what ``_source_info`` and the
#: encoders' ``provenance()`` record about the encoder itself). Every other provenance key (library
#: versions, dataset, command, image layout, ...) is kept as it was in :attr:`EncoderSpec.extra`.
_OWNED = {
    "model": "model_id", "resolved_path": "resolved_path", "commit_hash": "commit_hash",
    "name_or_path": "name_or_path", "family": "family", "layer": "layer", "name": "name",
    "precision": "precision", "max_length": "max_length", "patch_pool": "patch_pool", "proj_size": "proj_size",
}
#: The per-modality size option: (spec field, ExtractConfig field).
_SIZE_OPTION = {"text": ("max_length", "text_max_length"), "image": ("patch_pool", "patch_pool")}

_MEANINGFUL = r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$"


def readable_name(model: str, name: str | None = None) -> str:
    """What files and tables call an encoder: ``name`` when given; a hub id itself; a local folder by its
    config's ``_name_or_path`` when that is meaningful, else by ``parent/folder`` (never just ``model``).

    ``_name_or_path`` is meaningful when it is a hub-style id (``name`` or ``owner/name``, not a path,
    not the folder's own name) and the folder is not a sentence-transformers export (whose config
    names the model it was fine-tuned *from*)."""
    if name:
        return name
    if not os.path.isdir(model):
        return model
    try:
        raw = json.loads(Path(model, "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        raw = None
    fine_tuned = os.path.isfile(os.path.join(model, "config_sentence_transformers.json"))
    if (isinstance(raw, str) and re.match(_MEANINGFUL, raw) and not os.path.isdir(raw) and not fine_tuned
            and raw != Path(model).resolve().name):
        return raw
    p = Path(model).resolve()
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


@dataclass(frozen=True)
class EncoderSpec:
    """One modality's encoder: what was asked and, for a recorded one, what loading it resolved to.

    Asked: ``modality``, ``model`` (as given: hub id or folder path), ``revision`` (branch / tag / commit
    asked for), ``layer``, ``name`` (``--text-name``; in a recorded spec the readable name the file was
    given), ``precision``, ``max_length`` (text) / ``patch_pool`` (image).
    Recorded: ``resolved_path`` (a local folder's absolute path), ``commit_hash`` (hub commit),
    ``name_or_path`` (the checkpoint config's ``_name_or_path``), ``family``, ``proj_size`` and, from the
    file's config, ``weights_sha256`` (a local folder's weights). Recorded values are kept as stored
    (None when a file predates the key); the accessors apply the defaults."""

    modality: str
    model: str | None
    revision: str | None = None
    layer: str | None = "last"
    name: str | None = None
    precision: str | None = None
    max_length: int | None = None
    patch_pool: int | None = None
    resolved_path: str | None = None
    commit_hash: str | None = None
    name_or_path: str | None = None
    family: str | None = None
    proj_size: int | None = None
    weights_sha256: str | None = None
    #: provenance keys the spec does not own, unchanged (so :meth:`to_provenance` gives back the stored dict)
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)
    #: which owned provenance keys the record had (a file written before ``layer`` existed has none)
    recorded_keys: frozenset[str] = field(default_factory=frozenset, repr=False)
    #: made from a stored provenance (True) or asked for (False)
    recorded: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.modality not in _MODALITIES:
            raise BadInputError(f"modality must be text or image, got {self.modality!r}")

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def from_provenance(cls, modality: str, provenance: Mapping[str, Any] | None,
                        config: Mapping[str, Any] | None = None) -> EncoderSpec:
        """The recorded encoder of a feature file: its ``provenance`` attribute (and its ``config``,
        which adds the asked ``revision``, ``weights_sha256`` and, for files whose provenance lacks it,
        ``model``). ``model`` is the model as given (``model_id``), else the config's model, else the
        resolved folder: one rule for every reader."""
        prov, conf = dict(provenance or {}), dict(config or {})
        owned = {f: prov.get(k) for f, k in _OWNED.items()}
        owned["model"] = prov.get("model_id") or conf.get("model") or prov.get("resolved_path")
        size_field = _SIZE_OPTION.get(modality, (None,))[0]
        if size_field and owned[size_field] is None:
            owned[size_field] = conf.get(size_field)
        # a stored value a fallback replaced stays in extra, so to_provenance gives back what was stored
        faithful = {k for f, k in _OWNED.items() if k in prov and prov[k] == owned[f]}
        return cls(modality=modality, revision=conf.get("revision"), weights_sha256=conf.get("weights_sha256"),
                   extra={k: v for k, v in prov.items() if k not in faithful}, recorded=True,
                   recorded_keys=frozenset(faithful), **owned)

    def to_provenance(self) -> dict[str, Any]:
        """The provenance dict: for a recorded spec exactly the stored one (the keys it had, no more);
        for an asked spec its non-empty owned keys."""
        out = {k: getattr(self, f) for f, k in _OWNED.items()
               if (k in self.recorded_keys if self.recorded else getattr(self, f) is not None)}
        return {**out, **self.extra}

    def extract_options(self) -> dict[str, Any]:
        """The flat :class:`~mmcache.extract.extraction.ExtractConfig` fields that ask for this encoder
        again (``text_model``, ``text_revision``, ``text_layer``, ``text_name``, ``text_max_length`` or the
        image twins and ``patch_pool``); the model is :attr:`source`, what would be loaded."""
        m = self.modality
        out = {f"{m}_model": self.source, f"{m}_revision": self.revision, f"{m}_layer": self.layer or "last",
               f"{m}_name": self.name or None}
        spec_field, cfg_field = _SIZE_OPTION[m]
        if getattr(self, spec_field) is not None:
            out[cfg_field] = int(getattr(self, spec_field))
        return out

    # ------------------------------------------------------------------------------------ the rules

    @property
    def source(self) -> str | None:
        """Where to load the encoder from: the recorded local folder while it still exists, else the
        model as given (a hub id, or a folder path that is then reported missing)."""
        if self.resolved_path and os.path.isdir(self.resolved_path):
            return self.resolved_path
        return self.model

    @property
    def load_revision(self) -> str | None:
        """The revision to load at, for the encoder and its tokenizer / processor alike: None for a local
        folder (it has no revisions), else the recorded hub commit, else the asked revision."""
        src = self.source
        if src and os.path.isdir(src):
            return None
        return self.commit_hash or self.revision

    @property
    def display_name(self) -> str:
        """What files and tables call the encoder (:func:`readable_name`)."""
        return readable_name(self.source or "", self.name) if (self.source or self.name) else "?"

    def identity(self) -> dict[str, Any]:
        """The keys of this spec that :func:`~mmcache.cache.encoder_difference` compares, named as in a
        feature file's config: ``model`` is the weights' location (the resolved folder of a local
        model, else the model as given), plus ``revision``, ``commit_hash``, ``weights_sha256``,
        ``layer`` and ``proj_size`` (these two only when not at their defaults, as in configs) and
        ``max_length`` / ``patch_pool``.
        Compare two specs with ``encoder_difference(a.identity(), b.identity(), storage=False)``."""
        local = self.model and not self.resolved_path and os.path.isdir(self.model)
        where = str(Path(self.model).resolve()) if local else (self.resolved_path or self.model)
        out: dict[str, Any] = {"modality": self.modality, "model": where,
                               "revision": self.revision, "commit_hash": self.commit_hash,
                               "weights_sha256": self.weights_sha256}
        if (self.layer or "last") != "last":
            out["layer"] = self.layer
        if self.proj_size:
            out["proj_size"] = self.proj_size
        size_field = _SIZE_OPTION[self.modality][0]
        out[size_field] = getattr(self, size_field)
        return out

