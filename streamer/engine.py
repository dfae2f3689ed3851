"""The flash engine: decode with the FFN on flash and a budgeted part of it in DRAM.

`load_engine` builds, from a converted model, the model code of `streamer.model` with a
`FlashFFN` in place of the dense FFN, sized by a DRAM budget. Modes (the paper's ablation):

- `dense`: everything in DRAM (the reference);
- `naive`: every weight read from flash for every token, nothing kept between tokens;
- `hybrid`: resident part in DRAM, every layer's whole FFN read from flash per token;
- `predictor`: only the predicted neurons read, nothing kept between tokens;
- `window`: predictor + sliding window, but each neuron's vectors read separately (one read per
  vector, as an unbundled layout would need), to isolate what bundling buys;
- `all`: predictor + window + bundled reads, adjacent bundles merged (the default);
- `oracle`: the true active set instead of the predictor (for ReLU models equal to dense).

Telemetry per step and per layer: bytes and reads from flash, neurons predicted, cache hits, newly
loaded, evicted, and time as I/O / memory management / compute (the paper's Table 3 columns).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from streamer.cpus import DEFAULT_CONCURRENCY
from streamer.errors import ConfigError, ModelFormatError
from streamer.flash import ALIGN, FlashReader, ReadStats, aligned_buffer, merge_runs
from streamer.layout import ConvertedModel, parse_dtype
from streamer.model import ACTIVATION_FNS, FFNWeights, KVCache, Transformer, ffn_forward
from streamer.predictor import Predictors
from streamer.sources import Source, load_dense
from streamer.window import WindowCache

MODES = ("dense", "naive", "hybrid", "predictor", "window", "all", "oracle")
SPARSE_MODES = ("predictor", "window", "all", "oracle")
WORKING_MEMORY = 64 << 20  # activations, logits, tokenizer state: part of the fixed overhead
ROW_BUCKET = 64  # row counts are rounded up to this (see _rows_forward)
VECTOR_BATCH = 256  # the window mode's vector reads in flight at once

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}  # bare letters: binary, as fio reads them


def rss_bytes(peak: bool = False) -> int:
    """Resident set size of this process (VmHWM, the peak, with peak=True)."""
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def parse_budget(spec: str | int | None, model_bytes: int) -> int | None:
    """'60%' (of the model's size), '2GiB', '500MB', '123456' (bytes) -> bytes; None: no cap."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, int):
        value = spec
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", spec)
        if not m or (m.group(2) != "%" and m.group(2).lower() not in _UNITS):
            raise ConfigError(
                f"--dram-budget {spec!r}: expected bytes, a size such as 2GiB or "
                "500MB, or a percentage of the model such as 60%"
            )
        number, unit = float(m.group(1)), m.group(2)
        value = (
            int(number / 100 * model_bytes) if unit == "%" else int(number * _UNITS[unit.lower()])
        )
    if value <= 0:
        raise ConfigError(f"--dram-budget must be positive, got {spec!r}")
    return value


# --------------------------------------------------------------------------- resident part


def safetensors_index(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) in the file, from its header."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: unreadable safetensors header ({e})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = (_ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return out


def load_resident(
    model: ConvertedModel, dtype: torch.dtype, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """The resident tensors, read with plain reads (no mmap, whose file pages would count in RSS
    on top of the copies), then dropped from the page cache."""
    path = model.directory / "resident.safetensors"
    index = safetensors_index(path)
    out = {}
    with path.open("rb") as f:
        for name in model.resident_names() if names is None else names:
            st_dtype, shape, start, end = index[name]
            arr = np.fromfile(f, dtype=np.uint8, count=end - start, offset=start - f.tell())
            out[name] = torch.from_numpy(arr).view(st_dtype).reshape(shape).to(dtype)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return out


class StreamedResident(Mapping):
    """The naive mode's resident part: every access reads the tensor from flash again."""

    def __init__(
        self, model: ConvertedModel, reader: FlashReader, dtype: torch.dtype, telemetry: Telemetry
    ) -> None:
        names = set(model.resident_names())
        self.index = {n: v for n, v in safetensors_index(Path(reader.path)).items() if n in names}
        self.reader, self.dtype, self.telemetry = reader, dtype, telemetry

    def __getitem__(self, name: str) -> torch.Tensor:
        st_dtype, shape, start, end = self.index[name]
        lo, hi = start // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN
        buf = aligned_buffer(hi - lo)
        self.reader.read(self.reader.chunked(lo, buf), self.telemetry.extra)
        return buf[start - lo : end - lo].view(st_dtype).reshape(shape).to(self.dtype)

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


# --------------------------------------------------------------------------- telemetry


@dataclass
class LayerStats:
    layer: int
    bytes_read: int = 0
    reads: int = 0
    predicted: int = 0
    hits: int = 0
    loaded: int = 0
    evicted: int = 0
    overflow: int = 0
    cached: int = 0
    io_ms: float = 0.0
    mem_ms: float = 0.0


class Telemetry:
    """Per step (one forward call: the prompt, or one decoded token) and per layer."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.layers: list[LayerStats] = []
        self.extra = ReadStats()  # reads outside the FFN (naive mode's resident part)
        self._t0 = 0.0

    def reset(self) -> None:
        """Forget the steps recorded so far (a server's next request)."""
        self.steps = []

    def begin(self) -> None:
        self.layers = []
        self.extra = ReadStats()
        self._t0 = time.perf_counter()

    def end(self, tokens: int) -> dict[str, Any]:
        total_ms = (time.perf_counter() - self._t0) * 1e3
        io_ms = sum(s.io_ms for s in self.layers) + self.extra.seconds * 1e3
        mem_ms = sum(s.mem_ms for s in self.layers)
        step = {
            "step": len(self.steps),
            "tokens": tokens,
            "bytes_read": sum(s.bytes_read for s in self.layers) + self.extra.bytes,
            "reads": sum(s.reads for s in self.layers) + self.extra.reads,
            **{
                k: sum(getattr(s, k) for s in self.layers)
                for k in ("predicted", "hits", "loaded", "evicted", "overflow", "cached")
            },
            "io_ms": round(io_ms, 3),
            "mem_ms": round(mem_ms, 3),
            "compute_ms": round(total_ms - io_ms - mem_ms, 3),
            "total_ms": round(total_ms, 3),
            "layers": [_rounded(vars(s)) for s in self.layers],
        }
        self.steps.append(step)
        return step

    def summary(self) -> dict[str, Any]:
        """Totals of the run, and per-token means over the decode steps (one token each)."""
        keys = (
            "bytes_read",
            "reads",
            "io_ms",
            "mem_ms",
            "compute_ms",
            "total_ms",
            "predicted",
            "hits",
            "loaded",
            "evicted",
            "overflow",
        )
        # The pipeline's steps say too how long compute waited for I/O, the predictor's and
        # prefetch's busy time, and how many rows came from look-ahead reads.
        extra = ("wait_ms", "predict_ms", "prefetch_ms", "lookahead_wait_ms", "copied")
        keys += tuple(k for k in extra if self.steps and all(k in s for s in self.steps))
        out: dict[str, Any] = {k: round(sum(s[k] for s in self.steps), 3) for k in keys}
        if self.steps:  # the prompt's step on its own: prefill streams whole layers
            out["prefill"] = {k: self.steps[0][k] for k in keys}
        decode = [s for s in self.steps if s["tokens"] == 1]
        if decode:
            out["per_token"] = {k: round(sum(s[k] for s in decode) / len(decode), 3) for k in keys}
        return out


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


# --------------------------------------------------------------------------- the FFN


class FlashFFN:
    """The FFN read from flash per the mode; implements the model's `ffn(x, layer)`."""

    def __init__(
        self,
        model: ConvertedModel,
        mode: str,
        dtype: torch.dtype,
        reader: FlashReader,
        telemetry: Telemetry,
        window: int = 4,
        capacity: int | None = None,
        predictors: Predictors | None = None,
        resident: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        cfg, lay = model.config, model.layout
        self.cfg, self.layout, self.mode, self.dtype = cfg, lay, mode, dtype
        self.reader, self.telemetry, self.predictors = reader, telemetry, predictors
        self.act = ACTIVATION_FNS[cfg.activation]
        res = resident or {}
        # The FFN math runs in the stored dtype, on the rows as read; the rest of the model in
        # `dtype`. Biases follow the rows.
        self.biases = [
            {
                k: None if (t := res.get(f"layers.{i}.ffn.{k}")) is None else t.to(lay.dtype)
                for k in ("up_bias", "gate_bias", "down_bias")
            }
            for i in range(cfg.n_layers)
        ]
        n = cfg.d_ffn
        if mode in ("naive", "hybrid"):
            self.staging = aligned_buffer(lay.layer_bytes).view(n, lay.stride)
            return
        capacity = n if capacity is None else capacity
        self.caches = [WindowCache(n, capacity, lay.stride, window) for _ in range(cfg.n_layers)]
        # One whole layer's rows, shared by the layers (they run one after another): a prompt's
        # layer read whole, and a token's neurons beyond its layer's capacity (the first rows).
        self.scratch = aligned_buffer(n * lay.stride).view(n, lay.stride)
        self.dense_prefill = True  # eval turns it off to score every token through the window
        self.fresh = [True] * cfg.n_layers
        self.activity = predictors.activity if predictors is not None else [0.0] * cfg.n_layers
        self.part_bytes = cfg.d_model * lay.dtype.itemsize
        if mode == "window":
            span = vector_span(self.part_bytes)
            self.vector_scratch = aligned_buffer(VECTOR_BATCH * span).view(VECTOR_BATCH, span)
        if mode == "oracle":
            # The true active set needs every neuron's up (and gate) vectors: a dense copy in
            # DRAM, outside the budget. Oracle mode is for testing and analysis.
            self.oracle = [model.ffn(i) for i in range(cfg.n_layers)]
        elif predictors is None:
            raise ModelFormatError(f"mode {mode!r} needs predictors: run `streamer calibrate`")

    def reset(self) -> None:
        """A new sequence: the window starts empty."""
        for c in getattr(self, "caches", []):
            c.reset()
        self.fresh = [True] * self.cfg.n_layers

    def __call__(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        # x: [T, d] -> [T, d]
        if self.mode in ("naive", "hybrid"):
            return self._whole_layer(x, layer)
        if self.fresh[layer] and self.dense_prefill:
            self.fresh[layer] = False
            return self._prefill(x, layer)
        # The window advances token by token, so a chunk is taken one row at a time.
        return torch.cat([self._sparse(x[t : t + 1], layer) for t in range(x.shape[0])])

    def _prefill(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """A sequence's first call (the prompt): no predictor. The whole layer is read in large
        sequential reads and applied densely, and the window is filled, without more reads,
        from the true active sets of the last `window` prompt tokens."""
        stats, read, cache = LayerStats(layer), ReadStats(), self.caches[layer]
        offset = self.layout.layer_offsets[layer]
        self.reader.read(self.reader.chunked(offset, self.scratch.view(-1)), read)
        out, sets = prefill_ffn(
            x.to(self.layout.dtype),
            layer_weights(self.layout, self.scratch, self.biases[layer]),
            self.act,
            self.activity[layer],
            cache.window,
        )
        t0 = time.perf_counter()
        cache.fill(sets, self.scratch)
        stats.mem_ms = (time.perf_counter() - t0) * 1e3
        stats.bytes_read, stats.reads, stats.io_ms = read.bytes, read.reads, read.seconds * 1e3
        stats.loaded, stats.cached = self.cfg.d_ffn, cache.count
        self.telemetry.layers.append(stats)
        return out.to(self.dtype)

    def _whole_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        stats = LayerStats(layer)
        read = ReadStats()
        offset = self.layout.layer_offsets[layer]
        self.reader.read(self.reader.chunked(offset, self.staging.view(-1)), read)
        stats.bytes_read, stats.reads, stats.io_ms = read.bytes, read.reads, read.seconds * 1e3
        stats.loaded = stats.predicted = self.cfg.d_ffn
        self.telemetry.layers.append(stats)
        w = layer_weights(self.layout, self.staging, self.biases[layer])
        return ffn_forward(x.to(self.layout.dtype), w, self.act).to(self.dtype)

    def _active(self, x: torch.Tensor, layer: int) -> np.ndarray:
        if self.mode != "oracle":
            return self.predictors.predict(layer, x)
        w = self.oracle[layer]
        u = F.linear(x, w.up, w.up_bias)
        h = self.act(F.linear(x, w.gate, w.gate_bias)) * u if w.gate is not None else self.act(u)
        return torch.nonzero(h[0].abs() > self.activity[layer]).flatten().numpy()

    def _bundle_requests(self, layer: int, ids: np.ndarray, rows: torch.Tensor):
        return bundle_reads(self.layout, layer, ids, rows, self.reader.max_read)

    def _read_vectors(
        self, layer: int, ids: np.ndarray, rows: torch.Tensor, read: ReadStats
    ) -> float:
        """The unbundled layout's reads: each part of each neuron on its own (aligned span)."""
        lay, pb, mem = self.layout, self.part_bytes, 0.0
        jobs = [(r, j) for r in range(len(ids)) for j in range(len(lay.parts))]
        for b in range(0, len(jobs), VECTOR_BATCH):
            batch, reqs, cuts = jobs[b : b + VECTOR_BATCH], [], []
            for slot, (r, j) in enumerate(batch):
                start = lay.offset(layer, int(ids[r])) + j * pb
                lo, hi = start // ALIGN * ALIGN, -(-(start + pb) // ALIGN) * ALIGN
                reqs.append((lo, memoryview(self.vector_scratch[slot, : hi - lo].numpy())))
                cuts.append(start - lo)
            self.reader.read(reqs, read)
            t0 = time.perf_counter()
            for slot, ((r, j), cut) in enumerate(zip(batch, cuts, strict=True)):
                rows[r, j * pb : (j + 1) * pb] = self.vector_scratch[slot, cut : cut + pb]
            mem += time.perf_counter() - t0
        return mem

    def _sparse(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        stats = LayerStats(layer)
        x = x.to(self.layout.dtype)
        active = self._active(x, layer)
        cache = self.caches[layer]
        t0 = time.perf_counter()
        if self.mode == "predictor":
            cache.reset()  # no window: every predicted neuron is read again
        plan = cache.step(active)
        mem = time.perf_counter() - t0
        read = ReadStats()
        new_rows = cache.rows[plan.start : plan.start + len(plan.load)]
        over_rows = self.scratch[: len(plan.overflow)]
        if self.mode == "window":
            mem += self._read_vectors(layer, plan.load, new_rows, read)
            mem += self._read_vectors(layer, plan.overflow, over_rows, read)
        else:
            reqs = self._bundle_requests(layer, plan.load, new_rows)
            reqs += self._bundle_requests(layer, plan.overflow, over_rows)
            if reqs:
                self.reader.read(reqs, read)
        stats.bytes_read, stats.reads = read.bytes, read.reads
        stats.io_ms, stats.mem_ms = read.seconds * 1e3, mem * 1e3
        stats.predicted, stats.hits, stats.loaded = (
            len(active),
            plan.hits,
            len(plan.load) + len(plan.overflow),
        )
        stats.evicted, stats.overflow, stats.cached = plan.evicted, len(plan.overflow), cache.count
        self.telemetry.layers.append(stats)
        # Compute on the used rows directly: every cached neuron, plus this token's overflow.
        return sparse_ffn(
            x,
            self.layout,
            self.biases[layer],
            self.act,
            (cache.rows, cache.cached),
            (self.scratch, plan.overflow),
        ).to(self.dtype)


def layer_weights(layout, records: torch.Tensor, biases: dict) -> FFNWeights:
    """A whole layer's records as FFN matrices (views), with its resident biases."""
    parts = layout.unpack(records)
    return FFNWeights(parts["up"], parts["down"], parts.get("gate"), **biases)


def bundle_reads(
    layout, layer: int, ids: np.ndarray, dest: torch.Tensor, max_read: int, rows=None
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
    x: torch.Tensor, w: FFNWeights, act, threshold: float, k: int
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """A whole layer's FFN over a prompt, x: [T, d] -> [T, d], and the true active set
    (|activation| > threshold) of each of its last k tokens, oldest first."""
    kept: list[torch.Tensor] = []

    def record(h: torch.Tensor) -> torch.Tensor:  # h: [T, n]
        kept.append(h[-k:].abs() > threshold)
        return h

    out = ffn_forward(x, w, act, record)
    return out, [torch.nonzero(row).flatten().numpy() for row in kept[0]]


def sparse_ffn(x: torch.Tensor, layout, biases: dict, act, *parts) -> torch.Tensor:
    """One token's FFN over the neurons whose rows are given, x: [1, d] -> [1, d]. Each part
    is (rows, ids): rows[:len(ids)] hold the bundles of neurons `ids` (the window's rows, the
    overflow's). The single-process engine and the pipeline's compute stage both call this,
    so that they compute the same numbers."""
    out = None
    for rows, ids in parts:
        if len(ids) or out is None:
            y = _rows_forward(x, layout, biases, act, rows, ids)
            out = y if out is None else out + y
    b = biases["down_bias"]
    return out if b is None else out + b


def _rows_forward(
    x: torch.Tensor, layout, biases: dict, act, rows: torch.Tensor, ids: np.ndarray
) -> torch.Tensor:
    """The FFN over the neurons in rows[:len(ids)], without the down bias: x [1, d] -> [1, d].

    The row count is rounded up to a multiple of ROW_BUCKET (the extra rows masked out):
    oneDNN keeps a primitive per matrix shape for 16-bit matmuls, and a new count every
    token would grow the process by hundreds of MiB."""
    c = len(ids)
    if c == 0:
        return torch.zeros_like(x)
    n = min(rows.shape[0], -(-c // ROW_BUCKET) * ROW_BUCKET)
    parts = layout.unpack(rows[:n])
    up_b, gate_b = biases["up_bias"], biases["gate_bias"]
    if up_b is not None:  # each row's own bias; the padding rows take neuron 0's
        idx = torch.zeros(n, dtype=torch.long)
        idx[:c] = torch.from_numpy(ids)
        up_b, gate_b = up_b[idx], None if gate_b is None else gate_b[idx]
    w = FFNWeights(
        up=parts["up"],
        down=parts["down"],
        gate=parts.get("gate"),
        up_bias=up_b,
        gate_bias=gate_b,
    )

    def drop_padding(h: torch.Tensor) -> torch.Tensor:
        h[:, c:] = 0
        return h

    return ffn_forward(x, w, act, drop_padding)


# --------------------------------------------------------------------------- the engine


@dataclass
class MemoryPlan:
    budget: int | None
    model_bytes: int
    resident: int
    predictors: int
    kv_cache: int
    staging: int
    cache_rows: int  # per layer
    row_bytes: int
    n_layers: int
    overhead: int  # runtime RSS at start + working memory

    @property
    def caches(self) -> int:
        return self.cache_rows * self.row_bytes * self.n_layers

    @property
    def total(self) -> int:
        return self.resident + self.predictors + self.kv_cache + self.staging + self.caches

    def describe(self) -> str:
        mib = 2**20
        budget = "none" if self.budget is None else f"{self.budget / mib:.1f} MiB"
        return (
            f"DRAM budget {budget} (model {self.model_bytes / mib:.1f} MiB): resident "
            f"{self.resident / mib:.1f} + predictors {self.predictors / mib:.1f} + KV cache "
            f"{self.kv_cache / mib:.1f} + staging/scratch {self.staging / mib:.1f} + window "
            f"caches {self.caches / mib:.1f} ({self.n_layers} x {self.cache_rows} rows of "
            f"{self.row_bytes} B) = {self.total / mib:.1f} MiB; fixed overhead "
            f"{self.overhead / mib:.1f} MiB (runtime at start + working memory)"
        )


class Engine:
    """A model ready to decode in one mode; `forward` records telemetry per step."""

    def __init__(
        self,
        model: Transformer,
        telemetry: Telemetry,
        plan: MemoryPlan,
        mode: str,
        ffn: FlashFFN | None,
        readers: list[FlashReader],
    ) -> None:
        self.model, self.telemetry, self.plan, self.mode = model, telemetry, plan, mode
        self.flash_ffn, self.readers = ffn, readers
        self.cfg, self.dtype = model.cfg, model.dtype

    def new_cache(self, max_len: int) -> KVCache:
        if self.flash_ffn is not None:
            self.flash_ffn.reset()
        return self.model.new_cache(max_len)

    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False):
        self.telemetry.begin()
        logits = self.model.forward(tokens, cache, last_only)
        self.telemetry.end(int(tokens.shape[0]))
        return logits

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dense_engine(
    source: Source,
    dtype: torch.dtype,
    max_len: int,
    budget: int | None = None,
    model_bytes: int = 0,
    overhead: int | None = None,
) -> Engine:
    """Every weight in DRAM (the reference), from any source."""
    overhead = rss_bytes() + WORKING_MEMORY if overhead is None else overhead
    cfg = source.config
    model = load_dense(source, dtype)
    ffn_bytes = sum(_nbytes(t) for w in model.ffn.layers for t in vars(w).values() if t is not None)
    plan = MemoryPlan(
        budget,
        model_bytes,
        sum(_nbytes(t) for t in model.w.values()) + ffn_bytes,
        0,
        _kv_bytes(cfg, max_len, dtype),
        0,
        0,
        0,
        cfg.n_layers,
        overhead,
    )
    return Engine(model, Telemetry(), plan, "dense", None, [])


def load_engine(
    directory: str | os.PathLike,
    mode: str = "all",
    window: int = 4,
    dram_budget: str | int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    direct: bool = True,
    dtype: str | None = None,
    max_len: int = 2048,
) -> Engine:
    """A converted model ready to decode in `mode` within `dram_budget`."""
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if window < 1:
        raise ConfigError(f"--window must be at least 1, got {window}")
    overhead = rss_bytes() + WORKING_MEMORY
    model = ConvertedModel(directory)
    cfg, lay = model.config, model.layout
    compute = parse_dtype(dtype) if dtype else (torch.float32 if mode == "dense" else lay.dtype)
    model_bytes = model.model_bytes
    budget = parse_budget(dram_budget, model_bytes)
    if mode == "dense":
        return dense_engine(model, compute, max_len, budget, model_bytes, overhead)

    predictors = None
    if mode in ("predictor", "window", "all") or (mode == "oracle" and cfg.activation != "relu"):
        # The look-ahead predictors are the pipeline's; this engine does not load them.
        predictors = Predictors.load(
            model.directory, cfg.d_model, cfg.d_ffn, cfg.n_layers, lookahead=False
        ).to(compute)
    readers = [FlashReader(model.ffn_path, concurrency=concurrency, direct=direct)]
    try:
        telemetry = Telemetry()
        if mode == "naive":
            path = model.directory / "resident.safetensors"
            readers.append(FlashReader(path, concurrency=concurrency, direct=direct))
            resident: Mapping[str, torch.Tensor] = StreamedResident(
                model, readers[1], compute, telemetry
            )
            resident_bytes = 0
        else:
            resident = load_resident(model, compute)
            resident_bytes = sum(_nbytes(t) for t in resident.values())
        kv = _kv_bytes(cfg, max_len, compute)
        pred_bytes = predictors.nbytes if predictors is not None else 0
        if mode in ("naive", "hybrid"):
            staging, rows = lay.layer_bytes, 0
        else:
            vectors = VECTOR_BATCH * vector_span(cfg.d_model * lay.dtype.itemsize)
            extra = vectors if mode == "window" else 0  # the unbundled reads' landing area
            rows, staging = _cache_rows(
                budget, resident_bytes + pred_bytes + kv + extra, cfg, lay.stride, mode
            )
            staging += extra
        plan = MemoryPlan(
            budget,
            model_bytes,
            resident_bytes,
            pred_bytes,
            kv,
            staging,
            rows,
            lay.stride,
            cfg.n_layers,
            overhead,
        )
        if budget is not None and plan.total > budget:
            raise ConfigError(
                f"--dram-budget {dram_budget} is too small for mode {mode}: {plan.describe()}"
            )
        ffn = FlashFFN(
            model,
            mode,
            compute,
            readers[0],
            telemetry,
            window,
            rows if mode in SPARSE_MODES else None,
            predictors,
            resident if mode != "naive" else _ffn_biases(model, compute),
        )
        transformer = Transformer(cfg, resident, ffn, compute)
        return Engine(transformer, telemetry, plan, mode, ffn, readers)
    except BaseException:  # the engine did not take the readers: close them
        for r in readers:
            r.close()
        raise


def _ffn_biases(model: ConvertedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Naive mode still needs the FFN biases; they are tiny, so read them once."""
    return load_resident(model, dtype, [n for n in model.resident_names() if ".ffn." in n])


def vector_span(part_bytes: int) -> int:
    """Bytes of the aligned span that holds one weight vector wherever it starts."""
    return -(-part_bytes // ALIGN) * ALIGN + ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _kv_bytes(cfg, max_len: int, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layers * cfg.n_kv_heads * max_len * cfg.head_dim * dtype.itemsize


def _cache_rows(budget: int | None, fixed: int, cfg, stride: int, mode: str) -> tuple[int, int]:
    """Rows per layer's window cache, and the shared overflow scratch, within the budget."""
    n, layers = cfg.d_ffn, cfg.n_layers
    if budget is None:
        return n, n * stride
    avail = (budget - fixed) // stride  # rows that fit
    # layers * c rows of caches + n rows of shared scratch (a prompt's whole layer) must fit.
    c = min(n, (avail - n) // layers)
    if c < 1:
        need = fixed + (n + layers) * stride
        raise ConfigError(
            f"--dram-budget {budget} B is too small for mode {mode}: the resident "
            f"part, predictors and KV cache take {fixed / 2**20:.1f} MiB and at "
            f"least {need / 2**20:.1f} MiB are needed"
        )
    return c, n * stride
