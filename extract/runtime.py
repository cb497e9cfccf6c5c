"""Where and how a frozen encoder runs: compute precision (autocast), copies back to CPU float32, the
layer a family offers. Imports torch."""

from __future__ import annotations

import logging

import torch
from mmcache.extract.adapters import parse_layer

from mmcache.errors import BadInputError

log = logging.getLogger(__name__)


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


def to_cpu_f32(t: torch.Tensor) -> torch.Tensor:
    """CPU float32 copy usable outside inference mode (inference tensors cannot be modified later)."""
    out = t.detach().to("cpu", torch.float32)
    return out.clone() if out.is_inference() else out


def autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in _AUTOCAST_DTYPES:
        return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[precision])
    return torch.autocast(device.type, enabled=False)


def to_cpu(res: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (to_cpu_f32(v) if k != "mask" else v.detach().cpu().clone()) for k, v in res.items()}


def check_layer(adapter, layer: str, model: str) -> str:
    layer = parse_layer(layer)
    if layer != "last" and not adapter.supports_layers:
        raise BadInputError(f"{model!r} ({adapter.name}) offers only its last layer; drop the layer option")
    return layer


