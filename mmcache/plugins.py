"""Plugins: third-party heads, dataset readers and encoder families, found through entry points.

A plugin is an installed distribution whose ``entry_points.txt`` names modules in one of the groups::

    [mmcache.heads]
    my_head = my_package.heads          # imports it: its @register_head classes register themselves
    [mmcache.datasets]
    my_reader = my_package.reader       # calls register_dataset(DatasetSpec(...)) at import
    [mmcache.encoders]
    my_family = my_package.adapter      # a @register_encoder class

Each registry calls :func:`load_plugins` with its group on first use (listing, lookup), so loading
happens once per process and only when that registry is needed. Loading an entry point just imports
what it names: the registration is the import's side effect, as for the built-in modules.

A plugin that fails to load (import error, bad registration, a name already taken) is logged as a
warning naming the entry point and its distribution, and skipped: a broken third-party package must
never take the command line down with it.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

log = logging.getLogger(__name__)

__all__ = ["GROUPS", "load_plugins", "loaded_plugins"]

GROUPS = ("mmcache.heads", "mmcache.datasets", "mmcache.encoders")

_DONE: set[str] = set()
_LOADED: dict[str, list[str]] = {}  # group -> entry point names that loaded


def load_plugins(group: str) -> list[str]:
    """Import every entry point of ``group`` once per process; names of those that loaded."""
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; known: {', '.join(GROUPS)}")
    if group in _DONE:
        return list(_LOADED.get(group, []))
    # Marked before loading: a plugin module that registers through the same registry (which calls
    # back into load_plugins) must not start a second, recursive round of loading.
    _DONE.add(group)
    loaded = _LOADED.setdefault(group, [])
    for ep in entry_points(group=group):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 -- any failure of foreign code: warn and go on (module docstring)
            log.warning("skipped plugin %r (%s = %s, from %s): %s: %s", ep.name, group, ep.value, dist,
                        type(e).__name__, " ".join(str(e).split())[:200])
            continue
        log.debug("loaded plugin %r (%s) from %s", ep.name, group, dist)
        loaded.append(ep.name)
    return list(loaded)


def loaded_plugins() -> dict[str, list[str]]:
    """Entry point names loaded so far, per group (for provenance and ``--version``-style reports)."""
    return {g: list(names) for g, names in _LOADED.items()}
