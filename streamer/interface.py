"""The one engine interface the services are written against.

Both runtimes implement `EngineLike`: the single-process `streamer.engine.Engine` and the
pipeline's front-end proxy `workers.remote.RemoteEngine` (as vLLM's `EngineCoreClient` has an
in-process and a multi-process implementation). Generation needs only `Decoder`, which the plain
`streamer.model.Transformer` also is.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from streamer.config import ModelConfig
from streamer.telemetry import Telemetry


@runtime_checkable
class Decoder(Protocol):
    cfg: ModelConfig

    def new_cache(self, max_len: int) -> Any:
        """A fresh sequence of at most `max_len` tokens (its KV cache, or a handle of one)."""

    def forward(self, tokens: torch.Tensor, cache: Any, last_only: bool = False) -> torch.Tensor:
        """Logits [T, vocab] (the last row only, with last_only) of `tokens` after `cache`."""


@runtime_checkable
class EngineLike(Decoder, Protocol):
    mode: str  # what `summary.mode` reports: dense, all, ..., pipeline, pipeline-serial
    telemetry: Telemetry

    def close(self) -> None:
        """Release files, sockets and threads; the engine is not used again."""
