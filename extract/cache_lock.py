"""Deprecated shim, removed after integration: use :mod:`mmcache.cache.lock`."""

from mmcache.cache.lock import *  # noqa: F403
from mmcache.cache.lock import LOCK_NAME, CacheBusyError, folder_lock, writer_of  # noqa: F401
