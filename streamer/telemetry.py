"""Telemetry per step (one forward: the prompt, or one decoded token) and per layer.

The paper's Table 3 columns (time as I/O, memory management and compute) and the counters behind
them: bytes and reads from flash, neurons predicted, window hits, newly loaded, evicted. The key
lists here are the only ones: the engines, the pipeline's stages, the command line's tables and
the bench all read them from this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from streamer.flash import ReadStats

# Counters of a step, summed over its layers.
COUNTERS = ("bytes_read", "reads", "predicted", "hits", "loaded", "evicted", "overflow")
TIMES = ("io_ms", "mem_ms", "compute_ms", "total_ms")
# What a summary totals, and averages per decoded token.
SUMMARY_KEYS = (*COUNTERS[:2], *TIMES, *COUNTERS[2:])
# The pipeline's steps say too how long compute waited for rows, the predictor's and prefetch's
# busy time, how long prefetch waited for look-ahead reads, and how many rows it copied.
PIPELINE_KEYS = ("wait_ms", "predict_ms", "prefetch_ms", "lookahead_wait_ms", "copied")
# What the predictor and prefetch report with a layer's rows (`rows_ready.stats`).
PASSED_ON = (*PIPELINE_KEYS[1:], "mem_ms", *COUNTERS[2:])
# A pipeline step's counters at compute: its own, then what the other stages passed on.
PIPELINE_STEP_KEYS = ("bytes_read", "reads", "io_ms", "wait_ms", "cached", *PASSED_ON)
# The per-layer columns of `generate --stats`.
LAYER_COLUMNS = ("bytes_read", "reads", *COUNTERS[2:5], "cached", "io_ms", "mem_ms")


@dataclass
class LayerStats:
    layer: int
    bytes_read: int = 0
    reads: int = 0
    predicted: int = 0
    hits: int = 0
    loaded: int = 0
    evicted: int = 0
    overflow: int = 0
    cached: int = 0
    io_ms: float = 0.0
    mem_ms: float = 0.0
    # the bundles' checksums: part of mem_ms, or (checked by the reader threads as they landed)
    # their time added up over the threads, inside io_ms
    check_ms: float = 0.0


class Telemetry:
    """Per step and per layer; `summary` totals a run and averages its decode steps."""

    def __init__(self, ffn_bytes: int = 0) -> None:
        self.ffn_bytes = ffn_bytes  # the FFN's size on flash (0: the model has none there)
        self.steps: list[dict[str, Any]] = []
        self.layers: list[LayerStats] = []
        self.extra = ReadStats()  # reads outside the FFN (naive mode's resident part)
        self._t0 = 0.0

    def reset(self) -> None:
        """Forget the steps recorded so far (a server's next request)."""
        self.steps = []

    def begin(self) -> None:
        self.layers = []
        self.extra = ReadStats()
        self._t0 = time.perf_counter()

    def end(self, tokens: int) -> dict[str, Any]:
        total_ms = (time.perf_counter() - self._t0) * 1e3
        io_ms = sum(s.io_ms for s in self.layers) + self.extra.seconds * 1e3
        mem_ms = sum(s.mem_ms for s in self.layers)
        step = {
            "step": len(self.steps),
            "tokens": tokens,
            "bytes_read": sum(s.bytes_read for s in self.layers) + self.extra.bytes,
            "reads": sum(s.reads for s in self.layers) + self.extra.reads,
            **{k: sum(getattr(s, k) for s in self.layers) for k in (*COUNTERS[2:], "cached")},
            "io_ms": round(io_ms, 3),
            "mem_ms": round(mem_ms, 3),
            "check_ms": round(sum(s.check_ms for s in self.layers), 3),
            "compute_ms": round(total_ms - io_ms - mem_ms, 3),
            "total_ms": round(total_ms, 3),
            "layers": [_rounded(vars(s)) for s in self.layers],
        }
        self.steps.append(step)
        return step

    def summary(self) -> dict[str, Any]:
        """Totals of the run, the prompt's step on its own (prefill streams whole layers), and
        per-token means over the decode steps (one token each)."""
        keys = SUMMARY_KEYS + tuple(
            k
            for k in (*PIPELINE_KEYS, "check_ms")
            if self.steps and all(k in s for s in self.steps)
        )
        out: dict[str, Any] = {k: round(sum(s[k] for s in self.steps), 3) for k in keys}
        out["ffn_bytes"] = self.ffn_bytes  # bytes_read per token as a fraction of the FFN
        if self.steps:
            out["prefill"] = {k: self.steps[0][k] for k in keys}
        decode = [s for s in self.steps if s["tokens"] == 1]
        if decode:
            out["per_token"] = {k: round(sum(s[k] for s in decode) / len(decode), 3) for k in keys}
        return out


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
