"""Deprecated shim, removed after integration: the cache contract is now the package :mod:`mmcache.cache`
(``from mmcache import cache as cf``). Re-exports its public API for modules not yet switched."""

from mmcache.cache import *  # noqa: F403
from mmcache.cache import __all__  # noqa: F401
