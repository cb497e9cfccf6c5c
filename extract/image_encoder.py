"""The frozen image encoder of any registered family (:class:`ImageEncoder`, :func:`load_image_encoder`) and
its preprocessing (:class:`ImagePreprocessor`): ``cls`` / ``mean`` (B, D), ``tokens`` (B, T, D) over the
family's patch grid, ``mask`` (B, T) bool, CPU float32."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from mmcache.extract.adapters import find_adapter, select_layer
from mmcache.extract.hub import library_versions, load_config, source_info
from mmcache.extract.runtime import autocast, check_layer, resolve_precision, to_cpu

from mmcache.cache.encoder import readable_name
from mmcache.common import resolve_device
from mmcache.errors import BadInputError

log = logging.getLogger(__name__)


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


#: Largest difference (normalised units) the fast path may show against the checkpoint's own processor
#: on the self-check image; measured ~1e-6 (float32 rounding of the fused rescale + normalise).
FAST_TOLERANCE = 1e-4


class FastPlan:
    """One resize + centre crop + rescale/normalise, as the checkpoint's PIL image processor does it
    (transformers' PIL backend: ``get_resize_output_image_size`` sizes, PIL ``resize``, ``(H - h) // 2``
    crops, ``x * rescale`` then ``(x - mean) / std``), written into a preallocated (3, H, W) float32.

    Built from :meth:`ImagePreprocessor.settings`; :func:`FastPlan.from_settings` returns None for
    settings it does not cover (then the processor itself runs)."""

    def __init__(self, resize, crop, resample: int, mul, add, out_hw: tuple[int, int]) -> None:
        import numpy as np

        self.resize, self.crop, self.resample, self.out_hw = resize, crop, resample, out_hw
        self.mul = np.asarray(mul, np.float32)  # (3,) = rescale / std
        self.add = np.asarray(add, np.float32)  # (3,) = -mean / std

    @classmethod
    def from_settings(cls, s: dict) -> FastPlan | None:
        size, crop = s.get("size") if s.get("do_resize", True) else None, None
        if s.get("do_center_crop") and isinstance(s.get("crop_size"), dict):
            crop = (int(s["crop_size"]["height"]), int(s["crop_size"]["width"]))
        if size is None:
            resize = None
        elif isinstance(size, dict) and size.get("height") and size.get("width") and not size.get("shortest_edge"):
            resize = ("fixed", int(size["height"]), int(size["width"]))
        elif isinstance(size, dict) and size.get("shortest_edge") and not size.get("longest_edge"):
            short, pct = int(size["shortest_edge"]), s.get("crop_pct")
            if pct and short < 384:  # ConvNeXt-style: resize to short / crop_pct, crop short x short
                resize, crop = ("short", int(short / float(pct))), (short, short)
            elif pct:
                resize, crop = ("fixed", short, short), None
            else:
                resize = ("short", short)
        else:
            return None
        out_hw = crop or (resize[1:] if resize and resize[0] == "fixed" else None)
        if out_hw is None:
            return None  # output size would follow the input's: no fixed batch to preallocate
        scale = float(s.get("rescale_factor", 1 / 255)) if s.get("do_rescale", True) else 1.0
        mean, std = ((s.get("image_mean"), s.get("image_std")) if s.get("do_normalize", True) else (None, None))
        mean = [float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean or 0.0] * 3)]
        std = [float(x) for x in (std if isinstance(std, (list, tuple)) else [std or 1.0] * 3)]
        mul = [scale / sd for sd in std]
        add = [-m / sd for m, sd in zip(mean, std, strict=True)]
        return cls(resize, crop, int(s.get("resample", 2)), mul, add, (int(out_hw[0]), int(out_hw[1])))

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(W, H) of the resize step for a ``w`` x ``h`` image (before the crop)."""
        if self.resize is None:
            return w, h
        if self.resize[0] == "fixed":
            return self.resize[2], self.resize[1]
        short = self.resize[1]
        if w <= h:
            return short, int(short * h / w)
        return int(short * w / h), short

    def draft_size(self, w: int, h: int) -> tuple[int, int] | None:
        """What to ask ``Image.draft`` for: the resized size when it is at most half the source in
        both sides (JPEG then decodes at 1/2, 1/4 or 1/8 scale, never below it), else None."""
        tw, th = self.resized_size(w, h)
        return (tw, th) if 2 * tw <= w and 2 * th <= h else None

    def into(self, img, out) -> bool:
        """Write RGB PIL ``img`` preprocessed into ``out`` (3, H, W) float32 (numpy); False when the
        crop would need padding (the processor then runs instead)."""
        import numpy as np

        w, h = img.size
        tw, th = self.resized_size(w, h)
        if (tw, th) != (w, h):
            img = img.resize((tw, th), resample=self.resample)
        a = np.asarray(img)  # (th, tw, 3) uint8
        if self.crop:
            ch, cw = self.crop
            top, left = (th - ch) // 2, (tw - cw) // 2
            if top < 0 or left < 0:
                return False
            a = a[top:top + ch, left:left + cw]
        for c in range(3):
            np.multiply(a[:, :, c], self.mul[c], out=out[c])
            out[c] += self.add[c]
        return True


class ImagePreprocessor:
    """Picklable image -> tensor transform: the checkpoint's own image processor, nothing else.

    Holds no model, so it is cheap to send to DataLoader worker processes. :meth:`into` is the fast
    path (:class:`FastPlan`), used only when it matches the processor on a self-check image within
    :data:`FAST_TOLERANCE`; otherwise it runs the processor.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self.fast = self._checked_plan()

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
        """One PIL image -> (3, H, W) float32 (the fast path when it applies)."""
        if self.fast is not None:
            out = torch.empty((3, *self.fast.out_hw), dtype=torch.float32)
            if self.fast.into(self._rgb(img), out.numpy()):
                return out
        return self([img])[0]

    def into(self, img, out: torch.Tensor) -> None:
        """Preprocess one PIL image into ``out`` (3, H, W) float32, a slot of a preallocated batch."""
        if self.fast is None or not self.fast.into(self._rgb(img), out.numpy()):
            out.copy_(self([img])[0])

    def _checked_plan(self) -> FastPlan | None:
        """The fast path, if it reproduces the processor on an odd-sized random image."""
        import numpy as np
        from PIL import Image

        try:
            plan = FastPlan.from_settings(self.settings())
            if plan is None:
                return None
            probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (301, 517, 3), dtype=np.uint8))
            ref = self([probe])[0].numpy()
            mine = np.empty((3, *plan.out_hw), np.float32)
            ok = ref.shape == mine.shape and plan.into(probe, mine) and float(np.abs(ref - mine).max()) <= FAST_TOLERANCE
        except Exception as e:  # noqa: BLE001 -- an unusual processor: keep using it as it is
            log.debug("no fast image preprocessing for %s: %s", type(self.processor).__name__, e)
            return None
        if not ok:
            log.debug("fast image preprocessing differs from %s: using the processor", type(self.processor).__name__)
        return plan if ok else None

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
        return to_cpu(self.forward(pixel_values))

    def forward(self, pixel_values: torch.Tensor, non_blocking: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`encode` without the copy back: the same fields, on the device, in the compute dtype
        (``extract`` casts them to the storage dtype there and copies each batch to the host once).
        ``non_blocking``: copy pinned ``pixel_values`` to the device asynchronously."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.input_hw:
            raise BadInputError(
                f"expected pixel_values (B, 3, {self.input_hw[0]}, {self.input_hw[1]}), "
                f"got {tuple(pixel_values.shape)}; use preprocess()"
            )
        return self._forward(pixel_values.to(self.device, torch.float32, non_blocking=non_blocking))

    def _forward(self, pv: torch.Tensor) -> dict[str, torch.Tensor]:
        ad = self.adapter
        with torch.inference_mode(), autocast(self.device, self.precision):
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
            **library_versions(),
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


def image_parts(model: str, revision: str | None):
    """(config, adapter, processor, local_only): everything checked before the weights are read."""
    config, local_only = load_config(model, "image", revision)
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
    config, adapter, processor, local_only = image_parts(model, revision)
    layer = check_layer(adapter, layer, model)
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
        raw_grid=raw_grid, grid=grid, num_prefix_tokens=prefix, _source=source_info(model, config),
        adapter=adapter, layer=layer, name=readable_name(model, name),
        proj_size=int(proj.shape[-1]) if proj is not None else None,
    )


