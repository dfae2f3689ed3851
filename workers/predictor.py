"""The predictor stage: which neurons each layer needs, and which of them the window lacks.

Compute sends each layer's FFN input (`ffn_input`) as soon as it exists. This stage runs that
layer's low-rank predictor, steps the layer's window books (`WindowCache` over the shared rows:
its swap-deletes move rows in shared memory, before prefetch writes new ones; with frames, the
books alone, whose row moves travel on to compute), and asks prefetch (`fetch`) to read the
missing neurons into the rows the books gave them. Then, unless the pipeline is serial, it runs
the look-ahead predictor of the next layer and asks prefetch to read those of its neurons not in
the window into a staging slot while compute is still busy with this layer: the I/O of layer l+1
overlaps the compute of layer l. After a prompt, compute sends each
layer's true active sets (`fill`); the books take them (compute writes the rows itself).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import numpy as np
import torch
import zmq

from protocol.messages import Fetch, FFNInput, Fill, Reset
from streamer.layout import ConvertedModel, parse_dtype
from streamer.predictor import load_selection
from streamer.window import WindowCache
from workers.stage import StageContext, StageSpec, heartbeats, receive, run_stage, send


class PredictorStage:
    def __init__(self, spec: StageSpec) -> None:
        model = ConvertedModel(spec.model_dir)
        cfg, lay = model.config, model.layout
        gap = spec.read_gap
        self.spec, self.shared, self.n_layers = spec, spec.shared, cfg.n_layers
        self.dtype = parse_dtype(spec.dtype) if spec.dtype else model.dtype
        self.predictors = load_selection(
            model.directory, cfg, model.manifest, lookahead=not spec.serial
        ).to(self.dtype)
        c, n = spec.shared.capacity, cfg.d_ffn
        if spec.frames:  # the books alone; compute applies each token's row moves itself
            self.caches = [
                WindowCache(n, c, lay.stride, spec.window, books_only=True, keep=True, read_gap=gap)
                for _ in range(cfg.n_layers)
            ]
        else:
            self.shm = spec.rows()
            self.caches = [
                WindowCache(
                    n,
                    c,
                    lay.stride,
                    spec.window,
                    self.shm.cache(i),
                    self.shm.ids[i],
                    keep=True,
                    read_gap=gap,
                )
                for i in range(cfg.n_layers)
            ]
        self.current = ""

    def handle(self, msg) -> Iterator[Fetch]:
        """The fetches a message makes, in the order they must go out (a generator: the
        correction leaves before the look-ahead is even computed)."""
        if isinstance(msg, Reset):
            self.current = msg.request_id
            for c in self.caches:
                c.reset()
            return
        if msg.request_id != self.current:
            return  # a sequence that has ended (or began before this stage restarted)
        if isinstance(msg, Fill):
            sets = np.split(np.asarray(msg.neurons, dtype=np.int64), np.cumsum(msg.sizes)[:-1])
            self.caches[msg.layer].fill(sets, None)
            return
        yield from self._predict(msg)

    def _predict(self, msg: FFNInput) -> Iterator[Fetch]:
        t0 = time.perf_counter()
        layer, sl = msg.layer, self.shared
        x = torch.from_numpy(np.array(msg.x)).to(self.dtype)  # [1, d]
        active = self.predictors.predict(layer, x)
        t1 = time.perf_counter()
        cache = self.caches[layer]
        plan = cache.step(active)
        t2 = time.perf_counter()
        neurons = np.concatenate([plan.load, plan.overflow])
        rows = np.concatenate(
            [
                sl.cache_base(layer) + plan.start + np.arange(len(plan.load)),
                sl.scratch_base + np.arange(len(plan.overflow)),
            ]
        )
        stats = {
            "predicted": len(active),
            "hits": plan.hits,
            "loaded": len(neurons),
            "evicted": plan.evicted,
            "overflow": len(plan.overflow),
            "predict_ms": (t1 - t0) * 1e3,
            "mem_ms": (t2 - t1) * 1e3,
        }
        step, count = msg.step, cache.count
        where = cache.row_of[active]
        take = where[where >= 0]  # the token's neurons in the window, in neuron order
        yield Fetch(
            msg.request_id,
            step,
            layer,
            neurons,
            rows,
            False,
            count,
            stats,
            plan.moves,
            take,
            plan.extra,
        )
        nxt = layer + 1
        if self.spec.serial or nxt >= self.n_layers:
            return
        guess = self.predictors.predict_next(layer, x, self.spec.lookahead_p)
        if guess is not None:
            # Not in the next layer's window now: read into the staging slot of that layer.
            missing = guess[self.caches[nxt].row_of[guess] < 0]
            staged = sl.stage_base(nxt % 2) + np.arange(len(missing))
            yield Fetch(msg.request_id, step, nxt, missing, staged, lookahead=True)


async def serve(spec: StageSpec) -> None:
    sc = StageContext(spec)
    try:
        stage = PredictorStage(spec)
        inbox = sc.link(zmq.PULL, "predictor", bind=True)
        prefetch = sc.link(zmq.PUSH, "prefetch", bind=False)
        health = sc.link(zmq.PUSH, "health", bind=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeats, health, spec)
            while True:
                msg = await receive(inbox, spec, ("reset", "fill", "ffn_input"), health)
                for out in stage.handle(msg):
                    await send(prefetch, out)
    finally:
        sc.close()


def run(spec: StageSpec) -> None:
    """The predictor process (spawn-safe)."""
    run_stage(spec, serve)
