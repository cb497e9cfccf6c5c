"""The typer application the command modules register on, its global options (``--log-file``,
``--version``, ``-h``) and :func:`resume_command`, which resume hints print."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from mmcache.errors import BadInputError

HELP = "Extract BERT/DINOv2 features once into an HDF5 cache; train fusion heads on it."
# -h everywhere: click hands a group's help option names down to every subcommand's context.
CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=HELP,
                  context_settings=CONTEXT)
cache_app = typer.Typer(no_args_is_help=True, help="Look at the feature cache; merge shards.",
                        context_settings=CONTEXT)
app.add_typer(cache_app, name="cache")

CALL: list[list[str] | None] = [None]  # this call's argv (None: sys.argv), for resume hints


def _print_version(value: bool) -> None:
    if value:
        from mmcache import __version__

        typer.echo(f"mmcache {__version__}")
        raise typer.Exit(0)


def open_log_file(path: Path) -> None:
    """Append log and progress lines to ``path`` too (its folder is created); a path that cannot be
    a log file (a directory, a file where a folder should be, no permission) is bad input."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:  # IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError
        raise BadInputError(f"--log-file {str(path)!r} cannot be opened for appending: "
                            f"{e.strerror or type(e).__name__}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


@app.callback()
def _everywhere(
    log_file: Annotated[Path | None, typer.Option(
        "--log-file", help="also append log and progress lines to this file (before the command: "
                           "cli.py --log-file x.log extract ...)")] = None,
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="print the version and exit")] = False,
) -> None:
    """Extract BERT/DINOv2 features once into an HDF5 cache; train fusion heads on it."""
    if log_file is not None:
        open_log_file(log_file)


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
