"""`streamer calibrate`: record which FFN neurons fire, train the predictors, report quality.

Runs the dense model over calibration text, records each layer's FFN input and activations,
defines "active" (ReLU: output > 0; SwiGLU: |silu(gate·x)·(up·x)| above a per-layer threshold set
for the target sparsity, magnitude thresholding as in CATS/TEAL), trains a low-rank predictor
and a look-ahead predictor per layer, picks each threshold on a validation split for a target
recall, and reports recall, precision and perplexity (dense, sparse with the true active set,
sparse with the predictor) on held-out text. Everything is saved beside the converted model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from streamer.errors import ConfigError, ModelFormatError
from streamer.layout import ConvertedModel, parse_dtype
from streamer.model import DenseFFN, Transformer, ffn_forward
from streamer.predictor import (
    Predictors,
    parse_ranks,
    pick_threshold,
    recall_precision,
    train_predictor,
)
from streamer.sources import load_dense


def shipped_text(name: str) -> str:
    return resources.files("streamer").joinpath("data", name).read_text()


@dataclass
class CalibrationSettings:
    texts: list[Path] = field(default_factory=list)  # empty: the text shipped with streamer
    heldout: Path | None = None  # None: the held-out text shipped with streamer
    ranks: str = "128"
    sparsity: float = 0.5  # SwiGLU only: fraction of (token, neuron) pairs counted inactive
    target_recall: float = 0.99  # of the active neurons' activation mass
    epochs: int = 30
    max_tokens: int = 8192
    chunk: int = 256  # tokens per sequence while recording
    seed: int = 0
    dtype: str = "float32"  # the dense model's while recording (predictors train in float32)

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"--recall must be in (0, 1], got {self.target_recall}")
        if self.epochs < 1 or self.max_tokens < 16 or self.chunk < 2:
            raise ConfigError("--epochs must be >= 1 and --max-tokens >= 16")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype}")


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


def run_tokens(
    model: Transformer,
    tokens: list[int],
    chunk: int,
    on_logits: Callable[[torch.Tensor, list[int]], None] | None = None,
    step: int = 128,
) -> None:
    """Run the model over `tokens` in sequences of `chunk` (a fresh KV cache each)."""
    chunk = min(chunk, model.cfg.max_positions)
    for i in range(0, len(tokens) - 1, chunk):
        seq = tokens[i : i + chunk]
        if len(seq) < 2:
            break
        cache = model.new_cache(len(seq))
        rows = [
            model.forward(torch.tensor(seq[j : j + step]), cache) for j in range(0, len(seq), step)
        ]
        if on_logits is not None:
            on_logits(torch.cat(rows), seq)


def perplexity(model: Transformer, tokens: list[int], chunk: int = 512) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of each token given the ones before it in its chunk."""
    total = [0.0, 0]

    def score(logits: torch.Tensor, seq: list[int]) -> None:
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        total[0] -= logp.gather(1, torch.tensor(seq[1:])[:, None]).sum().item()
        total[1] += len(seq) - 1

    run_tokens(model, tokens, chunk, score)
    if total[1] == 0:
        raise ConfigError("the text is too short: it needs at least 2 tokens")
    mean = total[0] / total[1]
    # A random model (the benchmark's synthetic ones) can be sure and wrong: exp overflows.
    return (math.exp(mean) if mean < 700 else math.inf), total[1]


def _tokens(source: ConvertedModel, texts: list[str], limit: int) -> list[int]:
    spec = source.tokenizer()
    if spec is None:
        raise ModelFormatError(f"{source.directory} has no tokenizer to read calibration text")
    tok = spec.build()
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text)
    return ids[:limit]


def _record(model: Transformer, dense: DenseFFN, tokens: list[int], chunk: int):
    """Each layer's FFN inputs [N, d] and activation magnitudes [N, n] over `tokens`."""
    xs: list[list[torch.Tensor]] = [[] for _ in range(model.cfg.n_layers)]
    hs: list[list[torch.Tensor]] = [[] for _ in range(model.cfg.n_layers)]

    def record(layer: int, x: torch.Tensor, h: torch.Tensor) -> None:
        xs[layer].append(x.float().clone())
        hs[layer].append(h.abs().to(torch.float16))

    model.ffn = MaskedFFN(dense, record=record)
    run_tokens(model, tokens, chunk)
    model.ffn = dense
    return [torch.cat(x) for x in xs], [torch.cat(h) for h in hs]


def calibrate(
    directory: Path, settings: CalibrationSettings, progress: bool = True
) -> dict[str, Any]:
    t_start = time.perf_counter()
    source = ConvertedModel(directory)
    cfg = source.config
    ranks = parse_ranks(settings.ranks, cfg.n_layers)
    texts = [p.read_text() for p in settings.texts] or [shipped_text("calibration.txt")]
    heldout = settings.heldout.read_text() if settings.heldout else shipped_text("heldout.txt")
    train_tokens = _tokens(source, texts, settings.max_tokens)
    held_tokens = _tokens(source, [heldout], settings.max_tokens)
    if len(train_tokens) < 64 or len(held_tokens) < 16:
        raise ConfigError(
            f"calibration text too short ({len(train_tokens)} tokens; held-out "
            f"{len(held_tokens)}): give at least 64 and 16"
        )
    model = load_dense(source, parse_dtype(settings.dtype))
    dense = model.ffn
    assert isinstance(dense, DenseFFN)
    # ReLU (plain or gated) zeroes neurons exactly: "active" is output != 0, nothing to choose.
    relu = cfg.activation == "relu"

    xs, hs = _record(model, dense, train_tokens, settings.chunk)
    if relu:
        activity = [0.0] * cfg.n_layers  # a ReLU neuron is active when its output is > 0
    else:
        activity = [float(np.quantile(h.float().numpy(), settings.sparsity)) for h in hs]
    ys = [h.float() > a for h, a in zip(hs, activity, strict=True)]
    n_val = max(len(train_tokens) // 10, 8)
    layers, thresholds, look, look_thr = [], [], [], []
    bar = tqdm(total=2 * cfg.n_layers - 1, desc="calibrate", unit="predictor", disable=not progress)
    for i in range(cfg.n_layers):
        for target, out, thr in ((i, layers, thresholds), (i + 1, look, look_thr)):
            if target == cfg.n_layers:
                out.append(None)
                thr.append(0.5)
                continue
            x, y = xs[i], ys[target]
            p = train_predictor(
                x[:-n_val], y[:-n_val], ranks[i], settings.epochs, seed=settings.seed + i
            )
            with torch.no_grad():
                probs = torch.sigmoid(p(x[-n_val:]))
            out.append(p)
            thr.append(
                pick_threshold(probs, y[-n_val:], settings.target_recall, mass=hs[target][-n_val:])
            )
            bar.update(1)
    bar.close()
    preds = Predictors(layers, thresholds, activity, look, look_thr)
    del xs, ys, hs

    # Held-out quality: recall and precision per layer, and perplexity three ways.
    hx, hh = _record(model, dense, held_tokens, settings.chunk)
    per_layer = []
    for i in range(cfg.n_layers):
        y = hh[i].float() > activity[i]
        with torch.no_grad():
            pred = torch.sigmoid(layers[i](hx[i])) > thresholds[i]
        r, p, m = recall_precision(pred, y, hh[i])
        row = {
            "layer": i,
            "rank": ranks[i],
            "active": round(y.float().mean().item(), 4),
            "predicted": round(pred.float().mean().item(), 4),
            "recall": round(r, 4),
            "precision": round(p, 4),
            "mass_recall": round(m, 4),
        }
        if i + 1 < cfg.n_layers:
            y_next = hh[i + 1].float() > activity[i + 1]
            with torch.no_grad():
                la = torch.sigmoid(look[i](hx[i])) > look_thr[i]
            r, p, m = recall_precision(la, y_next, hh[i + 1])
            row["lookahead_recall"], row["lookahead_precision"] = round(r, 4), round(p, 4)
            row["lookahead_mass_recall"] = round(m, 4)
        per_layer.append(row)
    del hx, hh

    def oracle(layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return (h.abs() > activity[layer]).to(h.dtype)

    def predicted(layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (torch.sigmoid(layers[layer](x.float())) > thresholds[layer]).to(h.dtype)

    ppl = {}
    for name, mask in (("dense", None), ("oracle", oracle), ("predictor", predicted)):
        model.ffn = MaskedFFN(dense, mask=mask)
        ppl[name], n_tokens = perplexity(model, held_tokens)
    preds.meta = {
        "sparsity": None if relu else settings.sparsity,
        "target_recall": settings.target_recall,
        "calibration_tokens": len(train_tokens),
        "heldout_tokens": n_tokens,
        "perplexity": {k: round(v, 4) for k, v in ppl.items()},
        "layers": per_layer,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    preds.save(directory)
    return preds.meta
