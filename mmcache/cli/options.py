"""Every option more than one command offers, declared once as a typed ``Annotated`` alias, and the
choice sets as enums: a command writes ``device: Device = "auto"`` and gets the same flag, type, help
and validation as every other command with a ``--device``.

Choices are checked while parsing (an unknown value is a usage error, exit 2, whose one line lists
the valid values) and shown in ``--help`` as ``[a|b|c]``. The fixed sets are enums here (a test keeps
them equal to the library's own tuples); the heads come from :func:`mmcache.fuse.heads.list_heads`
when they are needed (parsing a head name, showing help), so a plugin head registered with
``@register_head`` appears, and commands that need no head do not pay for importing torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mmcache.errors import BadInputError


class Features(str, Enum):
    """Cached feature kinds a head can train on (``proj``: CLIP-style caches only)."""
    cls = "cls"
    mean = "mean"
    tokens = "tokens"
    proj = "proj"


class Device(str, Enum):
    """Where tensors go; ``cuda:N`` (any N) is accepted too."""
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    """Encoder compute precision (autocast on GPU)."""
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Modality(str, Enum):
    text = "text"
    image = "image"
    both = "both"


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"


class Dtype(str, Enum):
    """Storage dtype of the cached features."""
    float16 = "float16"
    float32 = "float32"


class ExportFormat(str, Enum):
    """`cache export` formats (parquet, hf: the optional pyarrow / datasets packages)."""
    npy = "npy"
    parquet = "parquet"
    hf = "hf"


class OneModality(str, Enum):
    text = "text"
    image = "image"


class Track(str, Enum):
    """Experiment tracking of training runs (fuse/tracking.py); ``auto``: tensorboard when installed."""
    auto = "auto"
    tensorboard = "tensorboard"
    none = "none"


def _values(choices: type[Enum] | Callable[[], Iterable[str]]) -> list[str]:
    return [m.value for m in choices] if isinstance(choices, type) else list(choices())


def choice(choices: type[Enum] | Callable[[], Iterable[str]], *, many: bool = False,
           also: str | None = None, also_shown: str = "") -> Callable[[str], str]:
    """A typer ``parser`` that accepts one of ``choices`` (or, ``many``, a comma list of them; the
    string comes back unchanged and :func:`names` splits it). ``also``: a regex of further accepted
    values (``cuda:N``), shown in the error as ``also_shown``."""

    def parse(value: str) -> str:
        valid = _values(choices)
        parts = [v.strip() for v in value.split(",")] if many else [value]
        for part in parts:
            if part not in valid and not (also and re.fullmatch(also, part)):
                shown = ", ".join(valid + ([also_shown] if also_shown else []))
                raise typer.BadParameter(f"{part!r} is not one of {shown}")
        return value

    return parse


def metavar(choices: type[Enum], *extra: str) -> str:
    return "[" + "|".join([m.value for m in choices] + list(extra)) + "]"


def head_names() -> list[str]:
    """The registered heads (imports torch: only called while parsing a head or showing help)."""
    from mmcache.fuse.heads import list_heads

    return list_heads()


# Option metavars filled in when help is shown (see LazyHelpCommand): the heads are not known
# before mmcache.fuse.heads (and torch) is imported.
HEAD_METAVAR = "HEAD"
HEADS_METAVAR = "HEAD,..."
LAZY_METAVARS: dict[str, Callable[[], str]] = {
    HEAD_METAVAR: lambda: "[" + "|".join(head_names()) + "]",
    HEADS_METAVAR: lambda: "[" + "|".join(head_names()) + "],...",
}


class LazyHelpCommand(typer.core.TyperCommand):
    """A command whose help shows choices only known at run time (the registered heads)."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.params:
            if param.metavar in LAZY_METAVARS:
                param.metavar = LAZY_METAVARS[param.metavar]()
        super().format_help(ctx, formatter)


# ----------------------------------------------------------------------------------- shared options
# Defaults: an option typed `X | None` with default None means "not given": the library's default
# applies (or a --config file's value, or the run's own); `show_default` then names that default.

DEFAULT_CACHE_DIR = Path("cache")
DEFAULT_DEVICE = Device.auto.value

_CACHE_DIR_HELP = "cache root: one folder per dataset"
CacheDir = Annotated[Path | None, typer.Option("--cache-dir", show_default=str(DEFAULT_CACHE_DIR), help=_CACHE_DIR_HELP)]
# commands that read a finished run: by default the cache root the run was trained on
RunCacheDir = Annotated[Path | None, typer.Option("--cache-dir", show_default="the run's", help=_CACHE_DIR_HELP)]
RunsDir = Annotated[Path | None, typer.Option("--runs-dir", help="where run folders go")]
Dataset = Annotated[str, typer.Option("--dataset", "-d", help="dataset name (see `datasets`)")]
OptDataset = Annotated[str | None, typer.Option(
    "--dataset", "-d", help="cached dataset (default: the only one in --cache-dir)")]
Datasets = Annotated[list[str] | None, typer.Option(
    "--dataset", "-d", help="cached dataset(s), repeatable or a,b (default: every dataset in --cache-dir)")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="dataset folder (default: per dataset)")]
DatasetOptions = Annotated[list[str] | None, typer.Option(
    "--option", "-o", help="dataset option KEY=VALUE (repeatable; see `datasets`)")]
SplitFile = Annotated[Path | None, typer.Option(
    "--split-file", help="CSV id,split or folder of train/dev/test.json")]
Seed = Annotated[int | None, typer.Option("--seed", show_default="0", help="random seed")]
Json = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
Threads = Annotated[int | None, typer.Option("--threads", help=(
    "CPU torch threads (default: extract all cores; train-fusion 1-2, 2 only with 4+ cores and 2 free; "
    "ablate cores // jobs); fewer on a busy machine"))]
MaxMemory = Annotated[str | None, typer.Option("--max-memory", help=(
    "bytes the feature arrays may take in memory, e.g. 512M, 4G (default: half of the free RAM, or of the free "
    "GPU memory on CUDA); larger features are streamed from the cache files"))]
ShuffleBuffer = Annotated[int | None, typer.Option("--shuffle-buffer", help=(
    "rows in the shuffle window when the features are streamed (over --max-memory); 0 = auto: the largest power "
    "of two the budget allows. The value used is recorded in config.json (it decides the training order)"))]
Epochs = Annotated[int | None, typer.Option("--epochs", help="max epochs per run (default: train-fusion, ablate 30; demo 40; bench 5)")]
Dim = Annotated[int | None, typer.Option("--dim", show_default="256", help="shared latent width")]
Lr = Annotated[float | None, typer.Option("--lr", show_default="3e-4", help="peak learning rate")]
Patience = Annotated[int | None, typer.Option(
    "--patience", show_default="5", help="early-stop after N epochs without val macro-F1 gain, 0 = off")]
TrainBatchSize = Annotated[int | None, typer.Option("--batch-size", show_default="32", help="batch size")]
EncodeBatchSize = Annotated[int, typer.Option("--batch-size", help="samples per encoder forward pass")]
Config = Annotated[Path | None, typer.Option(
    "--config", help="YAML or JSON config file: a run's config.json, a cache's extract-config.yaml, a results "
                     "folder's ablation_config.yaml, or your own; options given override it")]
AllowNoVal = Annotated[bool, typer.Option(
    "--allow-no-val", help="train without a validation split (no early stopping; the last epoch is kept)")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", help="parallel training processes (0 = auto)")]
TrackOpt = Annotated[Track, typer.Option(
    "--track", help="log each run's epochs, test metrics and config to <run>/tb/ for TensorBoard (auto: when the "
                    "tensorboard package is installed); never changes a run's numbers")]
Plots = Annotated[bool, typer.Option("--plots/--no-plots", help="PNG figures (needs matplotlib)")]
KeepShards = Annotated[bool, typer.Option("--keep-shards", help="keep the shard files after the verified merge")]
Run = Annotated[Path, typer.Option("--run", help="run folder written by train-fusion")]
TextCache = Annotated[str | None, typer.Option("--text-cache", help="text feature file (when the dataset has several)")]
ImageCache = Annotated[str | None, typer.Option("--image-cache", help="image feature file (when the dataset has several)")]
Target = Annotated[str | None, typer.Option(
    "--target", help="label to learn / score: a target or task of the dataset (`inspect` lists them)")]
OriginalSplit = Annotated[bool, typer.Option(
    "--original-split", help="after a re-split: use the run's own split (its split.json ids)")]
CurrentSplit = Annotated[bool, typer.Option(
    "--current-split", help="after a re-split: use the cache's current split anyway, labelled as not the run's")]

DeviceOpt = Annotated[str | None, typer.Option(
    "--device", parser=choice(Device, also=r"cuda:\d+", also_shown="cuda:N"), metavar=metavar(Device, "cuda:N"),
    show_default=DEFAULT_DEVICE, help="compute device (auto: cuda when available, else cpu)")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", parser=choice(Precision), metavar=metavar(Precision), help="encoder compute precision (autocast on GPU)")]
FeatureOpt = Annotated[str | None, typer.Option(
    "--features", parser=choice(Features), metavar=metavar(Features), show_default="cls",
    help="cached features to train on (proj: CLIP-style caches)")]
FeaturesOpt = Annotated[list[str] | None, typer.Option(
    "--features", parser=choice(Features, many=True), metavar=metavar(Features) + ",...",
    show_default="cls,tokens", help="cached features, repeatable or a,b")]
ModalityOpt = Annotated[str, typer.Option(
    "--modality", parser=choice(Modality), metavar=metavar(Modality), help="which encoders to run")]
SplitOpt = Annotated[str, typer.Option("--split", parser=choice(Split), metavar=metavar(Split), help="which split")]
PostsSplitOpt = Annotated[str, typer.Option(
    "--split", parser=choice(Split, also="all", also_shown="all"), metavar=metavar(Split, "all"),
    help="which split of --dataset (all: every post)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", parser=choice(Dtype), metavar=metavar(Dtype), help="storage dtype")]
HeadOpt = Annotated[str | None, typer.Option(
    "--head", parser=choice(head_names), metavar=HEAD_METAVAR, help="fusion head (required unless --config names one)")]
HeadsOpt = Annotated[list[str] | None, typer.Option(
    "--heads", parser=choice(head_names, many=True), metavar=HEADS_METAVAR, show_default="all",
    help="fusion heads, repeatable or a,b")]


# ----------------------------------------------------------------------------------- value helpers

def key_values(pairs: list[str] | None, flag: str = "--option") -> dict[str, str]:
    """Repeated ``KEY=VALUE`` flags as a dict (values stay strings)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInputError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def json_values(pairs: list[str] | None, flag: str) -> dict:
    """``KEY=VALUE`` pairs whose values parse as JSON when they can (numbers, true/false)."""
    out = {}
    for key, value in key_values(pairs, flag).items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def names(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also take comma lists: ``--heads a,b --heads c`` -> [a, b, c]."""
    out = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    return out or None


def numbers(text: str | None, kind: type, flag: str) -> list | None:
    """``--lrs 1e-4,3e-4`` -> [0.0001, 0.0003]; None when not given."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()] or None
    except ValueError:
        raise BadInputError(f"{flag} expects comma-separated {kind.__name__} values, got {text!r}") from None


def given(**values) -> dict:
    """The keyword arguments the user actually gave (None = not given: the callee's default applies)."""
    return {k: v for k, v in values.items() if v is not None}


def was_given(ctx: typer.Context, param: str) -> bool:
    """Whether the user gave option ``param`` (the function parameter's name) on the command line or
    through the environment; False when typer filled in its default (a --config file's value wins then)."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def given_by_user(ctx: typer.Context, values: dict, params: dict[str, str] | None = None) -> dict:
    """The entries of ``values`` (config key -> value) whose option the user gave; ``params`` maps a
    config key to its parameter's name where they differ (``options`` -> ``option``)."""
    params = params or {}
    return {k: v for k, v in values.items() if was_given(ctx, params.get(k, k))}
