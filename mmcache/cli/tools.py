"""Both stages at once: ``demo`` (end to end on built-in data) and ``bench`` (measure both stages);
features in and out of the cache: ``cache export`` and ``cache import``. Each parses, calls
:mod:`mmcache.api`, and formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmcache import api
from mmcache.cli.app import app, cache_app
from mmcache.cli.options import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DEVICE,
    CacheDir,
    DeviceOpt,
    Epochs,
    ExportFormat,
    ImageCache,
    Jobs,
    Json,
    OneModality,
    OptDataset,
    Plots,
    PrecisionOpt,
    RunsDir,
    TextCache,
    choice,
    metavar,
    names,
    numbers,
)
from mmcache.errors import PipelineError


@app.command()
def demo(
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    runs_dir: RunsDir = Path("runs/demo"),
    results_dir: Annotated[Path | None, typer.Option(help="where the ablation tables go (default results/<name of --runs-dir>, i.e. results/demo)")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per configuration")] = 3,
    jobs: Jobs = 0,
    plots: Plots = True,
    n: Annotated[int, typer.Option("--n", help="demo posts to generate")] = 600,
    epochs: Epochs = None,
) -> None:
    """Both stages end to end on the built-in demo data with tiny local encoders (~1-2 min on a CPU)."""
    from mmcache.extract.extraction import format_extract_summary
    from mmcache.fuse.ablate import format_ablation

    result = api.demo(cache_dir=str(cache_dir or DEFAULT_CACHE_DIR), runs_dir=str(runs_dir or "runs/demo"),
                      results_dir=None if results_dir is None else str(results_dir),
                      seeds=seeds, jobs=jobs, plots=plots, n=n, epochs=epochs)
    typer.echo(format_extract_summary(result.extract))
    typer.echo("")
    typer.echo(format_ablation(result.ablation))
    if result.ablation.failed:
        raise PipelineError(f"{len(result.ablation.failed)} demo run(s) failed; see the table above")


@app.command()
def bench(
    preset: Annotated[str, typer.Option(help="model sizes: tiny | small | base (BERT + DINOv2) | clip-base | siglip-base (random-init, built locally)")] = "small",
    samples: Annotated[int, typer.Option(help="generated posts (JPEG + text) to extract")] = 256,
    device: DeviceOpt = DEFAULT_DEVICE,
    precision: PrecisionOpt = "auto",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated extraction batch sizes to compare")] = "8,32",
    repeats: Annotated[int, typer.Option(help="timed repeats per figure (median)")] = 3,
    num_workers: Annotated[int, typer.Option(help="image decoding workers in the extract path")] = 2,
    epochs: Epochs = 5,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="measure peak RSS in child processes")] = True,
    out_dir: Annotated[Path, typer.Option(help="where results.json and results.md go")] = Path("bench"),
    work_dir: Annotated[Path, typer.Option(help="generated data, models and scratch caches")] = Path("cache/bench"),
    only: Annotated[str | None, typer.Option(help="sections a,b of: extraction (with cache_io, training, memory), grid, io, scale (default: extraction, grid)")] = None,
    grid_samples: Annotated[int, typer.Option(help="posts in the grid section's synthetic 768-d cache")] = 4500,
    grid_tokens_large: Annotated[bool, typer.Option(help="grid section: also the tokens grid on that cache (~25 min one model per run on a 2-core CPU)")] = False,
) -> None:
    """Measure both stages against their limits; print a table, write bench/results.json."""
    from mmcache.bench.run import format_report

    sizes = tuple(numbers(batch_sizes, int, "--batch-sizes") or ())
    report = api.bench(preset=preset, samples=samples, device=device or DEFAULT_DEVICE, precision=precision,
                       batch_sizes=sizes, repeats=repeats, num_workers=num_workers, epochs=5 if epochs is None else epochs,
                       memory=memory, out_dir=str(out_dir), work_dir=str(work_dir), grid_samples=grid_samples,
                       grid_tokens_large=grid_tokens_large, only=names([only] if only else None))
    typer.echo(format_report(report))
    typer.echo(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")


_EXPORT_FIELDS = "cls,mean,tokens,mask,proj"


@cache_app.command("export")
def cache_export(
    out: Annotated[Path, typer.Option("--out", help="folder the files go to (created)")],
    dataset: OptDataset = None,
    format: Annotated[str, typer.Option(
        "--format", parser=choice(ExportFormat), metavar=metavar(ExportFormat),
        help="npy: one .npy per array + metadata.json; parquet: one file per modality; hf: a datasets.Dataset "
             "saved to disk (parquet, hf: pip install mmcache[export])")] = "npy",
    fields: Annotated[str, typer.Option(
        "--fields", help=f"arrays per modality, a,b of {_EXPORT_FIELDS}")] = "cls,mean",
    modality: Annotated[str | None, typer.Option(
        "--modality", parser=choice(OneModality), metavar=metavar(OneModality),
        show_default="every modality cached", help="only this modality")] = None,
    text_cache: TextCache = None,
    image_cache: ImageCache = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    as_json: Json = False,
) -> None:
    """Write a cached dataset's ids, labels, split and feature arrays as numpy, parquet or a Hugging Face dataset."""
    result = api.export_cache(dataset, out=out, format=format, fields=tuple(names([fields]) or ()),
                              cache_dir=cache_dir or DEFAULT_CACHE_DIR, text_cache=text_cache,
                              image_cache=image_cache, modalities=(modality,) if modality else None)
    if as_json:
        typer.echo(json.dumps({**result.__dict__, "out": str(result.out), "files": [str(f) for f in result.files]}, indent=2))
        return
    typer.echo(f"exported {result.num_samples} samples ({', '.join(result.modalities)}: {', '.join(result.fields)}) "
               f"as {result.format} to {result.out}")


@cache_app.command("import")
def cache_import(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="cache folder name under --cache-dir")],
    sources: Annotated[list[Path], typer.Option(
        "--from", metavar="PATH", help="npy folder (ids.npy, <modality>.<field>.npy) or .parquet file (id column + feature "
                       "columns); repeatable, one per modality")],
    modality: Annotated[str | None, typer.Option(
        "--modality", parser=choice(OneModality), metavar=metavar(OneModality),
        show_default="from the file names / metadata", help="the modality of the input")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", show_default="imported/<exported encoder> or imported",
        help="what files and tables call these features (the file is <modality>--<name>.h5)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing feature file of that name")] = False,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    as_json: Json = False,
) -> None:
    """Bring features you already have into the cache (ids matched to its index); stage two trains on them."""
    results = api.import_cache(dataset, sources, cache_dir=cache_dir or DEFAULT_CACHE_DIR, modality=modality,
                               name=name, force=force)
    if as_json:
        typer.echo(json.dumps([{**r.__dict__, "path": str(r.path)} for r in results], indent=2))
        return
    for r in results:
        typer.echo(f"{r.status}: {r.path} ({r.modality}, {r.imported} of {r.num_samples} index rows with features, "
                   f"{r.missing} without; index {r.index_status})")
    typer.echo("encoder identity cannot be checked for imported features (provenance family: imported)")
