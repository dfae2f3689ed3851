"""Serving generation over ZeroMQ: the front end clients talk to.

A ROUTER socket takes `hello`, `generate` and `cancel` from any number of clients (each a DEALER;
ZeroMQ's identity frame keeps their streams apart). Requests wait in a bounded queue and run one
at a time, in order, token by token on a worker thread, so the event loop keeps answering: a
`cancel` stops a queued or running request at the next token, a malformed message gets an
`error` reply naming the problem, and the server keeps serving: whatever fails while one request
is served (a bug included) is an `error` reply to that client and a logged traceback, never the
server's end. A client that goes away without cancelling (its process killed, its socket closed)
has its requests cancelled at the next token: ZeroMQ's socket monitor reports the connection that
closed, and each message's frame names the connection it came on. Each token goes back as a `token`
message, the end as `done` with the same summary as `streamer generate --json`.

The engine is anything that implements `streamer.interface.EngineLike`: the single-process engine
(`streamer.engine`, `streamer serve MODEL`) or the pipeline's compute stage behind
`workers.remote.RemoteEngine` (`streamer serve --config`); clients see the same protocol.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from protocol.codec import decode, encode, request_id_of
from protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Done,
    Error,
    Generate,
    Hello,
    Limits,
    ProtocolError,
    Token,
    Welcome,
)
from protocol.sockets import Security, Sockets
from streamer.errors import ConfigError, StreamerError
from streamer.generate import Generation, SamplingParams
from streamer.interface import EngineLike
from streamer.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)


def default_endpoint() -> str:
    """ipc://$XDG_RUNTIME_DIR/streamer/front.sock, else under /tmp/streamer-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(base) / "streamer" if base else Path(f"/tmp/streamer-{os.getuid()}")
    return f"ipc://{directory}/front.sock"


@dataclass
class Job:
    identity: bytes
    request: Generate
    cancelled: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class ServerSettings:
    endpoint: str
    security: Security | None = None
    queue_size: int = 64
    model_name: str = ""
    context: int = 2048  # most prompt + reply tokens a request may use (the KV cache's size)


@dataclass
class Bound:
    """The server's socket, bound; `close()` closes it and removes an ipc endpoint's file."""

    sockets: Sockets
    sock: zmq.asyncio.Socket
    endpoint: str

    def close(self) -> None:
        self.sockets.close()
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[len("ipc://") :]).unlink(missing_ok=True)


def bind(settings: ServerSettings) -> Bound:
    """Bind the server's endpoint. A command binds before it loads the model, so that a bad,
    busy or live endpoint is refused at once. A client's biggest frame is a header: a client
    that sends a bigger one is dropped by ZeroMQ before the frame is buffered."""
    sockets = Sockets(settings.security, asyncio=True, max_frame_bytes=Limits().max_header_bytes)
    try:
        return Bound(
            sockets, sockets.socket(zmq.ROUTER, settings.endpoint, bind=True), settings.endpoint
        )
    except BaseException:
        sockets.close()
        raise


class Server:
    """Serves one engine, which it closes when it stops. Replies end at `tokenizer.stop_ids`."""

    def __init__(
        self,
        engine: EngineLike,
        tokenizer: Tokenizer,
        settings: ServerSettings,
        stop_ids: tuple[int, ...] | None = None,
    ) -> None:
        """`stop_ids`: the ids that end a reply; None: the model's end-of-sequence ids."""
        self.engine, self.tokenizer = engine, tokenizer
        self.eos_ids = tokenizer.stop_ids(engine.cfg) if stop_ids is None else stop_ids
        self.settings = settings
        cfg = engine.cfg
        self.context = min(settings.context, cfg.max_positions)
        self.limits = Limits(
            vocab_size=cfg.vocab_size, n_layers=cfg.n_layers, max_tokens=self.context
        )
        self.jobs: dict[tuple[bytes, str], Job] = {}
        self.counts = {"done": 0, "cancelled": 0, "failed": 0, "refused": 0, "abandoned": 0}
        self.peers: dict[int, set[bytes]] = {}  # connection (file descriptor) -> client identities

    async def serve(
        self,
        *,
        bound: Bound | None = None,
        task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED,
    ):
        """Serve until cancelled, on `bound` (see `bind`) or a socket bound here."""
        try:
            bound = bound or bind(self.settings)
            sock = bound.sock
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            send, receive = anyio.create_memory_object_stream[Job](self.settings.queue_size)
            async with send, receive, anyio.create_task_group() as tg:
                tg.start_soon(self._receive, sock, send)
                tg.start_soon(self._run, sock, receive)
                tg.start_soon(self._watch_peers, sock, monitor)
                task_status.started(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        finally:
            if bound is not None:
                bound.close()
            self.engine.close()

    async def _reply(self, sock: zmq.asyncio.Socket, identity: bytes, msg) -> None:
        await sock.send_multipart([identity, *encode(msg)], copy=False)

    async def _watch_peers(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Cancel the requests of clients whose connection closed."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                for identity in self.peers.pop(event["value"], ()):
                    for (who, _), job in list(self.jobs.items()):
                        if who == identity and not job.cancelled.is_set():
                            self.counts["abandoned"] += 1
                            job.cancelled.set()
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    async def _receive(
        self, sock: zmq.asyncio.Socket, send: anyio.abc.ObjectSendStream[Job]
    ) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            self.peers.setdefault(frames[0].get(zmq.SRCFD), set()).add(identity)
            try:
                await self._handle(sock, send, identity, frames[1:])
            except Exception as e:  # a bug met by one message: that client's error, not ours
                log.exception("serving a message from client %s failed", identity.hex())
                self.counts["failed"] += 1
                await self._reply(
                    sock, identity, Error(request_id_of(frames[1:]), "failed", _internal(e))
                )

    async def _handle(
        self,
        sock: zmq.asyncio.Socket,
        send: anyio.abc.ObjectSendStream[Job],
        identity: bytes,
        frames: list[zmq.Frame],
    ) -> None:
        try:
            msg = decode(frames, self.limits, accept=("hello", "generate", "cancel"))
        except ProtocolError as e:
            self.counts["refused"] += 1
            rid = request_id_of(frames, self.limits)
            await self._reply(sock, identity, Error(rid, "bad_request", str(e)))
            return
        if isinstance(msg, Hello):
            if msg.protocol != PROTOCOL_VERSION:
                await self._reply(
                    sock,
                    identity,
                    Error(
                        "",
                        "bad_version",
                        f"this server speaks protocol {PROTOCOL_VERSION}, not {msg.protocol}",
                    ),
                )
                return
            cfg = self.engine.cfg
            await self._reply(
                sock,
                identity,
                Welcome(
                    PROTOCOL_VERSION,
                    self.settings.model_name,
                    cfg.vocab_size,
                    cfg.n_layers,
                    self.context,
                ),
            )
        elif isinstance(msg, Cancel):
            job = self.jobs.get((identity, msg.request_id))
            if job is not None:
                job.cancelled.set()
        elif isinstance(msg, Generate):
            key = (identity, msg.request_id)
            if key in self.jobs:
                await self._reply(
                    sock,
                    identity,
                    Error(msg.request_id, "bad_request", "request_id already in use"),
                )
                return
            job = Job(identity, msg)
            try:
                send.send_nowait(job)
            except anyio.WouldBlock:
                await self._reply(
                    sock,
                    identity,
                    Error(
                        msg.request_id,
                        "busy",
                        f"{self.settings.queue_size} requests are already waiting; try again later",
                    ),
                )
                return
            self.jobs[key] = job

    async def _run(
        self, sock: zmq.asyncio.Socket, receive: anyio.abc.ObjectReceiveStream[Job]
    ) -> None:
        async for job in receive:
            try:
                await self._generate(sock, job)
            except StreamerError as e:
                self.counts["failed"] += 1
                await self._reply(
                    sock, job.identity, Error(job.request.request_id, "failed", str(e))
                )
            except Exception as e:  # a bug met by one request: its error, not the server's end
                log.exception("request %r failed", job.request.request_id)
                self.counts["failed"] += 1
                await self._reply(
                    sock, job.identity, Error(job.request.request_id, "failed", _internal(e))
                )
            finally:
                self.jobs.pop((job.identity, job.request.request_id), None)

    async def _generate(self, sock: zmq.asyncio.Socket, job: Job) -> None:
        r, tok = job.request, self.tokenizer
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            await self._reply(sock, job.identity, Error(r.request_id, "cancelled", "cancelled"))
            return
        if r.prompt_ids:
            prompt_ids = list(r.prompt_ids)
        elif r.messages:
            prompt_ids = tok.chat_messages(list(r.messages))
        else:
            prompt_ids = tok.chat(r.prompt, r.system or None) if r.chat else tok.encode(r.prompt)
        if len(prompt_ids) + r.max_tokens > self.context:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({r.max_tokens}) "
                f"exceeds this server's context of {self.context} tokens"
            )
        params = SamplingParams(
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=r.seed,
            stop_ids=() if r.ignore_eos else self.eos_ids,
            top_k=r.top_k,
            min_p=r.min_p,
            repetition_penalty=r.repetition_penalty,
        )
        t0 = time.perf_counter()
        self.engine.telemetry.reset()
        run = Generation(self.engine, prompt_ids, params)
        tokens = iter(run)
        stream = TextStream(tok, r.stop)
        while True:
            token = await anyio.to_thread.run_sync(next, tokens, None)
            if token is None:
                break
            delta = stream.push(run.token_ids)
            await self._reply(
                sock, job.identity, Token(r.request_id, len(run.token_ids) - 1, token, delta)
            )
            if stream.stopped:
                run.stop_reason = "stop"
                break
            if job.cancelled.is_set():
                run.stop_reason = "cancelled"
                break
        stream.finish(run.token_ids)
        self.counts["cancelled" if run.stop_reason == "cancelled" else "done"] += 1
        summary = {
            "mode": self.engine.mode,
            **run.summary,
            **self.engine.telemetry.summary(),
            "request_ms": round((time.perf_counter() - t0) * 1e3, 3),
        }
        await self._reply(
            sock,
            job.identity,
            Done(r.request_id, run.token_ids, stream.shown, summary),
        )


def _internal(e: Exception) -> str:
    return f"internal error ({type(e).__name__}: {e}); the server logged the traceback"
