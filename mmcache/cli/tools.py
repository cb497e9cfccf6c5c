"""Both stages at once: ``demo`` (end to end on built-in data) and ``bench`` (measure both stages).
Each parses, calls :mod:`mmcache.api`, and formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmcache import api
from mmcache.cli.app import app
from mmcache.cli.options import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DEVICE,
    CacheDir,
    DeviceOpt,
    Epochs,
    Jobs,
    Plots,
    PrecisionOpt,
    RunsDir,
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
    only: Annotated[str | None, typer.Option(help="sections a,b of: extraction (with cache_io, training, memory), grid (default all)")] = None,
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
