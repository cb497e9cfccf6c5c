"""Batches of one extraction: the fixed text and image batch plans, running the encoder over them and
writing each batch's rows (values, checksums, failures) to the feature file."""

from __future__ import annotations

import numpy as np
from mmcache.extract.config import EMPTY_TEXT, ExtractConfig
from mmcache.extract.images import (
    DEFAULT_MAX_RESIZED_PIXELS,
    ImageFailure,
    load_image,
    resize_plan,
)

from mmcache import cache as cf
from mmcache.errors import ResumableError

__all__ = ["ImageRows", "collate_image_rows", "progress_bar", "record_failures", "run_image", "run_text",
           "text_batches", "write_batch"]

# ---------------------------------------------------------------------------------------------- writing

def write_batch(writer: cf.FeatureWriter, rows: np.ndarray, out: dict, dtype: str) -> tuple[int, list[tuple[int, str]]]:
    """Cast to the storage dtype, zero padded token states, route non-finite rows to failures.

    ``rows`` (B,) ascending file rows; ``out`` from an encoder: cls/mean (B, D), tokens (B, T, D) float32
    tensors, mask (B, T) bool. Returns (rows written with features, [(row, reason)] failures)."""
    mask = out["mask"].numpy().astype(bool)
    cls = out["cls"].numpy().astype(dtype)
    mean = out["mean"].numpy().astype(dtype)
    tokens = out["tokens"].numpy().astype(dtype)
    proj = out["proj"].numpy().astype(dtype) if "proj" in out else None
    tokens[~mask] = 0
    finite = (np.isfinite(cls).all(1) & np.isfinite(mean).all(1)
              & np.isfinite(tokens.reshape(len(rows), -1)).all(1))
    if proj is not None:
        finite &= np.isfinite(proj).all(1)
    failures: list[tuple[int, str]] = []
    if not finite.all():
        reason = f"non-finite features (overflow in {dtype} storage or reduced precision)"
        failures = [(int(r), reason) for r in rows[~finite]]
        rows, cls, mean, tokens, mask = rows[finite], cls[finite], mean[finite], tokens[finite], mask[finite]
        proj = proj[finite] if proj is not None else None
    if rows.size:
        writer.write(rows, cls=cls, mean=mean, tokens=tokens, mask=mask, proj=proj)
    return int(rows.size), failures


def record_failures(writer: cf.FeatureWriter, failures: list[tuple[int, str]]) -> None:
    if failures:
        rows, reasons = zip(*failures, strict=True)
        writer.write_failures(np.asarray(rows, dtype=np.int64), list(reasons))


def progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar on a terminal, a progress line every 10 s in a log file (None), nothing (False)."""
    from mmcache.progress import progress as reporter

    return reporter(total, f"extract {desc}", "sample", enabled=progress)


# ---------------------------------------------------------------------------------------------- text

def text_batches(lengths: np.ndarray, batch_size: int, window: int, grouping: bool = True) -> list[np.ndarray]:
    """The fixed batch plan over ``len(lengths)`` items: windows of ``window`` consecutive items,
    each sorted by length (stable) when ``grouping``, cut into ``batch_size`` batches. Returns
    positions into ``lengths``, each batch ascending."""
    plan = []
    for w0 in range(0, len(lengths), window):
        pos = np.arange(w0, min(w0 + window, len(lengths)))
        if grouping:
            pos = pos[np.argsort(lengths[pos], kind="stable")]
        for b0 in range(0, len(pos), batch_size):
            plan.append(np.sort(pos[b0:b0 + batch_size]))
    return plan


def run_text(writer, enc, texts: list[str], redo: np.ndarray, cfg: ExtractConfig, bar) -> tuple[int, int]:
    nonempty = np.asarray([i for i, t in enumerate(texts) if t.strip()], dtype=np.int64)
    empty = np.asarray([i for i, t in enumerate(texts) if not t.strip()], dtype=np.int64)
    todo_empty = empty[redo[empty]] if empty.size else empty
    record_failures(writer, [(int(r), EMPTY_TEXT) for r in todo_empty])
    bar.update(len(todo_empty))
    encoded, failed = 0, len(todo_empty)
    bs = cfg.text_bs
    window = cfg.length_window or 64 * bs
    tok = enc.tokenizer
    for w0 in range(0, len(nonempty), window):
        wrows = nonempty[w0:w0 + window]
        if not redo[wrows].any():
            continue
        ids = tok([texts[r] for r in wrows], truncation=True, max_length=enc.max_length, padding=False,
                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths = np.asarray([len(x) for x in ids])
        for pos in text_batches(lengths, bs, len(wrows), cfg.length_grouping):
            rows = wrows[pos]
            if not redo[rows].any():
                continue
            out = enc.encode(enc.collate([ids[p] for p in pos]))  # right-padded, as TextEncoder.tokenize
            n_ok, fails = write_batch(writer, rows, out, cfg.dtype)
            record_failures(writer, fails)
            pending = int(redo[rows].sum())
            encoded += min(n_ok, pending)
            failed += len(fails)
            bar.update(pending)
    return encoded, failed


# ---------------------------------------------------------------------------------------------- image

class ImageRows:
    """Map-style dataset over file rows: decode + preprocess one image, never raise.

    ``__getitem__(row)`` -> ``(row, pixels (3, H, W) float32 or None, failure reason or None)``.
    Runs in DataLoader worker processes; holds only paths and the (picklable) preprocessor."""

    def __init__(self, files: list[str | None], preprocessor, max_pixels: int, timeout_s: float | None,
                 max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS) -> None:
        self.files, self.preprocessor = files, preprocessor
        self.max_pixels, self.timeout_s = max_pixels, timeout_s
        self.resize, self.max_resized_pixels = resize_plan(preprocessor.settings()), max_resized_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int):
        try:
            img = load_image(self.files[row], max_pixels=self.max_pixels, timeout_s=self.timeout_s,
                             resize=self.resize, max_resized_pixels=self.max_resized_pixels)
        except ImageFailure as e:
            return row, None, str(e)
        except Exception as e:  # noqa: BLE001 -- a worker must never die on one sample
            return row, None, f"unreadable image: {type(e).__name__}: {e}"
        try:
            return row, self.preprocessor.one(img), None
        except Exception as e:  # noqa: BLE001
            return row, None, f"preprocessing failed: {type(e).__name__}: {' '.join(str(e).split())[:100]}"


def collate_image_rows(items):
    """-> (rows (B',) int64 ndarray ascending, pixels (B', 3, H, W) float32 or None, [(row, reason)])."""
    import torch

    items = sorted(items, key=lambda t: t[0])
    ok = [(r, x) for r, x, why in items if why is None]
    failures = [(int(r), why) for r, _x, why in items if why is not None]
    rows = np.asarray([r for r, _x in ok], dtype=np.int64)
    pixels = torch.stack([x for _r, x in ok]) if ok else None
    return rows, pixels, failures


def run_image(writer, enc, files: list[str | None], redo: np.ndarray, cfg: ExtractConfig, bar) -> tuple[int, int]:
    from torch.utils.data import DataLoader

    bs = cfg.image_bs
    plan = [np.arange(b0, min(b0 + bs, len(files))) for b0 in range(0, len(files), bs)]
    plan = [b.tolist() for b in plan if redo[b].any()]
    if not plan:
        return 0, 0
    workers = min(cfg.num_workers, len(plan))
    loader = DataLoader(
        ImageRows(files, enc.preprocessor, cfg.max_image_pixels, cfg.image_timeout_s, cfg.max_resized_pixels),
        batch_sampler=plan, num_workers=workers, collate_fn=collate_image_rows,
        pin_memory=enc.device.type == "cuda", timeout=cfg.loader_timeout_s if workers else 0,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    encoded = failed = 0
    it = iter(loader)
    try:
        for batch in plan:
            try:
                rows, pixels, fails = next(it)
            except StopIteration:  # pragma: no cover -- the sampler fixes the number of batches
                break
            except RuntimeError as e:
                raise ResumableError(f"image loading stopped: {' '.join(str(e).split())[:200]}. Finished "
                                     "batches are saved") from e
            pending = int(redo[np.asarray(batch)].sum())
            n_ok = 0
            if pixels is not None:
                out = enc.encode(pixels)  # inference mode: set by extract_shard around the loop
                n_ok, more = write_batch(writer, rows, out, cfg.dtype)
                fails = fails + more
            record_failures(writer, fails)
            encoded += min(n_ok, pending)
            failed += len(fails)
            bar.update(pending)
    finally:
        del it  # shuts the worker processes down
    return encoded, failed


