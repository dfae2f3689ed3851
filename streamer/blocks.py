"""How a neuron's vectors are stored in its bundle: a float dtype, or GGUF's quantized blocks.

A block kind stores each vector of `d` values as d/BLOCK blocks, each a float16 scale (and for
q4_1 an offset) followed by BLOCK codes, byte for byte as GGUF defines the kind (and as llama.cpp
writes it), so that a GGUF file's own blocks can be copied into bundles unchanged where a bundle's
vector is one of the file's rows:

- `q8_0`: 34 bytes a block: scale d, 32 int8 codes q; value = d * q;
- `q4_0`: 18 bytes: scale d, 16 bytes of 4-bit codes (values 0-15 in the low nibbles, 16-31 in
  the high ones); value = d * (q - 8);
- `q4_1`: 20 bytes: scale d, offset m, 16 bytes of codes as q4_0; value = d * q + m.

Quantizing uses the `gguf` package (llama.cpp's own reference code, ported to numpy). Dequantizing
is written here in torch because it runs for every token on the rows the token needs, where the
package's numpy code would be the whole cost; tests check it against the package's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from streamer.errors import ConfigError

BLOCK = 32  # values per quantized block (GGUF's QK8_0, QK4_0, QK4_1)
ROWS_AT_ONCE = 128  # rows dequantized at a time, so that the codes unpacked stay in cache


@dataclass(frozen=True)
class Kind:
    name: str
    float_dtype: torch.dtype | None  # the float kinds: their dtype
    ggml: GGMLQuantizationType | None  # the block kinds: GGUF's type
    block_bytes: int  # bytes a block of BLOCK values takes
    header: int = 0  # bytes of scale (and offset) at the start of a block

    @property
    def quantized(self) -> bool:
        return self.ggml is not None

    def row_bytes(self, d: int, what: str = "vector") -> int:
        """Bytes a vector of d values takes; ConfigError when blocks do not divide it."""
        if self.quantized and d % BLOCK:
            raise ConfigError(
                f"quant {self.name} stores blocks of {BLOCK} values; the {what} length {d} "
                f"is not a multiple of {BLOCK} (use f16 or bf16 for this model)",
                "quant",
            )
        return d * self.block_bytes // BLOCK


KINDS = {
    "f16": Kind("f16", torch.float16, None, 2 * BLOCK),
    "bf16": Kind("bf16", torch.bfloat16, None, 2 * BLOCK),
    "f32": Kind("f32", torch.float32, None, 4 * BLOCK),
    "q8_0": Kind("q8_0", None, GGMLQuantizationType.Q8_0, 34, 2),
    "q4_0": Kind("q4_0", None, GGMLQuantizationType.Q4_0, 18, 2),
    "q4_1": Kind("q4_1", None, GGMLQuantizationType.Q4_1, 20, 4),
}
FLOAT_KIND = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}  # a dtype's own kind


def kind(name: str) -> Kind:
    if name not in KINDS:
        raise ConfigError(
            f"quant kind {name!r} is not supported (supported: {', '.join(KINDS)})", "quant"
        )
    return KINDS[name]


def quantize(w: torch.Tensor, k: Kind) -> np.ndarray:
    """w [n, d] -> its rows in kind k, bytes [n, row_bytes] (uint8)."""
    if not k.quantized:
        return w.to(k.float_dtype).contiguous().view(torch.uint8).numpy()
    return quants.quantize(w.float().numpy(), k.ggml)


def dequantize(raw: torch.Tensor, k: Kind, out: torch.Tensor) -> torch.Tensor:
    """raw [n, row_bytes] (uint8, rows of kind k) -> out [n, d] (float32), filled and
    returned."""
    n, d = out.shape
    for i in range(0, n, ROWS_AT_ONCE):
        _dequantize(raw[i : i + ROWS_AT_ONCE], k, out[i : i + ROWS_AT_ONCE])
    return out


def _dequantize(raw: torch.Tensor, k: Kind, out: torch.Tensor) -> None:
    n, d = out.shape
    if not k.quantized:
        out.copy_(raw.view(k.float_dtype))
        return
    blocks = raw.reshape(n, d // BLOCK, k.block_bytes)
    scale = blocks[..., :2].view(torch.float16).float()  # [n, b, 1]
    values = out.view(n, d // BLOCK, BLOCK)
    if k.name == "q8_0":
        torch.mul(blocks[..., 2:].view(torch.int8), scale, out=values)
        return
    codes = blocks[..., k.header :]  # [n, b, 16]: value j in the low nibble, j + 16 in the high
    q = torch.empty(n, d // BLOCK, 2, BLOCK // 2, dtype=torch.uint8)
    torch.bitwise_and(codes, 15, out=q[:, :, 0])
    torch.bitwise_right_shift(codes, 4, out=q[:, :, 1])
    q = q.view(n, d // BLOCK, BLOCK)
    if k.name == "q4_0":
        torch.mul(q.view(torch.int8).sub_(8), scale, out=values)
    else:  # q4_1
        torch.addcmul(blocks[..., 2:4].view(torch.float16).float(), q, scale, out=values)
