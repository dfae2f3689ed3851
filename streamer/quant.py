"""4-bit matrices in DRAM: groups of GROUP input channels, each with a scale and an offset (the
shape of GGUF's Q4_1 blocks), multiplied by torch's int4 weight-only CPU kernel.

Used by the gated ranker (`streamer.ranker`) and, on request, for the resident part's matrices
(`load_engine(quant_resident="q4")`: attention in 4 bits, embeddings in 8): for a model converted
from a Q4_1 GGUF file, as the default model is, the groups are the file's own blocks and the
values come back exactly, up to the bfloat16 rounding of scales and offsets. The kernels take
bfloat16 activations (README, "Decisions", for what they cost here).
"""

from __future__ import annotations

import torch

GROUP = 32  # input channels per scale and offset (GGUF's block)
ROW_BLOCK = 4096  # rows quantized at a time


def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, d] -> 4-bit codes two to a byte [N, d/2] (uint8), and per group of GROUP input
    channels a scale and an offset [N, d/GROUP] (bfloat16): w ≈ code * scale + low."""
    n, d = w.shape
    g = w.float().reshape(n, d // GROUP, GROUP)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-12)
    codes = ((g - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    codes = codes.reshape(n, d)
    return {
        "codes": codes[:, 0::2] | (codes[:, 1::2] << 4),
        "scale": scale.to(torch.bfloat16),
        "low": low.to(torch.bfloat16),
    }


def dequantize(q: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 matrix the codes stand for."""
    scale, low = q["scale"], q["low"]
    c = unpack(q["codes"]).float()
    n, d = c.shape
    g = c.reshape(n, d // GROUP, GROUP)
    return (g * scale.float()[..., None] + low.float()[..., None]).reshape(n, d)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[N, d/2] bytes -> [N, d] codes (int32)."""
    n, half = packed.shape
    out = torch.empty(n, 2 * half, dtype=torch.int32)
    out[:, 0::2] = (packed & 15).to(torch.int32)
    out[:, 1::2] = (packed >> 4).to(torch.int32)
    return out


class Q4Matrix:
    """A [N, d] matrix in 4 bits, packed for the CPU kernel; `linear(x)` is x @ Wᵀ."""

    def __init__(self, q: dict[str, torch.Tensor]) -> None:
        self.shape = (q["codes"].shape[0], 2 * q["codes"].shape[1])
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(q["codes"]), 1)
        # the kernel's form: w = (code - 8) * scale + zero, [d/GROUP, N, 2]
        scale, low = q["scale"].float(), q["low"].float()
        self.scales_zeros = (
            torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
        )

    @classmethod
    def of(cls, w: torch.Tensor) -> Q4Matrix:
        return cls(quantize(w))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> x @ Wᵀ [T, N] in x's dtype."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros
        )
        return y.to(x.dtype)


class Q8Embedding:
    """A [vocab, d] table in 8 bits with a scale per row: rows looked up (dequantized) and,
    for a tied LM head, multiplied by torch's int8 weight-only kernel; one copy serves both.
    (Why 8 bits and not 4: README, "Decisions".) With `quant_resident="q8"` every resident
    projection matrix is held this way too (`linear`: a scale per output row)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.shape = tuple(w.shape)
        self.codes = torch.empty(self.shape, dtype=torch.int8)
        self.scale = torch.empty(self.shape[0], dtype=torch.bfloat16)
        for i in range(0, self.shape[0], ROW_BLOCK):  # no float32 copy of the whole table
            rows = w[i : i + ROW_BLOCK].float()
            scale = (rows.abs().amax(1) / 127).clamp_min(1e-12)
            self.codes[i : i + ROW_BLOCK] = (rows / scale[:, None]).round_().clamp_(-127, 127)
            self.scale[i : i + ROW_BLOCK] = scale

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 2

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scale).to(x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.codes[ids].float() * self.scale[ids].float()[:, None]).to(dtype)


RESIDENT_KINDS = ("q4", "q8")
# what --quant-resident takes: as stored, 4 or 8 bits, or 4 bits only when a DRAM budget needs it
RESIDENT_CHOICES = ("none", *RESIDENT_KINDS, "auto")


def quantize_resident(weights: dict[str, torch.Tensor], kind: str = "q4") -> dict[str, object]:
    """The resident part with its projection matrices in 4 (or 8) bits and the token embeddings
    (and an untied LM head) in 8; see `quantize_resident_tensor`."""
    return {name: quantize_resident_tensor(name, t, kind) for name, t in weights.items()}


def quantize_resident_tensor(name: str, t: torch.Tensor, kind: str = "q4") -> object:
    """One resident tensor as it is held with `quant_resident=kind`: embeddings and LM head in
    8 bits, other matrices in 4 bits ("q4") or 8 ("q8", a scale per row); norms, biases,
    position embeddings and matrices whose input width GROUP does not divide as they are."""
    if name in ("embed.weight", "lm_head.weight"):
        return Q8Embedding(t)
    matrix = name.endswith(".weight") and t.dim() == 2 and t.shape[1] % GROUP == 0
    if not matrix or "norm" in name or name == "pos_embed.weight":
        return t
    if kind == "q8":
        return Q8Embedding(t)
    return Q4Matrix.of(t)
