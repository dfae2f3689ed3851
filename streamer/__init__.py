"""Streamer: run a language model bigger than DRAM by streaming FFN neurons from flash.

The package holds the core (model code, sources, the flash layout and converter, reader, window
cache, predictors, the FFN kernel, memory planning, telemetry, generation), the single-process
runtime (`engine`), the services (`services`: the ZeroMQ server and client) and the apps (`cli`,
`apps`). The pipeline runtime is the `workers` package. README, "Layout of the repository".
"""

from streamer.errors import StreamerError

__version__ = "0.1.0"
__all__ = ["StreamerError", "__version__"]
