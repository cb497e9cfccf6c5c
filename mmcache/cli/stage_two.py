"""Stage two commands: ``train-fusion``, ``evaluate``, ``predict``, ``analyze`` and ``ablate``. Each
parses, calls :mod:`mmcache.api`, and formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmcache import api, configfile
from mmcache.cli.app import CALL, app, resume_command
from mmcache.cli.options import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DEVICE,
    AllowNoVal,
    CacheDir,
    Config,
    CurrentSplit,
    DataDir,
    DatasetOptions,
    Datasets,
    DeviceOpt,
    Dim,
    Epochs,
    FeatureOpt,
    FeaturesOpt,
    HeadOpt,
    HeadsOpt,
    ImageCache,
    Jobs,
    Json,
    LazyHelpCommand,
    Lr,
    MaxMemory,
    OptDataset,
    OriginalSplit,
    Patience,
    Plots,
    PostsSplitOpt,
    Run,
    RunCacheDir,
    RunsDir,
    Seed,
    ShuffleBuffer,
    SplitFile,
    SplitOpt,
    Target,
    TextCache,
    Threads,
    Track,
    TrackOpt,
    TrainBatchSize,
    given,
    given_by_user,
    json_values,
    key_values,
    names,
    numbers,
)
from mmcache.errors import BadInputError, PipelineError


def _text(path: Path | None) -> str | None:
    """TrainConfig / AblationConfig keep folders as strings (they are written to config.json)."""
    return None if path is None else str(path)


def _bytes(text: str | None) -> int | None:
    """--max-memory in bytes (BadInputError, exit 2, for a bad value)."""
    if text is None:
        return None
    from mmcache.fuse.stream import parse_size

    return parse_size(text)


def _split_choice(original: bool, current: bool) -> str | None:
    if original and current:
        raise BadInputError("--original-split and --current-split exclude each other")
    return "original" if original else "current" if current else None


@app.command("train-fusion", cls=LazyHelpCommand)
def train_fusion(
    head: HeadOpt = None,
    dataset: OptDataset = None,
    features: FeatureOpt = None,
    target: Target = None,
    text_cache: TextCache = None,
    image_cache: ImageCache = None,
    config: Config = None,
    dim: Dim = None,
    layers: Annotated[int | None, typer.Option(show_default="1", help="attention layers")] = None,
    attention_heads: Annotated[int | None, typer.Option(
        "--attention-heads", show_default="4", help="attention heads per layer (config field `heads`)")] = None,
    dropout: Annotated[float | None, typer.Option(show_default="0.1", help="dropout")] = None,
    epochs: Epochs = None,
    batch_size: TrainBatchSize = None,
    lr: Lr = None,
    weight_decay: Annotated[float | None, typer.Option(show_default="0.01", help="AdamW weight decay")] = None,
    warmup_frac: Annotated[float | None, typer.Option(show_default="0.1", help="share of steps for linear warm-up")] = None,
    grad_clip: Annotated[float | None, typer.Option(show_default="1.0", help="max gradient norm, 0 = off")] = None,
    label_smoothing: Annotated[float | None, typer.Option(show_default="0", help="label smoothing of the loss")] = None,
    class_balanced: Annotated[bool | None, typer.Option(
        "--class-balanced/--no-class-balanced", show_default="off", help="inverse-frequency class weights in the loss")] = None,
    patience: Patience = None,
    seed: Seed = None,
    device: DeviceOpt = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", show_default="on", help="bf16 autocast on CUDA (CPU never)")] = None,
    threads: Threads = None,
    max_memory: MaxMemory = None,
    shuffle_buffer: ShuffleBuffer = None,
    head_option: Annotated[list[str] | None, typer.Option(help="head-specific KEY=VALUE (repeatable)")] = None,
    cache_dir: CacheDir = None,
    runs_dir: RunsDir = None,
    run_name: Annotated[str | None, typer.Option(help="run folder name (default <dataset>-<head>-<features>-s<seed>-<time>)")] = None,
    allow_no_val: AllowNoVal = False,
    track: TrackOpt = Track.auto,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar / progress lines")] = False,
    as_json: Json = False,
) -> None:
    """Train a fusion head on cached features; writes runs/<name>/ and prints a summary table.

    Flags left out keep the --config file's values, else the defaults shown."""
    from mmcache.fuse.report import format_train
    from mmcache.fuse.runs import read_split

    base = configfile.read_training(config) if config is not None else {}
    flags = given(head=head, dataset=dataset, features=features, target=target, text_cache=text_cache,
                  image_cache=image_cache, dim=dim, layers=layers, heads=attention_heads, dropout=dropout,
                  epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_frac=warmup_frac,
                  grad_clip=grad_clip, label_smoothing=label_smoothing, class_balanced=class_balanced,
                  patience=patience, seed=seed, device=device, amp=amp, threads=threads,
                  max_memory=_bytes(max_memory), shuffle_buffer=shuffle_buffer, cache_dir=_text(cache_dir),
                  runs_dir=_text(runs_dir), run_name=run_name)
    if head_option:
        flags["head_options"] = json_values(head_option, "--head-option")
    merged = {**base, **flags}
    if config is not None and dataset is not None and dataset != base.get("dataset"):
        merged.update(text_cache=text_cache, image_cache=image_cache)  # the config's files belong to its dataset
    if "head" not in merged:
        from mmcache.cli.options import head_names

        raise BadInputError(f"--head is required (or --config); heads: {', '.join(head_names())}")
    same_data = config is not None and merged.get("dataset") == base.get("dataset")
    result = api.train_fusion(merged, progress=False if quiet else None, allow_no_val=allow_no_val,
                              expected_split=read_split(config.parent) if same_data else None,
                              track=Track(track).value)
    typer.echo(json.dumps(result.metrics, indent=2) if as_json else format_train(result))


@app.command()
def evaluate(
    run: Run,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help="score on another cached dataset (same encoders, same classes)")] = None,
    split: SplitOpt = "test",
    target: Target = None,
    text_cache: TextCache = None,
    image_cache: ImageCache = None,
    cache_dir: RunCacheDir = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    original_split: OriginalSplit = False,
    current_split: CurrentSplit = False,
    max_memory: MaxMemory = None,
    as_json: Json = False,
) -> None:
    """Score a saved run again (its own test split, or another dataset's: cross-dataset evaluation)."""
    from mmcache.fuse.report import format_eval

    choice = _split_choice(original_split, current_split)
    result = api.evaluate(run, dataset, split, cache_dir=cache_dir, text_cache=text_cache, image_cache=image_cache,
                          device=device or DEFAULT_DEVICE, split_choice=choice, target=target,
                          max_memory=_bytes(max_memory))
    typer.echo(json.dumps(result.metrics, indent=2) if as_json else format_eval(result))


@app.command()
def predict(
    run: Run,
    text: Annotated[str | None, typer.Option(help="one post: its text")] = None,
    image: Annotated[Path | None, typer.Option(help="one post: its image file")] = None,
    post_id: Annotated[str, typer.Option("--id", help="one post: its id")] = "post0",
    label: Annotated[str | None, typer.Option(help="one post: its true label (optional)")] = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV/JSONL id,text,image[,label] (the folder format)")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="a dataset reader (see `datasets`)")] = None,
    data_dir: DataDir = None,
    split: PostsSplitOpt = "test",
    option: DatasetOptions = None,
    split_file: SplitFile = None,
    output: Annotated[Path | None, typer.Option(help=".csv or .jsonl (default: CSV on stdout)")] = None,
    cache_features: Annotated[Path | None, typer.Option(help="also keep the encoded posts as a normal cache under DIR")] = None,
    calibrated: Annotated[bool, typer.Option(help="temperature-scaled probabilities (run `analyze` first)")] = False,
    cache_dir: RunCacheDir = None,
    text_model: Annotated[Path | None, typer.Option(
        help="text encoder folder to use instead of the run's recorded one (verified against it)")] = None,
    image_model: Annotated[Path | None, typer.Option(
        help="image encoder folder to use instead of the run's recorded one (verified against it)")] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    batch_size: Annotated[int, typer.Option(help="encoder batch size")] = 32,
) -> None:
    """Label new posts with a trained run: encoders from its provenance (verified), then its head."""
    from mmcache.fuse.report import format_metrics

    if output is not None and output.suffix.lower() not in (".csv", ".jsonl"):
        raise BadInputError(f"--output must end in .csv or .jsonl, got {output.name!r}")
    one = text is not None or image is not None
    result = api.predict(run, texts=[text] if one else None, images=[image] if one else None,
                         ids=[post_id] if one else None, labels=[label] if one and label else None,
                         manifest=manifest, dataset=dataset, data_dir=data_dir, split=split,
                         options=key_values(option), split_file=split_file, device=device or DEFAULT_DEVICE,
                         calibrated=calibrated, cache_features=cache_features, batch_size=batch_size,
                         cache_dir=cache_dir, text_model=text_model, image_model=image_model)
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
    run: Run,
    gallery: Annotated[int, typer.Option(help="posts per error-gallery list")] = 6,
    heatmaps: Annotated[int, typer.Option(help="posts with attention heat maps")] = 4,
    cache_dir: RunCacheDir = None,
    original_split: OriginalSplit = False,
    current_split: CurrentSplit = False,
    device: DeviceOpt = DEFAULT_DEVICE,
    as_json: Json = False,
) -> None:
    """PR curves, ROC AUC, calibration + temperature scaling, attention shares and report.html into <run>/analysis/."""
    from mmcache.fuse.analyze import format_analysis

    choice = _split_choice(original_split, current_split)
    result = api.analyze(run, gallery=gallery, heatmaps=heatmaps, device=device or DEFAULT_DEVICE,
                         cache_dir=cache_dir, split_choice=choice)
    typer.echo(json.dumps(result.summary, indent=2) if as_json else format_analysis(result))


@app.command(cls=LazyHelpCommand)
def ablate(
    ctx: typer.Context,
    dataset: Datasets = None,
    heads: HeadsOpt = None,
    features: FeaturesOpt = None,
    targets: Annotated[list[str] | None, typer.Option(help="targets / tasks, repeatable or a,b (default: each dataset's main label); one table each")] = None,
    seeds: Annotated[int, typer.Option(help="seeds 0..N-1 per config")] = 5,
    jobs: Jobs = 0,
    threads: Threads = None,
    shard: Annotated[str | None, typer.Option(help="i/n: run only configs i, i+n, ... of the sorted grid (job arrays); tables cover every finished run")] = None,
    force: Annotated[bool, typer.Option("--force", help="rerun finished runs too")] = False,
    aggregate_only: Annotated[bool, typer.Option(help="train nothing; tables from the finished runs")] = False,
    config: Config = None,
    epochs: Epochs = None,
    dim: Dim = None,
    lr: Lr = None,
    patience: Patience = None,
    batch_size: TrainBatchSize = None,
    device: DeviceOpt = None,
    max_memory: MaxMemory = None,
    shuffle_buffer: ShuffleBuffer = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    runs_dir: RunsDir = Path("runs/ablate"),
    results_dir: Annotated[Path | None, typer.Option(help="where ablation_<dataset>.md|csv|json go (default results/<name of --runs-dir>, e.g. results/ablate)")] = None,
    plots: Plots = True,
    allow_no_val: AllowNoVal = False,
    as_json: Json = False,
    stack: Annotated[bool, typer.Option(help="train the seeds (and --lrs) of a config as one stacked model; --no-stack: one model per run")] = True,
    lrs: Annotated[str | None, typer.Option(help="learning rates a,b,c: each trained, the best on validation reported per head")] = None,
    dims: Annotated[str | None, typer.Option(help="latent widths a,b: a table row each")] = None,
    dropouts: Annotated[str | None, typer.Option(help="dropout values a,b: a table row each")] = None,
    wait_timeout: Annotated[float, typer.Option(help="seconds to wait for runs another ablate process is training before the tables are written (they count as unfinished after it)")] = 86400.0,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="linear-probe baseline rows (logistic regression on the same features)")] = True,
    baseline: Annotated[str | None, typer.Option(help="head every row's paired delta is against (default: the best probe of its features)")] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap replicates of the 95% intervals over test posts and seeds")] = 1000,
    track: TrackOpt = Track.auto,
) -> None:
    """Train every head x features x encoder x seed on the cached datasets; write results/ablate/ablation_<dataset>.*

    Options left out keep the --config file's values, else the defaults shown. The resolved settings
    are written to the results folder as ablation_config.yaml: `ablate --config` that file repeats the call."""
    from mmcache.fuse.ablate import format_ablation

    values = dict(datasets=names(dataset), heads=names(heads), features=names(features), seeds=seeds,
                  targets=names(targets), jobs=jobs, threads=threads, shard=shard, force=force,
                  aggregate_only=aggregate_only, cache_dir=_text(cache_dir or DEFAULT_CACHE_DIR),
                  runs_dir=_text(runs_dir), results_dir=_text(results_dir), plots=plots, allow_no_val=allow_no_val,
                  stack=stack, lrs=numbers(lrs, float, "--lrs"), dims=numbers(dims, int, "--dims"),
                  dropouts=numbers(dropouts, float, "--dropouts"), wait_timeout=wait_timeout, probe=probe,
                  baseline=baseline, bootstrap=bootstrap)
    flags = given_by_user(ctx, values, {"datasets": "dataset"})
    training = given(epochs=epochs, dim=dim, lr=lr, patience=patience, batch_size=batch_size, device=device,
                     max_memory=_bytes(max_memory), shuffle_buffer=shuffle_buffer)
    resolved = configfile.resolve_ablation(values, configfile.read_ablation(config) if config else {}, flags, training)
    options = {k: v for k, v in resolved.items() if k not in ("datasets", "base")}
    # --track is not a grid setting (not in ablation_config.yaml): it changes no number, only what is logged
    result = api.ablate(resolved["datasets"], base=resolved["base"], track=Track(track).value, **options)
    configfile.save_ablation_config(resolved)
    typer.echo(json.dumps(result.tables, indent=2, default=str) if as_json else format_ablation(result))
    if result.failed:
        results = configfile.ablation_results_dir(resolved)
        raise PipelineError(f"{len(result.failed)} of {len(result.selected)} runs failed (listed in the tables and "
                            f"{results}/ablation_<dataset>.json); retry them with: {resume_command(CALL[0])}")
