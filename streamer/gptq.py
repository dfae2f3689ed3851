"""GPTQ (Frantar et al., 2022) for the 4-bit bundle kinds: each layer's FFN quantized so that
its outputs on calibration text stay near the float ones, not only its weights.

Rounding each weight to its block's nearest level (GGUF's own quantizer) costs the default model
12% held-out perplexity in q4_0 (README, "Quantized bundles"). GPTQ quantizes one input column
at a time and spreads the column's error over the columns not yet quantized, through the
inverse of the inputs' second moments H = Xᵀ X (X: the layer's inputs on calibration text), so
that the products, which are what the model sees, move as little as they can. Gate and up are
quantized along their input channels (GGUF's blocks of 32, a scale each chosen from a grid as the
block is reached); down along the neurons, whose inputs are the activations h, each neuron's
down vector a column quantized in blocks of 32 along d_model as its bundle holds it. Layers go
in order, each on the inputs the quantized layers before it give (as GPTQ does). Written here:
the algorithm is short, and the packages that implement it quantize torch modules for GPUs, not
GGUF blocks in bundles.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from streamer.blocks import BLOCK, Kind
from streamer.layerwise import LayerRun, MaskedFFN
from streamer.layout import BundleLayout
from streamer.model import ACTIVATION_FNS, DenseFFN, FFNWeights, Transformer, ffn_forward
from streamer.sources import LayerWeights, Source

DAMP = 0.1  # of H's mean diagonal, added to it (a few thousand calibration tokens: GPTQ's 0.01
# over-fits them)
LAZY = 128  # columns whose updates are applied together (GPTQ's lazy batch)
# scales tried for each block, as multiples of the round-to-nearest one (the least weighted
# squared error wins)
GRID = (0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975, 1.0, 1.025, 1.05, 1.1)
KINDS = ("q4_0", "q4_1")
GPTQ_SETTINGS = ("auto", "on", "off")  # convert's gptq argument
# the shipped texts it runs on (streamer/data; 2,339 tokens of the default model's): three times
# as much prose of the same kinds measured no better (README, "Quantized bundles")
GPTQ_TEXTS = ("calibration.txt",)
CHUNK = 256  # calibration tokens per sequence


def _levels(v: torch.Tensor, kind: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [..., 32] -> each block's scale and offset [..., 1] (float16 values, as stored), chosen
    from GRID by the least `weight`ed squared error of the block's rounding (every grid point at
    once, on a new axis before the block's)."""
    if kind == "q4_0":  # value = d * (q - 8), q in 0..15: the largest magnitude maps to -8
        top = v.gather(-1, v.abs().argmax(-1, keepdim=True))
        base, low = top / -8, torch.zeros_like(top)
    else:  # q4_1: value = d * q + m
        low = v.amin(-1, keepdim=True)
        base = (v.amax(-1, keepdim=True) - low) / 15
        low = low.half().float()
    grid = torch.tensor(GRID).view(-1, *([1] * v.dim()))  # [G, 1, ..., 1]
    d = (base * grid).half().float()  # [G, ..., 1]
    d = torch.where(d == 0, torch.ones_like(d), d)
    low = low.expand_as(d)
    # the scale (and q4_1's offset) that fit these codes best, by weighted least squares
    d, m = _refit(v, _codes(v, d, low, kind), weight, d, low, kind)
    err = (weight * (v - _round(v, d, m, kind)) ** 2).sum(-1, keepdim=True)
    best = err.argmin(0, keepdim=True)  # the first of equals, as the grid's order has them
    return d.gather(0, best)[0], m.gather(0, best)[0]


def _refit(v, q, weight, d, low, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares over each block (float16 values) of v ≈ d * (q - 8) (q4_0) or
    v ≈ d * q + m (q4_1), where it has a solution; else d and low as they were."""
    if kind == "q4_0":
        q = q - 8
        num, den = (weight * q * v).sum(-1, keepdim=True), (weight * q * q).sum(-1, keepdim=True)
        d2 = (num / den.clamp_min(1e-30)).half().float()
        return torch.where((den > 0) & (d2 != 0), d2, d), low
    sw = weight.sum(-1, keepdim=True)
    sq, sv = (weight * q).sum(-1, keepdim=True), (weight * v).sum(-1, keepdim=True)
    sqq, sqv = (weight * q * q).sum(-1, keepdim=True), (weight * q * v).sum(-1, keepdim=True)
    det = sw * sqq - sq * sq
    ok = det.abs() > 1e-12
    safe = torch.where(ok, det, torch.ones_like(det))
    d2 = ((sw * sqv - sq * sv) / safe).half().float()
    m2 = ((sqq * sv - sq * sqv) / safe).half().float()
    ok &= d2 > 0
    return torch.where(ok, d2, d), torch.where(ok, m2, low)


def _codes(v: torch.Tensor, d: torch.Tensor, low: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "q4_0":
        return torch.clamp(torch.round(v / d) + 8, 0, 15)
    return torch.clamp(torch.round((v - low) / d), 0, 15)


def _round(v: torch.Tensor, d: torch.Tensor, low: torch.Tensor, kind: str) -> torch.Tensor:
    q = _codes(v, d, low, kind)
    return d * (q - 8) if kind == "q4_0" else d * q + low


def pack(codes: torch.Tensor, d: torch.Tensor, low: torch.Tensor, kind: Kind) -> np.ndarray:
    """Codes [n, b, 32] with scales and offsets [n, b, 1] -> GGUF's blocks, bytes [n, b * size]."""
    n, b, _ = codes.shape
    q = codes.to(torch.uint8)
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).numpy()
    parts = [d.half().numpy().view(np.uint8).reshape(n, b, 2)]
    if kind.name == "q4_1":
        parts.append(low.half().numpy().view(np.uint8).reshape(n, b, 2))
    return np.concatenate([*parts, nibbles], axis=-1).reshape(n, -1)


def _inverse(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The damped H's inverse as GPTQ uses it (its upper Cholesky factor), and the columns that
    never saw an input (zeroed). In double: float32 (GPTQ's own code's), twice as fast, gave the
    default model's q4_0 0.5% more perplexity on its own calibration text."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return u.float(), dead


def _gptq(w: torch.Tensor, h: torch.Tensor, quantize: Callable) -> None:
    """GPTQ over the columns of w [rows, cols] (in place, float32): quantize(c, block) turns
    column c of the lazy block (a view, its later columns already corrected) into its quantized
    values."""
    u, dead = _inverse(h)
    w[:, dead] = 0
    cols = w.shape[1]
    for a in range(0, cols, LAZY):
        b = min(a + LAZY, cols)
        block, err = w[:, a:b], torch.zeros(w.shape[0], b - a)
        for i in range(b - a):
            col = block[:, i].clone()
            q = quantize(a + i, block[:, i:])
            e = (col - q) / u[a + i, a + i]
            block[:, i:] -= e[:, None] * u[a + i, a + i : b][None, :]
            block[:, i] = q
            err[:, i] = e
        w[:, b:] -= err @ u[a:b, b:]


def quantize_rows(w: torch.Tensor, x_moments: torch.Tensor, kind: Kind) -> np.ndarray:
    """Gate or up [n, d] -> their rows in `kind` (bytes [n, d/32 * size]): blocks of 32 input
    channels, each block's scale chosen (weighted by the inputs' energy) when GPTQ reaches it."""
    n, d = w.shape
    w = w.float().clone()
    energy = torch.diag(x_moments).float().clamp_min(0)
    scale = torch.zeros(n, d // BLOCK, 1)
    low = torch.zeros(n, d // BLOCK, 1)

    def quantize(c: int, rest: torch.Tensor) -> torch.Tensor:
        g = c // BLOCK
        if c % BLOCK == 0:  # a new block: its scale from its columns as they are now
            v = rest[:, :BLOCK]
            scale[:, g], low[:, g] = _levels(v, kind.name, energy[c : c + BLOCK].expand_as(v))
        return _round(rest[:, 0:1], scale[:, g], low[:, g], kind.name)[:, 0]

    _gptq(w, x_moments, quantize)
    blocks = w.reshape(n, d // BLOCK, BLOCK)
    return pack(_codes(blocks, scale, low, kind.name), scale, low, kind)


def quantize_columns(down: torch.Tensor, h_moments: torch.Tensor, kind: Kind) -> np.ndarray:
    """Down vectors [n, d] (row j: neuron j's column of the down projection) -> their bundles'
    vectors in `kind` (bytes [n, d/32 * size]): GPTQ over the neurons, the busiest first (GPTQ's
    act order: a neuron's vector is its own group, so any order keeps the blocks), each
    neuron's vector quantized whole, in blocks of 32 along d, when it is reached."""
    n, d = down.shape
    order = torch.argsort(torch.diag(h_moments), descending=True)
    w = down.float()[order].T.contiguous()  # [d, n]: the projection, its columns the neurons
    scale = torch.zeros(n, d // BLOCK, 1)
    low = torch.zeros(n, d // BLOCK, 1)

    def quantize(c: int, rest: torch.Tensor) -> torch.Tensor:
        v = rest[:, 0].reshape(d // BLOCK, BLOCK)
        scale[c], low[c] = _levels(v, kind.name, torch.ones_like(v))
        return _round(v, scale[c], low[c], kind.name).reshape(d)

    _gptq(w, h_moments[order][:, order], quantize)
    back = torch.argsort(order)
    blocks = w.T[back].reshape(n, d // BLOCK, BLOCK)
    return pack(_codes(blocks, scale[back], low[back], kind.name), scale[back], low[back], kind)


def wants_gptq(layout: BundleLayout, kept: set[str]) -> bool:
    """Whether any part of the layout is quantized again in a 4-bit kind (not kept as is)."""
    return any(
        k.name in KINDS and p not in kept
        for p, k in zip(layout.parts, layout.part_kinds, strict=True)
    )


class LayerByLayer:
    """The model run over calibration text one layer at a time beside the converter, each
    layer's FFN quantized by GPTQ on the inputs the quantized layers before it give."""

    def __init__(self, source: Source, layout: BundleLayout, tokens: list[int]) -> None:
        cfg = source.config
        self.cfg, self.layout = cfg, layout
        self.act = ACTIVATION_FNS[cfg.activation]
        model = Transformer(cfg, LayerWeights(source, torch.float32), None, torch.float32)  # type: ignore[arg-type]
        chunk = min(CHUNK, cfg.max_positions)
        seqs = [tokens[i : i + chunk] for i in range(0, len(tokens), chunk)]
        seqs = [s for s in seqs if len(s) >= 2]
        self.run = LayerRun(model, seqs)
        self.tokens = sum(len(s) for s in self.run.seqs)

    def _through(self, run: LayerRun, i: int, w: FFNWeights, record=None) -> None:
        ffns: list[FFNWeights | None] = [None] * self.cfg.n_layers
        ffns[i] = w
        run.layer(i, MaskedFFN(DenseFFN(ffns, self.cfg.activation), record=record))  # type: ignore[arg-type]

    def _inputs(self, run: LayerRun, i: int, w: FFNWeights) -> torch.Tensor:
        xs: list[torch.Tensor] = []
        self._through(run, i, w, lambda layer, x, h: xs.append(x.float()))
        return torch.cat(xs)

    def _hidden(self, x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
        """The neurons' outputs h [N, n] of the FFN w on inputs x, as the model computes them."""
        seen: list[torch.Tensor] = []
        ffn_forward(x, w, self.act, lambda h: seen.append(h) or h)
        return seen[0]

    @torch.no_grad()
    def layer(self, i: int, w: FFNWeights, kept: dict[str, np.ndarray]) -> torch.Tensor:
        """Layer i's bundle records: the parts in `kept` as given, the 4-bit ones by GPTQ (the
        rest as the layout quantizes them: float kinds and 8 bits round to nearest)."""
        lay, raw = self.layout, dict(kept)
        kinds = dict(zip(lay.parts, lay.part_kinds, strict=True))
        w = w.to(torch.float32)
        before = [x.clone() for x in self.run.x]
        x = self._inputs(self.run, i, w)
        hx = x.T @ x
        for part in ("gate", "up"):
            if part in kinds and part not in raw and kinds[part].name in KINDS:
                raw[part] = quantize_rows(getattr(w, part), hx, kinds[part])
        if kinds["down"].name in KINDS and "down" not in raw:
            h = self._hidden(x, layer_weights(lay, lay.pack(w, raw), w))
            raw["down"] = quantize_columns(w.down, h.T @ h, kinds["down"])
        records = lay.pack(w, raw)
        self.run.x = before  # the layer again, quantized: what the next layer's inputs are
        self._through(self.run, i, layer_weights(lay, records, w))
        return records


def layer_weights(layout: BundleLayout, records: torch.Tensor, w: FFNWeights) -> FFNWeights:
    """The float32 FFN that bundle records hold, with w's biases."""
    parts = {k: v.float() for k, v in layout.unpack(records).items()}
    return FFNWeights(
        parts["up"], parts["down"], parts.get("gate"), w.up_bias, w.gate_bias, w.down_bias
    ).to(torch.float32)
