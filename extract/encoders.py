"""Frozen encoders for stage one: a BERT-family text encoder and a vision backbone.

Both wrap Hugging Face checkpoints (a hub id or a local folder written by ``save_pretrained``), loaded
with ``trust_remote_code=False``, in eval mode, float32 weights, and return CPU float32 features:

* text  -> ``cls`` (B, D), ``mean`` (B, D), ``tokens`` (B, L, D), ``mask`` (B, L) bool
* image -> ``cls`` (B, D), ``mean`` (B, D), ``tokens`` (B, T, D), ``mask`` (B, T) bool

Mask convention everywhere: boolean, True = real token.

This module imports torch and transformers; :mod:`extract` itself stays import-light.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmcache.common import resolve_device
from mmcache.errors import BadInputError, ModelLoadError

log = logging.getLogger(__name__)

__all__ = [
    "ImageEncoder",
    "ImagePreprocessor",
    "TextEncoder",
    "load_image_encoder",
    "load_text_encoder",
    "resolve_device",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: ViT-style backbones: model_type -> number of leading non-patch tokens *besides* registers.
_VIT_PREFIX_TOKENS = {"dinov2": 1, "dinov2_with_registers": 1, "vit": 1, "deit": 2}
#: CNN backbones whose last_hidden_state is a (B, C, h, w) map and pooler_output a global average.
_CNN_TYPES = {"resnet", "convnext", "convnextv2", "regnet", "bit"}

TEXT_POOLING = {
    "cls": "last_hidden_state[:, 0] -- the raw first ([CLS]) token, not the pooler head",
    "mean": "mean of last_hidden_state over positions with attention_mask True (incl. [CLS]/[SEP])",
    "tokens": "last_hidden_state, padded to the longest text in the batch; mask True = real token",
}
VIT_POOLING = {
    "cls": "last_hidden_state[:, 0] -- the CLS token (final layernorm applied by the model)",
    "mean": "mean of the patch tokens (CLS, distillation and register tokens excluded), before patch_pool",
    "tokens": "patch tokens in row-major (gh, gw) grid order, avg-pooled kernel=stride=patch_pool, ceil_mode",
}
CNN_POOLING = {
    "cls": "global average pool of the final feature map (pooler_output flattened); same as mean",
    "mean": "global average pool of the final feature map (pooler_output flattened)",
    "tokens": "final (C, h, w) feature map avg-pooled kernel=stride=patch_pool (ceil_mode), flattened row-major to (h*w, C)",
}


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


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_config(model: str, what: str, revision: str | None):
    """AutoConfig for ``model``; every way this can fail becomes one :class:`ModelLoadError` line."""
    from transformers import AutoConfig

    hint = "Download it elsewhere and pass its folder path."
    if os.path.isdir(model):
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
    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError) as e:
        reason = _one_line(e)
        if os.path.isdir(model):
            raise ModelLoadError(f"could not load {what} model {model!r}: {reason}") from e
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"could not load {what} model {model!r}: it needs custom code (trust_remote_code), "
                "which this tool never enables; pick a model with a built-in transformers architecture."
            ) from e
        if "connect" in str(e).lower() or "offline" in str(e).lower():
            raise ModelLoadError(
                f"could not load {what} model {model!r}: not a local folder and the Hugging Face hub is "
                f"unreachable (offline?). {hint}"
            ) from e
        raise ModelLoadError(
            f"could not load {what} model {model!r}: not a local folder and not loadable from the "
            f"Hugging Face hub ({reason}). {hint}"
        ) from e


def _load_model(model: str, config, what: str, revision: str | None):
    """AutoModel with sdpa attention where the architecture supports it, float32, eval mode."""
    from transformers import AutoModel

    kwargs: dict[str, Any] = dict(config=config, revision=revision, trust_remote_code=False)
    try:
        try:
            net = AutoModel.from_pretrained(model, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError, TypeError) as e:
            log.info("sdpa attention unavailable for %s (%s); using the default", model, _one_line(e, 120))
            net = AutoModel.from_pretrained(model, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as e:
        raise ModelLoadError(f"could not load {what} model {model!r}: {_one_line(e)}") from e
    return net.float().eval()


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


# --------------------------------------------------------------------------------------------------
# text


@dataclass(eq=False)
class TextEncoder:
    """A frozen BERT-family encoder. Build with :func:`load_text_encoder`."""

    model_id: str
    tokenizer: Any
    model: Any
    config: Any
    device: torch.device
    precision: str
    max_length: int
    hidden_size: int
    _source: dict = field(default_factory=dict, repr=False)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize on CPU, padded to the longest text in the batch, truncated at ``max_length``.

        Returns ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64 (1 = real token).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise BadInputError("tokenize() takes a list of strings")
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the encoder on a :meth:`tokenize` batch.

        Args:
            batch: ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64 or bool (True/1 = real).

        Returns CPU tensors:
            ``cls`` (B, D) float32 -- last_hidden_state[:, 0] (raw [CLS], not the pooler);
            ``mean`` (B, D) float32 -- masked mean over real tokens ([CLS]/[SEP] included);
            ``tokens`` (B, L, D) float32 -- last_hidden_state;
            ``mask`` (B, L) bool -- True = real token.
        """
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        with torch.inference_mode(), _autocast(self.device, self.precision):
            out = self.model(input_ids=ids, attention_mask=mask.long())
        hidden = out.last_hidden_state.float()  # (B, L, D)
        with torch.inference_mode():
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            res = {"cls": hidden[:, 0], "mean": mean, "tokens": hidden, "mask": mask}
        return {k: (_to_cpu_f32(v) if k != "mask" else v.detach().cpu().clone()) for k, v in res.items()}

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
            "pooling": dict(TEXT_POOLING),
        }


def load_text_encoder(
    model: str | os.PathLike,
    *,
    device: str = "cpu",
    max_length: int = 128,
    precision: str = "fp32",
    revision: str | None = None,
) -> TextEncoder:
    """Load a BERT-family text encoder (hub id or local ``save_pretrained`` folder).

    Raises:
        ModelLoadError: the model cannot be found / loaded (one line naming what was tried).
        BadInputError: bad arguments, or the checkpoint is not a text encoder with a leading [CLS].
    """
    from transformers import AutoTokenizer

    model = str(model)
    if not isinstance(max_length, int) or max_length < 2:
        raise BadInputError(f"max_length must be an integer >= 2, got {max_length!r}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    config = _load_config(model, "text", revision)
    if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "vocab_size"):
        raise BadInputError(
            f"{model!r} is a {config.model_type!r} model, not a text encoder; pass a BERT-family model"
        )
    try:
        tok = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as e:
        raise ModelLoadError(f"could not load the tokenizer of text model {model!r}: {_one_line(e)}") from e
    if not getattr(tok, "is_fast", False):
        raise BadInputError(f"text model {model!r} has no fast (Rust) tokenizer; a tokenizer.json is needed")
    probe = tok(["good"], return_tensors=None)["input_ids"][0]
    if tok.cls_token_id is None or not probe or probe[0] != tok.cls_token_id:
        raise BadInputError(
            f"text model {model!r} does not start sequences with a [CLS]-style token; "
            "pass a BERT-family encoder"
        )
    net = _load_model(model, config, "text", revision)
    if getattr(net, "main_input_name", "input_ids") != "input_ids":
        raise BadInputError(f"{model!r} ({type(net).__name__}) is not a text encoder")
    model_max = getattr(tok, "model_max_length", None)
    if not isinstance(model_max, int) or model_max > 100_000:  # "unset" is a huge sentinel
        model_max = getattr(config, "max_position_embeddings", None)
    if model_max is not None and max_length > model_max:
        log.warning("max_length %d > model limit %d; using %d", max_length, model_max, model_max)
        max_length = int(model_max)
    net.to(dev)
    return TextEncoder(
        model_id=model,
        tokenizer=tok,
        model=net,
        config=config,
        device=dev,
        precision=prec,
        max_length=max_length,
        hidden_size=int(config.hidden_size),
        _source=_source_info(model, config),
    )


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
    """A frozen vision backbone. Build with :func:`load_image_encoder`.

    ``kind`` is "vit" (token sequence with leading CLS) or "cnn" (a (B, C, h, w) feature map).
    ``grid`` (gh, gw) and ``num_tokens`` = gh * gw describe ``tokens`` *after* ``patch_pool``.
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
    num_prefix_tokens: int  # CLS (+ distillation) + registers, ViT only; 0 for CNNs
    _source: dict = field(default_factory=dict, repr=False)

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

        Returns CPU tensors:
            ``cls`` (B, D) float32 -- ViT: token 0; CNN: global average pool of the final map;
            ``mean`` (B, D) float32 -- ViT: mean of patch tokens (registers excluded); CNN: = cls;
            ``tokens`` (B, T, D) float32 -- patch tokens / feature-map cells, row-major over
            ``grid`` after ``patch_pool`` (T = ``num_tokens``);
            ``mask`` (B, T) bool -- all True.
        """
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.input_hw:
            raise BadInputError(
                f"expected pixel_values (B, 3, {self.input_hw[0]}, {self.input_hw[1]}), "
                f"got {tuple(pixel_values.shape)}; use preprocess()"
            )
        pv = pixel_values.to(self.device, torch.float32)
        with torch.inference_mode(), _autocast(self.device, self.precision):
            out = self.model(pixel_values=pv)
        with torch.inference_mode():
            res = self._pool(out)
        return {k: (_to_cpu_f32(v) if k != "mask" else v.cpu().clone()) for k, v in res.items()}

    def _pool(self, out) -> dict[str, torch.Tensor]:
        gh, gw = self.raw_grid
        if self.kind == "vit":
            hidden = out.last_hidden_state.float()  # (B, P + gh*gw, D)
            cls = hidden[:, 0]
            patches = hidden[:, self.num_prefix_tokens:]  # (B, gh*gw, D)
            mean = patches.mean(1)
            fmap = patches.transpose(1, 2).reshape(hidden.shape[0], -1, gh, gw)  # (B, D, gh, gw)
        else:
            fmap = out.last_hidden_state.float()  # (B, C, h, w)
            pooled = getattr(out, "pooler_output", None)
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
            "pooling": dict(VIT_POOLING if self.kind == "vit" else CNN_POOLING),
        }


def _patch_size(config) -> tuple[int, int] | None:
    p = getattr(config, "patch_size", None)
    if isinstance(p, int):
        return p, p
    if isinstance(p, (list, tuple)) and len(p) == 2:
        return int(p[0]), int(p[1])
    return None


def load_image_encoder(
    model: str | os.PathLike,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    patch_pool: int = 1,
    revision: str | None = None,
) -> ImageEncoder:
    """Load a vision backbone (hub id or local ``save_pretrained`` folder) and its image processor.

    The token layout (kind, grid, hidden size) is read from the config and checked against one dummy
    forward pass on a blank image of the processor's output size.

    Raises:
        ModelLoadError: the model or its image processor cannot be found / loaded.
        BadInputError: bad arguments, or the checkpoint is not a supported vision backbone.
    """
    from transformers import AutoImageProcessor

    model = str(model)
    if not isinstance(patch_pool, int) or patch_pool < 1:
        raise BadInputError(f"patch_pool must be an integer >= 1, got {patch_pool!r}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    config = _load_config(model, "image", revision)
    mtype = getattr(config, "model_type", "")
    if hasattr(config, "vocab_size") and not hasattr(config, "num_channels"):
        raise BadInputError(f"{model!r} is a {mtype!r} text model, not a vision backbone")
    try:
        processor = AutoImageProcessor.from_pretrained(model, revision=revision, trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as e:
        raise ModelLoadError(
            f"could not load the image processor of image model {model!r}: {_one_line(e)}"
        ) from e
    net = _load_model(model, config, "image", revision)
    if getattr(net, "main_input_name", None) != "pixel_values":
        raise BadInputError(f"{model!r} ({type(net).__name__}) is not a vision backbone")
    net.to(dev)
    pre = ImagePreprocessor(processor)

    # one dummy forward pass fixes the layout (robust to processor crop sizes and config quirks)
    input_hw = pre.output_hw()
    with torch.inference_mode():
        out = net(pixel_values=torch.zeros(1, 3, *input_hw, device=dev))
    hidden = out.last_hidden_state
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    if hidden.ndim == 4 and (mtype in _CNN_TYPES or mtype not in _VIT_PREFIX_TOKENS):
        kind = "cnn"
        hidden_size = int(hidden.shape[1])
        raw_grid = (int(hidden.shape[2]), int(hidden.shape[3]))
        prefix = 0
    elif hidden.ndim == 3 and mtype not in _CNN_TYPES:
        kind = "vit"
        hidden_size = int(hidden.shape[2])
        prefix = _VIT_PREFIX_TOKENS.get(mtype, 1) + registers
        n_patches = int(hidden.shape[1]) - prefix
        ps = _patch_size(config)
        if ps is not None:
            raw_grid = (input_hw[0] // ps[0], input_hw[1] // ps[1])
        else:
            side = math.isqrt(max(n_patches, 0))
            raw_grid = (side, side)
        if raw_grid[0] * raw_grid[1] != n_patches:
            raise BadInputError(
                f"image model {model!r} ({mtype}) returned {hidden.shape[1]} tokens, which do not form "
                f"{prefix} leading token(s) + a {raw_grid[0]}x{raw_grid[1]} patch grid; unsupported backbone"
            )
    else:
        raise BadInputError(
            f"image model {model!r} ({mtype}) has an unsupported output layout {tuple(hidden.shape)}; "
            f"supported: ViT-style {sorted(_VIT_PREFIX_TOKENS)} and CNNs {sorted(_CNN_TYPES)}"
        )
    cfg_hidden = getattr(config, "hidden_size", None)
    if kind == "vit" and cfg_hidden is not None and int(cfg_hidden) != hidden_size:
        raise BadInputError(f"image model {model!r}: config hidden_size {cfg_hidden} != output width {hidden_size}")
    grid = (
        (math.ceil(raw_grid[0] / patch_pool), math.ceil(raw_grid[1] / patch_pool))
        if patch_pool > 1
        else raw_grid
    )
    log.info("image encoder %s: kind=%s grid=%s hidden=%d", model, kind, grid, hidden_size)
    return ImageEncoder(
        model_id=model,
        preprocessor=pre,
        model=net,
        config=config,
        device=dev,
        precision=prec,
        kind=kind,
        hidden_size=hidden_size,
        patch_pool=patch_pool,
        input_hw=input_hw,
        raw_grid=raw_grid,
        grid=grid,
        num_prefix_tokens=prefix,
        _source=_source_info(model, config),
    )
