"""Stage one: dataset readers, encoders and the HDF5 feature cache.

Kept import-light on purpose: importing :mod:`extract` (or :mod:`extract.cache_format`) must not pull
in transformers, so stage two can read caches quickly.
"""
