"""Streamer: run a language model bigger than DRAM by streaming FFN neurons from flash.

The package holds the core (model code, sources, the flash layout and converter, reader, window
cache, predictors, the FFN kernel, memory planning, telemetry, generation), the single-process
runtime (`engine`), the services (`services`: the ZeroMQ server and client, the HTTP API, the
in-process API `streamer.load`) and the apps (`cli`, `apps`). The pipeline runtime is the
`workers` package. README, "Layout of the repository".
"""

from streamer.errors import StreamerError

__version__ = "0.1.0"
__all__ = ["LLM", "StreamerError", "__version__", "load"]


def __getattr__(name: str):
    """`streamer.load` and `streamer.LLM` (`streamer.services.api`), imported when first used:
    importing `streamer` stays light for the core's users."""
    if name in ("load", "LLM"):
        from streamer.services import api

        return getattr(api, name)
    raise AttributeError(f"module 'streamer' has no attribute {name!r}")
