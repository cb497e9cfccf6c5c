"""mmcache: extract multimodal features once into an HDF5 cache, train fusion heads on it in seconds.

Installed, this is the only top-level name: stage one is :mod:`mmcache.extract`, stage two
:mod:`mmcache.fuse`, the benchmark :mod:`mmcache.bench`, the command line :mod:`mmcache.cli`.
"""

from pathlib import Path as _Path

# In a source checkout the stage packages sit beside this folder (the repository layout keeps
# `extract/` and `fuse/` at the top); pyproject maps them under `mmcache.` when installed.
_here = _Path(__file__).resolve().parent
if not (_here / "extract").is_dir() and (_here.parent / "extract" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)

__version__ = "0.1.0"
