"""The flash-prefetch stage: requests in, many concurrent O_DIRECT reads straight into shared rows.

Three kinds of request arrive on one socket. `fetch` from the predictor: read these neurons'
bundles into these rows (a window cache, or the overflow rows), then tell compute
(`rows_ready`). A look-ahead `fetch` (from the layer before): read into the staging slot of
its layer; when that layer's own fetch comes, neurons already staged are copied (DRAM to DRAM)
instead of read again, and the look-ahead's reads count as this step's. `load_layer` from
compute during a prompt: read a whole layer, in large sequential reads, into a staging slot
(`layer_ready`). Requests run concurrently (a look-ahead read proceeds while a correction is
served); each one's reads go to a thread pool of `os.preadv` calls (`FlashReader`, its
`concurrency` reads in flight) through an anyio capacity limiter. With frames (stages that share
no memory), reads go to a fresh buffer that leaves as the reply's `data` frame, without a copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import numpy as np
import zmq

from protocol.messages import Fetch, LayerReady, LoadLayer, RowsReady
from streamer.ffn import bundle_reads
from streamer.flash import FlashReader, ReadStats, aligned_buffer
from streamer.layout import ConvertedModel
from streamer.window import copy_rows
from workers.stage import StageContext, StageSpec, heartbeats, receive, run_stage, send

REQUESTS_IN_FLIGHT = 2  # a look-ahead and a correction, or two prompt layers
INLINE_READS = 2  # requests of at most this many reads run on the event loop itself


@dataclass
class Staged:
    """A look-ahead's reads into a staging slot: neuron -> staging row, once `done`."""

    key: tuple[str, int, int]  # request_id, step, layer
    row_of: np.ndarray
    after: anyio.Event  # the correction compute waits on now: it reads first
    done: anyio.Event = field(default_factory=anyio.Event)
    stats: ReadStats = field(default_factory=ReadStats)


class PrefetchStage:
    def __init__(self, spec: StageSpec) -> None:
        model = ConvertedModel(spec.model_dir)
        self.spec, self.layout, self.n = spec, model.layout, model.config.d_ffn
        self.sums = model.sums  # every bundle read is checked against its checksum
        self.shm = spec.rows()
        self.frames = spec.frames
        self.reader = FlashReader(model.ffn_path, concurrency=spec.concurrency, direct=spec.direct)
        self.limiter = anyio.CapacityLimiter(REQUESTS_IN_FLIGHT)
        self.staged: list[Staged | None] = [None, None]
        self.correcting = anyio.Event()  # set when the latest correction has been served
        self.correcting.set()

    def close(self) -> None:
        self.reader.close()

    async def _read(self, reqs, stats: ReadStats) -> None:
        if len(reqs) > INLINE_READS:
            await anyio.to_thread.run_sync(self.reader.read, reqs, stats, limiter=self.limiter)
        elif reqs:  # a few reads: two thread hand-offs would cost more than the reads
            self.reader.read(reqs, stats)

    def accept(self, msg) -> object:
        """In arrival order, before any request runs: a look-ahead claims its staging slot and
        queues behind the correction before it (compute is waiting on that one; the look-ahead
        only has to be done by the next layer), so it never takes the disk from it."""
        if isinstance(msg, Fetch) and msg.lookahead:
            row_of = np.full(self.n, -1, dtype=np.int64)
            row_of[msg.neurons] = msg.rows
            key = (msg.request_id, msg.step, msg.layer)
            self.staged[msg.layer % 2] = Staged(key, row_of, self.correcting)
        elif isinstance(msg, Fetch):
            self.correcting = anyio.Event()
            return self.correcting
        return None

    async def handle(self, msg, served: anyio.Event | None = None) -> object | None:
        try:
            return await self._handle(msg)
        finally:
            if served is not None:
                served.set()

    async def _handle(self, msg) -> object | None:
        if isinstance(msg, LoadLayer):
            stats = ReadStats()
            # With frames, a buffer of its own: ZeroMQ sends it after this returns.
            dest = self._buffer(self.n) if self.frames else self.shm.stage(msg.slot)
            await self._read(
                self.reader.chunked(self.layout.layer_offsets[msg.layer], dest.view(-1)), stats
            )
            self.sums.check(msg.layer, None, dest)
            data = dest.numpy() if self.frames else np.zeros((0, 0), np.uint8)
            return LayerReady(
                msg.request_id,
                msg.layer,
                msg.slot,
                stats.bytes,
                stats.reads,
                stats.seconds * 1e3,
                data,
            )
        assert isinstance(msg, Fetch)
        rows_all = self.shm.rows
        if msg.lookahead:
            entry = self.staged[msg.layer % 2]
            assert entry is not None
            try:
                await entry.after.wait()
                reqs = bundle_reads(
                    self.layout, msg.layer, msg.neurons, rows_all, self.reader.max_read, msg.rows
                )
                await self._read(reqs, entry.stats)
            finally:
                entry.done.set()
            return None
        t0 = time.perf_counter()
        neurons, rows = np.asarray(msg.neurons), np.asarray(msg.rows)
        stats, copied, waited = ReadStats(), 0, 0.0
        out, out_rows = rows_all, rows
        if self.frames:  # the rows go to compute as one frame, in the fetch's order
            out, out_rows = self._buffer(len(neurons)), np.arange(len(neurons))
        entry = self.staged[msg.layer % 2]
        if entry is not None and entry.key != (msg.request_id, msg.step, msg.layer):
            entry = None
        have = np.zeros(len(neurons), dtype=bool) if entry is None else entry.row_of[neurons] >= 0
        # What the look-ahead missed is read at once, beside the look-ahead's reads still in
        # flight; what it staged is copied when those are done.
        reqs = bundle_reads(
            self.layout, msg.layer, neurons[~have], out, self.reader.max_read, out_rows[~have]
        )
        await self._read(reqs, stats)
        if entry is not None:
            tw = time.perf_counter()
            await entry.done.wait()
            waited = time.perf_counter() - tw
            if have.any():
                copy_rows(out, out_rows[have], rows_all, entry.row_of[neurons[have]])
                copied = int(have.sum())
            stats.bytes += entry.stats.bytes
            stats.reads += entry.stats.reads
            stats.seconds += entry.stats.seconds
        self.sums.check(msg.layer, neurons, out, out_rows)
        pstats = {
            **msg.stats,
            "copied": copied,
            "lookahead_wait_ms": waited * 1e3,
            "prefetch_ms": (time.perf_counter() - t0) * 1e3,
        }
        return RowsReady(
            msg.request_id,
            msg.step,
            msg.layer,
            msg.neurons,
            msg.rows,
            stats.bytes,
            stats.reads,
            stats.seconds * 1e3,
            msg.cached,
            pstats,
            msg.moves,
            out.numpy() if self.frames else np.zeros((0, 0), np.uint8),
            msg.take,
            msg.extra,
        )

    def _buffer(self, n_rows: int):
        """Page-aligned rows for O_DIRECT reads that leave as a frame (a new one each time:
        the last one may still be on its way)."""
        return aligned_buffer(n_rows * self.layout.stride).view(n_rows, self.layout.stride)


async def serve(spec: StageSpec) -> None:
    sc = StageContext(spec)
    stage = None
    try:
        stage = PrefetchStage(spec)
        inbox = sc.link(zmq.PULL, "prefetch", bind=True)
        compute = sc.link(zmq.PUSH, "rows", bind=False)
        health = sc.link(zmq.PUSH, "health", bind=False)
        send_work, receive_work = anyio.create_memory_object_stream[tuple](16)

        async def worker(receive) -> None:
            async with receive:
                async for msg, served in receive:
                    reply = await stage.handle(msg, served)
                    if reply is not None:
                        await send(compute, reply)

        async with anyio.create_task_group() as tg, send_work:
            tg.start_soon(heartbeats, health, spec)
            for _ in range(REQUESTS_IN_FLIGHT + 1):
                tg.start_soon(worker, receive_work.clone())
            receive_work.close()
            while True:
                msg = await receive(inbox, spec, ("fetch", "load_layer"), health)
                await send_work.send((msg, stage.accept(msg)))
    finally:
        if stage is not None:
            stage.close()
        sc.close()


def run(spec: StageSpec) -> None:
    """The prefetch process (spawn-safe)."""
    run_stage(spec, serve)
