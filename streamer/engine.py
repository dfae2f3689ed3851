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

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamer.cpus import DEFAULT_CONCURRENCY
from streamer.errors import ConfigError, ModelFormatError
from streamer.ffn import (
    TokenFFN,
    bundle_reads,
    ffn_biases,
    layer_forward,
    load_resident,
    prefill_ffn,
    safetensors_index,
)
from streamer.flash import ALIGN, FlashReader, ReadStats, aligned_buffer
from streamer.layout import RESIDENT_FILE, ConvertedModel, parse_dtype
from streamer.memory import (
    WORKING_MEMORY,
    MemoryPlan,
    kv_bytes,
    nbytes,
    parse_budget,
    plan_memory,
    release_freed_memory,
    rss_bytes,
)
from streamer.model import ACTIVATION_FNS, KVCache, Transformer
from streamer.predictor import Selection, load_selection
from streamer.quant import (
    RESIDENT_CHOICES,
    RESIDENT_KINDS,
    quantize_resident,
    quantize_resident_tensor,
)
from streamer.sources import Source, load_dense
from streamer.telemetry import LayerStats, Telemetry
from streamer.window import MAX_READ_GAP, READ_GAP, WindowCache

MODES = ("dense", "naive", "hybrid", "predictor", "window", "all", "oracle")
SPARSE_MODES = ("predictor", "window", "all", "oracle")
VECTOR_BATCH = 256  # the window mode's vector reads in flight at once

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- resident part


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
        predictors: Selection | None = None,
        resident: Mapping[str, torch.Tensor] | None = None,
        read_gap: int = 0,
    ) -> None:
        cfg, lay = model.config, model.layout
        self.cfg, self.layout, self.mode, self.dtype = cfg, lay, mode, dtype
        self.reader, self.telemetry, self.predictors = reader, telemetry, predictors
        self.sums = model.sums  # every bundle read is checked against its checksum
        self.act = ACTIVATION_FNS[cfg.activation]
        # The FFN math runs in the stored dtype, on the rows as read; the rest of the model in
        # `dtype`.
        self.biases = ffn_biases(resident or {}, cfg.n_layers, lay.dtype)
        self.token_ffn = TokenFFN(lay, cfg.activation, self.biases)
        n = cfg.d_ffn
        if mode in ("naive", "hybrid"):
            self.staging = aligned_buffer(lay.layer_bytes).view(n, lay.stride)
            return
        capacity = n if capacity is None else capacity
        keep = mode in ("window", "all")
        gap = read_gap if mode == "all" else 0  # the other modes are the paper's ablation
        self.caches = [
            WindowCache(n, capacity, lay.stride, window, keep=keep, read_gap=gap)
            for _ in range(cfg.n_layers)
        ]
        # One whole layer's rows, shared by the layers (they run one after another): a prompt's
        # layer read whole, and a token's neurons beyond its layer's capacity (the first rows).
        self.scratch = aligned_buffer(n * lay.stride).view(n, lay.stride)
        self.dense_prefill = True  # eval turns it off to score every token through the window
        self.fresh = [True] * cfg.n_layers
        self.activity = predictors.activity if predictors is not None else [0.0] * cfg.n_layers
        if mode == "window":
            span = vector_span(lay.record_bytes)
            self.vector_scratch = aligned_buffer(VECTOR_BATCH * span).view(VECTOR_BATCH, span)
        if mode == "oracle":
            # The true active set needs every neuron's up (and gate) vectors: a dense copy in
            # DRAM, outside the budget. Oracle mode is for testing and analysis.
            self.oracle = [model.ffn(i).to(lay.dtype) for i in range(cfg.n_layers)]
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
        self._check(stats, layer, (None, self.scratch))
        out, sets = prefill_ffn(
            x.to(self.layout.dtype),
            self.layout,
            self.scratch,
            self.biases[layer],
            self.act,
            self.activity[layer],
            cache.window,
        )
        t0 = time.perf_counter()
        cache.fill(sets, self.scratch)
        stats.mem_ms += (time.perf_counter() - t0) * 1e3
        stats.bytes_read, stats.reads, stats.io_ms = read.bytes, read.reads, read.seconds * 1e3
        stats.loaded, stats.cached = self.cfg.d_ffn, cache.count
        self.telemetry.layers.append(stats)
        return out.to(self.dtype)

    def _check(self, stats: LayerStats, layer: int, *parts: tuple[np.ndarray | None, torch.Tensor]):
        """Check the bundles just read (ids, None for a whole layer; their rows) against their
        checksums."""
        t0 = time.perf_counter()
        for ids, rows in parts:
            self.sums.check(layer, ids, rows)
        ms = (time.perf_counter() - t0) * 1e3
        stats.check_ms += ms
        stats.mem_ms += ms

    def _whole_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        stats = LayerStats(layer)
        read = ReadStats()
        offset = self.layout.layer_offsets[layer]
        self.reader.read(self.reader.chunked(offset, self.staging.view(-1)), read)
        self._check(stats, layer, (None, self.staging))
        stats.bytes_read, stats.reads, stats.io_ms = read.bytes, read.reads, read.seconds * 1e3
        stats.loaded = stats.predicted = self.cfg.d_ffn
        self.telemetry.layers.append(stats)
        x = x.to(self.layout.dtype)
        return layer_forward(x, self.layout, self.staging, self.biases[layer], self.act).to(
            self.dtype
        )

    def _active(self, x: torch.Tensor, layer: int) -> np.ndarray:
        if self.mode != "oracle":
            return self.predictors.predict(layer, x)
        w = self.oracle[layer]
        u = F.linear(x, w.up, w.up_bias)
        h = self.act(F.linear(x, w.gate, w.gate_bias)) * u if w.gate is not None else self.act(u)
        return torch.nonzero(h[0].abs() > self.activity[layer]).flatten().numpy()

    def _bundle_requests(self, layer: int, ids: np.ndarray, rows: torch.Tensor):
        """The reads of these bundles, each checked as it lands where the reader can."""
        return bundle_reads(self.layout, layer, ids, rows, self.reader.max_read, sums=self.sums)

    def _read_vectors(
        self, layer: int, ids: np.ndarray, rows: torch.Tensor, read: ReadStats
    ) -> float:
        """The unbundled layout's reads: each part of each neuron on its own (aligned span)."""
        lay, mem = self.layout, 0.0
        jobs = [(r, span) for r in range(len(ids)) for span in lay.part_spans]
        for b in range(0, len(jobs), VECTOR_BATCH):
            batch, reqs, cuts = jobs[b : b + VECTOR_BATCH], [], []
            for slot, (r, (a, e)) in enumerate(batch):
                start = lay.offset(layer, int(ids[r])) + a
                lo, hi = start // ALIGN * ALIGN, -(-(start + e - a) // ALIGN) * ALIGN
                reqs.append((lo, memoryview(self.vector_scratch[slot, : hi - lo].numpy())))
                cuts.append(start - lo)
            self.reader.read(reqs, read)
            t0 = time.perf_counter()
            for slot, ((r, (a, e)), cut) in enumerate(zip(batch, cuts, strict=True)):
                rows[r, a:e] = self.vector_scratch[slot, cut : cut + e - a]
            mem += time.perf_counter() - t0
        return mem

    def _sparse(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        stats = LayerStats(layer)
        active = self._active(x.to(self.layout.dtype), layer)
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
        stats.check_ms = read.check_seconds * 1e3  # checked as they landed: inside io_ms
        if self.mode == "window" or not self.sums.checked_in_flight:
            self._check(stats, layer, (plan.load, new_rows), (plan.overflow, over_rows))
        stats.predicted, stats.hits, stats.loaded = (
            len(active),
            plan.hits,
            len(plan.load) + len(plan.overflow),
        )
        stats.evicted, stats.overflow, stats.cached = plan.evicted, len(plan.overflow), cache.count
        self.telemetry.layers.append(stats)
        # Compute on this token's rows only, where they lie: its neurons in the window, then
        # those in the overflow's scratch (not the read gaps, `Plan.extra`: what a token
        # computes is its selection, whatever the window holds).
        where = cache.row_of[active]
        kept = where >= 0
        over = np.flatnonzero(~np.isin(plan.overflow, plan.extra))
        return self.token_ffn(
            x,
            layer,
            (cache.rows, where[kept], active[kept]),
            (self.scratch, over, plan.overflow[over]),
        ).to(self.dtype)


# --------------------------------------------------------------------------- the engine


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
    quant_resident: str | None = None,
    progress: bool = False,
) -> Engine:
    """Every weight in DRAM (the reference), from any source."""
    overhead = rss_bytes() + WORKING_MEMORY if overhead is None else overhead
    cfg = source.config
    model = load_dense(source, dtype, progress)
    if quant_resident:
        model.w = quantize_resident(dict(model.w), quant_resident)
    ffn_bytes = sum(nbytes(t) for w in model.ffn.layers for t in vars(w).values() if t is not None)
    plan = MemoryPlan(
        budget,
        model_bytes,
        resident=sum(nbytes(t) for t in model.w.values()) + ffn_bytes,
        predictors=0,
        kv_cache=kv_bytes(cfg, max_len, dtype),
        cache_rows=0,
        row_bytes=0,
        n_layers=cfg.n_layers,
        overhead=overhead,
    )
    # A converted model's FFN is on flash even when this engine reads it whole into DRAM.
    on_flash = source.layout.file_bytes if isinstance(source, ConvertedModel) else 0
    return Engine(model, Telemetry(on_flash), plan, "dense", None, [])


def load_engine(
    directory: str | os.PathLike,
    mode: str = "all",
    window: int = 4,
    dram_budget: str | int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    direct: bool = True,
    dtype: str | None = None,
    max_len: int = 2048,
    quant_resident: str | None = "auto",
    progress: bool = False,
    read_gap: int = READ_GAP,
) -> Engine:
    """A converted model ready to decode in `mode` within `dram_budget` (`progress`: a bar on
    stderr while the weights load). `quant_resident`: "q4" ("q8") keeps the resident part's
    matrices in 4 (8) bits (`streamer.quant`); "none" (or None) keeps them as stored; "auto"
    keeps them in 4 bits where a flash mode's budget is too small for them as stored, or leaves
    its windows less than the whole FFN that way (and says so)."""
    quant_resident = quant_resident or "none"
    if quant_resident not in RESIDENT_CHOICES:
        raise ConfigError(
            f"quant_resident must be one of {', '.join(RESIDENT_CHOICES)}, got {quant_resident!r}",
            "quant_resident",
        )
    if quant_resident in RESIDENT_KINDS and mode == "naive":
        raise ConfigError("mode naive reads the resident part from flash: no quant_resident")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    if window < 1:
        raise ConfigError(f"window must be at least 1, got {window}", "window")
    if not 0 <= read_gap <= MAX_READ_GAP:
        raise ConfigError(f"read_gap must be in [0, {MAX_READ_GAP}], got {read_gap}", "read_gap")
    overhead = rss_bytes() + WORKING_MEMORY
    model = ConvertedModel(directory)
    cfg, lay = model.config, model.layout
    compute = parse_dtype(dtype) if dtype else (torch.float32 if mode == "dense" else model.dtype)
    model_bytes = model.model_bytes
    budget = parse_budget(dram_budget, model_bytes)
    if mode == "dense":
        q = quant_resident if quant_resident in RESIDENT_KINDS else None
        return dense_engine(model, compute, max_len, budget, model_bytes, overhead, q, progress)

    predictors = None
    if mode in ("predictor", "window", "all") or (mode == "oracle" and cfg.activation != "relu"):
        # The look-ahead predictors are the pipeline's; this engine does not load them.
        predictors = load_selection(model.directory, cfg, model.manifest, lookahead=False)
    readers = [FlashReader(model.ffn_path, concurrency=concurrency, direct=direct)]
    try:
        telemetry = Telemetry(lay.file_bytes)
        sizes: dict[torch.dtype, int] = {}

        def predictor_bytes(compute: torch.dtype) -> int:
            if predictors is None:
                return 0
            if compute not in sizes:
                sizes[compute] = predictors.to(compute).nbytes
            return sizes[compute]

        def memory_plan(resident_bytes: int, compute: torch.dtype) -> MemoryPlan:
            """The plan with this resident part, computing in `compute`; ConfigError if it does
            not fit the budget."""
            plan = MemoryPlan(
                budget,
                model_bytes,
                resident=resident_bytes,
                predictors=predictor_bytes(compute),
                kv_cache=kv_bytes(cfg, max_len, compute),
                cache_rows=0,
                row_bytes=lay.stride,
                n_layers=cfg.n_layers,
                overhead=overhead,
                # naive and hybrid: one layer's staging; the sparse modes: one whole layer of
                # scratch (a prompt's layer, a token's overflow) beside the window caches
                scratch_rows=cfg.d_ffn,
                # the bundles' checksums; the window mode's landing area for its unbundled reads
                extra=model.sums.nbytes
                + (VECTOR_BATCH * vector_span(lay.record_bytes) if mode == "window" else 0),
            )
            if mode in SPARSE_MODES:
                plan_memory(plan, cfg.d_ffn, f"mode {mode}")
            if budget is not None and plan.total > budget:
                raise ConfigError(
                    f"dram_budget {dram_budget} is too small for mode {mode}: {plan.describe()}",
                    "dram_budget",
                )
            return plan

        if mode == "naive":
            path = model.directory / RESIDENT_FILE
            readers.append(FlashReader(path, concurrency=concurrency, direct=direct))
            resident: Mapping[str, torch.Tensor] = StreamedResident(
                model, readers[1], compute, telemetry
            )
            resident_bytes = 0
        else:
            if dtype is None and quant_resident in ("auto", "none"):
                compute = _compute_dtype(model, memory_plan)
            if quant_resident == "auto":
                quant_resident = _resident_kind_for(model, compute, memory_plan, mode)
            quantized = (
                partial(quantize_resident_tensor, kind=quant_resident)
                if quant_resident in RESIDENT_KINDS
                else None
            )
            resident = load_resident(model, compute, transform=quantized, progress=progress)
            if quantized is not None:
                release_freed_memory()  # quantizing left freed float copies in the heap
            resident_bytes = sum(nbytes(t) for t in resident.values())
        plan = memory_plan(resident_bytes, compute)
        rows = plan.cache_rows
        if predictors is not None:
            predictors = predictors.to(compute)
        ffn = FlashFFN(
            model,
            mode,
            compute,
            readers[0],
            telemetry,
            window,
            rows if mode in SPARSE_MODES else None,
            predictors,
            resident if mode != "naive" else naive_biases(model, compute),
            read_gap,
        )
        transformer = Transformer(cfg, resident, ffn, compute)
        return Engine(transformer, telemetry, plan, mode, ffn, readers)
    except BaseException:  # the engine did not take the readers: close them
        for r in readers:
            r.close()
        raise


Planner = Callable[[int, torch.dtype], MemoryPlan]


def _resident_bytes(model: ConvertedModel, dtype: torch.dtype) -> int:
    return model.manifest["resident"]["bytes"] * dtype.itemsize // model.dtype.itemsize


def _compute_dtype(model: ConvertedModel, memory_plan: Planner) -> torch.dtype:
    """float32, as dense computes, where holding the resident part in float32 costs the window
    caches nothing (a generous budget, or none): the token path then converts nothing on its
    way, and float32 decodes faster than float16 here (README, "Decisions"); else the stored
    dtype."""
    stored = model.dtype
    if stored == torch.float32:
        return stored
    try:
        wide = memory_plan(_resident_bytes(model, torch.float32), torch.float32)
        narrow = memory_plan(_resident_bytes(model, stored), stored)
    except ConfigError:
        return stored
    return torch.float32 if wide.cache_rows == narrow.cache_rows else stored


def _resident_kind_for(
    model: ConvertedModel, compute: torch.dtype, memory_plan: Planner, mode: str
) -> str:
    """ "none" where the resident part as stored fits the memory plan and (a mode with windows)
    leaves them the whole FFN; else "q4", whose smaller resident part gives the windows more
    rows: so a bigger budget never holds fewer neurons (README, "Decisions")."""
    stored = _resident_bytes(model, compute)
    try:
        plan = memory_plan(stored, compute)
    except ConfigError:
        log.info(
            "the resident part as stored (%.1f MiB) leaves no room in the DRAM budget: keeping "
            "its matrices in 4 bits (--quant-resident q4; --quant-resident none refuses instead)",
            stored / 2**20,
        )
        return "q4"
    n = model.config.d_ffn
    if mode not in SPARSE_MODES or plan.cache_rows >= n:
        return "none"
    log.info(
        "the resident part as stored (%.1f MiB) leaves the windows %d of %d neurons a layer: "
        "keeping its matrices in 4 bits so that they hold more (--quant-resident none keeps it)",
        stored / 2**20,
        plan.cache_rows,
        n,
    )
    return "q4"


def naive_biases(model: ConvertedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Naive mode still needs the FFN biases; they are tiny, so read them once."""
    return load_resident(model, dtype, [n for n in model.resident_names() if ".ffn." in n])


def vector_span(vector_bytes: int) -> int:
    """Bytes of an aligned span that holds a weight vector of at most `vector_bytes` wherever
    it starts (a record's size bounds each of its parts)."""
    return -(-vector_bytes // ALIGN) * ALIGN + ALIGN
