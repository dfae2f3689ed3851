"""The compute stage: resident weights, the KV cache, and the FFN over the window's shared rows.

The front end sends `forward` (a prompt, or one decoded token); compute answers `logits` with the
step's telemetry. The model runs on a worker thread, with its own synchronous sockets to the
predictor and prefetch, so that the event loop keeps receiving (and heartbeating) meanwhile.

- A prompt (the first forward of a sequence) does not use the predictor: compute asks prefetch
  for whole layers (`load_layer`), one ahead unless serial, applies each densely, copies the
  neurons of its last `window` tokens' true active sets from the staged layer into the layer's
  window rows, and tells the predictor those sets (`fill`) so that its books agree.
- A decoded token: each layer's FFN input goes to the predictor (`ffn_input`) as soon as it
  exists; compute waits only for that layer's `rows_ready`, and computes on the token's own rows
  where they lie in the window (the rows the predictor named in `take`) and on the overflow rows,
  with the very functions the single-process engine uses.

The launcher pushes `dead` into the inbox when another stage dies: the running forward stops
waiting and fails, and so does every later step of that sequence.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import torch
import zmq

from protocol.codec import encode
from protocol.messages import (
    Dead,
    Error,
    FFNInput,
    Fill,
    Forward,
    LayerReady,
    LoadLayer,
    Logits,
    ProtocolError,
    Reset,
    RowsReady,
)
from streamer.errors import StreamerError
from streamer.ffn import TokenFFN, ffn_biases, load_resident, prefill_ffn
from streamer.layout import ConvertedModel, parse_dtype
from streamer.model import ACTIVATION_FNS, Transformer
from streamer.predictor import selection_activity
from streamer.telemetry import PASSED_ON, PIPELINE_STEP_KEYS
from streamer.window import WindowCache, copy_rows
from workers.stage import (
    StageContext,
    StageFailed,
    StageSpec,
    heartbeats,
    poll_message,
    receive,
    run_stage,
    send,
)

WAIT_LIMIT_S = 60.0  # a reply slower than this means a stage is wedged (health catches it first)


class PipelineFFN:
    """The model's `ffn(x, layer)` for the compute stage (runs on the model thread)."""

    def __init__(
        self,
        spec: StageSpec,
        model: ConvertedModel,
        dtype: torch.dtype,
        resident: dict[str, torch.Tensor],
    ) -> None:
        cfg, lay = model.config, model.layout
        self.spec, self.cfg, self.layout, self.dtype = spec, cfg, lay, dtype
        self.act = ACTIVATION_FNS[cfg.activation]
        self.shm = spec.rows()
        self.activity = selection_activity(model.directory)
        # The FFN math runs as in the single-process engine, on the rows where they lie.
        self.biases = ffn_biases(resident, cfg.n_layers, lay.dtype)
        self.token_ffn = TokenFFN(lay, cfg.activation, self.biases)
        # The model thread's own synchronous sockets.
        self.sockets = StageContext(spec, asyncio=False)
        self.predictor = self.sockets.link(zmq.PUSH, "predictor", False)
        self.prefetch = self.sockets.link(zmq.PUSH, "prefetch", False)
        self.inbox = self.sockets.link(zmq.PULL, "rows", True)
        self.request_id, self.step, self.prefill = "", 0, False
        self.aborted: dict[str, str] = {}  # request_id -> why
        self.early: dict[tuple, object] = {}  # replies that came before they were waited for
        self.stats: dict[str, float] = {}

    def close(self) -> None:
        self.sockets.close()

    def _send(self, sock, msg) -> None:
        sock.send_multipart(encode(msg), copy=False)

    def begin(self, request_id: str, step: int, reset: bool) -> None:
        self.request_id, self.step = request_id, step
        self.stats = dict.fromkeys(PIPELINE_STEP_KEYS, 0)
        self.early = {k: m for k, m in self.early.items() if k[1] == request_id}
        if reset:
            self.prefill = True
            self._send(self.predictor, Reset(request_id))

    def _key(self, msg) -> tuple:
        step = msg.step if isinstance(msg, RowsReady) else -1
        return (msg.KIND, msg.request_id, step, msg.layer)

    def _wait(self, kind: type, layer: int):
        """The reply of `kind` for this step and layer. Replies may come out of order (two
        prompt layers are read at once): early ones wait in `early`; stale ones are dropped."""
        t0 = time.perf_counter()
        want = (kind.KIND, self.request_id, self.step if kind is RowsReady else -1, layer)
        while True:
            why = self.aborted.get(self.request_id)
            if why:
                raise StageFailed(why)
            msg = self.early.pop(want, None)
            if msg is None:
                msg = poll_message(
                    self.inbox, self.spec.limits, ("rows_ready", "layer_ready"), "compute"
                )
                if msg is not None and msg.request_id == self.request_id and self._key(msg) != want:
                    self.early[self._key(msg)] = msg
                    msg = None
            if msg is not None and self._key(msg) == want:
                self.stats["wait_ms"] += (time.perf_counter() - t0) * 1e3
                return msg
            if time.perf_counter() - t0 > WAIT_LIMIT_S:
                raise StageFailed(f"no {kind.KIND} for layer {layer} in {WAIT_LIMIT_S:.0f} s")

    def __call__(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        # x: [T, d] -> [T, d]
        if self.prefill:
            out = self._prefill(x.to(self.layout.dtype), layer)
            if layer == self.cfg.n_layers - 1:
                self.prefill = False
            return out.to(self.dtype)
        if x.shape[0] != 1:
            raise StreamerError("after the prompt, a forward takes one token at a time")
        wire = x.to(self.layout.dtype)  # what the single-process engine's selection sees
        wire = wire.float() if wire.dtype == torch.bfloat16 else wire
        self._send(self.predictor, FFNInput(self.request_id, self.step, layer, wire.numpy()))
        msg: RowsReady = self._wait(RowsReady, layer)
        s, ps = self.stats, msg.stats
        s["bytes_read"] += msg.bytes_read
        s["reads"] += msg.reads
        s["io_ms"] += msg.io_ms
        for k in PASSED_ON:
            s[k] += ps.get(k, 0)
        s["cached"] += msg.cached
        if self.spec.frames:
            self._apply(msg)
        take = np.asarray(msg.take)
        overflow = np.asarray(msg.neurons)[np.asarray(msg.rows) >= self.spec.shared.scratch_base]
        needed = np.flatnonzero(~np.isin(overflow, msg.extra))  # not the read gaps
        out = self.token_ffn(
            x,
            layer,
            (self.shm.cache(layer), take, self.shm.ids[layer][take]),
            (self.shm.scratch, needed, overflow[needed]),
        )
        return out.to(self.dtype)

    def _apply(self, msg: RowsReady) -> None:
        """Frames: what shared memory would have done here. The predictor's row moves, then
        the new rows (and, for cache rows, their neuron ids) from the message's frame."""
        sl = self.spec.shared
        cache, ids = self.shm.cache(msg.layer), self.shm.ids[msg.layer]
        if len(msg.moves):
            to, src = msg.moves[:, 0], msg.moves[:, 1]
            copy_rows(cache, to, cache, src)
            ids[to] = ids[src]
        rows = np.asarray(msg.rows)
        if len(rows) and len(msg.data) != len(rows):
            raise StreamerError(
                "rows_ready came without its rows: prefetch shares memory and compute does not "
                "(give every host the same config)"
            )
        if len(rows):
            self.shm.rows.numpy()[rows] = msg.data
            kept = rows < sl.scratch_base
            ids[rows[kept] - sl.cache_base(msg.layer)] = np.asarray(msg.neurons)[kept]

    def _load(self, layer: int) -> None:
        self._send(self.prefetch, LoadLayer(self.request_id, layer, layer % 2))

    def _prefill(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        n_layers, serial = self.cfg.n_layers, self.spec.serial
        if layer == 0 or serial:
            self._load(layer)
            if layer == 0 and not serial and n_layers > 1:
                self._load(1)
        msg: LayerReady = self._wait(LayerReady, layer)
        self.stats["bytes_read"] += msg.bytes_read
        self.stats["reads"] += msg.reads
        self.stats["io_ms"] += msg.io_ms
        staged = self.shm.stage(layer % 2)
        if self.spec.frames:
            staged.numpy()[:] = msg.data
        out, sets = prefill_ffn(
            x,
            self.layout,
            staged,
            self.biases[layer],
            self.act,
            self.activity[layer],
            self.spec.window,
        )
        t0 = time.perf_counter()
        sl = self.spec.shared
        books = WindowCache(
            sl.n_neurons,
            sl.capacity,
            sl.stride,
            self.spec.window,
            self.shm.cache(layer),
            # with frames, compute keeps the ids itself; else the predictor's books write them
            self.shm.ids[layer] if self.spec.frames else np.empty(sl.capacity, dtype=np.int64),
            keep=True,
        )
        books.fill(sets, staged)  # the same steps as the predictor's books: the same rows
        self.stats["mem_ms"] += (time.perf_counter() - t0) * 1e3
        self.stats["cached"] += books.count
        sizes = np.array([len(s) for s in sets], dtype=np.int64)
        neurons = np.concatenate(sets).astype(np.int64) if sets else np.zeros(0, np.int64)
        self._send(self.predictor, Fill(self.request_id, layer, neurons, sizes))
        if not serial and layer + 2 < n_layers:
            self._load(layer + 2)  # the slot this layer used is free again
        return out


class ComputeStage:
    def __init__(self, spec: StageSpec) -> None:
        model = ConvertedModel(spec.model_dir)
        self.dtype = parse_dtype(spec.dtype) if spec.dtype else model.dtype
        resident = load_resident(model, self.dtype)
        self.ffn = PipelineFFN(spec, model, self.dtype, resident)
        self.model = Transformer(model.config, resident, self.ffn, self.dtype)
        self.cache = None
        self.request_id = ""
        self.next_step = 0

    def forward(self, msg: Forward) -> tuple[np.ndarray, dict[str, Any]]:
        t0 = time.perf_counter()
        if msg.reset:
            self.cache = self.model.new_cache(max(msg.max_len, len(msg.tokens)))
            self.request_id, self.next_step = msg.request_id, 0
        elif msg.request_id != self.request_id or self.cache is None:
            raise StreamerError(
                f"sequence {msg.request_id!r} is not the one in progress "
                "(a stage restarted since it began); start it again"
            )
        if msg.step != self.next_step:
            raise StreamerError(f"step {msg.step} out of order (expected {self.next_step})")
        self.ffn.begin(msg.request_id, msg.step, msg.reset)
        try:
            logits = self.model.forward(
                torch.from_numpy(np.asarray(msg.tokens, dtype=np.int64)), self.cache, True
            )
        except BaseException:
            self.request_id, self.cache = "", None  # a half-run step leaves the cache unusable
            raise
        self.next_step += 1
        stats = {k: round(v, 3) for k, v in self.ffn.stats.items()}
        stats["total_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        stats["compute_ms"] = round(stats["total_ms"] - stats["wait_ms"], 3)
        stats["tokens"] = len(msg.tokens)
        return logits[-1].numpy(), stats


async def serve(spec: StageSpec) -> None:
    sc = StageContext(spec)
    stage = None
    try:
        stage = ComputeStage(spec)
        inbox = sc.link(zmq.PULL, "compute", bind=True)
        results = sc.link(zmq.PUSH, "results", bind=False)
        health = sc.link(zmq.PUSH, "health", bind=False)
        send_work, receive_work = anyio.create_memory_object_stream[Forward](4)

        async def run_forwards() -> None:
            async with receive_work:
                async for msg in receive_work:
                    try:
                        logits, stats = await anyio.to_thread.run_sync(stage.forward, msg)
                        reply = Logits(msg.request_id, msg.step, logits, stats)
                    except (StreamerError, ProtocolError) as e:
                        reply = Error(msg.request_id, "failed", str(e))
                    await send(results, reply)

        async with anyio.create_task_group() as tg, send_work:
            tg.start_soon(heartbeats, health, spec)
            tg.start_soon(run_forwards)
            while True:
                msg = await receive(inbox, spec, ("forward", "dead"), health)
                if isinstance(msg, Dead):
                    if stage.request_id:
                        stage.ffn.aborted[stage.request_id] = f"the {msg.stage} stage died"
                    continue
                await send_work.send(msg)
    finally:
        if stage is not None:
            stage.ffn.close()
        sc.close()


def run(spec: StageSpec) -> None:
    """The compute process (spawn-safe)."""
    run_stage(spec, serve)
