"""The HDF5 cache contract: what stage one writes and stage two reads (h5py + numpy; never torch).

``from mmcache import cache as cf`` gives the whole contract: names and paths (:mod:`.names`),
identity and fingerprints (:mod:`.identity`), the encoder record (:mod:`.encoder`), the sample index
(:mod:`.index`), feature files (:mod:`.writer`, :mod:`.reader`), integrity (:mod:`.integrity`), shard merging (:mod:`.merge`), the
folder's write lock (:mod:`.lock`), what ``cache info`` / ``cache verify`` show (:mod:`.info`) and
features out of and into the cache as numpy / parquet / Hugging Face datasets (:mod:`.export`).
"""

from mmcache.cache.encoder import EncoderSpec
from mmcache.cache.export import (
    EXPORT_FORMATS,
    IMPORTED_FAMILY,
    ExportResult,
    ImportResult,
    export_features,
    import_features,
    imported_encoder_error,
)
from mmcache.cache.identity import (
    CONFIG_DEFAULTS,
    SPLIT_NAMES,
    STORAGE_KEYS,
    UNRECORDED_SPLIT,
    CacheMismatchError,
    encoder_difference,
    fingerprint,
    index_fingerprint,
    split_counts,
    split_fingerprint,
    split_spec_text,
)
from mmcache.cache.index import SampleIndex, read_index, write_index
from mmcache.cache.info import collect, format_info, format_verify, verify
from mmcache.cache.integrity import (
    CHECKSUM,
    CHECKSUM_FIELDS,
    Damage,
    check_free_space,
    disk_full_error,
    is_disk_full,
    planned_bytes,
    row_crc32,
    scan_file,
)
from mmcache.cache.lock import LOCK_NAME, CacheBusyError, describe_holder, folder_lock, read_holder, writer_of
from mmcache.cache.merge import MergeResult, expected_shards, merge_paths, merge_shards, shard_groups
from mmcache.cache.names import (
    DTYPES,
    FAILURES_NAME,
    FEATURE_FIELDS,
    FORMAT_VERSION,
    INDEX_NAME,
    MODALITIES,
    OPTIONAL_FIELDS,
    REASON,
    REASON_BYTES,
    STR,
    feature_path,
    list_feature_files,
    list_shard_files,
    model_slug,
    name_slug,
    parse_shard_name,
    shard_path,
)
from mmcache.cache.reader import FeatureFile, describe, repair_command, write_failures_csv
from mmcache.cache.writer import FeatureWriter
from mmcache.errors import BadInputError, CacheError

__all__ = [
    "BadInputError", "CHECKSUM", "CHECKSUM_FIELDS", "CONFIG_DEFAULTS", "CacheBusyError", "CacheError",
    "CacheMismatchError", "DTYPES", "Damage", "EXPORT_FORMATS", "EncoderSpec", "ExportResult", "IMPORTED_FAMILY",
    "ImportResult", "export_features", "import_features", "imported_encoder_error", "FAILURES_NAME", "FEATURE_FIELDS", "FORMAT_VERSION",
    "FeatureFile", "FeatureWriter", "INDEX_NAME", "LOCK_NAME", "MODALITIES", "MergeResult", "OPTIONAL_FIELDS",
    "REASON", "REASON_BYTES", "SPLIT_NAMES", "STORAGE_KEYS", "STR", "SampleIndex", "UNRECORDED_SPLIT",
    "check_free_space", "collect", "describe", "describe_holder", "disk_full_error", "encoder_difference",
    "expected_shards", "feature_path", "fingerprint", "folder_lock", "format_info", "format_verify",
    "index_fingerprint", "is_disk_full", "list_feature_files", "list_shard_files", "merge_paths",
    "merge_shards", "model_slug", "name_slug", "parse_shard_name", "planned_bytes", "read_holder",
    "read_index", "repair_command", "row_crc32", "scan_file", "shard_groups", "shard_path", "split_counts",
    "split_fingerprint", "split_spec_text", "verify", "write_failures_csv", "write_index", "writer_of",
]
