"""`make bench`: both stages measured against their limits, side by side in one run.

Outputs (git-ignored) land in this folder: ``results.json`` and ``results.md``.
"""
