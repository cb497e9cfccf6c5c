"""docs/cli.md from the ``--help`` of every command, so the reference cannot drift from the code:
``python -m mmcache.cli.docs > docs/cli.md`` (or ``make docs``); a test compares the committed file
with :func:`render`.

The text does not depend on the terminal: the width is fixed, colours are off and the program is
always called ``mmcache``. Lines are right-stripped (the help tables pad them to the full width)."""

from __future__ import annotations

import contextlib
import io
import sys

import typer
from typer import rich_utils

WIDTH = 100
PROG = "mmcache"
HEADER = """# Command line reference

Generated from the `--help` of every command by `python -m mmcache.cli.docs > docs/cli.md`
(`make docs`); do not edit by hand: `tests/test_cli_docs.py` fails when this file is out of date.
Every command also takes `-h`; `mmcache --version` prints the version.
"""


def command_paths() -> list[list[str]]:
    """Every command as its words after ``mmcache``: ``[]`` (the top level), ``["extract"]``,
    ``["cache"]``, ``["cache", "info"]``, ... in the order ``--help`` lists them."""
    from mmcache.cli import app

    def walk(command, path: list[str]) -> list[list[str]]:
        out = [path]
        ctx = typer.Context(command, info_name=PROG)
        for name in getattr(command, "list_commands", lambda _ctx: [])(ctx):
            out += walk(command.get_command(ctx, name), [*path, name])
        return out

    return walk(typer.main.get_command(app), [])


@contextlib.contextmanager
def _fixed_terminal():
    """Help rendered at WIDTH columns, without colours, whatever the terminal (restored after)."""
    saved = rich_utils.MAX_WIDTH, rich_utils.COLOR_SYSTEM, rich_utils.FORCE_TERMINAL
    rich_utils.MAX_WIDTH, rich_utils.COLOR_SYSTEM, rich_utils.FORCE_TERMINAL = WIDTH, None, False
    try:
        yield
    finally:
        rich_utils.MAX_WIDTH, rich_utils.COLOR_SYSTEM, rich_utils.FORCE_TERMINAL = saved


def help_text(path: list[str]) -> str:
    """The ``--help`` output of one command, as :func:`render` writes it."""
    from mmcache.cli import invoke

    buf = io.StringIO()
    with _fixed_terminal(), contextlib.redirect_stdout(buf):
        code = invoke([*path, "--help"], prog=PROG)
    if code != 0:
        raise RuntimeError(f"`{PROG} {' '.join(path)} --help` exited {code}")
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def render() -> str:
    """The whole of docs/cli.md."""
    parts = [HEADER]
    for path in command_paths():
        title = " ".join([PROG, *path])
        parts.append(f"## `{title}`\n\n```text\n{help_text(path)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
