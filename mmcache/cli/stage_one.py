"""Stage one commands: ``datasets``, ``inspect``, ``extract`` and the ``cache`` group. Each parses,
calls :mod:`mmcache.api`, and formats."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from mmcache import api, configfile
from mmcache.cli.app import CALL, app, cache_app, resume_command
from mmcache.cli.options import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DEVICE,
    CacheDir,
    Config,
    DataDir,
    Dataset,
    DatasetOptions,
    DeviceOpt,
    DtypeOpt,
    EncodeBatchSize,
    Json,
    KeepShards,
    ModalityOpt,
    PrecisionOpt,
    Seed,
    SplitFile,
    Threads,
    given,
    given_by_user,
    key_values,
)
from mmcache.errors import BadInputError


@app.command()
def datasets() -> None:
    """List the known datasets and the folder layout each expects."""
    for name, spec in api.datasets().items():
        typer.echo(f"{name}\n  {spec.description}\n  layout: {spec.layout}")
        for opt, (typ, default, helptext) in spec.options.items():
            typer.echo(f"  option {opt}={default!r} ({typ.__name__}): {helptext}")
        if spec.default_dirs:
            typer.echo(f"  default folder: {' or '.join(spec.default_dirs)}")
        if spec.download:
            typer.echo(f"  download: {spec.download}")


@app.command()
def inspect(
    dataset: Dataset,
    data_dir: DataDir = None,
    split_file: SplitFile = None,
    seed: Seed = None,
    option: DatasetOptions = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    as_json: Json = False,
) -> None:
    """Counts per class and split, dropped samples by reason, decode fallbacks.

    With --cache-dir, also the split that cache holds for the dataset (what extract would keep)."""
    from mmcache.extract.summary import format_summary

    summary = api.inspect(dataset, data_dir=data_dir, options=key_values(option), split_file=split_file,
                          seed=seed, cache_dir=cache_dir)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


_LAYERS = "hidden states stored: last | K | -K (from the end) | mean-last-K"
_NAMES = "name in cache files and tables (default: hub id, config _name_or_path, or parent/folder)"


@app.command()
def extract(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", show_default=False, help="dataset name (see `datasets`); required unless --config names one")] = None,
    config: Config = None,
    data_dir: DataDir = None,
    modality: ModalityOpt = "both",
    text_model: Annotated[str, typer.Option(help="text encoder hub id or local folder (BERT, RoBERTa-style, CLIP, SigLIP ...)")] = "bert-base-uncased",
    image_model: Annotated[str, typer.Option(help="image encoder hub id or local folder (DINOv2, ViT, CNN, CLIP, SigLIP ...)")] = "facebook/dinov2-base",
    text_revision: Annotated[str | None, typer.Option(help="hub revision of the text model")] = None,
    image_revision: Annotated[str | None, typer.Option(help="hub revision of the image model")] = None,
    text_layer: Annotated[str, typer.Option(help=_LAYERS)] = "last",
    image_layer: Annotated[str, typer.Option(help=_LAYERS)] = "last",
    text_name: Annotated[str | None, typer.Option(help=_NAMES)] = None,
    image_name: Annotated[str | None, typer.Option(help=_NAMES)] = None,
    text_max_length: Annotated[int, typer.Option(help="tokens stored per text (truncated beyond)")] = 128,
    dtype: DtypeOpt = "float16",
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = DEFAULT_DEVICE,
    batch_size: EncodeBatchSize = 32,
    text_batch_size: Annotated[int | None, typer.Option(help="override --batch-size for text")] = None,
    image_batch_size: Annotated[int | None, typer.Option(help="override --batch-size for images")] = None,
    decode: Annotated[str, typer.Option(help="image decoding: draft (a JPEG at 1/2-1/8 scale where the resize allows: 2-4x less work, pixels within ~1/255 on average) or full; an existing file keeps the policy it was made with")] = "draft",
    num_workers: Annotated[str, typer.Option(help="image decoding processes: auto (from the cores and the device) or a number (0: main process)")] = "auto",
    threads: Threads = None,
    patch_pool: Annotated[int, typer.Option(help="average-pool the patch grid K x K before storing")] = 1,
    fields: Annotated[str | None, typer.Option(help="what to store: comma list of cls, mean, tokens (with its mask), proj (default: everything the encoder gives; an existing file: what it stores). A superset on an existing file adds only the missing fields")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild feature files made with other settings")] = False,
    retry_failed: Annotated[bool, typer.Option(help="recompute samples recorded as failures")] = False,
    repair: Annotated[bool, typer.Option(help="recompute damaged rows (every run does) and rebuild a feature file HDF5 cannot open")] = False,
    split_file: SplitFile = None,
    seed: Seed = None,
    resplit: Annotated[bool, typer.Option(help="replace an existing cache's split by the one --seed / --split-file asks for (recorded in the index); without it an existing cache keeps its split")] = False,
    option: DatasetOptions = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    name: Annotated[str | None, typer.Option(help="cache folder name (default: the dataset name)")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="refuse larger images (decompression bombs)")] = None,
    max_resized_pixels: Annotated[int | None, typer.Option(help="refuse images the processor's resize would make larger (extreme aspect ratios; default 4000000)")] = None,
    shard: Annotated[str | None, typer.Option(help="i/n (or i with --num-shards n): extract only shard i of n into its own .shard file; combine with `cache merge`")] = None,
    num_shards: Annotated[int | None, typer.Option(help="n, with --shard i (job arrays: --shard $TASK_ID --num-shards n); with --claim or under torchrun: the shards to claim from (default: ~8 per worker, >= 1000 rows each)")] = None,
    claim: Annotated[bool | None, typer.Option("--claim/--no-claim", show_default=False, help="claim the next free shard through its lock until all are done, then merge (independent workers, e.g. Slurm arrays: `--claim --num-shards 64`); default: on under torchrun, off otherwise")] = None,
    keep_shards: KeepShards = False,
    dist_backend: Annotated[str, typer.Option(help="torchrun: auto (nccl on CUDA, gloo on CPU) | gloo | nccl")] = "auto",
    dist_timeout_hours: Annotated[float, typer.Option(help="torchrun: longest wait at the start/end barrier")] = 48.0,
    engine: Annotated[str, typer.Option(help="local (this process, --claim, torchrun) | ray: the shards (--num-shards) run on a Ray cluster, then merge (needs the ray extra)")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="--engine ray: an existing cluster (auto, ray://host:10001); default: start a local one")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bars")] = False,
    as_json: Json = False,
) -> None:
    """Run the encoders once over a dataset into the resumable HDF5 cache (cache/<dataset>/...).

    Options left out keep the --config file's values, else the defaults shown. The resolved settings
    are written to cache/<dataset>/extract-config.yaml: `extract --config` that file repeats the call."""
    from mmcache.extract.extraction import format_extract_summary

    values = dict(
        dataset=dataset, data_dir=data_dir, options=key_values(option), cache_dir=cache_dir, name=name,
        modality=modality, text_model=text_model, image_model=image_model, text_revision=text_revision,
        image_revision=image_revision, text_layer=text_layer, image_layer=image_layer, text_name=text_name,
        image_name=image_name, text_max_length=text_max_length, dtype=dtype, precision=precision,
        device=device or DEFAULT_DEVICE, batch_size=batch_size, text_batch_size=text_batch_size,
        image_batch_size=image_batch_size, decode=decode, num_workers=num_workers, threads=threads, patch_pool=patch_pool,
        fields=fields, force=force, retry_failed=retry_failed, repair=repair, split_file=split_file, seed=seed,
        resplit=resplit, **_shard_values(shard, num_shards, claim), progress=False if no_progress else None,
        keep_shards=keep_shards, dist_backend=dist_backend, dist_timeout_hours=dist_timeout_hours,
        **given(max_image_pixels=max_image_pixels, max_resized_pixels=max_resized_pixels))
    flags = given_by_user(ctx, values, {"options": "option", "progress": "no_progress", "claim_shards": "num_shards"})
    resolved = configfile.resolve_extract(values, configfile.read_extract(config) if config else {}, flags)
    settings = {k: v for k, v in resolved.items() if k not in configfile.EXTRACT_RUN_KEYS}
    summary = api.extract(
        settings.pop("dataset"), **settings, command=resume_command(CALL[0]),
        keep_shards=resolved["keep_shards"], dist_backend=resolved["dist_backend"],
        dist_timeout_s=resolved["dist_timeout_hours"] * 3600, engine=engine, ray_address=ray_address)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints (the merged files)
        configfile.save_extract_config(summary.index_path, resolved)
        typer.echo(json.dumps(summary.to_dict(), indent=2, default=str) if as_json else format_extract_summary(summary))


def _shard_values(shard: str | None, num_shards: int | None, claim: bool | None) -> dict:
    """``--num-shards n`` without ``--shard``: the shards to claim from (``--claim``, torchrun); with
    ``--shard i``: the fixed shard's n, as before."""
    if shard is None and num_shards is not None:
        return {"shard": None, "num_shards": None, "claim": claim, "claim_shards": num_shards}
    return {"shard": shard, "num_shards": num_shards, "claim": claim}


@cache_app.command("info")
def cache_info(
    path: Annotated[Path, typer.Argument(help="a cache file, a dataset folder, or the cache root")] = DEFAULT_CACHE_DIR,
    as_json: Json = False,
) -> None:
    """Every cache file: shapes, dtypes, size on disk, provenance, completeness, failure count."""
    from mmcache.cache.info import format_info

    entries = api.cache_info(path)
    typer.echo(json.dumps(entries, indent=2, default=str) if as_json else format_info(entries))


@cache_app.command("verify")
def cache_verify(
    path: Annotated[Path | None, typer.Argument(
        show_default=False, help="a feature file, a dataset folder, or a cache root (default: --cache-dir)")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="only this dataset's folder under --cache-dir")] = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    as_json: Json = False,
) -> None:
    """Read every feature file whole and check each row's checksum and for NaN/Inf; exit 1 on damage."""
    from mmcache.cache.info import format_verify

    if path is not None and dataset is not None:
        raise BadInputError("give PATH or --dataset (a folder under --cache-dir), not both")
    target = path if path is not None else cache_dir / dataset if dataset else cache_dir
    entries = api.verify_cache(target)
    typer.echo(json.dumps(entries, indent=2, default=str) if as_json else format_verify(entries))
    if any(e["status"] in ("damaged", "unreadable") for e in entries):
        raise typer.Exit(1)


@cache_app.command("merge")
def cache_merge(
    paths: Annotated[list[Path], typer.Argument(help="dataset folder(s) and/or shard files (*.shard-<i>-of-<n>.h5)")],
    keep_shards: KeepShards = False,
    force: Annotated[bool, typer.Option("--force", help="replace a merged file made with other settings")] = False,
    copy: Annotated[bool, typer.Option("--copy", help="copy every shard into one file (verified; shards removed "
                                       "unless --keep-shards) instead of the virtual merge that reads them in place")] = False,
    as_json: Json = False,
) -> None:
    """Combine the shard files of `extract --shard i/n` runs into the normal feature file: a small virtual file
    over the shards (they stay), or with --copy one file holding everything."""
    results = api.merge_cache(paths, keep_shards=keep_shards, force=force, copy=copy)
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in results], indent=2, default=str))
        return
    if not results:
        typer.echo(f"nothing to merge: no shard files in {', '.join(map(str, paths))}")
    for r in results:
        left = "shard files removed" if r.removed_shards else ("shard files kept" if r.shards else "")
        left = "shard files kept: the virtual merge reads them in place" if r.virtual else left
        typer.echo(f"{r.status} {r.num_shards} shards -> {r.path} ({r.num_samples} samples, {r.num_valid} valid, "
                   f"{r.num_failed} failed{', ' + left if left else ''})")
    csvs = sorted({str(r.failures_csv) for r in results if r.failures_csv and r.num_failed})
    if csvs:
        typer.echo(f"failures: {', '.join(csvs)}")

