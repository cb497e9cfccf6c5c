"""Safe image decoding for stage one: every way an image file can be bad becomes one short reason.

Dataset images are untrusted input. :func:`load_image` never returns a half-decoded picture:

* a file whose header claims more than ``max_pixels`` pixels is refused *before* any pixel is decoded
  ("decompression bomb: ..."); PIL's own bomb check (``Image.MAX_IMAGE_PIXELS``) is turned into the
  same failure, so the effective cap is ``min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)``;
* a small image of extreme shape is refused before decoding too when the image processor's
  aspect-keeping resize would blow it up past ``max_resized_pixels`` ("image_too_large: ..."): a
  60000 x 1 PNG resized to a shortest edge of 256 would be 15,360,000 x 256 pixels (~47 GB as float32);
* truncated files fail ("truncated image: ..."): ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set;
* anything PIL cannot identify fails ("cannot identify image"), as does any other decode error
  ("unreadable image: ...").

A decoded image is returned as RGB; alpha (RGBA, LA, PA, palette transparency) is composited onto
white, as ``transformers.image_transforms.convert_to_rgb`` does. Multi-frame files give their first
frame. EXIF orientation is not applied (the Hugging Face image processors do not apply it either).
"""

from __future__ import annotations

import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

#: Default pixel cap: PIL's own warning threshold (~89.5 MP, e.g. 9459 x 9459).
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
#: Default cap on the processor's resized image (~48 MB as float32 RGB): at a shortest edge of 256 it
#: admits aspect ratios up to ~61:1, at 224 up to ~80:1.
DEFAULT_MAX_RESIZED_PIXELS = 4_000_000
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageFailure(Exception):
    """An image that cannot be used; ``str(exc)`` is the reason recorded in the cache."""


@contextmanager
def _time_limit(seconds: float | None):
    """Best-effort per-image time limit via SIGALRM; only where that is safe (a DataLoader worker
    process, which owns its main thread). Elsewhere a no-op: the DataLoader timeout is the backstop."""
    from torch.utils.data import get_worker_info

    usable = (seconds and hasattr(signal, "SIGALRM") and get_worker_info() is not None
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def _raise(signum, frame):  # noqa: ARG001
        raise ImageFailure(f"decode timeout: took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _short(exc: BaseException, limit: int = 100) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resize_plan(settings: dict) -> tuple[int, int | None] | None:
    """``(shortest_edge, longest_edge or None)`` of an image processor's aspect-keeping resize, from its
    settings (``ImagePreprocessor.settings()``); None when it resizes to a fixed size or not at all
    (then the output size does not depend on the input's shape). ``crop_pct`` (ConvNeXt / ResNet
    processors) resizes to ``shortest_edge / crop_pct`` before cropping."""
    if not settings.get("do_resize", True):
        return None
    size = settings.get("size")
    if isinstance(size, int):
        short, longest = size, None
    elif isinstance(size, dict) and size.get("shortest_edge"):
        short, longest = int(size["shortest_edge"]), size.get("longest_edge")
    else:
        return None
    crop_pct = settings.get("crop_pct")
    if crop_pct and short < 384:
        short = int(short / float(crop_pct))
    return short, int(longest) if longest else None


def resized_size(w: int, h: int, plan: tuple[int, int | None]) -> tuple[int, int]:
    """(W, H) an image of ``w`` x ``h`` becomes under :func:`resize_plan`'s ``plan``."""
    short, longest = plan
    scale = short / min(w, h)
    if longest:
        scale = min(scale, longest / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def check_resized(w: int, h: int, plan: tuple[int, int | None] | None, max_resized_pixels: int) -> None:
    """Raise ``image_too_large`` when the processor would resize ``w`` x ``h`` past the cap."""
    if plan is None or w < 1 or h < 1:
        return
    rw, rh = resized_size(w, h, plan)
    if rw * rh > max_resized_pixels:
        raise ImageFailure(f"image_too_large: {w}x{h} would be resized to {rw}x{rh} = {rw * rh} pixels > limit "
                           f"{max_resized_pixels} (aspect ratio {max(w, h) / min(w, h):.0f}:1)")


def load_image(path: str | Path | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               timeout_s: float | None = None, resize: tuple[int, int | None] | None = None,
               max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS, draft=None) -> Image.Image:
    """Decode ``path`` fully into an RGB :class:`PIL.Image.Image`.

    ``resize``: the processor's :func:`resize_plan`; an image it would blow up past
    ``max_resized_pixels`` is refused from its header, before decoding. ``draft``: ``(w, h) -> (W, H)
    or None``, the size the preprocessing will resize to when that is at most half the source
    (:meth:`extract.image_encoder.FastPlan.draft_size`); a JPEG is then decoded at the largest
    1/2, 1/4 or 1/8 scale still at least that big (``Image.draft``: 2-4x less decoding work).

    Raises:
        ImageFailure: with the reason: "no image path", "missing image file", "decompression bomb: ...",
            "image_too_large: ...", "truncated image: ...", "cannot identify image", "decode timeout: ...",
            "unreadable image: ...".
    """
    if path is None or str(path) == "":
        raise ImageFailure("no image path")
    p = Path(path)
    if not p.is_file():
        if p.is_symlink():  # a dangling link or a symlink loop (is_file says False for both)
            raise ImageFailure("unreadable image: broken symlink or symlink loop")
        raise ImageFailure("missing image file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with _time_limit(timeout_s), Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageFailure(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
                if w < 1 or h < 1:
                    raise ImageFailure(f"unreadable image: empty {w}x{h} image")
                check_resized(w, h, resize, max_resized_pixels)
                target = draft(w, h) if draft is not None and im.format == "JPEG" else None
                if target is not None:
                    im.draft(None, target)  # mode kept: _to_rgb converts after
                im.load()  # decodes every pixel now; truncated data raises here
                out = _to_rgb(im)
                out.load()
                return out
        except ImageFailure:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageFailure(f"decompression bomb: {_short(e)}") from None
        except UnidentifiedImageError:
            raise ImageFailure("cannot identify image") from None
        except (OSError, SyntaxError) as e:
            msg = _short(e)
            if "truncated" in msg.lower() or "broken data stream" in msg.lower():
                raise ImageFailure(f"truncated image: {msg}") from None
            raise ImageFailure(f"unreadable image: {type(e).__name__}: {msg}") from None
        except Exception as e:  # noqa: BLE001 -- untrusted input: any decoder error is a failed sample
            raise ImageFailure(f"unreadable image: {type(e).__name__}: {_short(e)}") from None
