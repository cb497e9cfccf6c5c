"""Command line for both stages. Thin on purpose: parse, call :mod:`mmcache.api`, print, map errors
to exit codes (2 = bad input, 1 = runtime failure). Run as ``python cli.py ...`` from a checkout, or
as the ``mmcache`` command / ``python -m mmcache`` once installed.

Layout: :mod:`.app` (the typer app, global options, resume hints), :mod:`.options` (every shared
option declared once), the commands by stage (:mod:`.stage_one`, :mod:`.stage_two`, :mod:`.tools`),
:mod:`.docs` (docs/cli.md from the help texts); :func:`main` here maps errors to exit codes."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from mmcache.cli import stage_one, stage_two, tools  # noqa: F401 -- registers the commands
from mmcache.cli.app import CALL, app, resume_command
from mmcache.errors import BadInputError, Interrupted, PipelineError, ResumableError

__all__ = ["app", "main", "resume_command"]

# click's exception classes, wherever this typer takes click from (typer >= 0.2x vendors its own copy)
_clickx = sys.modules[typer.BadParameter.__module__]
_NoArgsIsHelp = getattr(_clickx, "NoArgsIsHelpError", ())
_Exit = tuple({typer.Exit, getattr(_clickx, "Exit", typer.Exit)})
_Abort = tuple({typer.Abort, getattr(_clickx, "Abort", typer.Abort)})


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
    # typer words a rejected enum value as pydantic does ("Value error, 'x' is not one of ...")
    msg = _one_line(e.format_message()).replace(": Value error, ", ": ")
    ctx = e.ctx
    if "No such command" in msg and ctx is not None and hasattr(ctx.command, "list_commands"):
        msg += f" Commands: {', '.join(ctx.command.list_commands(ctx))}"
    elif ctx is not None:
        msg += f" (see `{ctx.command_path} --help`)"
    return msg


def invoke(argv: list[str] | None, prog: str | None = None) -> int:
    """Run the click command without click's own error printing (boxes, "Aborted!"): exceptions
    reach :func:`main` unchanged. ``prog``: the name usage lines show (default: how we were started)."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with command.make_context(prog or Path(sys.argv[0]).name or "cli.py", args) as ctx:
            command.invoke(ctx)
    except _Exit as e:  # --help, --version
        return e.exit_code
    except _NoArgsIsHelp as e:  # `cli.py` / `cli.py cache` alone: the help
        typer.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
        return 0
    return 0


def _stdout_gone() -> int:
    """stdout's reader went away (``cli.py --help | head``): say nothing more, and point stdout at
    /dev/null so the interpreter's final flush does not print "Exception ignored ... BrokenPipeError".
    Exit 1, as rich does when its help output meets the closed pipe (it exits by itself)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout): nothing to flush
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (callable from tests with an argv list).

    Exit codes: 0 ok, 2 bad input (one ``error:`` line: unknown name or choice, malformed value,
    missing option, unknown command, unusable --log-file), 1 runtime failure, 130 interrupted
    (Ctrl-C: one line saying what was kept and the command that resumes); stdout closed early
    (``| head``): 1, quietly."""
    _quiet_libraries()
    CALL[0] = argv
    rank = os.environ.get("RANK")  # set by torchrun: only rank 0 logs below warnings
    logging.basicConfig(level=logging.INFO if rank in (None, "0") else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s" if rank is None else
                        f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        return invoke(argv)
    except BrokenPipeError:
        return _stdout_gone()
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
