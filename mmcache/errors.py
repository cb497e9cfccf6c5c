"""Error types shared by both stages.

The CLI maps these to exit codes: :class:`BadInputError` -> 2 (the user can fix the call),
any other :class:`PipelineError` -> 1 (something went wrong at run time). Library code raises,
never exits or prints.
"""


class PipelineError(Exception):
    """A failure the CLI reports as one clear line (exit code 1)."""


class ResumableError(PipelineError):
    """A run-time failure after which the finished work is kept and the same command finishes the rest.
    ``str(e)`` is ``message`` plus "; rerun the same command to resume"; the CLI names that command
    instead (:meth:`with_command`)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.with_command(None)

    def with_command(self, command: str | None) -> str:
        return f"{self.message}; rerun {'the same command' if command is None else f'`{command}`'} to resume"


class BadInputError(PipelineError):
    """Bad user input: unknown name, wrong folder, malformed file (exit code 2)."""


class ModelLoadError(BadInputError):
    """A model id / folder that cannot be loaded (not found locally, hub unreachable)."""


class CacheError(PipelineError):
    """A cache file that is missing, unfinished, mismatched or corrupt."""


class DiskFullError(ResumableError):
    """Not enough disk space: for a cache file (checked before allocating), or ENOSPC while writing any
    file (:func:`mmcache.common.atomic_write`: a run's files, an ablation's tables, an analysis). The
    message names the bytes needed and available; what finished is kept, the same command resumes."""


class MissingCacheError(CacheError, BadInputError):
    """The dataset or modality the call names has no cache (yet): the user must extract it first
    (exit code 2, like any other unknown name)."""


class Interrupted(KeyboardInterrupt):  # noqa: N818 -- reads as what happened, like KeyboardInterrupt
    """Ctrl-C, re-raised by the library with one line saying what was kept (``str(e)``).

    A KeyboardInterrupt on purpose: ``except Exception`` (an ablation recording a failed run) must
    never swallow it. The CLI adds the command that resumes and exits 130."""
