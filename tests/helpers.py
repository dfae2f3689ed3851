"""Helpers the test modules share (none imports another test module)."""

from __future__ import annotations

import numpy as np
import torch

from protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Dead,
    Done,
    Error,
    Fetch,
    FFNInput,
    Fill,
    Forward,
    Generate,
    Heartbeat,
    Hello,
    LayerReady,
    Limits,
    LoadLayer,
    Logits,
    Ready,
    Reset,
    RowsReady,
    Token,
    Welcome,
)
from workers.config import PipelineConfig

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


def greedy_with_logits(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Prefill, then decode n tokens one by one; the logits of every position, [T, vocab]."""
    cache = model.new_cache(len(prompt) + n)
    rows = [model.forward(torch.tensor(prompt), cache)]
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(rows[-1][-1].argmax()))
        rows.append(model.forward(torch.tensor(tokens[-1:]), cache))
    return tokens, torch.cat(rows)


async def collect(client, **kw) -> Done:
    """A request's events: the tokens, then the `done` that repeats them."""
    tokens, done = [], None
    async for event in client.generate(**kw):
        if isinstance(event, Token):
            tokens.append(event.token_id)
        else:
            done = event
    assert isinstance(done, Done) and done.token_ids == tokens
    return done


# One valid message of every kind (and a few variants): the protocol tests' and fuzzers' seeds.
LIMITS = Limits(vocab_size=49152, n_layers=30, d_model=576, n_neurons=1536, row_bytes=4096)
ids = np.array([3, 4, 5, 900], dtype=np.int64)
FETCH_TAKE = Fetch(
    "r1",
    3,
    13,
    ids,
    np.arange(4),
    cached=6,
    take=np.array([0, 2, 5], dtype=np.int64),
    extra=np.array([4], dtype=np.int64),  # a read gap: neuron 4 lies between 3 and 5
)
EXAMPLES = [
    Hello(PROTOCOL_VERSION, "client", "test"),
    Welcome(PROTOCOL_VERSION, "SmolLM2-135M-Instruct", 49152, 30, 8192),
    Heartbeat("prefetch", 7, 1234.5),
    Dead("compute", "out of memory"),
    Generate("r1", prompt="hello", max_tokens=16, temperature=0.0),
    Generate("r2", prompt_ids=[1, 2, 3], chat=False, seed=9),
    Cancel("r1"),
    Token("r1", 0, 42, " Paris"),
    Done("r1", [42, 2], " Paris", {"ms_per_token": 37.5, "stop_reason": "eos"}),
    Error("", "bad_request", "unknown message kind 'x'"),
    FFNInput("r1", 3, 12, np.linspace(-1, 1, 2 * 576, dtype=np.float16).reshape(2, 576)),
    Fetch("r1", 3, 13, ids, np.arange(4, dtype=np.int32), lookahead=True),
    RowsReady("r1", 3, 13, ids, np.arange(4, dtype=np.int32), 16384, 2, 0.4),
    # stages without shared memory: the window's row moves, and the rows as a frame
    RowsReady(
        "r1",
        3,
        13,
        ids,
        np.arange(4, dtype=np.int32),
        moves=np.array([[0, 7], [2, 9]], dtype=np.int64),
        data=np.arange(4 * 4096, dtype=np.uint8).reshape(4, 4096),
    ),
    Ready("predictor", 4242, 1),
    Forward("s1", 0, np.array([1, 2, 3], dtype=np.int64), reset=True, max_len=64),
    Logits("s1", 0, np.linspace(0, 1, 49152, dtype=np.float32), {"wait_ms": 1.5}),
    Reset("s1"),
    Fill("s1", 2, ids, np.array([1, 3], dtype=np.int64)),
    LoadLayer("s1", 5, 1),
    LayerReady("s1", 5, 1, 1 << 20, 4, 2.5),
    LayerReady("s1", 5, 1, data=np.ones((1536, 4096), dtype=np.uint8)),
    # the window rows of a token's neurons, for compute to gather
    FETCH_TAKE,
    Generate(
        "r3",
        messages=[{"role": "system", "content": "é"}, {"role": "user", "content": "hi"}],
        stop=["\n\n", "User:"],
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
    ),
]


def pipeline_config(tmp_path, model, **kw) -> PipelineConfig:
    """A pipeline of `model` whose sockets, run directory and shared rows live under tmp_path
    (not a tmpfs, but a test can see what is left behind); `kw` overrides."""
    run = tmp_path / "run"
    settings = {
        "model": str(model),
        "endpoint": f"ipc://{run}/front.sock",
        "run_dir": str(run),
        "shm_dir": str(tmp_path),
    }
    return PipelineConfig(**{**settings, **kw})
