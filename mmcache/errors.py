"""Error types shared by both stages.

The CLI maps these to exit codes: :class:`BadInputError` -> 2 (the user can fix the call),
any other :class:`PipelineError` -> 1 (something went wrong at run time). Library code raises,
never exits or prints.
"""


class PipelineError(Exception):
    """A failure the CLI reports as one clear line (exit code 1)."""


class BadInputError(PipelineError):
    """Bad user input: unknown name, wrong folder, malformed file (exit code 2)."""


class ModelLoadError(BadInputError):
    """A model id / folder that cannot be loaded (not found locally, hub unreachable)."""


class CacheError(PipelineError):
    """A cache file that is missing, unfinished, mismatched or corrupt."""


class DiskFullError(PipelineError):
    """Not enough disk space for a cache file (checked before allocating, or ENOSPC while writing)."""
