"""Compact model code for the three families: Llama (SwiGLU), OPT (ReLU) and Falcon.

This is the dense reference path and the compute the engine runs: embeddings, attention and norms
are *resident* (always in DRAM); each layer's FFN sits behind one call, `ffn(x, layer)`, so the
engine can put a flash-streamed, sparse FFN where the dense one sits. Weights use the canonical
names of `streamer.sources` (`layers.3.attn.wq.weight`, ...). Batch size is 1: tensors are `[T, d]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from streamer.config import ModelConfig
from streamer.errors import ConfigError

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


DOWN_BLOCK = 1024  # rows of a float16 down projection converted to float32 at a time


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ + b for a resident matrix: a tensor, or a quantized one (`streamer.quant`)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    y = w.linear(x)
    return y if b is None else y + b


class FFN(Protocol):
    def __call__(self, x: torch.Tensor, layer: int) -> torch.Tensor: ...


@dataclass
class FFNWeights:
    """One layer's FFN, neuron-major: row i of each matrix belongs to neuron i (its bundle)."""

    up: torch.Tensor  # [n_ffn, d]
    down: torch.Tensor  # [n_ffn, d]: row i is column i of the down projection
    gate: torch.Tensor | None = None  # [n_ffn, d], SwiGLU only
    up_bias: torch.Tensor | None = None  # [n_ffn]
    gate_bias: torch.Tensor | None = None  # [n_ffn]
    down_bias: torch.Tensor | None = None  # [d]

    def to(self, dtype: torch.dtype) -> FFNWeights:
        """Every tensor in `dtype`, contiguous (the stored rows are views of bundle records)."""
        return FFNWeights(
            **{k: None if v is None else v.to(dtype).contiguous() for k, v in vars(self).items()}
        )


def ffn_forward(
    x: torch.Tensor, w: FFNWeights, act: Callable, on_activations: Callable | None = None
) -> torch.Tensor:
    """x: [T, d] -> [T, d]. `on_activations(h)`, h: [T, n], may record or change the neurons'
    outputs before the down projection (calibration's masks, the engine's padding rows)."""
    h = F.linear(x, w.up, w.up_bias)
    h = act(F.linear(x, w.gate, w.gate_bias)) * h if w.gate is not None else act(h)
    if on_activations is not None:
        h = on_activations(h)
    if w.down.dtype == torch.float16:
        # torch's float16 matmul is 20x slower here than converting both to float32 first
        # (README, "Decisions"); in blocks of rows, so that a whole layer's conversion (a
        # prompt's) does not need a float32 copy of down beside the budget
        out = torch.zeros(h.shape[0], w.down.shape[1])
        for i in range(0, h.shape[1], DOWN_BLOCK):
            out += h[:, i : i + DOWN_BLOCK].float() @ w.down[i : i + DOWN_BLOCK].float()
        out = out.to(h.dtype)
    else:
        out = h @ w.down
    return out + w.down_bias if w.down_bias is not None else out


class DenseFFN:
    """Every FFN weight in DRAM: the reference every sparse path is tested against."""

    def __init__(self, layers: list[FFNWeights], activation: str) -> None:
        self.layers = layers
        self.act = ACTIVATION_FNS[activation]

    def __call__(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return ffn_forward(x, self.layers[layer], self.act)


class KVCache:
    """Preallocated keys and values of one sequence: `[n_kv_heads, max_len, head_dim]` a layer."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> None:
        shape = (cfg.n_layers, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens whose keys and values are stored

    @classmethod
    def one_layer(cls, cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> KVCache:
        """A cache that stores one layer at a time (every layer index views the same memory):
        for running a sequence layer by layer, as calibration does."""
        cache = cls.__new__(cls)
        shape = (1, cfg.n_kv_heads, max_len, cfg.head_dim)
        cache.k = torch.zeros(shape, dtype=dtype).expand(cfg.n_layers, -1, -1, -1)
        cache.v = torch.zeros(shape, dtype=dtype).expand(cfg.n_layers, -1, -1, -1)
        cache.max_len, cache.length = max_len, 0
        return cache


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig):
    if cfg.norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, cfg.norm_eps)
    # RMSNorm in float32, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    return weight * xf.to(x.dtype)


class Transformer:
    """Resident weights plus one FFN provider; `forward` runs T new tokens after `cache.length`."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        ffn: FFN,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg = cfg
        self.w = weights  # a Mapping: the naive mode reads each tensor from flash on access
        self.ffn = ffn
        self.dtype = dtype
        self.inv_freq = rope_inv_freq(cfg) if cfg.positions == "rope" else None
        self.lm_head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"

    def new_cache(self, max_len: int) -> KVCache:
        if max_len > self.cfg.max_positions:
            raise ConfigError(
                f"context of {max_len} tokens exceeds the model's maximum of "
                f"{self.cfg.max_positions}"
            )
        return KVCache(self.cfg, max_len, self.dtype)

    def _get(self, name: str) -> torch.Tensor | None:
        return self.w.get(name)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: [heads, T, hd]; pos: [T]
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def attention(self, x: torch.Tensor, i: int, cache: KVCache, pos: torch.Tensor):
        # x: [T, d] -> [T, d]
        cfg, p, T = self.cfg, f"layers.{i}.attn.", x.shape[0]
        start = cache.length
        q = linear(x, self.w[p + "wq.weight"], self._get(p + "wq.bias"))
        k = linear(x, self.w[p + "wk.weight"], self._get(p + "wk.bias"))
        v = linear(x, self.w[p + "wv.weight"], self._get(p + "wv.bias"))
        q = q.view(T, cfg.n_heads, cfg.head_dim).transpose(0, 1)  # [H, T, hd]
        k = k.view(T, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)  # [KV, T, hd]
        v = v.view(T, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)
        if self.inv_freq is not None:
            q, k = self._rope(q, pos), self._rope(k, pos)
        cache.k[i, :, start : start + T] = k
        cache.v[i, :, start : start + T] = v
        keys, values = cache.k[i, :, : start + T], cache.v[i, :, : start + T]  # [KV, S, hd]
        # Causal, offset by what is already cached; one new token sees everything.
        mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool).tril(start)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=cfg.n_heads != cfg.n_kv_heads
        )
        out = out.transpose(0, 1).reshape(T, cfg.n_heads * cfg.head_dim)
        return linear(out, self.w[p + "wo.weight"], self._get(p + "wo.bias"))

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return _norm(x, self.w[name + ".weight"], self._get(name + ".bias"), self.cfg)

    def block(self, x: torch.Tensor, i: int, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, f"layers.{i}."
        if cfg.block == "parallel":
            h = self.norm(x, p + "attn_norm")
            f_in = self.norm(x, p + "ffn_norm") if cfg.ffn_norm else h
            return x + self.attention(h, i, cache, pos) + self.ffn(f_in, i)
        if cfg.block == "post_norm":
            h = self.norm(x + self.attention(x, i, cache, pos), p + "attn_norm")
            return self.norm(h + self.ffn(h, i), p + "ffn_norm")
        h = x + self.attention(self.norm(x, p + "attn_norm"), i, cache, pos)
        return h + self.ffn(self.norm(h, p + "ffn_norm"), i)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False):
        """tokens: [T] -> logits [T, vocab] (or [1, vocab] with last_only)."""
        cfg, T = self.cfg, tokens.shape[0]
        if cache.length + T > cache.max_len:
            raise ConfigError(
                f"sequence of {cache.length + T} tokens exceeds the cache of {cache.max_len}"
            )
        if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
            raise ConfigError(f"token ids must lie in [0, {cfg.vocab_size})")
        pos = torch.arange(cache.length, cache.length + T)
        x = self.embed(tokens, pos)
        for i in range(cfg.n_layers):
            x = self.block(x, i, cache, pos)
        cache.length += T
        return self.head(x[-1:] if last_only else x)

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # tokens, pos: [T] -> the residual stream [T, d]
        table = self.w["embed.weight"]
        if isinstance(table, torch.Tensor):
            x = F.embedding(tokens, table)
        else:
            x = table.rows(tokens, self.dtype)
        if "proj_in.weight" in self.w:
            x = linear(x, self.w["proj_in.weight"])
        if self.cfg.positions == "learned":
            x = x + F.embedding(pos + self.cfg.position_offset, self.w["pos_embed.weight"])
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, d] -> logits [T, vocab] in float32
        if self.cfg.final_norm:
            x = self.norm(x, "final_norm")
        if "proj_out.weight" in self.w:
            x = linear(x, self.w["proj_out.weight"])
        return linear(x, self.w[self.lm_head]).float()
