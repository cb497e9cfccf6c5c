"""Command line for both stages. Thin on purpose: parse, call the library, print, map errors to exit
codes (2 = bad input, 1 = runtime failure). Run as ``python cli.py ...`` or the ``mmcache`` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python cli.py` from anywhere, no install

from extract.errors import BadInputError, PipelineError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract BERT/DINOv2 features once into an HDF5 cache; train fusion heads on it.")

OptionList = list[str] | None


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
    from extract.datasets import get_dataset, list_datasets

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
    seed: int = typer.Option(0, help="seed of the stratified split"),
    option: OptionList = typer.Option(None, "--option", "-o", help="dataset option KEY=VALUE (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Counts per class and split, dropped samples by reason, decode fallbacks."""
    from extract.datasets import load_dataset
    from extract.splits import resolve_splits
    from extract.summary import format_summary, summarize

    result = load_dataset(dataset, data_dir, **_options(option))
    summary = summarize(result, resolve_splits(result.samples, split_file=split_file, seed=seed))
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (callable from tests with an argv list)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        # standalone mode lets click report its own usage errors (exit 2) and --help (exit 0) via
        # SystemExit; our library errors pass through it untouched and are mapped here.
        app(args=argv, standalone_mode=True, prog_name=Path(sys.argv[0]).name or "cli.py")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BadInputError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
