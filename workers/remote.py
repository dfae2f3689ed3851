"""The pipeline's front-end proxy: the engine interface (`streamer.interface.EngineLike`) over the
compute stage, for the server and `Generation` in the launcher's process.

`forward` sends one step (`forward`: a prompt, or one token) to compute and waits, polling every
20 ms, for its `logits`; a stage the launcher declares dead fails the step at once (`fail`), and
every later step of that sequence too. A sequence is a `RemoteSequence`, the stand-in for a KV
cache that compute keeps.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from protocol.codec import encode
from protocol.messages import Error, Forward, Limits
from protocol.sockets import Security, Sockets
from streamer.config import ModelConfig
from streamer.errors import ConfigError, StreamerError
from streamer.telemetry import Telemetry
from workers.stage import StageFailed, poll_message

log = logging.getLogger("launcher")


@dataclass
class RemoteSequence:
    """The front end's handle of one sequence in compute (its `KVCache` stand-in)."""

    request_id: str
    max_len: int
    failures: int
    step: int = 0


class RemoteEngine:
    """The engine interface the server and `Generation` use, run by the compute stage."""

    def __init__(
        self,
        cfg: ModelConfig,
        endpoints: dict[str, str],
        limits: Limits,
        mode: str,
        security: Security,
        start_timeout_s: float,
        ffn_bytes: int = 0,
    ) -> None:
        self.cfg, self.mode, self.limits = cfg, mode, limits
        self.telemetry = Telemetry(ffn_bytes)
        self.sockets = Sockets(security, max_frame_bytes=limits.max_frame_bytes)
        self.out = self.sockets.socket(zmq.PUSH, endpoints["compute"], False)
        self.inbox = self.sockets.socket(zmq.PULL, endpoints["results"], True)
        self.ready = threading.Event()
        self.failures, self.failure = 0, ""
        self.start_timeout_s = start_timeout_s

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.failures += 1

    def new_cache(self, max_len: int) -> RemoteSequence:
        if max_len > self.cfg.max_positions:
            raise ConfigError(
                f"context of {max_len} tokens exceeds the model's maximum of "
                f"{self.cfg.max_positions}"
            )
        return RemoteSequence(uuid.uuid4().hex, max_len, self.failures)

    def forward(self, tokens: torch.Tensor, seq: RemoteSequence, last_only: bool = False):
        """tokens: [T] -> logits [1, vocab] of the last position (compute returns no more)."""
        if not self.ready.wait(self.start_timeout_s):
            raise StageFailed(f"the pipeline's stages are not ready after {self.start_timeout_s} s")
        if seq.step == 0:
            seq.failures = self.failures
        if seq.failures != self.failures:
            raise StageFailed(self.failure)
        msg = Forward(
            seq.request_id,
            seq.step,
            tokens.numpy().astype(np.int64),
            reset=seq.step == 0,
            max_len=seq.max_len,
        )
        self.out.send_multipart(encode(msg), copy=False)
        while True:
            if seq.failures != self.failures:
                raise StageFailed(self.failure)
            reply = poll_message(self.inbox, self.limits, ("logits", "error"), "launcher")
            if reply is None:
                continue
            if isinstance(reply, Error) and not reply.request_id:
                log.warning("launcher: %s", reply.message)  # compute refused one
            if reply.request_id != seq.request_id:
                continue  # a reply to a sequence that already failed
            if isinstance(reply, Error):
                raise StreamerError(reply.message)
            if reply.step == seq.step:
                break
        seq.step += 1
        self.telemetry.steps.append({"step": len(self.telemetry.steps), **reply.stats})
        return torch.from_numpy(np.array(reply.logits))[None]

    def close(self) -> None:
        self.fail("the pipeline is shutting down")
        self.sockets.close()
