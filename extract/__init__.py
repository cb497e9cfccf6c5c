"""Stage one: dataset readers, encoders and the HDF5 feature cache.

Kept import-light on purpose: importing :mod:`extract` (or :mod:`mmcache.cache`) must not pull
in transformers, so stage two can read caches quickly.
"""

import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    """``mmcache.extract`` is both this package and the API call ``mmcache.extract(dataset, ...)``
    (:func:`mmcache.api.extract`): once the package is imported, the attribute is the package."""

    def __call__(self, dataset: str, **options):
        from mmcache.api import extract

        return extract(dataset, **options)


_sys.modules[__name__].__class__ = _CallablePackage
