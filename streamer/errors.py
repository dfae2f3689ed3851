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
    """A setting or argument is out of its allowed range."""
