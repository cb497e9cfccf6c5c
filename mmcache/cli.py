"""Command line for both stages. Thin on purpose: parse, call the library, print, map errors to exit
codes (2 = bad input, 1 = runtime failure). Run as ``python cli.py ...`` from a checkout, or as the
``mmcache`` command / ``python -m mmcache`` once installed."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

import typer

from mmcache.errors import BadInputError, Interrupted, PipelineError, ResumableError

# click's exception classes, wherever this typer takes click from (typer >= 0.2x vendors its own copy)
_clickx = sys.modules[typer.BadParameter.__module__]
_NoArgsIsHelp = getattr(_clickx, "NoArgsIsHelpError", ())
_Exit = tuple({typer.Exit, getattr(_clickx, "Exit", typer.Exit)})
_Abort = tuple({typer.Abort, getattr(_clickx, "Abort", typer.Abort)})

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract BERT/DINOv2 features once into an HDF5 cache; train fusion heads on it.")

OptionList = list[str] | None


@app.callback()
def _everywhere(
    log_file: Path | None = typer.Option(None, "--log-file", help="also append log and progress lines to this file (before the command: cli.py --log-file x.log extract ...)"),
) -> None:
    """Extract BERT/DINOv2 features once into an HDF5 cache; train fusion heads on it."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
_CALL: list[list[str] | None] = [None]  # this call's argv (None: sys.argv), for resume hints


def _options(pairs: OptionList) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInputError(f"--option expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


@app.command()
def datasets() -> None:
    """List the known datasets and the folder layout each expects."""
    from mmcache.extract.datasets import get_dataset, list_datasets

    for name in list_datasets():
        spec = get_dataset(name)
        typer.echo(f"{name}\n  {spec.description}\n  layout: {spec.layout}")
        for opt, (typ, default, helptext) in spec.options.items():
            typer.echo(f"  option {opt}={default!r} ({typ.__name__}): {helptext}")
        if spec.default_dirs:
            typer.echo(f"  default folder: {' or '.join(spec.default_dirs)}")
        if spec.download:
            typer.echo(f"  download: {spec.download}")


@app.command()
def inspect(
    dataset: str = typer.Option(..., "--dataset", "-d", help="dataset name (see `datasets`)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="dataset folder (default: per dataset)"),
    split_file: Path | None = typer.Option(None, "--split-file", help="CSV id,split or folder of train/dev/test.json"),
    seed: int | None = typer.Option(None, help="seed of the stratified split (default 0)"),
    option: OptionList = typer.Option(None, "--option", "-o", help="dataset option KEY=VALUE (repeatable)"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="also compare with the split this cache root holds for the dataset (what extract would keep)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Counts per class and split, dropped samples by reason, decode fallbacks."""
    from mmcache.extract import cache_format as cf
    from mmcache.extract.datasets import load_dataset
    from mmcache.extract.extraction import ExtractConfig, _cache_name
    from mmcache.extract.split_policy import preview_split
    from mmcache.extract.summary import format_summary, summarize

    result = load_dataset(dataset, data_dir, **_options(option))
    index_path = stored = None
    if cache_dir is not None:
        index_path = cache_dir / _cache_name(ExtractConfig(dataset=dataset), Path(result.root)) / cf.INDEX_NAME
        stored = cf.read_index(index_path) if index_path.is_file() else None
    split, note = preview_split(result.samples, stored, split_file=split_file, seed=seed, index_path=index_path)
    summary = summarize(result, split)
    summary["cache_split"] = note
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


# --------------------------------------------------------------------------------------------- stage two

def _head_options(pairs: OptionList) -> dict:
    """--head-option KEY=VALUE pairs; values parse as JSON when they can (numbers, true/false)."""
    out = {}
    for key, value in _options(pairs).items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command("train-fusion")
def train_fusion(
    head: str | None = typer.Option(None, "--head", help="fusion head (text_only, image_only, basic, self_attention, dual_attention)"),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="cached dataset (default: the only one in --cache-dir)"),
    features: str | None = typer.Option(None, "--features", help="cls | mean | tokens | proj (CLIP caches) (default cls)"),
    target: str | None = typer.Option(None, "--target", help="label to learn: a target or task of the dataset (default: its main label; `inspect` lists them)"),
    text_cache: str | None = typer.Option(None, "--text-cache", help="text feature file (when the dataset has several)"),
    image_cache: str | None = typer.Option(None, "--image-cache", help="image feature file (when the dataset has several)"),
    config: Path | None = typer.Option(None, "--config", help="JSON training config (e.g. a run's config.json); flags override it"),
    dim: int | None = typer.Option(None, "--dim", help="shared latent width (default 256)"),
    layers: int | None = typer.Option(None, "--layers", help="attention layers (default 1)"),
    heads: int | None = typer.Option(None, "--heads", help="attention heads (default 4)"),
    dropout: float | None = typer.Option(None, "--dropout", help="dropout (default 0.1)"),
    epochs: int | None = typer.Option(None, "--epochs", help="max epochs (default 30)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="batch size (default 32)"),
    lr: float | None = typer.Option(None, "--lr", help="peak learning rate (default 3e-4)"),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0.01)"),
    warmup_frac: float | None = typer.Option(None, "--warmup-frac", help="share of steps for linear warm-up (default 0.1)"),
    grad_clip: float | None = typer.Option(None, "--grad-clip", help="max gradient norm, 0 = off (default 1.0)"),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="(default 0)"),
    class_balanced: bool | None = typer.Option(None, "--class-balanced/--no-class-balanced", help="inverse-frequency class weights in the loss"),
    patience: int | None = typer.Option(None, "--patience", help="early-stop after N epochs without val macro-F1 gain, 0 = off (default 5)"),
    seed: int | None = typer.Option(None, "--seed", help="seed (default 0)"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default auto)"),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA (default on; CPU never)"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default 1-2: 2 only with 4+ cores and 2 free; more threads make small heads much slower on a busy machine)"),
    head_option: OptionList = typer.Option(None, "--head-option", help="head-specific KEY=VALUE (repeatable)"),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="cache root (default cache)"),
    runs_dir: str | None = typer.Option(None, "--runs-dir", help="where run folders go (default runs)"),
    run_name: str | None = typer.Option(None, "--run-name", help="run folder name (default <dataset>-<head>-<features>-s<seed>-<time>)"),
    allow_no_val: bool = typer.Option(False, "--allow-no-val", help="train without a validation split (no early stopping; the last epoch is kept)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar / progress lines"),
    as_json: bool = typer.Option(False, "--json", help="print metrics.json instead of the summary"),
) -> None:
    """Train a fusion head on cached features; writes runs/<name>/ and prints a summary table."""
    from mmcache import api
    from mmcache.fuse.report import format_train
    from mmcache.fuse.train import TrainConfig

    base = {}
    if config is not None:
        base = TrainConfig.from_json(config).to_dict()
    flags = dict(head=head, dataset=dataset, features=features, target=target, text_cache=text_cache, image_cache=image_cache,
                 dim=dim, layers=layers, heads=heads, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
                 weight_decay=weight_decay, warmup_frac=warmup_frac, grad_clip=grad_clip,
                 label_smoothing=label_smoothing, class_balanced=class_balanced, patience=patience, seed=seed,
                 device=device, amp=amp, threads=threads, cache_dir=cache_dir, runs_dir=runs_dir, run_name=run_name)
    if head_option:
        flags["head_options"] = _head_options(head_option)
    merged = {**base, **{k: v for k, v in flags.items() if v is not None}}
    if config is not None and dataset is not None and dataset != base.get("dataset"):
        merged.update(text_cache=text_cache, image_cache=image_cache)  # the config's files belong to its dataset
    if "head" not in merged:
        from mmcache.fuse.heads import list_heads

        raise BadInputError(f"--head is required (or --config); heads: {', '.join(list_heads())}")
    from mmcache.fuse.runs import read_split

    expected = read_split(config.parent) if config is not None and merged.get("dataset") == base.get("dataset") else None
    result = api.train_fusion(merged, progress=False if quiet else None, allow_no_val=allow_no_val,
                              expected_split=expected)
    typer.echo(json.dumps(result.metrics, indent=2) if as_json else format_train(result))


@app.command()
def evaluate(
    run: Path = typer.Option(..., "--run", help="run folder written by train-fusion"),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="score on another cached dataset (same encoders, same classes)"),
    split: str = typer.Option("test", "--split", help="train | val | test"),
    target: str | None = typer.Option(None, "--target", help="score against this target instead of the run's own (same classes)"),
    text_cache: str | None = typer.Option(None, "--text-cache", help="text feature file of that dataset"),
    image_cache: str | None = typer.Option(None, "--image-cache", help="image feature file of that dataset"),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="cache root (default: the run's)"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default: the run's, else auto)"),
    original_split: bool = typer.Option(False, "--original-split", help="after a re-split: score the run's own split (its split.json ids)"),
    current_split: bool = typer.Option(False, "--current-split", help="after a re-split: score the cache's current split anyway, labelled as not the run's"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
) -> None:
    """Score a saved run again (its own test split, or another dataset's: cross-dataset evaluation)."""
    from mmcache.api import evaluate as evaluate_run
    from mmcache.fuse.report import format_eval

    if original_split and current_split:
        raise BadInputError("--original-split and --current-split exclude each other")
    choice = "original" if original_split else "current" if current_split else None
    result = evaluate_run(run, dataset, split, cache_dir=cache_dir, text_cache=text_cache, image_cache=image_cache,
                          device=device, split_choice=choice, target=target)
    typer.echo(json.dumps(result.metrics, indent=2) if as_json else format_eval(result))


@app.command()
def predict(
    run: Path = typer.Option(..., "--run", help="run folder written by train-fusion"),
    text: str | None = typer.Option(None, "--text", help="one post: its text"),
    image: Path | None = typer.Option(None, "--image", help="one post: its image file"),
    post_id: str = typer.Option("post0", "--id", help="one post: its id"),
    label: str | None = typer.Option(None, "--label", help="one post: its true label (optional)"),
    manifest: Path | None = typer.Option(None, "--manifest", help="CSV/JSONL id,text,image[,label] (the folder format)"),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="a dataset reader (see `datasets`)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="that dataset's folder"),
    split: str = typer.Option("test", "--split", help="train | val | test | all (with --dataset)"),
    option: OptionList = typer.Option(None, "--option", "-o", help="dataset option KEY=VALUE (repeatable)"),
    split_file: Path | None = typer.Option(None, "--split-file", help="with --dataset: split file (default: the run's own splits)"),
    output: Path | None = typer.Option(None, "--output", help=".csv or .jsonl (default: CSV on stdout)"),
    cache_features: Path | None = typer.Option(None, "--cache-features", help="also keep the encoded posts as a normal cache under DIR"),
    calibrated: bool = typer.Option(False, "--calibrated", help="temperature-scaled probabilities (run `analyze` first)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(32, "--batch-size", help="encoder batch size"),
) -> None:
    """Label new posts with a trained run: encoders from its provenance (verified), then its head."""
    from mmcache.api import predict as predict_posts
    from mmcache.fuse.report import format_metrics

    if output is not None and output.suffix.lower() not in (".csv", ".jsonl"):
        raise BadInputError(f"--output must end in .csv or .jsonl, got {output.name!r}")
    one = text is not None or image is not None
    result = predict_posts(run, texts=[text] if one else None, images=[image] if one else None,
                           ids=[post_id] if one else None, labels=[label] if one and label else None,
                           manifest=manifest, dataset=dataset, data_dir=data_dir, split=split,
                           options=_options(option), split_file=split_file, device=device, calibrated=calibrated,
                           cache_features=cache_features, batch_size=batch_size)
    if output is not None:
        result.write(output)
        typer.echo(f"{len(result.rows)} rows written to {output}")
    else:
        typer.echo(result.to_csv(), nl=False)
    unanswered = sum(r["predicted"] is None for r in result.rows)
    if unanswered:
        typer.echo(f"{unanswered} post(s) without an answer: see the note column", err=True)
    if result.metrics:
        typer.echo(format_metrics(result.metrics, f"{result.metrics['scored']} labelled posts"), err=output is None)


@app.command()
def analyze(
    run: Path = typer.Option(..., "--run", help="run folder written by train-fusion"),
    gallery: int = typer.Option(6, "--gallery", help="posts per error-gallery list"),
    heatmaps: int = typer.Option(4, "--heatmaps", help="posts with attention heat maps"),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="print analysis.json"),
) -> None:
    """PR curves, ROC AUC, calibration + temperature scaling, attention shares and report.html into <run>/analysis/."""
    from mmcache.api import analyze as analyze_run
    from mmcache.fuse.analyze import format_analysis

    result = analyze_run(run, gallery=gallery, heatmaps=heatmaps, device=device)
    typer.echo(json.dumps(result.summary, indent=2) if as_json else format_analysis(result))


# --------------------------------------------------------------------------------------------- stage one

@app.command()
def extract(
    dataset: str = typer.Option(..., "--dataset", "-d", help="dataset name (see `datasets`)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="dataset folder (default: per dataset)"),
    modality: str = typer.Option("both", "--modality", help="text | image | both"),
    text_model: str = typer.Option("bert-base-uncased", "--text-model", help="text encoder hub id or local folder (BERT, RoBERTa-style, CLIP, SigLIP ...)"),
    image_model: str = typer.Option("facebook/dinov2-base", "--image-model", help="image encoder hub id or local folder (DINOv2, ViT, CNN, CLIP, SigLIP ...)"),
    text_revision: str | None = typer.Option(None, "--text-revision", help="hub revision of the text model"),
    image_revision: str | None = typer.Option(None, "--image-revision", help="hub revision of the image model"),
    text_layer: str = typer.Option("last", "--text-layer", help="hidden states stored: last | K | -K (from the end) | mean-last-K"),
    image_layer: str = typer.Option("last", "--image-layer", help="hidden states stored: last | K | -K (from the end) | mean-last-K"),
    text_name: str | None = typer.Option(None, "--text-name", help="name in cache files and tables (default: hub id, config _name_or_path, or parent/folder)"),
    image_name: str | None = typer.Option(None, "--image-name", help="name in cache files and tables (default: hub id, config _name_or_path, or parent/folder)"),
    text_max_length: int = typer.Option(128, "--text-max-length", help="tokens stored per text (truncated beyond)"),
    dtype: str = typer.Option("float16", "--dtype", help="storage dtype: float16 | float32"),
    precision: str = typer.Option("auto", "--precision", help="compute: auto | fp32 | bf16 | fp16 (autocast on GPU)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(32, "--batch-size", help="samples per forward pass"),
    text_batch_size: int | None = typer.Option(None, "--text-batch-size", help="override --batch-size for text"),
    image_batch_size: int | None = typer.Option(None, "--image-batch-size", help="override --batch-size for images"),
    num_workers: int = typer.Option(2, "--num-workers", help="image decoding processes (0: main process)"),
    threads: int | None = typer.Option(None, "--threads", help="CPU torch threads for the forward (default: all cores; fewer on a busy machine)"),
    patch_pool: int = typer.Option(1, "--patch-pool", help="average-pool the patch grid K x K before storing"),
    force: bool = typer.Option(False, "--force", help="rebuild feature files made with other settings"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="recompute samples recorded as failures"),
    repair: bool = typer.Option(False, "--repair", help="recompute damaged rows (every run does) and rebuild a feature file HDF5 cannot open"),
    split_file: Path | None = typer.Option(None, "--split-file", help="CSV id,split or folder of train/dev/test.json (a new cache; an existing one keeps its split unless --resplit)"),
    seed: int | None = typer.Option(None, "--seed", help="seed of the stratified split (a new cache: default 0; an existing one keeps its split unless --resplit)"),
    resplit: bool = typer.Option(False, "--resplit", help="replace the cache's split by the one --seed / --split-file asks for (recorded in the index)"),
    option: OptionList = typer.Option(None, "--option", "-o", help="dataset option KEY=VALUE (repeatable)"),
    cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="cache root"),
    name: str | None = typer.Option(None, "--name", help="cache folder name (default: the dataset name)"),
    max_image_pixels: int | None = typer.Option(None, "--max-image-pixels", help="refuse larger images (decompression bombs)"),
    max_resized_pixels: int | None = typer.Option(None, "--max-resized-pixels", help="refuse images the processor's resize would make larger (extreme aspect ratios; default 4000000)"),
    shard: str | None = typer.Option(None, "--shard", help="i/n (or i with --num-shards n): extract only shard i of n into its own .shard file; combine with `cache merge`"),
    num_shards: int | None = typer.Option(None, "--num-shards", help="n, with --shard i (job arrays: --shard $TASK_ID --num-shards n)"),
    keep_shards: bool = typer.Option(False, "--keep-shards", help="torchrun: keep the per-rank shard files after the verified merge"),
    dist_backend: str = typer.Option("auto", "--dist-backend", help="torchrun: auto (nccl on CUDA, gloo on CPU) | gloo | nccl"),
    dist_timeout_hours: float = typer.Option(48.0, "--dist-timeout-hours", help="torchrun: longest wait at the start/end barrier"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Run the encoders once over a dataset into the resumable HDF5 cache (cache/<dataset>/...)."""
    from mmcache.extract.distributed import launch_env, run_distributed_extract
    from mmcache.extract.extraction import ExtractConfig, format_extract_summary, parse_shard

    cfg = ExtractConfig(
        dataset=dataset, data_dir=data_dir, options=_options(option), cache_dir=cache_dir, name=name,
        modality=modality, text_model=text_model, image_model=image_model, text_revision=text_revision,
        image_revision=image_revision, text_layer=text_layer, image_layer=image_layer, text_name=text_name,
        image_name=image_name, text_max_length=text_max_length, dtype=dtype, precision=precision,
        device=device, batch_size=batch_size, text_batch_size=text_batch_size, image_batch_size=image_batch_size,
        num_workers=num_workers, threads=threads, patch_pool=patch_pool, force=force, retry_failed=retry_failed,
        repair=repair,
        split_file=split_file, seed=seed, resplit=resplit, shard=parse_shard(shard, num_shards), progress=False if no_progress else None,
        command=resume_command(_CALL[0]),
    )
    if max_image_pixels is not None:
        cfg.max_image_pixels = max_image_pixels
    if max_resized_pixels is not None:
        cfg.max_resized_pixels = max_resized_pixels
    env = launch_env()  # None unless started by torchrun
    summary = run_distributed_extract(cfg, env, keep_shards=keep_shards, backend=dist_backend,
                                      timeout_s=dist_timeout_hours * 3600)
    if env is None or env.is_main:
        typer.echo(json.dumps(summary.to_dict(), indent=2, default=str) if as_json else format_extract_summary(summary))


cache_app = typer.Typer(no_args_is_help=True, help="Look at the feature cache; merge shards.")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(
    path: Path = typer.Argument(Path("cache"), help="a cache file, a dataset folder, or the cache root"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Every cache file: shapes, dtypes, size on disk, provenance, completeness, failure count."""
    from mmcache.extract.cache_info import collect, format_info

    entries = collect(path)
    typer.echo(json.dumps(entries, indent=2, default=str) if as_json else format_info(entries))


@cache_app.command("verify")
def cache_verify(
    path: Path = typer.Argument(Path("cache"), help="a feature file, a dataset folder, or the cache root"),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="only this dataset's folder under --cache-dir"),
    cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="cache root (with --dataset)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Read every feature file whole and check each row's checksum and for NaN/Inf; exit 1 on damage."""
    from mmcache.extract.cache_info import format_verify, verify

    entries = verify(cache_dir / dataset if dataset else path)
    typer.echo(json.dumps(entries, indent=2, default=str) if as_json else format_verify(entries))
    if any(e["status"] in ("damaged", "unreadable") for e in entries):
        raise typer.Exit(1)


@cache_app.command("merge")
def cache_merge(
    paths: list[Path] = typer.Argument(..., help="dataset folder(s) and/or shard files (*.shard-<i>-of-<n>.h5)"),
    keep_shards: bool = typer.Option(False, "--keep-shards", help="keep the shard files after the verified merge"),
    force: bool = typer.Option(False, "--force", help="replace a merged file made with other settings"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Combine the shard files of `extract --shard i/n` runs into the normal feature file."""
    from mmcache.extract.cache_format import merge_paths

    results = merge_paths(paths, keep_shards=keep_shards, force=force)
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in results], indent=2, default=str))
        return
    if not results:
        typer.echo(f"nothing to merge: no shard files in {', '.join(map(str, paths))}")
    for r in results:
        left = "shard files removed" if r.removed_shards else ("shard files kept" if r.shards else "")
        typer.echo(f"{r.status} {r.num_shards} shards -> {r.path} ({r.num_samples} samples, {r.num_valid} valid, "
                   f"{r.num_failed} failed{', ' + left if left else ''})")
    csvs = sorted({str(r.failures_csv) for r in results if r.failures_csv and r.num_failed})
    if csvs:
        typer.echo(f"failures: {', '.join(csvs)}")


@app.command()
def bench(
    preset: str = typer.Option("small", help="model sizes: tiny | small | base (BERT + DINOv2) | clip-base | siglip-base (random-init, built locally)"),
    samples: int = typer.Option(256, help="generated posts (JPEG + text) to extract"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 (GPU autocast)"),
    batch_sizes: str = typer.Option("8,32", help="comma-separated extraction batch sizes to compare"),
    repeats: int = typer.Option(3, help="timed repeats per figure (median)"),
    num_workers: int = typer.Option(2, help="image decoding workers in the extract path"),
    epochs: int = typer.Option(5, help="epochs per training run"),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="measure peak RSS in child processes"),
    out_dir: Path = typer.Option(Path("bench"), help="where results.json and results.md go"),
    work_dir: Path = typer.Option(Path("cache/bench"), help="generated data, models and scratch caches"),
    only: str | None = typer.Option(None, "--only", help="sections a,b of: extraction (with cache_io, training, memory), grid (default all)"),
    grid_samples: int = typer.Option(4500, "--grid-samples", help="posts in the grid section's synthetic 768-d cache"),
    grid_tokens_large: bool = typer.Option(False, "--grid-tokens-large", help="grid section: also the tokens grid on that cache (~25 min one model per run on a 2-core CPU)"),
) -> None:
    """Measure both stages against their limits; print a table, write bench/results.json."""
    from mmcache.bench.run import BenchConfig, format_report, run_bench

    try:
        sizes = tuple(int(x) for x in batch_sizes.split(",") if x.strip())
    except ValueError:
        raise BadInputError(f"--batch-sizes expects integers like 8,32; got {batch_sizes!r}") from None
    cfg = BenchConfig(preset=preset, samples=samples, device=device, precision=precision, batch_sizes=sizes,
                      repeats=repeats, num_workers=num_workers, epochs=epochs, memory=memory,
                      out_dir=str(out_dir), work_dir=str(work_dir), grid_samples=grid_samples,
                      grid_tokens_large=grid_tokens_large)
    if only:
        names = [x.strip() for x in only.split(",") if x.strip()]
        cfg.sections = tuple(dict.fromkeys(s for n in names for s in
                                           (("extraction", "cache_io", "training", "memory") if n == "extraction" else (n,))))
    typer.echo(format_report(run_bench(cfg)))
    typer.echo(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")


def _names(values: OptionList) -> list[str] | None:
    """Repeatable options that also take comma-separated lists: --heads a,b --heads c -> [a, b, c]."""
    out = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    return out or None


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    """``--lrs 1e-4,3e-4`` -> [0.0001, 0.0003]; None when not given."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()] or None
    except ValueError:
        raise BadInputError(f"{flag} expects comma-separated {kind.__name__} values, got {text!r}") from None


@app.command()
def ablate(
    dataset: OptionList = typer.Option(None, "--dataset", "-d", help="cached dataset(s), repeatable or a,b (default: every dataset in --cache-dir)"),
    heads: OptionList = typer.Option(None, "--heads", help="heads, repeatable or a,b (default: all five)"),
    features: OptionList = typer.Option(None, "--features", help="cls | mean | tokens | proj, repeatable or a,b (default cls,tokens)"),
    targets: OptionList = typer.Option(None, "--targets", help="targets / tasks, repeatable or a,b (default: each dataset's main label); one table each"),
    seeds: int = typer.Option(5, "--seeds", help="seeds 0..N-1 per config"),
    jobs: int = typer.Option(0, "--jobs", "-j", help="worker processes (0 = auto: 1 on CUDA, else min(cores, 4)); 1 = in this process"),
    threads: int | None = typer.Option(None, "--threads", help="torch threads per run (default cores // jobs)"),
    shard: str | None = typer.Option(None, "--shard", help="i/n: run only configs i, i+n, ... of the sorted grid (job arrays); tables cover every finished run"),
    force: bool = typer.Option(False, "--force", help="rerun finished runs too"),
    aggregate_only: bool = typer.Option(False, "--aggregate-only", help="train nothing; tables from the finished runs"),
    config: Path | None = typer.Option(None, "--config", help="JSON training config every run starts from (e.g. a run's config.json)"),
    epochs: int | None = typer.Option(None, "--epochs", help="max epochs (default 30)"),
    dim: int | None = typer.Option(None, "--dim", help="shared latent width (default 256)"),
    lr: float | None = typer.Option(None, "--lr", help="peak learning rate (default 3e-4)"),
    patience: int | None = typer.Option(None, "--patience", help="early-stop patience, 0 = off (default 5)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="batch size (default 32)"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default auto)"),
    cache_dir: str = typer.Option("cache", "--cache-dir", help="cache root"),
    runs_dir: str = typer.Option("runs/ablate", "--runs-dir", help="run folders go to RUNS_DIR/<dataset>/"),
    results_dir: str | None = typer.Option(None, "--results-dir", help="where ablation_<dataset>.md|csv|json go (default results/<name of --runs-dir>, e.g. results/ablate)"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="PNG figures (needs matplotlib; skipped with a warning without it)"),
    allow_no_val: bool = typer.Option(False, "--allow-no-val", help="train datasets without a validation split (no early stopping)"),
    as_json: bool = typer.Option(False, "--json", help="print the tables as JSON"),
    stack: bool = typer.Option(True, "--stack/--no-stack", help="train the seeds (and --lrs) of a config as one stacked model (default on); --no-stack: one model per run"),
    lrs: str | None = typer.Option(None, "--lrs", help="learning rates a,b,c: each trained, the best on validation reported per head"),
    dims: str | None = typer.Option(None, "--dims", help="latent widths a,b: a table row each"),
    dropouts: str | None = typer.Option(None, "--dropouts", help="dropout values a,b: a table row each"),
    wait_timeout: float = typer.Option(86400.0, "--wait-timeout", help="seconds to wait for runs another ablate process is training before the tables are written (they count as unfinished after it)"),
) -> None:
    """Train every head x features x encoder x seed on the cached datasets; write results/ablate/ablation_<dataset>.*"""
    from mmcache.extract.extraction import parse_shard
    from mmcache.fuse.ablate import (
        DEFAULT_FEATURES,
        AblationConfig,
        default_results_dir,
        format_ablation,
        run_ablation,
    )
    from mmcache.fuse.train import TrainConfig

    base = TrainConfig.from_json(config).to_dict() if config is not None else {}
    flags = dict(epochs=epochs, dim=dim, lr=lr, patience=patience, batch_size=batch_size, device=device)
    base.update({k: v for k, v in flags.items() if v is not None})
    cfg = AblationConfig(datasets=_names(dataset), heads=_names(heads), features=_names(features) or list(DEFAULT_FEATURES),
                         seeds=seeds, targets=_names(targets), base=TrainConfig.from_dict(base), cache_dir=cache_dir, runs_dir=runs_dir,
                         results_dir=results_dir, jobs=jobs, threads=threads,
                         shard=parse_shard(shard) if shard else None, force=force, aggregate_only=aggregate_only,
                         plots=plots, allow_no_val=allow_no_val, stack=stack, lrs=_numbers(lrs, float, "--lrs"),
                         dims=_numbers(dims, int, "--dims"), dropouts=_numbers(dropouts, float, "--dropouts"),
                         wait_timeout=wait_timeout)
    result = run_ablation(cfg)
    typer.echo(json.dumps(result.tables, indent=2, default=str) if as_json else format_ablation(result))
    if result.failed:
        raise PipelineError(f"{len(result.failed)} of {len(result.selected)} runs failed (listed in the tables and "
                            f"{cfg.results_dir or default_results_dir(cfg.runs_dir)}/ablation_<dataset>.json); retry them with: {resume_command(_CALL[0])}")


@app.command()
def demo(
    cache_dir: Path = typer.Option(Path("cache"), help="cache root (demo data, tiny models and features go here)"),
    runs_dir: Path = typer.Option(Path("runs/demo"), help="run folders of the demo grid"),
    results_dir: Path | None = typer.Option(None, help="where the ablation tables go (default results/<name of --runs-dir>, i.e. results/demo)"),
    seeds: int = typer.Option(3, help="seeds per configuration"),
    jobs: int = typer.Option(0, "--jobs", "-j", help="parallel training processes (0 = auto)"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="PNG figures (needs matplotlib)"),
    n: int = typer.Option(600, "--n", help="demo posts to generate"),
    epochs: int | None = typer.Option(None, help="max epochs per run (default 40)"),
) -> None:
    """Both stages end to end on the built-in demo data with tiny local encoders (~1-2 min on a CPU)."""
    from mmcache.extract.extraction import format_extract_summary
    from mmcache.fuse.ablate import format_ablation
    from mmcache.fuse.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(cache_dir=str(cache_dir), runs_dir=str(runs_dir),
                                 results_dir=None if results_dir is None else str(results_dir),
                                 seeds=seeds, jobs=jobs, plots=plots, n=n, epochs=epochs))
    typer.echo(format_extract_summary(result.extract))
    typer.echo("")
    typer.echo(format_ablation(result.ablation))
    if result.ablation.failed:
        raise PipelineError(f"{len(result.ablation.failed)} demo run(s) failed; see the table above")


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that repeats this call (``python cli.py ...``, ``python -m mmcache ...`` or
    ``mmcache ...``, as it was started), shell-quoted: what resume hints print."""
    args = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # tests pass Paths
    prog = sys.argv[0] if sys.argv else ""
    py = shutil.which("python")
    python = "python" if py and os.path.realpath(py) == os.path.realpath(sys.executable) else sys.executable
    if Path(prog).name == "cli.py":
        lead = [python, prog]
    elif Path(prog).name == "__main__.py":
        lead = [python, "-m", "mmcache"]
    else:
        lead = ["mmcache"]
    return shlex.join(lead + args)


def _quiet_libraries() -> None:
    """Keep the output to what the user needs: transformers / huggingface_hub warnings (``X requires
    torchvision; falling back ...``, download notices) are hidden, their errors kept. Set before they
    are first imported (commands import them lazily); a user's own setting wins."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars would interleave
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_error(e) -> str:
    """A click usage error as one line, with the valid choices where there are some."""
    msg = _one_line(e.format_message())
    ctx = e.ctx
    if "No such command" in msg and ctx is not None and hasattr(ctx.command, "list_commands"):
        msg += f" Commands: {', '.join(ctx.command.list_commands(ctx))}"
    elif ctx is not None:
        msg += f" (see `{ctx.command_path} --help`)"
    return msg


def _invoke(argv: list[str] | None) -> int:
    """Run the click command without click's own error printing (boxes, "Aborted!"): exceptions
    reach :func:`main` unchanged."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with command.make_context(Path(sys.argv[0]).name or "cli.py", args) as ctx:
            command.invoke(ctx)
    except _Exit as e:  # --help
        return e.exit_code
    except _NoArgsIsHelp as e:  # `cli.py` / `cli.py cache` alone: the help
        typer.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (callable from tests with an argv list).

    Exit codes: 0 ok, 2 bad input (one ``error:`` line: unknown name, malformed value, missing
    option, unknown command), 1 runtime failure, 130 interrupted (Ctrl-C: one line saying what was
    kept and the command that resumes)."""
    _quiet_libraries()
    _CALL[0] = argv
    rank = os.environ.get("RANK")  # set by torchrun: only rank 0 logs below warnings
    logging.basicConfig(level=logging.INFO if rank in (None, "0") else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s" if rank is None else
                        f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        return _invoke(argv)
    except _clickx.UsageError as e:
        typer.echo(f"error: {_usage_error(e)}", err=True)
        return 2
    except BadInputError as e:
        typer.echo(f"error: {_one_line(e)}", err=True)
        return 2
    except PipelineError as e:
        msg = e.with_command(resume_command(argv)) if isinstance(e, ResumableError) else str(e)
        typer.echo(f"error: {_one_line(msg)}", err=True)
        return 1
    except (KeyboardInterrupt, *_Abort) as e:
        kept = str(e) if isinstance(e, Interrupted) else "stopped before anything new was saved"
        typer.echo(f"interrupted: {_one_line(kept)}; resume with: {resume_command(argv)}", err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
