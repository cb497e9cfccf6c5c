"""Deprecated shim, removed after integration: use :mod:`mmcache.cache.integrity`."""

from mmcache.cache.integrity import *  # noqa: F403
from mmcache.cache.integrity import CHECKSUM, CHECKSUM_FIELDS, Damage, row_crc32, scan_file  # noqa: F401
