"""The FFN kernel both runtimes run: layer weights from bundle rows, bundle reads, prefill and
the sparse FFN over the rows a token needs.

The single-process engine (`streamer.engine`) and the pipeline's compute and prefetch stages
(`workers/`) call these same functions, so that they read the same bytes and compute the same
numbers. Also here: the resident part's loader (plain reads, no mmap) and the FFN biases, which
stay resident and follow the rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from streamer.errors import ModelFormatError
from streamer.flash import merge_runs
from streamer.layout import RESIDENT_FILE, BundleLayout, ConvertedModel
from streamer.model import FFNWeights, ffn_forward

ROW_BUCKET = 64  # row counts are rounded up to this (see rows_forward)
NEURON_BLOCK = 512  # neurons of a block kind dequantized at a time (float32 copies of them)
BIAS_KEYS = ("up_bias", "gate_bias", "down_bias")
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

Biases = dict[str, torch.Tensor | None]


def safetensors_index(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) in the file, from its header."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        base = 8 + n
        return {
            name: (
                _ST_DTYPES[info["dtype"]],
                tuple(info["shape"]),
                base + info["data_offsets"][0],
                base + info["data_offsets"][1],
            )
            for name, info in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{path}: unreadable safetensors header ({e})") from None


def load_resident(
    model: ConvertedModel,
    dtype: torch.dtype,
    names: list[str] | None = None,
    transform: Callable[[str, torch.Tensor], object] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The resident tensors, read with plain reads (no mmap, whose file pages would count in RSS
    on top of the copies), then dropped from the page cache. `transform(name, tensor)`: what to
    hold instead of each tensor (a quantized one), made as each is read, so that the whole part
    is never in DRAM twice."""
    path = model.directory / RESIDENT_FILE
    index = safetensors_index(path)
    out = {}
    with path.open("rb") as f:
        names = model.resident_names() if names is None else names
        for name in tqdm(names, desc="load", unit="tensor", disable=not progress, leave=False):
            st_dtype, shape, start, end = index[name]
            arr = np.fromfile(f, dtype=np.uint8, count=end - start, offset=start - f.tell())
            t = torch.from_numpy(arr).view(st_dtype).reshape(shape).to(dtype)
            out[name] = t if transform is None else transform(name, t)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return out


def ffn_biases(
    resident: Mapping[str, torch.Tensor], n_layers: int, dtype: torch.dtype
) -> list[Biases]:
    """Each layer's FFN biases (None where the model has none) in `dtype`: the FFN math runs
    in the stored dtype, on the rows as read, and the biases follow the rows."""
    return [
        {
            k: None if (t := resident.get(f"layers.{i}.ffn.{k}")) is None else t.to(dtype)
            for k in BIAS_KEYS
        }
        for i in range(n_layers)
    ]


def layer_weights(layout: BundleLayout, records: torch.Tensor, biases: Biases) -> FFNWeights:
    """Records' FFN matrices (views of a float kind's records, dequantized copies of a block
    kind's), with their resident biases (already sliced to the records' neurons)."""
    parts = layout.unpack(records)
    return FFNWeights(parts["up"], parts["down"], parts.get("gate"), **biases)


def layer_forward(
    x: torch.Tensor,
    layout: BundleLayout,
    records: torch.Tensor,
    biases: Biases,
    act: Callable,
    on_activations: Callable | None = None,
) -> torch.Tensor:
    """A whole layer's FFN from its records, x: [T, d] -> [T, d]. A block kind is dequantized
    NEURON_BLOCK neurons at a time, so that a prompt never holds a float copy of the layer
    beside the budget; `on_activations(h)` sees each block's activations, in order."""
    if not layout.dequantized:
        return ffn_forward(x, layer_weights(layout, records, biases), act, on_activations)
    out = None
    for i in range(0, records.shape[0], NEURON_BLOCK):
        j = min(i + NEURON_BLOCK, records.shape[0])
        part = {k: None if v is None else v[i:j] for k, v in biases.items() if k != "down_bias"}
        y = ffn_forward(x, layer_weights(layout, records[i:j], part), act, on_activations)
        out = y if out is None else out.add_(y)
    b = biases["down_bias"]
    return out if b is None else out + b


def bundle_reads(
    layout: BundleLayout,
    layer: int,
    ids: np.ndarray,
    dest: torch.Tensor,
    max_read: int,
    rows: np.ndarray | None = None,
) -> list[tuple[int, memoryview]]:
    """Reads of neurons `ids` (sorted) of `layer` into dest[rows[i]] (default dest[i]): one
    read per run of neurons adjacent both on flash and in `dest`, split at max_read bytes."""
    reqs: list[tuple[int, memoryview]] = []
    if len(ids) == 0:
        return reqs
    rows = np.arange(len(ids)) if rows is None else np.asarray(rows)
    stride, max_rows = layout.stride, max(max_read // layout.stride, 1)
    view = memoryview(dest.numpy()).cast("B")
    for first, length in merge_runs(ids, rows):
        for j in range(first, first + length, max_rows):
            k, r = min(max_rows, first + length - j), int(rows[j])
            reqs.append((layout.offset(layer, int(ids[j])), view[r * stride : (r + k) * stride]))
    return reqs


def prefill_ffn(
    x: torch.Tensor,
    layout: BundleLayout,
    records: torch.Tensor,
    biases: Biases,
    act: Callable,
    threshold: float,
    k: int,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """A whole layer's FFN over a prompt, x: [T, d] -> [T, d], and the true active set
    (|activation| > threshold) of each of its last k tokens, oldest first."""
    kept: list[torch.Tensor] = []

    def record(h: torch.Tensor) -> torch.Tensor:  # h: [T, n] (or a block of its neurons)
        kept.append(h[-k:].abs() > threshold)
        return h

    out = layer_forward(x, layout, records, biases, act, record)
    active = torch.cat(kept, dim=1)
    return out, [torch.nonzero(row).flatten().numpy() for row in active]


def gather_rows(
    rows: torch.Tensor, ids: np.ndarray, take: np.ndarray, dest: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """rows[take] copied, in order, into dest[:len(take)] (a token's neurons out of its window
    cache, so that its FFN computes on its own rows only); returns dest and the neurons' ids."""
    idx = torch.from_numpy(np.ascontiguousarray(take, dtype=np.int64))
    torch.index_select(rows, 0, idx, out=dest[: len(take)])
    return dest, ids[take]


def sparse_ffn(
    x: torch.Tensor,
    layout: BundleLayout,
    biases: Biases,
    act: Callable,
    *parts: tuple[torch.Tensor, np.ndarray],
) -> torch.Tensor:
    """One token's FFN over the neurons whose rows are given, x: [1, d] -> [1, d]. Each part
    is (rows, ids): rows[:len(ids)] hold the bundles of neurons `ids` (the window's rows, the
    overflow's)."""
    out = None
    for rows, ids in parts:
        if len(ids) or out is None:
            y = rows_forward(x, layout, biases, act, rows, ids)
            out = y if out is None else out + y
    b = biases["down_bias"]
    return out if b is None else out + b


def rows_forward(
    x: torch.Tensor,
    layout: BundleLayout,
    biases: Biases,
    act: Callable,
    rows: torch.Tensor,
    ids: np.ndarray,
) -> torch.Tensor:
    """The FFN over the neurons in rows[:len(ids)], without the down bias: x [1, d] -> [1, d].

    The row count is rounded up to a multiple of ROW_BUCKET (the extra rows masked out):
    oneDNN keeps a primitive per matrix shape for 16-bit matmuls, and a new count every
    token would grow the process without bound (README, Decisions)."""
    c = len(ids)
    if c == 0:
        return torch.zeros_like(x)
    if layout.dequantized and c > NEURON_BLOCK:  # a bounded float32 copy at a time
        out = torch.zeros_like(x)
        for i in range(0, c, NEURON_BLOCK):
            out += rows_forward(x, layout, biases, act, rows[i:], ids[i : i + NEURON_BLOCK])
        return out
    n = min(rows.shape[0], -(-c // ROW_BUCKET) * ROW_BUCKET)
    parts = layout.unpack(rows[:n])
    up_b, gate_b = biases["up_bias"], biases["gate_bias"]
    if up_b is not None:  # each row's own bias; the padding rows take neuron 0's
        idx = torch.zeros(n, dtype=torch.long)
        idx[:c] = torch.from_numpy(ids)
        up_b, gate_b = up_b[idx], None if gate_b is None else gate_b[idx]
    w = FFNWeights(parts["up"], parts["down"], parts.get("gate"), up_b, gate_b)

    def drop_padding(h: torch.Tensor) -> torch.Tensor:
        h[:, c:] = 0
        return h

    return ffn_forward(x, w, act, drop_padding)
