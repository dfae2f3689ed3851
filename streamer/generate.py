"""Token generation: prefill the prompt, then decode one token at a time until EOS or the limit.

Greedy at temperature 0; otherwise temperature, top-k, top-p (nucleus) and min-p sampling from a
seeded generator, so a run is reproducible; a repetition penalty applies to both. `Generation` is
an iterator of token ids that keeps the run's timings in `summary` once it is exhausted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from streamer.errors import ConfigError
from streamer.interface import Decoder


@dataclass(frozen=True)
class SamplingParams:
    """Sampling as transformers' logits processors do it, in their order: repetition penalty
    (on every token of the prompt and the reply so far), temperature, top-k, top-p, min-p.
    0 (top_k), 1.0 (top_p, repetition_penalty) and 0.0 (min_p) turn a filter off."""

    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}", "top_k")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}", "min_p")
        if not 0 < self.repetition_penalty <= 100:
            raise ConfigError(
                f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}",
                "repetition_penalty",
            )


def penalize(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """The repetition penalty (CTRL's, as transformers applies it): each seen token's logit is
    divided by `penalty` where positive, multiplied where negative."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)))
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [vocab] (penalized) -> the distribution a token is drawn from (float64)."""
    # Shifted so that the best logit is 0: a tiny temperature then sends the others to -inf
    # (probability 0) instead of every logit to +-inf (NaN), and sampling becomes greedy.
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if 0 < params.top_k < probs.numel():
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        mass = sorted_p.sum()
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < params.top_p * mass
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    if params.min_p > 0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def log_probabilities(
    logits: torch.Tensor, token: int, n: int
) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token`, and the n likeliest tokens' (id, log-prob)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    top = torch.topk(logp, n) if n else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(logp[token]), pairs


def sample(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, seen: list[int] = ()
) -> int:
    """logits: [vocab] -> one token id; `seen`: the tokens the repetition penalty applies to."""
    logits = penalize(logits, list(seen), params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, params), 1, generator=gen))


@dataclass
class Generation:
    """Iterate to get generated token ids; `summary` holds counts and timings afterwards."""

    model: Decoder
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    stop_reason: str | None = None
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    # n >= 0: each token's log-probability under the model (before any sampling filter) and
    # the n likeliest tokens', in `logprobs`
    top_logprobs: int = -1
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ConfigError("the prompt is empty: give at least one token")
        limit = self.model.cfg.max_positions
        if len(self.prompt_ids) + self.params.max_tokens > limit:
            raise ConfigError(
                f"prompt ({len(self.prompt_ids)} tokens) + max_tokens "
                f"({self.params.max_tokens}) exceeds the model's context of {limit}"
            )

    def __iter__(self) -> Iterator[int]:
        model, p = self.model, self.params
        gen = torch.Generator().manual_seed(p.seed)
        cache = model.new_cache(len(self.prompt_ids) + p.max_tokens)
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor(self.prompt_ids), cache, last_only=True)[-1]
        self.prefill_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        while True:
            token = sample(logits, p, gen, self.prompt_ids + self.token_ids)
            if self.top_logprobs >= 0:
                self.logprobs.append(log_probabilities(logits, token, self.top_logprobs))
            self.token_ids.append(token)
            # up to date at each token, for a caller that stops early (a stop string, a cancel)
            self.decode_ms = (time.perf_counter() - t0) * 1e3
            yield token
            if token in p.stop_ids:
                self.stop_reason = "eos"
                break
            if len(self.token_ids) >= p.max_tokens:
                self.stop_reason = "length"
                break
            logits = model.forward(torch.tensor([token]), cache)[-1]
        self.decode_ms = (time.perf_counter() - t0) * 1e3

    def run(self) -> list[int]:
        for _ in self:
            pass
        return self.token_ids

    @property
    def summary(self) -> dict[str, Any]:
        n = len(self.token_ids)
        # The first token comes from the prefill's logits; each later one costs a decode step.
        steps = max(n - 1, 1)
        return {
            "prompt_tokens": len(self.prompt_ids),
            "generated_tokens": n,
            "stop_reason": self.stop_reason,
            "prefill_ms": round(self.prefill_ms, 3),
            "decode_ms": round(self.decode_ms, 3),
            "ms_per_token": round(self.decode_ms / steps, 3),
            "tokens_per_s": round(steps / (self.decode_ms / 1e3), 3) if self.decode_ms else None,
        }
