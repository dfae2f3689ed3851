"""The project's own exceptions.

Foreign exceptions (safetensors, gguf, json, OS errors) are converted into these at the boundary
where a file or a value from outside is read, so that the CLI can print one clear line instead of a
traceback, and embedders can catch one type.
"""


class StreamerError(Exception):
    """Base of every error the engine raises on purpose."""


class ModelFormatError(StreamerError):
    """A model file or directory is missing, truncated, corrupt, or of a kind we do not support."""


class ConfigError(StreamerError):
    """A setting or argument is out of its allowed range.

    `setting` names the library's setting (`dram_budget`, `window`, ...) when one is to blame,
    and the message names it the same way; the command line shows its own flag instead."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


def first_error(group: BaseExceptionGroup) -> BaseException:
    """One clear error for the caller instead of a task group's tree: the first of ours or of
    the protocol package's (a `ValueError`: an endpoint refused by the socket factory), else
    the group itself."""
    errors = group.subgroup((StreamerError, ValueError))
    if errors is None:
        return group
    first: BaseException = errors
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
