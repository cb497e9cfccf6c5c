"""Deprecated shim, removed after integration: use :mod:`mmcache.cache.info` (and :mod:`mmcache.tables`
for the table helpers)."""

from mmcache.cache.info import *  # noqa: F403
from mmcache.cache.info import collect, format_info, format_verify, verify  # noqa: F401
from mmcache.tables import fit_line, fit_table, terminal_width  # noqa: F401
