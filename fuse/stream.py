"""Streamed features: training on token arrays larger than the memory budget (``--max-memory``).

:func:`fuse.data.load_data` compares the bytes of the big feature arrays a run needs (``tokens``
(N, L, D), or the (N, D) vectors) with the budget. When they fit, they are read whole as always. When not,
each modality's ``x`` is a :class:`StreamedArray` (rows read from the HDF5 file on demand, in chunk-aligned
blocks, every done row checked against its checksum) and the data carries a :class:`StreamPlan`. The small
arrays (``mask`` (N, L) bool, ``valid``, labels, split rows: ~1/(2D) of the tokens' bytes) stay in memory.

Training order in streamed mode (:meth:`StreamPlan.batches`): the train rows' blocks in a shuffled order
(a numpy generator of ``(stream_seed, epoch)``), grouped into *windows* of at most ``buffer_rows`` rows; a
window's rows are sorted, permuted by ``torch.randperm(n, generator=Generator(stream_seed))`` (the one
generator of the run, drawn once per window) and cut into batches, the tail carried into the next window,
so every epoch has ``ceil(n / batch_size)`` steps. A background thread reads the next blocks into a bounded
queue meanwhile. With a buffer as large as the train split there is one window holding the split in row
order, so the batches are exactly the in-memory ones of a run whose ``seed`` equals ``stream_seed``
(``tests/test_stream.py``). Smaller buffers shuffle only within a window (block shuffle): the order differs,
the numbers too, training still works.

The order is a function of ``stream_seed``, the files and the window alone, never of the free memory: a block
is at most 1/:data:`BLOCKS_PER_BUFFER` of the window (not of the budget), and the window is the config's
``shuffle_buffer`` or, when that is auto, resolved from the budget (:func:`resolve_window`) and then written
into the run's config.json with ``streamed`` (:func:`fuse.data.choose_streaming`), so a rerun of the stored
config and the ablation key (:func:`fuse.ablate.grid.run_key`) see the window the run was trained with.

Validation, test and scoring read sequentially through :class:`StreamedArray` (no shuffle, no thread).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmcache.cache.blocks import BLOCK_BYTES, BlockReader, array_nbytes
from mmcache.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_FRACTION", "StreamPlan", "StreamedArray", "default_budget", "epoch_batches", "parse_size",
           "plan_stream", "resolve_window"]

# Share of MemAvailable (or free device memory) a run's features may take by default. Half: the rest is
# for the model, its activations and optimizer state, the OS page cache that the HDF5 reads go through,
# and the other processes of an ablation (which runs several jobs side by side).
DEFAULT_FRACTION = 0.5
# Of the budget, first the resident arrays and WORKING_BYTES (the model, one batch in float32 and its
# activations, torch's scratch: measured 10-15 MB for self_attention on 64 x 512 tokens, batch 16) are set
# aside; of the rest, BUFFER_SHARE is the shuffle buffer and PREFETCH_SHARE the blocks read ahead (each is
# read whole, then its wanted rows copied: up to twice that). Measured peak RSS over the interpreter's
# (tests/test_stream.py's child, 128 KB rows): 20, 25, 47 MB for budgets of 24, 32, 64 MB.
WORKING_BYTES = 16 << 20
BUFFER_SHARE = 0.5
PREFETCH_SHARE = 0.1
# A block (the unit the epoch order shuffles) is at most this fraction of the shuffle buffer, so that a window
# mixes many blocks. Derived from the buffer, not from the budget: the order depends on the window alone.
BLOCKS_PER_BUFFER = 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes of ``"512M"``, ``"4G"``, ``"1.5G"``, ``"300MiB"`` or plain ``"1000000"`` (units are 1024-based).
    :class:`BadInputError` for anything else or a size below 1 MiB."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE)
        if m is None:
            raise BadInputError(f"--max-memory {text!r}: expected bytes or a size like 512M, 4G")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1 << 20:
        raise BadInputError(f"--max-memory {text!r}: at least 1M is needed")
    return value


def default_budget(device: torch.device) -> int:
    """:data:`DEFAULT_FRACTION` of the free host memory; on CUDA also at most that share of the free device
    memory (in-memory features live there)."""
    from mmcache.fuse.stack import available_memory

    host = available_memory(torch.device("cpu"))
    free = min(host, available_memory(device)) if device.type == "cuda" else host
    return int(DEFAULT_FRACTION * free)


# --------------------------------------------------------------------------------------------- random access

class StreamedArray:
    """Stands in for :attr:`ModalityData.x` when features are streamed: ``shape`` (N, L, D) (L = 1 for
    vectors), ``x[rows]`` / ``x[rows, :n]`` read those rows ((B,) int64, any order) from the file and return a
    tensor in the stored dtype on :attr:`device`. Reads go block by block with the last block kept, so
    ascending rows (validation, test) read each block once."""

    def __init__(self, reader: BlockReader, vector: bool) -> None:
        self.reader, self.vector = reader, vector
        n, *rest = reader.shape
        self.shape = torch.Size((n, 1, *rest) if vector else (n, *rest))
        self.dtype = torch.from_numpy(np.zeros(0, dtype=reader.dtype)).dtype
        self.device = torch.device("cpu")
        self._last: tuple[int, np.ndarray] | None = None

    def to(self, device: str | torch.device) -> StreamedArray:
        self.device = torch.device(device)
        return self

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """(B, ...) stored-dtype numpy of ``rows`` (B,) int64 (as stored: no token axis added)."""
        out = np.empty((rows.size, *self.reader.shape[1:]), dtype=self.reader.dtype)
        blocks = rows // self.reader.block_rows
        for blk in np.unique(blocks):
            a, b = self.reader.block_of(int(blk) * self.reader.block_rows)
            if self._last is None or self._last[0] != a:
                self._last = None  # drop the old block before reading the next: one block resident
                self._last = (a, self.reader.read(a, b))
            sel = blocks == blk
            out[sel] = self._last[1][rows[sel] - a]
        return out

    def __getitem__(self, key) -> Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        x = torch.from_numpy(self.rows(torch.as_tensor(rows).reshape(-1).cpu().numpy().astype(np.int64)))
        if self.vector:
            x = x.unsqueeze(1)
        return (x[(slice(None), *rest)] if rest else x).to(self.device)

    def float(self) -> Tensor:
        raise BadInputError(f"{self.reader.path}: its features are streamed (over the memory budget), not in "
                            "memory; give a larger --max-memory for this command")


# --------------------------------------------------------------------------------------------- plan

@dataclass
class StreamPlan:
    """How a run streams: its ``budget`` (bytes), ``buffer_rows`` (rows of every streamed modality in the
    shuffle buffer), ``prefetch`` (blocks queued ahead) and the modalities' :class:`StreamedArray`."""

    budget: int
    needed: int
    buffer_rows: int
    prefetch: int
    arrays: dict[str, StreamedArray] = field(default_factory=dict)

    @property
    def block_rows(self) -> int:
        return max(a.reader.block_rows for a in self.arrays.values())

    def summary(self) -> dict[str, int]:
        return {"budget": self.budget, "needed": self.needed, "buffer_rows": self.buffer_rows,
                "prefetch_blocks": self.prefetch, "block_rows": self.block_rows}

    def batches(self, rows: Tensor, batch_size: int, generator: torch.Generator, epoch: int, seed: int,
                device: torch.device) -> _Epoch:
        """One epoch's batches of the (n,) ascending ``rows``: a context manager yielding (rows (b,) int64 on
        ``device``, {modality: (b, L, D) stored dtype on ``device``}); closing it stops its reader thread."""
        return _Epoch(self, rows.cpu().numpy(), batch_size, generator, np.random.default_rng((seed, epoch)),
                      device)

    def close(self) -> None:
        for a in self.arrays.values():
            a.reader.close()


def resolve_window(budget: int, resident: int, row_bytes: int, n_rows: int, shuffle_buffer: int | None) -> int:
    """Rows of the shuffle window of a stream within ``budget`` bytes (``resident`` taken by the in-memory
    arrays, ``row_bytes`` a row of every streamed modality together). ``shuffle_buffer`` (rows) when given:
    :class:`BadInputError` naming the budget when it does not fit. Auto (None / 0): the largest power of two
    that fits, at most ``n_rows`` -- rounded down so that a little more or less free memory leaves the
    window, so the numbers and the ablation key, as they were. 0 when nothing fits (:func:`plan_stream` says so)."""
    most = int(BUFFER_SHARE * max(0, budget - resident - WORKING_BYTES) // max(1, row_bytes))
    if shuffle_buffer:
        if shuffle_buffer > most:
            raise BadInputError(f"--shuffle-buffer {shuffle_buffer:,} rows does not fit the memory budget of "
                                f"{budget:,} bytes (--max-memory; default half of the free memory): it allows at "
                                f"most {most:,} rows of {row_bytes:,} bytes")
        return shuffle_buffer
    return min(n_rows, 1 << (most.bit_length() - 1)) if most > 0 else 0


def plan_stream(paths: dict[str, Path], field_name: str, resident: int, budget: int, needed: int,
                shuffle_buffer: int | None = None) -> StreamPlan:
    """The stream of ``field_name`` of the modality files ``paths`` within ``budget`` bytes, of which
    ``resident`` are taken by the in-memory arrays; ``shuffle_buffer``: the window's rows (None: auto, see
    :func:`resolve_window`). :class:`BadInputError` when not even one block fits, or the window does not."""
    free = max(0, budget - resident - WORKING_BYTES)
    row_bytes, n_rows = 0, 0
    for p in paths.values():
        nbytes, shape = array_nbytes(p, field_name)
        n_rows = shape[0] if shape else 0
        row_bytes += nbytes // max(1, n_rows)
    buffer_rows = resolve_window(budget, resident, row_bytes, n_rows, shuffle_buffer)
    block_bytes = min(BLOCK_BYTES, buffer_rows * row_bytes // BLOCKS_PER_BUFFER)
    readers = {m: BlockReader(p, field_name, block_bytes=block_bytes) for m, p in paths.items()}
    vector = field_name != "tokens"
    arrays = {m: StreamedArray(r, vector) for m, r in readers.items()}
    block_rows = max(r.block_rows for r in readers.values())
    prefetch = int(PREFETCH_SHARE * free // max(1, block_rows * row_bytes))
    if free <= 0 or buffer_rows < block_rows:
        for r in readers.values():
            r.close()
        need = resident + WORKING_BYTES + int(block_rows * row_bytes / BUFFER_SHARE)
        what = f"--shuffle-buffer {shuffle_buffer:,} rows" if shuffle_buffer else f"--max-memory {budget:,} bytes"
        raise BadInputError(f"{what} is too small to stream these features: the in-memory arrays take "
                            f"{resident:,} bytes, training {WORKING_BYTES:,} and a buffer of one block "
                            f"({block_rows:,} rows) {block_rows * row_bytes:,}; give a --max-memory of at least "
                            f"{need:,}" + (f" and a --shuffle-buffer of at least {block_rows}" if shuffle_buffer else ""))
    return StreamPlan(budget=budget, needed=needed, buffer_rows=buffer_rows, prefetch=max(1, prefetch),
                      arrays=arrays)


# --------------------------------------------------------------------------------------------- one epoch

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Epoch:
    """One epoch of a :class:`StreamPlan` (see :meth:`StreamPlan.batches`)."""

    def __init__(self, plan: StreamPlan, rows: np.ndarray, batch_size: int, generator: torch.Generator,
                 rng: np.random.Generator, device: torch.device) -> None:
        self.plan, self.rows, self.bs, self.gen, self.device = plan, rows, batch_size, generator, device
        br = plan.block_rows
        starts = np.unique(rows // br) * br
        order = starts[rng.permutation(starts.size)]
        self.blocks = [(int(a), rows[(rows >= a) & (rows < a + br)]) for a in order]
        self.windows = _windows([w.size for _, w in self.blocks], plan.buffer_rows)
        self.queue: queue.Queue = queue.Queue(maxsize=plan.prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="mmcache-stream", daemon=True)

    def __enter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        self.thread.start()
        return self._consume()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reader thread and wait for it (an early stop, an error or Ctrl-C in the loop)."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)  # unblock a put()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        """Background thread: read the blocks in order, only the wanted rows kept; any error goes to the queue."""
        try:
            for a, wanted in self.blocks:
                if self.stop.is_set():
                    return
                b = min(a + self.plan.block_rows, next(iter(self.plan.arrays.values())).shape[0])
                arrays = {m: arr.reader.read(a, b)[wanted - a] for m, arr in self.plan.arrays.items()}
                if not self._put((wanted, arrays)):
                    return
            self._put(_END)
        except BaseException as e:  # re-raised in the main thread by _consume
            self._put(_Failed(e))

    def _get(self):
        item = self.queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def _consume(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Windows filled from the queue, each permuted and cut into batches; a short tail is carried over.
        Batches are gathered from the window by index (a permuted copy of it would double the memory)."""
        carry: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
        first = 0
        for k, count in enumerate(self.windows):
            last = k == len(self.windows) - 1
            rows, feats = self._fill(first, count)
            first += count
            take = np.argsort(rows, kind="stable")[torch.randperm(rows.size, generator=self.gen).numpy()]
            pos = 0
            if carry is not None:  # complete the batch the last window left short
                idx = take[:self.bs - carry[0].size]
                pos = idx.size
                carry = (np.concatenate([carry[0], rows[idx]]),
                         {m: np.concatenate([carry[1][m], v[idx]]) for m, v in feats.items()})
                if carry[0].size == self.bs or last:
                    yield self._batch(*carry)
                    carry = None
            for s in range(pos, rows.size, self.bs):
                idx = take[s:s + self.bs]
                if idx.size < self.bs and not last:
                    carry = (rows[idx], {m: v[idx] for m, v in feats.items()})
                    break
                yield self._batch(rows[idx], {m: v[idx] for m, v in feats.items()})
            del rows, feats  # the window's memory goes before the next one is filled
        if self._get() is not _END:
            raise RuntimeError("stream out of step: more blocks than planned")

    def _fill(self, first: int, count: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The next window: blocks ``first .. first + count - 1`` copied from the queue into one buffer."""
        sizes = [w.size for _, w in self.blocks[first:first + count]]
        n = sum(sizes)
        rows = np.empty(n, dtype=np.int64)
        feats = {m: np.empty((n, *a.reader.shape[1:]), dtype=a.reader.dtype) for m, a in self.plan.arrays.items()}
        at = 0
        for size in sizes:
            wanted, arrays = self._get()
            rows[at:at + size] = wanted
            for m, v in arrays.items():
                feats[m][at:at + size] = v
            at += size
        return rows, feats

    def _batch(self, rows: np.ndarray, feats: dict[str, np.ndarray]) -> tuple[Tensor, dict[str, Tensor]]:
        out = {}
        for m, v in feats.items():
            x = torch.from_numpy(np.ascontiguousarray(v))
            out[m] = (x.unsqueeze(1) if self.plan.arrays[m].vector else x).to(self.device)
        return torch.from_numpy(rows.astype(np.int64)).to(self.device), out


def _windows(sizes: list[int], buffer_rows: int) -> list[int]:
    """Consecutive blocks grouped into windows of at most ``buffer_rows`` rows (at least one block each):
    the number of blocks per window."""
    out, rows, count = [], 0, 0
    for s in sizes:
        if count and rows + s > buffer_rows:
            out.append(count)
            rows, count = 0, 0
        rows, count = rows + s, count + 1
    if count:
        out.append(count)
    return out


@contextlib.contextmanager
def epoch_batches(data, rows: Tensor, batch_size: int, gens: list[torch.Generator],
                  stream_gen: torch.Generator | None, epoch: int, stream_seed: int):
    """A training epoch's batches, for the trainers: an iterator of (rows (M, b) int64 on the data's device,
    resident) with M = len(gens). In memory: member k's own order from ``gens[k]``
    (``rows[randperm(n, gens[k])]``), resident None. Streamed (``data.stream``): ONE order for every member
    (from ``stream_gen``, a ``Generator(stream_seed)`` kept for the run) and resident = {modality: (b, L, D)
    stored dtype}, the batch's features. The reader thread stops when the ``with`` block is left."""
    n, device = rows.numel(), rows.device
    if data.stream is None:
        orders = torch.stack([rows[torch.randperm(n, generator=g).to(device)] for g in gens])
        yield ((orders[:, s:s + batch_size], None) for s in range(0, n, batch_size))
        return
    with data.stream.batches(rows, batch_size, stream_gen, epoch, stream_seed, device) as it:
        yield ((r.expand(len(gens), -1), resident) for r, resident in it)
