"""Running a model over text one layer at a time, for calibration and for the converter's GPTQ:
every sequence through layer i before any goes through layer i + 1, so that one layer's weights
are in DRAM at a time (a 7B model calibrates in a few GB), with the FFN behind a hook that can
record or mask its activations; and the texts shipped for it."""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib import resources

import torch

from streamer.model import DenseFFN, KVCache, Transformer, ffn_forward


def shipped_text(name: str) -> str:
    return resources.files("streamer").joinpath("data", name).read_text()


class MaskedFFN:
    """The dense FFN with a hook on its activations: record them, or zero the inactive ones."""

    def __init__(
        self,
        dense: DenseFFN,
        mask: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        record: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        self.dense, self.mask, self.record = dense, mask, record

    def __call__(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        def hook(h: torch.Tensor) -> torch.Tensor:
            if self.record is not None:
                self.record(layer, x, h)
            return h if self.mask is None else h * self.mask(layer, x, h)

        return ffn_forward(x, self.dense.layers[layer], self.dense.act, hook)


class LayerRun:
    """Sequences taken through the model one layer at a time, all of them per layer, so that
    one layer's weights are in DRAM at a time (a 7B model calibrates in a few GB)."""

    def __init__(self, model: Transformer, seqs: list[list[int]]) -> None:
        self.model, self.seqs = model, seqs
        cfg = model.cfg
        self.caches = [KVCache.one_layer(cfg, len(s), model.dtype) for s in seqs]
        self.pos = [torch.arange(len(s)) for s in seqs]
        with torch.no_grad():
            self.x = [model.embed(torch.tensor(s), p) for s, p in zip(seqs, self.pos, strict=True)]

    @torch.no_grad()
    def layer(self, i: int, ffn: MaskedFFN) -> None:
        self.model.ffn = ffn
        for j, (cache, pos) in enumerate(zip(self.caches, self.pos, strict=True)):
            self.x[j] = self.model.block(self.x[j], i, cache, pos)

    @torch.no_grad()
    def perplexity(self) -> tuple[float, int]:
        """exp(mean negative log-likelihood) of each token given the ones before it."""
        total, count = 0.0, 0
        for x, seq in zip(self.x, self.seqs, strict=True):
            total += nll(self.model.head(x), seq)
            count += len(seq) - 1
        return perplexity_of(total, count), count


def token_nlls(logits: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """Each of seq[1:]'s negative log-likelihoods [T - 1] (float32) under logits [T, vocab]."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]


def nll(logits: torch.Tensor, seq: list[int]) -> float:
    """The negative log-likelihood of seq[1:] under logits [T, vocab] of seq."""
    return token_nlls(logits, seq).sum().item()


def perplexity_of(total: float, count: int) -> float:
    """exp of the mean of `count` tokens' negative log-likelihoods summing to `total`."""
    mean = total / count
    # A random model (the benchmark's synthetic ones) can be sure and wrong: exp overflows.
    return math.exp(mean) if mean < 700 else math.inf
