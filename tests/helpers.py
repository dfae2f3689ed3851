"""Helpers the test modules share (none imports another test module)."""

from __future__ import annotations

import torch

from protocol.messages import Done, Token

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
