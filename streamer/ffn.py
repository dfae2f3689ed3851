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

from streamer import kernels
from streamer.errors import ModelFormatError
from streamer.flash import RecordCheck, Runs
from streamer.kernels import SparseFFN
from streamer.layout import RESIDENT_FILE, BundleLayout, BundleSums, ConvertedModel, corrupt
from streamer.model import ACTIVATION_FNS, FFNWeights, ffn_forward

ROW_BUCKET = 64  # row counts are rounded up to this (see rows_forward)
NEURON_BLOCK = 512  # neurons of a block kind dequantized at a time (float32 copies of them)
BIAS_KEYS = ("up_bias", "gate_bias", "down_bias")  # TokenFFN takes the first two in order
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
    sums: BundleSums | None = None,
) -> Runs:
    """Reads of neurons `ids` (sorted) of `layer` into dest[rows[i]] (default dest[i]; dest:
    contiguous rows of the record stride): one read per run of neurons adjacent both on flash
    and in `dest`, split at max_read bytes. With `sums`, each bundle is checked as it lands
    where the compiled reader can (`Runs.check` is then set; else it is None, and the caller
    checks the rows itself)."""
    if len(ids) == 0:
        return Runs.empty()
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.arange(len(ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    stride, max_rows = layout.stride, max(max_read // layout.stride, 1)
    if not dest.is_contiguous() or dest.shape[-1] * dest.element_size() != stride:
        raise ValueError("bundle reads land in contiguous rows of the record stride")
    step = (np.diff(ids) != 1) | (np.diff(rows) != 1)
    first = np.concatenate(([0], np.flatnonzero(step) + 1))
    length = np.diff(np.append(first, len(ids)))
    if length.max() > max_rows:  # long runs in pieces of at most max_rows
        pieces = -(-length // max_rows)
        run = np.repeat(np.arange(len(first)), pieces)
        k = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        first = first[run] + k * max_rows
        length = np.minimum(max_rows, length[run] - k * max_rows)
    offsets = layout.layer_offsets[layer] + ids[first] * stride
    addresses = dest.data_ptr() + rows[first] * stride
    check = None
    if sums is not None and sums.checked_in_flight:

        def error(k: int, ids=ids) -> Exception:
            return corrupt(layer, int(ids[k]))

        want = np.ascontiguousarray(sums.sums[layer][ids])
        check = RecordCheck(want, first, stride, sums.record_bytes, error)
    return Runs(offsets, length * stride, addresses, [dest], check)


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


Part = tuple[torch.Tensor, np.ndarray, np.ndarray]  # (records, rows, ids): see TokenFFN


class TokenFFN:
    """One token's FFN over the neurons it needs, for both runtimes. A call takes parts
    (records, rows, ids): the bundle of neuron ids[i] is records[rows[i]] (the window cache's
    rows, the overflow's scratch), and computes on the records where they lie: the compiled
    kernel (`streamer.kernels`) reads each needed byte once, with no copy of the rows. Without
    the kernel (no compiler, STREAMER_KERNELS=off) the same sums run in torch, NEURON_BLOCK
    rows gathered at a time."""

    def __init__(self, layout: BundleLayout, activation: str, biases: list[Biases]) -> None:
        self.layout, self.biases = layout, biases
        self.act = ACTIVATION_FNS[activation]
        self.kernel = None
        if SparseFFN.supports(layout.part_kinds, activation) and kernels.available():
            self.kernel = SparseFFN(
                layout.parts, layout.part_spans, layout.part_kinds, layout.d_model, activation
            )
            # the kernel's per-neuron biases (up, gate): float32, indexed by neuron id
            self.kernel_biases = [
                tuple(None if b[k] is None else b[k].float().contiguous() for k in BIAS_KEYS[:2])
                for b in biases
            ]

    def __call__(self, x: torch.Tensor, layer: int, *parts: Part) -> torch.Tensor:
        """x [1, d] -> [1, d] in x's dtype."""
        biases, d = self.biases[layer], self.layout.d_model
        out = torch.zeros(d)
        if self.kernel is not None:
            xf = x.reshape(-1).float().contiguous()
            up_b, gate_b = self.kernel_biases[layer]
            part = torch.empty(d)
            for records, rows, ids in parts:
                if len(ids):
                    out += self.kernel(xf, records, rows, ids, gate_b, up_b, part)
        else:
            xs = x.to(self.layout.dtype)
            for records, rows, ids in parts:
                for i in range(0, len(ids), NEURON_BLOCK):
                    block = slice(i, i + NEURON_BLOCK)
                    out += self._gathered(xs, biases, records, rows[block], ids[block])[0].float()
        b = biases["down_bias"]
        out = out if b is None else out + b.float()
        return out.view(1, d).to(x.dtype)

    def _gathered(self, x, biases, records, rows, ids) -> torch.Tensor:
        """torch's way: the rows copied out (their count rounded up to ROW_BUCKET with copies
        of the first, masked out), then multiplied."""
        c = len(ids)
        n = -(-c // ROW_BUCKET) * ROW_BUCKET
        idx = torch.full((n,), int(rows[0]), dtype=torch.long)
        idx[:c] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        return rows_forward(x, self.layout, biases, self.act, records.index_select(0, idx), ids)


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
