"""docs/cli.md is the --help of every command, regenerated (`make docs`) whenever the CLI changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _generate(**env: str) -> str:
    # A fresh process: heads that other tests register in this one must not reach the docs.
    proc = subprocess.run([sys.executable, "-m", "mmcache.cli.docs"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_committed_cli_docs_are_current():
    committed = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == _generate(), "docs/cli.md is out of date: run `make docs` (python -m mmcache.cli.docs > docs/cli.md)"


def test_cli_docs_do_not_depend_on_the_terminal():
    narrow = _generate(COLUMNS="40", TERMINAL_WIDTH="45", FORCE_COLOR="1")
    assert narrow == (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert "\x1b[" not in narrow  # no colour codes


def test_cli_docs_cover_every_command():
    from mmcache.cli.docs import command_paths, render

    text = render()
    for path in command_paths():
        assert f"## `{' '.join(['mmcache', *path])}`" in text
    assert "--attention-heads" in text and "[cls|mean|tokens|proj]" in text
    assert all(line == line.rstrip() for line in text.splitlines())
