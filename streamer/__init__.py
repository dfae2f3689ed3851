"""Streamer: run a language model bigger than DRAM by streaming FFN neurons from flash.

The package holds the engine core: model code for the supported families (`model`), the sources a
model is read from (`sources`), the on-flash layout and its converter (`layout`, `convert`), the
tokenizer (`tokenizer`), token generation (`generate`) and the command line (`cli`).
"""

from streamer.errors import StreamerError

__version__ = "0.1.0"
__all__ = ["StreamerError", "__version__"]
