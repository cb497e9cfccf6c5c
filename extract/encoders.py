"""Frozen encoders for stage one: a text encoder and an image encoder of any registered family.

Both wrap Hugging Face checkpoints (a hub id or a local folder written by ``save_pretrained``), loaded
with ``trust_remote_code=False``, in eval mode, float32 weights, and return CPU float32 features:

* text  -> ``cls`` (B, D), ``mean`` (B, D), ``tokens`` (B, L, D), ``mask`` (B, L) bool
* image -> ``cls`` (B, D), ``mean`` (B, D), ``tokens`` (B, T, D), ``mask`` (B, T) bool
* both, when the checkpoint has a joint-space projection (CLIP) -> ``proj`` (B, P)

Mask convention everywhere: boolean, True = real token.

What differs between families (which class loads the checkpoint, what ``cls`` is, leading non-patch
tokens, padding) lives in the adapters of :mod:`extract.adapters`, recognised by ``config.model_type``;
this module holds what is common: devices, precision, padding, layer choice, patch pooling (the grid
geometry is each family's ``ImageAdapter.grid`` hook).

This module imports torch and transformers; :mod:`extract` itself stays import-light.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from mmcache.extract.adapters import find_adapter, get_adapter, parse_layer, select_layer
from mmcache.extract.adapters.base import one_line as _one_line

from mmcache.cache.encoder import EncoderSpec, readable_name  # noqa: F401 -- readable_name: public here too
from mmcache.common import resolve_device
from mmcache.errors import BadInputError, ModelLoadError

log = logging.getLogger(__name__)

__all__ = [
    "ImageEncoder",
    "ImagePreprocessor",
    "TextEncoder",
    "load_encoder",
    "load_encoder_from_provenance",
    "load_image_encoder",
    "load_text_encoder",
    "load_tokenizer",
    "readable_name",
    "resolve_device",
    "resolve_precision",
    "validate_encoder",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# shared helpers


def resolve_precision(precision: str, device: torch.device) -> str:
    """Effective compute precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (the last two on CUDA only).

    ``"auto"`` = bf16 on a CUDA device that supports it, else fp32. On CPU it is always fp32 (a
    requested bf16/fp16 is logged and ignored).
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            log.warning("precision %s ignored on %s: computing in fp32", precision, device)
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return precision


def _looks_like_path(model: str) -> bool:
    """True when ``model`` can only be meant as a local path (hub ids are 'name' or 'owner/name')."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep != "/" and os.sep in model
    )


_REACHABLE: dict[str, bool] = {}


def _hub_offline() -> bool:
    import huggingface_hub.constants as hub

    flag = os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(hub.HF_HUB_OFFLINE) or flag


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or the hub's host cannot
    be connected to within ``timeout_s`` (checked once per process; behind a proxy assumed reachable).
    Loading a hub id then uses the local Hugging Face cache only, instead of ~40 s of retries."""
    if _hub_offline():
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout_s).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
            log.info("%s is unreachable: loading hub ids from the local cache only", host)
    return _REACHABLE[host]


def _load_config(model: str, what: str, revision: str | None):
    """(AutoConfig, local_files_only) for ``model``; every way this can fail is one :class:`ModelLoadError`."""
    from transformers import AutoConfig

    hint = "Download it elsewhere and pass its folder path."
    local_dir = os.path.isdir(model)
    if local_dir:
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelLoadError(
                f"could not load {what} model {model!r}: the folder has no config.json "
                "(expected a folder written by save_pretrained)."
            )
    elif _looks_like_path(model) or os.path.exists(model):
        raise ModelLoadError(
            f"could not load {what} model {model!r}: no such folder. "
            "Pass a Hugging Face hub id or the path of a folder written by save_pretrained."
        )
    local_only = local_dir or not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=False,
                                            local_files_only=local_only)
        return config, local_only
    except (OSError, ValueError, KeyError, ImportError) as e:
        reason = _one_line(e)
        if local_dir:
            raise ModelLoadError(f"could not load {what} model {model!r}: {reason}") from e
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"could not load {what} model {model!r}: it needs custom code (trust_remote_code), "
                "which this tool never enables; pick a model with a built-in transformers architecture."
            ) from e
        if local_only:
            raise ModelLoadError(f"could not load {what} model {model!r}: not found locally; set --{what}-model "
                                 "to a folder or enable network") from e
        raise ModelLoadError(
            f"could not load {what} model {model!r}: not a local folder and not loadable from the "
            f"Hugging Face hub ({reason}). {hint}"
        ) from e


def _source_info(model: str, config) -> dict:
    local = os.path.isdir(model)
    return {
        "model_id": model,
        "resolved_path": str(Path(model).resolve()) if local else None,
        "commit_hash": getattr(config, "_commit_hash", None),
        "name_or_path": getattr(config, "_name_or_path", None),
    }


def _versions() -> dict:
    import transformers

    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


def _to_cpu_f32(t: torch.Tensor) -> torch.Tensor:
    """CPU float32 copy usable outside inference mode (inference tensors cannot be modified later)."""
    out = t.detach().to("cpu", torch.float32)
    return out.clone() if out.is_inference() else out


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in _AUTOCAST_DTYPES:
        return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[precision])
    return torch.autocast(device.type, enabled=False)


def _cpu(res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (_to_cpu_f32(v) if k != "mask" else v.detach().cpu().clone()) for k, v in res.items()}


def _check_layer(adapter, layer: str, model: str) -> str:
    layer = parse_layer(layer)
    if layer != "last" and not adapter.supports_layers:
        raise BadInputError(f"{model!r} ({adapter.name}) offers only its last layer; drop the layer option")
    return layer


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
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = self.max_length if self.adapter.fixed_length else max((len(x) for x in ids), default=1)
        input_ids = torch.full((len(ids), max(longest, 1)), pad, dtype=torch.long)
        attn = torch.zeros((len(ids), max(longest, 1)), dtype=torch.long)
        for j, x in enumerate(ids):
            input_ids[j, :len(x)] = torch.as_tensor(x, dtype=torch.long)
            attn[j, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": attn}

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the encoder on a :meth:`tokenize` batch.

        Args:
            batch: ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64 or bool (True/1 = real).

        Returns CPU tensors (see the family's ``pooling`` for what ``cls`` is):
            ``cls`` (B, D) float32; ``mean`` (B, D) float32 -- masked mean over real tokens of the
            chosen layer; ``tokens`` (B, L, D) float32 -- the chosen layer's states; ``mask`` (B, L)
            bool -- True = real token; ``proj`` (B, P) float32 when the checkpoint has a projection.
        """
        ad = self.adapter
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        with torch.inference_mode(), _autocast(self.device, self.precision):
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
        return _cpu(res)

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
            **_versions(),
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


def _text_parts(model: str, revision: str | None):
    """(config, adapter, tokenizer, local_only): everything checked before the weights are read."""
    config, local_only = _load_config(model, "text", revision)
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
    config, adapter, tok, local_only = _text_parts(model, revision)
    layer = _check_layer(adapter, layer, model)
    net = adapter.load_model(model, config, revision=revision, local_files_only=local_only)
    model_max = _text_limit(tok, config)
    if model_max is not None and max_length > model_max:
        log.warning("max_length %d > model limit %d; using %d", max_length, model_max, model_max)
        max_length = int(model_max)
    net.to(dev)
    enc = TextEncoder(model_id=model, tokenizer=tok, model=net, config=config, device=dev, precision=prec,
                      max_length=max_length, hidden_size=0, _source=_source_info(model, config),
                      adapter=adapter, layer=layer, name=readable_name(model, name))
    enc.proj_size = -1 if adapter.has_proj else None  # probe: is there a projection in this checkpoint?
    out = enc.encode(enc.tokenize(["good"]))
    enc.hidden_size = int(out["tokens"].shape[-1])
    enc.proj_size = int(out["proj"].shape[-1]) if "proj" in out else None
    if int(out["cls"].shape[-1]) != enc.hidden_size:
        raise BadInputError(f"text model {model!r}: pooled width {out['cls'].shape[-1]} != hidden width "
                            f"{enc.hidden_size}; unsupported checkpoint")
    return enc


# --------------------------------------------------------------------------------------------------
# image


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, str, type(None))):
        return v
    if isinstance(v, (int, float)):
        return v
    try:
        return int(v)  # PIL / transformers resampling enums
    except (TypeError, ValueError):
        return str(v)


class ImagePreprocessor:
    """Picklable image -> tensor transform: the checkpoint's own image processor, nothing else.

    Holds no model, so it is cheap to send to DataLoader worker processes.
    """

    def __init__(self, processor: Any):
        self.processor = processor

    @staticmethod
    def _rgb(img):
        return img if getattr(img, "mode", "RGB") == "RGB" else img.convert("RGB")

    def __call__(self, images: list) -> torch.Tensor:
        """list of PIL images -> (B, 3, H, W) float32."""
        if not isinstance(images, (list, tuple)):
            raise BadInputError("preprocess() takes a list of PIL images")
        if not images:
            raise BadInputError("preprocess() got an empty list of images")
        out = self.processor(images=[self._rgb(im) for im in images], return_tensors="pt")
        return out["pixel_values"].float()

    def one(self, img) -> torch.Tensor:
        """One PIL image -> (3, H, W) float32."""
        return self([img])[0]

    def settings(self) -> dict:
        """The processor's resize / crop / normalisation settings, JSON-serialisable."""
        keys = ("do_resize", "size", "do_center_crop", "crop_size", "crop_pct", "resample", "do_rescale",
                "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
        d = self._config_dict()
        s = {k: _jsonable(d[k]) for k in keys if d.get(k) is not None}
        s["processor_class"] = type(self.processor).__name__
        return s

    def _config_dict(self) -> dict:
        try:
            return dict(self.processor.to_dict())  # plain dicts (transformers 5 keeps SizeDict objects)
        except (AttributeError, TypeError, ValueError):
            return dict(vars(self.processor))

    def output_hw(self) -> tuple[int, int]:
        """(H, W) this processor produces, found by running it on a blank image."""
        from PIL import Image

        d = self._config_dict()
        side = 224
        for attr in ("crop_size", "size"):
            sz = d.get(attr)
            if isinstance(sz, dict) and (sz.get("height") or sz.get("shortest_edge")):
                side = sz.get("height") or sz.get("shortest_edge")
                break
        pv = self([Image.new("RGB", (int(side), int(side)))])
        return int(pv.shape[-2]), int(pv.shape[-1])


@dataclass(eq=False)
class ImageEncoder:
    """A frozen vision backbone of one registered family. Build with :func:`load_image_encoder`.

    ``kind`` is "vit" (token sequence: ``num_prefix_tokens`` leading tokens, then the patch grid) or
    "cnn" (a (B, C, h, w) feature map). ``grid`` (gh, gw) and ``num_tokens`` = gh * gw describe
    ``tokens`` *after* ``patch_pool``.
    """

    model_id: str
    preprocessor: ImagePreprocessor
    model: Any
    config: Any
    device: torch.device
    precision: str
    kind: str
    hidden_size: int
    patch_pool: int
    input_hw: tuple[int, int]
    raw_grid: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int  # CLS (+ distillation) + registers, ViT only; 0 for CNNs and SigLIP
    _source: dict = field(default_factory=dict, repr=False)
    adapter: Any = None
    layer: str = "last"
    name: str = ""
    proj_size: int | None = None

    @property
    def family(self) -> str:
        return self.adapter.name

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def preprocess(self, images: list) -> torch.Tensor:
        """list of PIL images -> (B, 3, H, W) float32 via the checkpoint's image processor."""
        return self.preprocessor(images)

    def preprocess_one(self, img) -> torch.Tensor:
        """One PIL image -> (3, H, W) float32 (for per-sample collation in DataLoader workers)."""
        return self.preprocessor.one(img)

    def encode(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the backbone on (B, 3, H, W) float32 pixels (from :meth:`preprocess`).

        Returns CPU tensors (see the family's ``pooling`` for what ``cls`` is):
            ``cls`` (B, D) float32; ``mean`` (B, D) float32 -- mean of the patch tokens (CNN: = cls);
            ``tokens`` (B, T, D) float32 -- patch tokens / feature-map cells, row-major over ``grid``
            after ``patch_pool`` (T = ``num_tokens``); ``mask`` (B, T) bool -- all True; ``proj``
            (B, P) float32 when the checkpoint has a projection.
        """
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.input_hw:
            raise BadInputError(
                f"expected pixel_values (B, 3, {self.input_hw[0]}, {self.input_hw[1]}), "
                f"got {tuple(pixel_values.shape)}; use preprocess()"
            )
        return _cpu(self._forward(pixel_values.to(self.device, torch.float32)))

    def _forward(self, pv: torch.Tensor) -> dict[str, torch.Tensor]:
        ad = self.adapter
        with torch.inference_mode(), _autocast(self.device, self.precision):
            out = ad.run(self.model, pv, self.layer != "last")
            pooled = getattr(out, "pooler_output", None)
            proj = ad.project(self.model, pooled) if (self.proj_size and pooled is not None) else None
        with torch.inference_mode():
            res = self._pool(out, pooled)
            if proj is not None:
                res["proj"] = proj.float()
        return res

    def _pool(self, out, pooled) -> dict[str, torch.Tensor]:
        gh, gw = self.raw_grid
        if self.kind == "vit":
            hidden = select_layer(out, self.layer)  # (B, P + gh*gw, D)
            patches = hidden[:, self.num_prefix_tokens:]  # (B, gh*gw, D)
            mean = patches.mean(1)
            cls = pooled.float() if (self.adapter.cls_is_pooled and pooled is not None) else (
                hidden[:, 0] if self.num_prefix_tokens else mean)
            fmap = patches.transpose(1, 2).reshape(hidden.shape[0], -1, gh, gw)  # (B, D, gh, gw)
        else:
            fmap = out.last_hidden_state.float()  # (B, C, h, w)
            cls = pooled.float().flatten(1) if pooled is not None else fmap.mean((2, 3))
            mean = cls
        if self.patch_pool > 1:
            k = self.patch_pool
            fmap = F.avg_pool2d(fmap, kernel_size=k, stride=k, ceil_mode=True)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, gh'*gw', D), row-major
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return {"cls": cls, "mean": mean, "tokens": tokens, "mask": mask}

    def provenance(self) -> dict:
        """JSON-serialisable description of exactly what produced the features."""
        return {
            **self._source,
            "class_name": type(self.model).__name__,
            "model_type": getattr(self.config, "model_type", None),
            **_versions(),
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "input_hw": list(self.input_hw),
            "raw_grid": list(self.raw_grid),
            "grid": list(self.grid),
            "num_tokens": self.num_tokens,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_register_tokens": int(getattr(self.config, "num_register_tokens", 0) or 0),
            "patch_pool": self.patch_pool,
            "precision": self.precision,
            "processor": self.preprocessor.settings(),
            "pooling": dict(self.adapter.pooling),
            "family": self.adapter.name, "layer": self.layer, "name": self.name, "proj_size": self.proj_size,
        }


def _image_parts(model: str, revision: str | None):
    """(config, adapter, processor, local_only): everything checked before the weights are read."""
    config, local_only = _load_config(model, "image", revision)
    adapter = find_adapter("image", config, model)
    processor = adapter.load_processor(model, revision=revision, local_files_only=local_only)
    return config, adapter, processor, local_only


def _layout(adapter, config, hidden: torch.Tensor, input_hw, model: str) -> tuple[int, tuple[int, int], int]:
    """(hidden size, raw grid, prefix tokens) of a dummy forward's ``last_hidden_state``, from the
    family's :meth:`~extract.adapters.ImageAdapter.grid` hook; its errors name the model here."""
    try:
        prefix, raw_grid, hidden_size = adapter.grid(config, hidden, input_hw)
    except BadInputError as e:
        raise BadInputError(f"image model {model!r} ({getattr(config, 'model_type', '')}): {e}") from None
    return hidden_size, raw_grid, prefix


def load_image_encoder(
    model: str | os.PathLike,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    patch_pool: int = 1,
    revision: str | None = None,
    layer: str | int = "last",
    name: str | None = None,
) -> ImageEncoder:
    """Load a vision backbone of any registered family (hub id or local ``save_pretrained`` folder) and
    its image processor (a two-tower checkpoint needs no tokenizer for this).

    The token layout (kind, grid, hidden size) comes from the family's adapter and one dummy forward
    pass on a blank image of the processor's output size. ``layer`` / ``name`` as in
    :func:`load_text_encoder`.

    Raises:
        ModelLoadError: the model or its image processor cannot be found / loaded.
        BadInputError: bad arguments, a text model, or a family no adapter knows.
    """
    model = str(model)
    if not isinstance(patch_pool, int) or patch_pool < 1:
        raise BadInputError(f"patch_pool must be an integer >= 1, got {patch_pool!r}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    config, adapter, processor, local_only = _image_parts(model, revision)
    layer = _check_layer(adapter, layer, model)
    net = adapter.load_model(model, config, revision=revision, local_files_only=local_only)
    net.to(dev)
    pre = ImagePreprocessor(processor)

    # one dummy forward pass fixes the layout (robust to processor crop sizes and config quirks)
    input_hw = pre.output_hw()
    with torch.inference_mode():
        out = adapter.run(net, torch.zeros(1, 3, *input_hw, device=dev), False)
        pooled = getattr(out, "pooler_output", None)
        proj = adapter.project(net, pooled) if (adapter.has_proj and pooled is not None) else None
    hidden_size, raw_grid, prefix = _layout(adapter, config, out.last_hidden_state, input_hw, model)
    grid = (
        (math.ceil(raw_grid[0] / patch_pool), math.ceil(raw_grid[1] / patch_pool))
        if patch_pool > 1
        else raw_grid
    )
    log.info("image encoder %s (%s): kind=%s grid=%s hidden=%d", model, adapter.name, adapter.kind, grid, hidden_size)
    return ImageEncoder(
        model_id=model, preprocessor=pre, model=net, config=config, device=dev, precision=prec,
        kind=adapter.kind, hidden_size=hidden_size, patch_pool=patch_pool, input_hw=input_hw,
        raw_grid=raw_grid, grid=grid, num_prefix_tokens=prefix, _source=_source_info(model, config),
        adapter=adapter, layer=layer, name=readable_name(model, name),
        proj_size=int(proj.shape[-1]) if proj is not None else None,
    )


# --------------------------------------------------------------------------------------------------
# before any work; rebuilding from a cache


_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json")


def validate_encoder(modality: str, model: str, revision: str | None = None) -> str:
    """Check that ``model`` is found, of a known family of ``modality``, and its tokenizer / image
    processor loads, without reading the weights (seconds, not the model's load time). Returns the
    family name; raises as :func:`load_text_encoder` / :func:`load_image_encoder` would."""
    model = str(model)
    parts = _text_parts(model, revision) if modality == "text" else _image_parts(model, revision)
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
    return AutoTokenizer.from_pretrained(spec.source, revision=spec.load_revision, trust_remote_code=False)


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
    from mmcache.extract.identity import encoder_config

    from mmcache import cache as cf

    spec = modality if isinstance(modality, EncoderSpec) else EncoderSpec.from_provenance(modality, provenance, config)
    enc = load_encoder(spec, device=device, precision=precision)
    if spec.family and spec.family != enc.family:
        get_adapter(spec.family)  # an unknown recorded family is its own error
        raise BadInputError(f"{spec.source!r} now loads as family {enc.family!r}; the cache was made with "
                            f"{spec.family!r}")
    if config is not None:
        mine = encoder_config(enc, spec.modality, dtype=config.get("dtype", "float16"), revision=config.get("revision"))
        diff = cf.encoder_difference(config, mine, storage=False)
        if diff:
            raise BadInputError(f"{spec.source!r} is not the {spec.modality} encoder the cache was made with: {diff}")
    return enc


def load_encoder_for_cache(path: str | os.PathLike, *, device: str = "cpu", precision: str | None = None):
    """:func:`load_encoder_from_provenance` for the feature file at ``path`` (its modality, provenance
    and config)."""
    from mmcache import cache as cf

    with cf.FeatureFile(path) as ff:
        spec, conf = cf.EncoderSpec.from_provenance(ff.modality, ff.provenance, ff.config), ff.config
    return load_encoder_from_provenance(spec, config=conf, device=device, precision=precision)
