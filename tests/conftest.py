"""Helpers shared by the test modules (one copy instead of one per module).

``run_cli(capsys, *argv)`` runs the command line in this process as a user would (``cli.main`` returns
the exit code instead of exiting) and returns ``(code, stdout, stderr)``; ``one_error_line(err)`` asserts
the house rule for a refused call (exactly one ``error:`` line, never a traceback) and returns it.
Test modules import them: ``from conftest import run_cli``.
"""

from __future__ import annotations

from mmcache import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``cli.main(argv)`` with captured output: (exit code, stdout, stderr); arguments may be Paths."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The one ``error:`` line of a refused call's stderr (transformers' own load bars aside)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
