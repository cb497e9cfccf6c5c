"""The frozen text encoder of any registered family (:class:`TextEncoder`, :func:`load_text_encoder`):
``cls`` (B, D), ``mean`` (B, D), ``tokens`` (B, L, D), ``mask`` (B, L) bool (True = real token), CPU float32."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from mmcache.extract.adapters import find_adapter, select_layer
from mmcache.extract.hub import library_versions, load_config, source_info
from mmcache.extract.runtime import autocast, check_layer, resolve_precision, to_cpu

from mmcache.cache.encoder import readable_name
from mmcache.common import resolve_device
from mmcache.errors import BadInputError, ModelLoadError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# text


@dataclass(eq=False)
class TextEncoder:
    """A frozen text encoder of one registered family. Build with :func:`load_text_encoder`."""

    model_id: str
    tokenizer: Any
    model: Any
    config: Any
    device: torch.device
    precision: str
    max_length: int
    hidden_size: int
    _source: dict = field(default_factory=dict, repr=False)
    adapter: Any = None
    layer: str = "last"
    name: str = ""
    proj_size: int | None = None

    @property
    def family(self) -> str:
        return self.adapter.name

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize on CPU, padded to the longest text in the batch (to ``max_length`` for fixed-length
        families), truncated at ``max_length``.

        Returns ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64 (1 = real token).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise BadInputError("tokenize() takes a list of strings")
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return self.collate(ids)

    def collate(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad token id lists: ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64.
        L = the longest list, or ``max_length`` for fixed-length families (SigLIP)."""
        import numpy as np

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        longest = max(self.max_length if self.adapter.fixed_length else int(lengths.max(initial=1)), 1)
        # one flat copy of every id, scattered by a mask: no per-row tensor (10x faster than row by row)
        attn = np.arange(longest) < lengths[:, None]  # (B, L) bool
        input_ids = np.full((len(ids), longest), pad, dtype=np.int64)
        input_ids[attn] = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attn.astype(np.int64))}

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the encoder on a :meth:`tokenize` batch.

        Args:
            batch: ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64 or bool (True/1 = real).

        Returns CPU tensors (see the family's ``pooling`` for what ``cls`` is):
            ``cls`` (B, D) float32; ``mean`` (B, D) float32 -- masked mean over real tokens of the
            chosen layer; ``tokens`` (B, L, D) float32 -- the chosen layer's states; ``mask`` (B, L)
            bool -- True = real token; ``proj`` (B, P) float32 when the checkpoint has a projection.
        """
        return to_cpu(self.forward(batch))

    def forward(self, batch: dict[str, torch.Tensor], non_blocking: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`encode` without the copy back: the same fields on the device (``extract`` casts them
        to the storage dtype there and copies each batch once). ``non_blocking``: pinned inputs."""
        ad = self.adapter
        ids = batch["input_ids"].to(self.device, non_blocking=non_blocking)
        mask = batch["attention_mask"].to(self.device, non_blocking=non_blocking).bool()
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = ad.run(self.model, ids, mask.long() if ad.pass_mask else None, self.layer != "last")
            pooled = out.pooler_output if (ad.cls_is_pooled or self.proj_size) else None
            proj = ad.project(self.model, pooled) if self.proj_size else None
        with torch.inference_mode():
            hidden = select_layer(out, self.layer)  # (B, L, D)
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            cls = pooled.float() if ad.cls_is_pooled else hidden[:, 0]
            res = {"cls": cls, "mean": mean, "tokens": hidden, "mask": mask}
            if proj is not None:
                res["proj"] = proj.float()
        return res

    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`tokenize` then :meth:`encode`."""
        return self.encode(self.tokenize(texts))

    def provenance(self) -> dict:
        """JSON-serialisable description of exactly what produced the features."""
        return {
            **self._source,
            "class_name": type(self.model).__name__,
            "model_type": getattr(self.config, "model_type", None),
            "tokenizer_class": type(self.tokenizer).__name__,
            **library_versions(),
            "hidden_size": self.hidden_size,
            "max_length": self.max_length,
            "precision": self.precision,
            "pooling": dict(self.adapter.pooling),
            "family": self.adapter.name, "layer": self.layer, "name": self.name, "proj_size": self.proj_size,
        }


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def _text_limit(tok, config) -> int | None:
    model_max = getattr(tok, "model_max_length", None)
    if not isinstance(model_max, int) or model_max > 100_000:  # "unset" is a huge sentinel
        sub = getattr(config, "text_config", None) or config
        model_max = getattr(sub, "max_position_embeddings", None)
    return model_max


def text_parts(model: str, revision: str | None):
    """(config, adapter, tokenizer, local_only): everything checked before the weights are read."""
    config, local_only = load_config(model, "text", revision)
    adapter = find_adapter("text", config, model)
    if os.path.isdir(model) and not any(os.path.isfile(os.path.join(model, f)) for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"could not load the tokenizer of text model {model!r}: the folder has no tokenizer "
                             f"files ({', '.join(_TOKENIZER_FILES[:3])} ...); an image-only checkpoint works as "
                             "--image-model only")
    tok = adapter.load_tokenizer(model, revision=revision, local_files_only=local_only)
    if len(tok) < 16:  # transformers 5 builds an empty tokenizer rather than fail for some classes
        raise ModelLoadError(f"could not load the tokenizer of text model {model!r}: it has only {len(tok)} tokens")
    if not getattr(tok, "is_fast", False):
        raise BadInputError(f"text model {model!r} has no fast (Rust) tokenizer; a tokenizer.json is needed")
    adapter.check_tokenizer(tok, model)
    return config, adapter, tok, local_only


def load_text_encoder(
    model: str | os.PathLike,
    *,
    device: str = "cpu",
    max_length: int = 128,
    precision: str = "fp32",
    revision: str | None = None,
    layer: str | int = "last",
    name: str | None = None,
) -> TextEncoder:
    """Load a text encoder of any registered family (hub id or local ``save_pretrained`` folder).

    ``layer``: which hidden states ``mean``/``tokens`` (and a first-token ``cls``) come from (see
    :func:`extract.adapters.parse_layer`). ``name``: what files and tables call it (default
    :func:`readable_name`).

    Raises:
        ModelLoadError: the model cannot be found / loaded (one line naming what was tried).
        BadInputError: bad arguments, an image model, or a family no adapter knows.
    """
    model = str(model)
    if not isinstance(max_length, int) or max_length < 2:
        raise BadInputError(f"max_length must be an integer >= 2, got {max_length!r}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    config, adapter, tok, local_only = text_parts(model, revision)
    layer = check_layer(adapter, layer, model)
    net = adapter.load_model(model, config, revision=revision, local_files_only=local_only)
    model_max = _text_limit(tok, config)
    if model_max is not None and max_length > model_max:
        log.warning("max_length %d > model limit %d; using %d", max_length, model_max, model_max)
        max_length = int(model_max)
    net.to(dev)
    enc = TextEncoder(model_id=model, tokenizer=tok, model=net, config=config, device=dev, precision=prec,
                      max_length=max_length, hidden_size=0, _source=source_info(model, config),
                      adapter=adapter, layer=layer, name=readable_name(model, name))
    enc.proj_size = -1 if adapter.has_proj else None  # probe: is there a projection in this checkpoint?
    out = enc.encode(enc.tokenize(["good"]))
    enc.hidden_size = int(out["tokens"].shape[-1])
    enc.proj_size = int(out["proj"].shape[-1]) if "proj" in out else None
    if int(out["cls"].shape[-1]) != enc.hidden_size:
        raise BadInputError(f"text model {model!r}: pooled width {out['cls'].shape[-1]} != hidden width "
                            f"{enc.hidden_size}; unsupported checkpoint")
    return enc


