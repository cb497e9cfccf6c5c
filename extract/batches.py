"""Batches of one extraction: the fixed text and image batch plans, running the encoder over them and
writing each batch's rows (values, checksums, failures) to the feature file."""

from __future__ import annotations

import logging

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
from mmcache.progress import progress as reporter

log = logging.getLogger(__name__)

__all__ = ["ImageRows", "WriteBehind", "collate_image_rows", "progress_bar", "record_failures", "resolve_workers",
           "run_image", "run_text", "text_batches", "to_host", "write_batch"]

# ---------------------------------------------------------------------------------------------- writing

def to_host(out: dict, dtype: str, all_real: bool = False, tokens: bool = True) -> dict:
    """Encoder fields on the device -> the storage dtype, cast *there*, padded token states zeroed
    there, then copied to the host once (asynchronously into pinned memory on CUDA: ``"ready"`` is
    the event the writer thread waits on before reading).

    ``out``: ``cls``/``mean`` (B, D), ``tokens`` (B, T, D), ``proj`` (B, P) float, ``mask`` (B, T)
    bool (``all_real``: known all True, as for images: no zeroing pass). ``tokens=False`` (a lean
    file: ``extract --fields`` without tokens): token states and mask are neither zeroed nor copied
    (for bert-base at length 128 they are 97% of the bytes a batch moves). Returns the same keys as
    host tensors, ``dtype`` (float16 / float32), plus ``ready``."""
    import torch

    want = getattr(torch, dtype)
    mask = out["mask"].bool()
    cuda = mask.device.type == "cuda"
    host = {"mask": mask.to("cpu", non_blocking=cuda)} if tokens else {}
    for key in ("cls", "mean", "tokens", "proj"):
        if key in out and (tokens or key != "tokens"):
            v = out[key].to(want)
            if key == "tokens" and not all_real:
                v = v.masked_fill(~mask.unsqueeze(-1), 0)
            host[key] = v.to("cpu", non_blocking=cuda)
    host["ready"] = None
    if cuda:
        host["ready"] = torch.cuda.Event()
        host["ready"].record()
    return host


def _finite_split(rows: np.ndarray, out: dict, dtype: str):
    """-> (rows with finite values, their fields as numpy, [(row, reason)] for the others)."""
    if "ready" not in out:
        out = to_host(out, dtype)
    if out["ready"] is not None:
        out["ready"].synchronize()  # the device-to-host copy has landed
    vals = {k: out[k].numpy() for k in ("cls", "mean", "tokens", "mask", "proj") if k in out}
    finite = np.ones(len(rows), dtype=bool)
    for k in ("cls", "mean", "tokens", "proj"):
        if k in vals:
            finite &= np.isfinite(vals[k].reshape(len(rows), -1)).all(1)
    if finite.all():
        return rows, vals, []
    reason = f"non-finite features (overflow in {dtype} storage or reduced precision)"
    return rows[finite], {k: v[finite] for k, v in vals.items()}, [(int(r), reason) for r in rows[~finite]]


def _write_values(writer: cf.FeatureWriter, rows: np.ndarray, vals: dict) -> None:
    if rows.size:
        writer.write(rows, cls=vals["cls"], mean=vals["mean"], tokens=vals.get("tokens"), mask=vals.get("mask"),
                     proj=vals.get("proj"))


def keeps_tokens(writer) -> bool:
    """Whether ``writer`` stores token states (a lean file does not: they are never copied off the device)."""
    return "tokens" in writer.arrays


def write_batch(writer: cf.FeatureWriter, rows: np.ndarray, out: dict, dtype: str) -> tuple[int, list[tuple[int, str]]]:
    """Route non-finite rows to failures, write the rest.

    ``rows`` (B,) ascending file rows; ``out``: :func:`to_host` fields (already ``dtype``, padded
    token states zero), or an encoder's float32 fields (cast and zeroed here). Returns (rows written
    with features, [(row, reason)] failures)."""
    rows, vals, failures = _finite_split(rows, out, dtype)
    _write_values(writer, rows, vals)
    return int(rows.size), failures


def _merge(parts: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    """Batches -> one block in ascending row order, token fields right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    rows = np.concatenate([r for r, _v in parts])
    order = np.argsort(rows, kind="stable")
    t = max(v["mask"].shape[1] for _r, v in parts) if "mask" in parts[0][1] else 0
    vals = {}
    for k in parts[0][1]:
        if k in ("tokens", "mask"):
            blocks = [np.pad(v[k], [(0, 0), (0, t - v[k].shape[1])] + [(0, 0)] * (v[k].ndim - 2)) for _r, v in parts]
        else:
            blocks = [v[k] for _r, v in parts]
        vals[k] = np.concatenate(blocks)[order]
    return rows[order], vals


class WriteBehind:
    """Writes finished batches (checksums, NaN checks, HDF5) in one thread while the next forward runs.

    A bounded queue (``depth`` batches) keeps memory flat and lets the forward run at most ``depth``
    batches ahead of the disk. Whatever is waiting when the thread gets to it (up to ``block_bytes``)
    is written as one block: a writer that keeps up writes batch by batch, one that falls behind
    writes fewer, larger blocks (length-sorted text batches then land as longer runs of rows).
    ``coalesce=False`` (image batches: already one contiguous block each) writes batch by batch. The crash rule is :class:`~mmcache.cache.FeatureWriter`'s: a row is done only once its
    values, checksums and done bits are written, so ``kill -9`` loses at most the queued and held
    batches (recomputed on resume). Leaving the ``with`` block -- normally, on an interrupt or
    an error -- first writes every batch already queued (nothing finished is lost). A failure in the
    thread (disk full, ...) is raised in the caller, as the same exception, at its next :meth:`put`
    or at the end of the block; it is never swallowed.
    """

    def __init__(self, writer: cf.FeatureWriter, dtype: str, bar, depth: int = 8, block_bytes: int = 32 << 20,
                 coalesce: bool = True) -> None:
        import queue
        import threading

        self.writer, self.dtype, self.bar, self.block_bytes = writer, dtype, bar, block_bytes
        self._held: list = []  # finished batches not yet written: (rows, fields, pending)
        self._held_bytes = 0
        self.coalesce = coalesce
        self._stopping = False
        self._finished = threading.Event()
        self.encoded = self.failed = 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mmcache-write-behind", daemon=True)
        self._thread.start()

    def put(self, rows: np.ndarray, out: dict | None, fails: list[tuple[int, str]], pending: int) -> None:
        """Queue one batch: ``out`` from :func:`to_host` (None: only failures), ``pending`` rows of it
        still to do (progress and counts)."""
        import queue

        while True:
            self._raise_if_failed()
            try:
                self._queue.put((rows, out, fails, pending), timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._finished.set()

    def _loop(self) -> None:
        import queue

        while True:
            item = self._queue.get()
            while item is not None:
                if self._error is None:  # after a failure: drain, write nothing more
                    try:
                        self._hold(*item)
                    except BaseException as e:  # noqa: BLE001 -- handed to the caller by _raise_if_failed
                        self._error = e
                if self._held_bytes >= self.block_bytes or not self.coalesce:
                    break
                try:  # what else is already waiting joins this block; nothing waiting: write now
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._flush_unless_failed()
            if item is None:
                return

    def _hold(self, rows, out, fails, pending) -> None:
        if out is not None:
            rows, vals, more = _finite_split(rows, out, self.dtype)
            fails = fails + more
            if rows.size:
                self._held.append((rows, vals, pending))
                self._held_bytes += sum(v.nbytes for v in vals.values())
        record_failures(self.writer, fails)
        self.failed += len(fails)
        if out is None or not rows.size:
            self.bar.update(pending)

    def _flush(self) -> None:
        """Write the held batches as one block (few large HDF5 writes instead of one per batch and
        run), then their done bits: the crash rule of FeatureWriter.write, for the whole block."""
        if not self._held:
            return
        rows, vals = _merge([(r, v) for r, v, _p in self._held])
        _write_values(self.writer, rows, vals)
        for r, _v, pending in self._held:
            self.encoded += min(r.size, pending)
            self.bar.update(pending)
        self._held, self._held_bytes = [], 0

    def _flush_unless_failed(self) -> None:
        if self._error is None:
            try:
                self._flush()
            except BaseException as e:  # noqa: BLE001 -- handed to the caller by __exit__
                self._error = e

    def __enter__(self) -> WriteBehind:
        return self

    def _stop(self) -> None:
        """Hand over the end marker and wait until every queued batch is written."""
        import queue

        # Waits on an Event, not Thread.join: a Ctrl-C inside join() can leave the thread marked
        # stopped while it still runs (CPython gh-90882), and the writes must finish first.
        while not self._finished.is_set():  # the thread never ends before the marker: it always gets here
            if not self._stopping:
                try:
                    self._queue.put(None, timeout=0.1)
                    self._stopping = True
                except queue.Full:
                    continue
            self._finished.wait(timeout=0.1)

    def __exit__(self, exc_type, exc, tb) -> None:
        # A Ctrl-C that lands while we wait must not leave the thread writing as the process exits:
        # the writes of batches already computed finish first (a bounded wait), then it is raised.
        interrupt = None
        while True:
            try:
                self._stop()
                break
            except KeyboardInterrupt as e:
                interrupt = e
        if interrupt is not None and exc is None:
            raise interrupt
        if self._error is not None and exc is None:
            raise self._error
        if self._error is not None and exc is not self._error:
            log.error("writing a batch failed too: %s", self._error)


def record_failures(writer: cf.FeatureWriter, failures: list[tuple[int, str]]) -> None:
    if failures:
        rows, reasons = zip(*failures, strict=True)
        writer.write_failures(np.asarray(rows, dtype=np.int64), list(reasons))


def progress_bar(total: int, desc: str, progress: bool | None):
    """A tqdm bar on a terminal, a progress line every 10 s in a log file (None), nothing (False)."""

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


def prefetch(items, depth: int):
    """Iterate ``items`` in a background thread, up to ``depth`` ahead (tokenization off the main
    loop: the Rust tokenizer releases the GIL). An exception in the thread is raised here, in order;
    closing the generator early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not offer(("item", x)):
                    return
            offer(("end", None))
        except BaseException as e:  # noqa: BLE001 -- raised in the consumer below
            offer(("error", e))

    thread = threading.Thread(target=produce, name="mmcache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise x
            yield x
    finally:
        stop.set()
        thread.join()


def _text_stream(enc, texts: list[str], nonempty: np.ndarray, redo: np.ndarray, cfg: ExtractConfig):
    """(rows (B,) ascending, batch) of every planned text batch with a row to do: each window tokenized
    in one call, cut by :func:`text_batches`, right-padded (as TextEncoder.tokenize); pinned on CUDA."""
    bs = cfg.text_bs
    window = cfg.length_window or 64 * bs
    pin = enc.device.type == "cuda"
    for w0 in range(0, len(nonempty), window):
        wrows = nonempty[w0:w0 + window]
        if not redo[wrows].any():
            continue
        ids = enc.tokenizer([texts[r] for r in wrows], truncation=True, max_length=enc.max_length, padding=False,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths = np.asarray([len(x) for x in ids])
        for pos in text_batches(lengths, bs, len(wrows), cfg.length_grouping):
            rows = wrows[pos]
            if redo[rows].any():
                batch = enc.collate([ids[p] for p in pos])
                yield rows, ({k: v.pin_memory() for k, v in batch.items()} if pin else batch)


def run_text(writer, enc, texts: list[str], redo: np.ndarray, cfg: ExtractConfig, bar) -> tuple[int, int]:
    """Tokenize in a thread, forward in this one, write in another (:class:`WriteBehind`)."""
    empty = np.asarray([i for i, t in enumerate(texts) if not t.strip()], dtype=np.int64)
    nonempty = np.asarray([i for i, t in enumerate(texts) if t.strip()], dtype=np.int64)
    todo_empty = empty[redo[empty]] if empty.size else empty
    record_failures(writer, [(int(r), EMPTY_TEXT) for r in todo_empty])
    bar.update(len(todo_empty))
    cuda = enc.device.type == "cuda"
    tokens = keeps_tokens(writer)
    with WriteBehind(writer, cfg.dtype, bar) as wb:
        for rows, batch in prefetch(_text_stream(enc, texts, nonempty, redo, cfg), depth=8):
            out = to_host(enc.forward(batch, non_blocking=cuda), cfg.dtype, tokens=tokens)
            wb.put(rows, out, [], int(redo[rows].sum()))
    return wb.encoded, len(todo_empty) + wb.failed


# ---------------------------------------------------------------------------------------------- image

class ImageRows:
    """Map-style dataset over file rows: decode + preprocess, never raise.

    ``__getitem__(row)`` -> ``(row, pixels (3, H, W) float32 or None, failure reason or None)``;
    :meth:`batch` does a whole batch into one preallocated (B, 3, H, W) float32. Runs in DataLoader
    worker processes; holds only paths and the (picklable) preprocessor."""

    def __init__(self, files: list[str | None], preprocessor, max_pixels: int, timeout_s: float | None,
                 max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS, draft: bool = True) -> None:
        self.files, self.preprocessor = files, preprocessor
        self.max_pixels, self.timeout_s = max_pixels, timeout_s
        self.resize, self.max_resized_pixels = resize_plan(preprocessor.settings()), max_resized_pixels
        fast = getattr(preprocessor, "fast", None)
        # JPEG decoded at reduced scale, only under the "draft" decode policy the file records
        self.draft = fast.draft_size if fast is not None and draft else None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, row: int):
        """-> (RGB image, None) or (None, failure reason)."""
        try:
            return load_image(self.files[row], max_pixels=self.max_pixels, timeout_s=self.timeout_s,
                              resize=self.resize, max_resized_pixels=self.max_resized_pixels, draft=self.draft), None
        except ImageFailure as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 -- a worker must never die on one sample
            return None, f"unreadable image: {type(e).__name__}: {e}"

    @staticmethod
    def _preprocess_failed(e: Exception) -> str:
        return f"preprocessing failed: {type(e).__name__}: {' '.join(str(e).split())[:100]}"

    def __getitem__(self, row: int):
        img, why = self._load(row)
        if img is None:
            return row, None, why
        try:
            return row, self.preprocessor.one(img), None
        except Exception as e:  # noqa: BLE001
            return row, None, self._preprocess_failed(e)

    def batch(self, rows: list[int]):
        """-> as :func:`collate_image_rows`: (rows (B',) int64 ascending, pixels (B', 3, H, W) float32 or
        None, [(row, reason)]), the pixels written in place into one preallocated batch."""
        import torch

        fast = getattr(self.preprocessor, "fast", None)
        if fast is None:  # the processor's own output size: per image, then stacked
            return collate_image_rows([self[r] for r in rows])
        rows = sorted(rows)
        pixels = torch.empty((len(rows), 3, *fast.out_hw), dtype=torch.float32)
        ok, failures = [], []
        for r in rows:
            img, why = self._load(r)
            if img is not None:
                try:
                    self.preprocessor.into(img, pixels[len(ok)])
                except Exception as e:  # noqa: BLE001
                    img, why = None, self._preprocess_failed(e)
            if img is None:
                failures.append((int(r), why))
            else:
                ok.append(r)
        return np.asarray(ok, dtype=np.int64), (pixels[:len(ok)] if ok else None), failures


class _Batches:
    """The DataLoader's dataset: one index = one planned batch of rows (:meth:`ImageRows.batch`)."""

    def __init__(self, rows: ImageRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: list[int]):
        return self.rows.batch(batch)


def _as_is(batch):
    return batch


def collate_image_rows(items):
    """-> (rows (B',) int64 ndarray ascending, pixels (B', 3, H, W) float32 or None, [(row, reason)])."""
    import torch

    items = sorted(items, key=lambda t: t[0])
    ok = [(r, x) for r, x, why in items if why is None]
    failures = [(int(r), why) for r, _x, why in items if why is not None]
    rows = np.asarray([r for r, _x in ok], dtype=np.int64)
    pixels = torch.stack([x for _r, x in ok]) if ok else None
    return rows, pixels, failures


def resolve_workers(num_workers: int | str, device, batches: int) -> int:
    """Image decoding processes for ``--num-workers`` (``auto`` or a number), at most one per batch.

    ``auto``: on CUDA every core but one (the main process feeds the device and its copies), at most
    16; on a CPU device every core -- decoding and the forward then share the cores, and the forward
    of a real encoder leaves them idle while it waits on memory (see torch_threads in extraction)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers == "auto":
        num_workers = max(1, min(16, cores - 1)) if getattr(device, "type", str(device)) == "cuda" else cores
    return max(0, min(int(num_workers), batches))


def run_image(writer, enc, files: list[str | None], redo: np.ndarray, cfg: ExtractConfig, bar) -> tuple[int, int]:
    """Decode + preprocess in ``--num-workers`` processes (whole batches, pinned on CUDA, up to 4 per
    worker in flight), forward here, write in a thread (:class:`WriteBehind`)."""
    from torch.utils.data import DataLoader

    bs = cfg.image_bs
    plan = [np.arange(b0, min(b0 + bs, len(files))) for b0 in range(0, len(files), bs)]
    plan = [b.tolist() for b in plan if redo[b].any()]
    if not plan:
        return 0, 0
    workers = resolve_workers(cfg.num_workers, enc.device, len(plan))
    cuda = enc.device.type == "cuda"
    tokens = keeps_tokens(writer)
    rows_ds = ImageRows(files, enc.preprocessor, cfg.max_image_pixels, cfg.image_timeout_s, cfg.max_resized_pixels,
                        draft=cfg.decode == "draft")
    loader = DataLoader(
        _Batches(rows_ds), sampler=plan, batch_size=None, num_workers=workers, collate_fn=_as_is,
        pin_memory=cuda, timeout=cfg.loader_timeout_s if workers else 0,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    it = iter(loader)  # the workers fork here, before the writer thread starts
    try:
        with WriteBehind(writer, cfg.dtype, bar, coalesce=False) as wb:
            for batch in plan:
                try:
                    rows, pixels, fails = next(it)
                except StopIteration:  # pragma: no cover -- the sampler fixes the number of batches
                    break
                except RuntimeError as e:
                    raise ResumableError(f"image loading stopped: {' '.join(str(e).split())[:200]}. Finished "
                                         "batches are saved") from e
                out = None
                if pixels is not None:  # inference mode: set by extract_shard around the loop
                    out = to_host(enc.forward(pixels, non_blocking=cuda), cfg.dtype, all_real=True, tokens=tokens)
                wb.put(rows, out, fails, int(redo[np.asarray(batch)].sum()))
    finally:
        del it  # shuts the worker processes down
    return wb.encoded, wb.failed
