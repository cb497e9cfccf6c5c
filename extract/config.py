"""The typed records of an extraction: what is asked (:class:`ExtractConfig`, shard specs) and what was
done (:class:`ModalitySummary`, :class:`IndexInfo`, :class:`ExtractSummary` and their one-screen text)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mmcache.extract.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_RESIZED_PIXELS,
)

from mmcache import cache as cf
from mmcache.cache.names import parse_fields
from mmcache.errors import BadInputError
from mmcache.tables import format_table, human_bytes

__all__ = ["EMPTY_TEXT", "MODALITY_CHOICES", "ExtractConfig", "ExtractSummary", "IndexInfo", "ModalitySummary",
           "format_extract_summary", "parse_shard", "reason_kind", "shard_rows"]

MODALITY_CHOICES = ("text", "image", "both")
EMPTY_TEXT = "empty text"


# ---------------------------------------------------------------------------------------------- config

@dataclass
class ExtractConfig:
    """Everything one extraction run needs. Only some fields determine the cached values (see
    :func:`text_config` / :func:`image_config`); batch sizes, workers and device do not."""

    dataset: str
    data_dir: str | Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # dataset reader options (--option K=V)
    cache_dir: str | Path = "cache"
    name: str | None = None  # cache folder name; default: dataset name (folder datasets: the folder's name)
    modality: str = "both"  # text | image | both
    text_model: str = "bert-base-uncased"
    image_model: str = "facebook/dinov2-base"
    text_revision: str | None = None
    image_revision: str | None = None
    text_layer: str = "last"  # hidden states stored: last | k | -k | mean-last-k (see extract.adapters.parse_layer)
    image_layer: str = "last"
    text_name: str | None = None  # what files and tables call the encoder (default: encoders.readable_name)
    image_name: str | None = None
    text_max_length: int = 128
    dtype: str = "float16"  # storage dtype of cls / mean / tokens
    precision: str = "auto"  # compute precision: auto | fp32 | bf16 | fp16
    device: str = "auto"
    batch_size: int = 32
    text_batch_size: int | None = None  # default: batch_size
    image_batch_size: int | None = None  # default: batch_size
    decode: str = "draft"  # image decoding: "draft" (JPEG at reduced scale where the resize allows) or "full"
    num_workers: int | str = "auto"  # image decoding processes (0 = in the main process; auto: batches.resolve_workers)
    threads: int | None = None  # CPU device: torch threads for the forward; None = torch's default (all cores)
    patch_pool: int = 1
    # what the feature files store: comma list / list of cls, mean, tokens, proj (tokens brings its mask);
    # None: everything the encoder gives (an existing file: what it stores). Not part of a file's identity.
    fields: str | list[str] | tuple[str, ...] | None = None
    force: bool = False
    retry_failed: bool = False  # recompute rows recorded as failures (e.g. after fixing the files)
    repair: bool = False  # also rebuild a feature file HDF5 cannot open (damaged rows: every run repairs)
    split_file: str | Path | None = None
    seed: int | None = None  # None: not asked (the cache's split is kept; a new cache gets seed 0)
    resplit: bool = False  # replace the cache's split by the one asked for (--seed / --split-file)
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS  # cap on what the processor's resize makes of an image
    image_timeout_s: float = 60.0  # per image, inside a worker process
    loader_timeout_s: float = 600.0  # DataLoader: longest wait for one batch before giving up
    length_grouping: bool = True
    length_window: int | None = None  # rows per length-sorting window; default 64 * text_batch_size
    progress: bool | None = None  # tqdm bars: None = only on a terminal
    shard: tuple[int, int] = (0, 1)  # (shard_index, num_shards)
    claim: bool | None = None  # claim shards through their locks (extract.claim); None: yes under torchrun
    claim_shards: int | None = None  # shards to claim from (--num-shards without --shard); None: from the size
    command: str | None = None  # the command line of this run: stored in provenance, quoted by resume hints

    def validate(self) -> None:
        if self.modality not in MODALITY_CHOICES:
            raise BadInputError(f"--modality must be one of {', '.join(MODALITY_CHOICES)}, got {self.modality!r}")
        if self.dtype not in cf.DTYPES:
            raise BadInputError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        for key in ("batch_size", "text_batch_size", "image_batch_size", "length_window"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise BadInputError(f"{key.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"--threads must be >= 1, got {self.threads}")
        if self.decode not in ("draft", "full"):
            raise BadInputError(f"--decode must be draft or full, got {self.decode!r}")
        if isinstance(self.num_workers, str) and self.num_workers.strip().isdigit():
            self.num_workers = int(self.num_workers)
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise BadInputError(f"--num-workers must be auto or an integer >= 0, got {self.num_workers!r}")
        if self.patch_pool < 1:
            raise BadInputError(f"--patch-pool must be >= 1, got {self.patch_pool}")
        if self.text_max_length < 2:
            raise BadInputError(f"--text-max-length must be >= 2, got {self.text_max_length}")
        if self.max_image_pixels < 1:
            raise BadInputError(f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_resized_pixels < 1:
            raise BadInputError(f"--max-resized-pixels must be >= 1, got {self.max_resized_pixels}")
        from mmcache.extract.adapters.base import (
            parse_layer,  # adapters import torch: not for reading a config
        )

        self.text_layer, self.image_layer = parse_layer(self.text_layer), parse_layer(self.image_layer)
        for key in ("text_name", "image_name"):
            if getattr(self, key) is not None and not str(getattr(self, key)).strip():
                raise BadInputError(f"--{key.replace('_', '-')} must not be empty")
        self.fields = parse_fields(self.fields)
        i, n = self.shard
        if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
            raise BadInputError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
        self._validate_claim()

    def _validate_claim(self) -> None:
        if self.claim_shards is not None and (not isinstance(self.claim_shards, int) or self.claim_shards < 1):
            raise BadInputError(f"--num-shards must be a positive integer, got {self.claim_shards!r}")
        if not self.claim:
            return
        if self.shard != (0, 1):
            raise BadInputError("--claim takes the next free shard itself: give --num-shards n, not --shard i/n")
        if self.force or self.retry_failed:
            # a worker cannot tell a shard rebuilt by another worker of this run from an old one: each would
            # rebuild (or retry) it again. One fixed run does it once.
            raise BadInputError("--force / --retry-failed cannot be combined with --claim; run them once without "
                                "claiming (under torchrun: --no-claim)")

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text", "image") if self.modality == "both" else (self.modality,)

    @property
    def text_bs(self) -> int:
        return self.batch_size_for("text")

    @property
    def image_bs(self) -> int:
        return self.batch_size_for("image")

    def batch_size_for(self, modality: str) -> int:
        """``--text-batch-size`` / ``--image-batch-size``, else ``--batch-size``."""
        return getattr(self, f"{_checked(modality)}_batch_size") or self.batch_size

    def encoder(self, modality: str) -> cf.EncoderSpec:
        """The encoder asked for ``modality``: ``--text-model``, ``--text-revision``, ``--text-layer``,
        ``--text-name``, ``--text-max-length`` (or the image twins and ``--patch-pool``), as one record."""
        m = _checked(modality)
        size = {"text": {"max_length": self.text_max_length}, "image": {"patch_pool": self.patch_pool}}[m]
        return cf.EncoderSpec(modality=m, model=str(getattr(self, f"{m}_model")),
                              revision=getattr(self, f"{m}_revision"), layer=getattr(self, f"{m}_layer"),
                              name=getattr(self, f"{m}_name"), precision=self.precision, **size)


def _checked(modality: str) -> str:
    if modality not in cf.MODALITIES:
        raise BadInputError(f"unknown modality {modality!r}; expected one of {', '.join(cf.MODALITIES)}")
    return modality


def parse_shard(spec: str | None, num_shards: int | None = None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; or ``spec="i"`` with ``num_shards=n`` (job arrays: ``--shard
    $TASK_ID --num-shards 8``). Neither -> ``(0, 1)``."""
    if spec is None:
        if num_shards is not None and num_shards != 1:
            raise BadInputError(f"--num-shards {num_shards} needs --shard i (which shard this process runs)")
        return 0, 1
    try:
        if "/" in spec:
            i, n = (int(x) for x in spec.split("/"))
            if num_shards is not None and num_shards != n:
                raise BadInputError(f"--shard {spec} disagrees with --num-shards {num_shards}")
        elif num_shards is not None:
            i, n = int(spec), num_shards
        else:
            raise BadInputError(f"--shard {spec}: give i/n (e.g. 0/4) or add --num-shards n")
    except ValueError:
        raise BadInputError(f"--shard expects i/n (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise BadInputError(f"--shard {i}/{n}: need 0 <= i < n")
    return i, n


def shard_rows(num_samples: int, shard_index: int, num_shards: int) -> np.ndarray:
    """(M,) int64 index rows of shard ``shard_index`` of ``num_shards``: the contiguous block
    ``[i*N//n, (i+1)*N//n)``. The blocks of all shards partition ``range(N)`` in order."""
    if not (0 <= shard_index < num_shards):
        raise BadInputError(f"shard {shard_index} of {num_shards} does not exist")
    lo = shard_index * num_samples // num_shards
    hi = (shard_index + 1) * num_samples // num_shards
    return np.arange(lo, hi, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- summary

@dataclass
class ModalitySummary:
    """One modality file after a run. Counts are rows of this file (a shard holds a subset)."""

    modality: str
    model: str
    path: str
    total: int = 0
    already_done: int = 0  # rows done before this run (features or failure), not recomputed
    encoded: int = 0  # rows newly written with features this run
    failed: int = 0  # rows newly recorded as failures this run
    valid: int = 0  # rows with features in the file after the run
    failures: dict[str, int] = field(default_factory=dict)  # all failed rows in the file, by reason kind
    seconds: float = 0.0  # wall time incl. model loading
    samples_per_s: float = 0.0  # (encoded + failed) / time of the encode loop
    size_bytes: int = 0
    complete: bool = False
    up_to_date: bool = False  # nothing to do: the file was already complete
    forced: bool = False
    repaired: int = 0  # rows found damaged (checksum mismatch, NaN/Inf) and recomputed this run


@dataclass
class IndexInfo:
    path: Path
    dataset_dir: Path
    status: str  # "written" | "unchanged" | "updated" (labels/splits/extras) | "replaced" (samples changed)
    fingerprint: str
    num_samples: int
    ids: list[str]
    texts: list[str]
    image_files: list[str | None]  # absolute paths for loading (None: no image path)
    split_status: str = "kept"  # new | kept | same | resplit (extract.split_policy.SplitDecision)
    split_notes: list[str] = field(default_factory=list)  # warnings about the split (empty val, re-split, ...)
    split_summary: str = ""  # "split: <source>; train/val/test a/b/c (kept)"


@dataclass
class ExtractSummary:
    dataset: str
    cache_dir: str
    index_path: str
    index_status: str
    num_samples: int
    shard: tuple[int, int]
    modalities: list[ModalitySummary]
    failures_csv: str | None
    seconds: float
    ranks: int = 1  # processes of a torchrun launch whose shards were merged into these files
    notes: list[str] = field(default_factory=list)  # e.g. what the merge did

    @property
    def up_to_date(self) -> bool:
        return all(m.up_to_date for m in self.modalities)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["up_to_date"] = self.up_to_date
        return d


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "failed"


def format_extract_summary(s: ExtractSummary) -> str:
    """The closing summary the CLI prints: one table row per modality, then failures by reason."""

    names = ", ".join(Path(m.path).name for m in s.modalities)
    head = (f"up to date: {s.cache_dir}/{Path(s.index_path).parent.name} ({names})" if s.up_to_date else
            f"extracted {s.dataset}: {s.num_samples} samples into {Path(s.index_path).parent}")
    if s.shard[1] > 1:
        head += f" [shard {s.shard[0]}/{s.shard[1]}]"
    if s.ranks > 1:
        head += f" [{s.ranks} ranks]"
    out = [head, f"index: {s.index_path} ({s.index_status})", ""]
    rows = []
    for m in sorted(s.modalities, key=lambda m: cf.MODALITIES.index(m.modality)):
        rows.append([m.modality, Path(m.path).name, m.total, m.already_done, m.encoded, m.failed,
                     sum(m.failures.values()), m.valid, "yes" if m.complete else "NO",
                     f"{m.seconds:.1f}", "-" if m.up_to_date else f"{m.samples_per_s:.1f}",
                     human_bytes(m.size_bytes)])
    out.append(format_table(["modality", "file", "total", "done before", "encoded", "failed now",
                             "failed all", "valid", "complete", "seconds", "samples/s", "size"], rows))
    fail_rows = [[m.modality, reason, n] for m in s.modalities for reason, n in sorted(m.failures.items())]
    if fail_rows:
        out += ["", format_table(["modality", "failure", "count"], fail_rows)]
    out += s.notes
    repaired = [f"{m.modality}: {m.repaired}" for m in s.modalities if m.repaired]
    if repaired:
        out.append(f"repaired (damaged rows found by checksum and recomputed): {', '.join(repaired)}")
    if s.failures_csv and fail_rows:  # the file always exists; point at it only when it lists something
        out.append(f"failures: {s.failures_csv}")
    out.append(f"total time {s.seconds:.1f} s")
    return "\n".join(out)


