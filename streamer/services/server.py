"""Serving generation over ZeroMQ: the front end clients talk to.

A ROUTER socket takes `hello`, `generate` and `cancel` from any number of clients (each a DEALER;
ZeroMQ's identity frame keeps their streams apart). Requests go to a `Scheduler`
(`streamer.services.scheduler`, which other front ends may share): they wait in a bounded queue
and run one at a time, in order, token by token on a worker thread, so the event loop keeps
answering: a `cancel` stops a queued or running request at the next token, a malformed message
gets an `error` reply naming the problem, and the server keeps serving: whatever fails while one
request is served (a bug included) is an `error` reply to that client and a logged traceback,
never the server's end. A client that goes away without cancelling (its process killed, its
socket closed) has its requests cancelled at the next token: ZeroMQ's socket monitor reports the
connection that closed, and each message's frame names the connection it came on. Each token goes
back as a `token` message, the end as `done` with the same summary as `streamer generate --json`.

The engine is anything that implements `streamer.interface.EngineLike`: the single-process engine
(`streamer.engine`, `streamer serve MODEL`) or the pipeline's compute stage behind
`workers.remote.RemoteEngine` (`streamer serve --config`); clients see the same protocol.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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
    Message,
    ProtocolError,
    Welcome,
)
from protocol.sockets import Security, Sockets
from streamer.interface import EngineLike
from streamer.services.scheduler import Busy, Job, Scheduler, internal_error
from streamer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def default_endpoint() -> str:
    """ipc://$XDG_RUNTIME_DIR/streamer/front.sock, else under /tmp/streamer-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(base) / "streamer" if base else Path(f"/tmp/streamer-{os.getuid()}")
    return f"ipc://{directory}/front.sock"


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
    """Serves one engine over ZeroMQ through a `Scheduler`: its own (made from `engine`, closed
    when the server stops) or one given, shared with other front ends (its owner runs and
    closes it). Replies end at `stop_ids` (None: the model's end-of-sequence ids)."""

    def __init__(
        self,
        engine: EngineLike | None,
        tokenizer: Tokenizer,
        settings: ServerSettings,
        stop_ids: tuple[int, ...] | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.owns_scheduler = scheduler is None
        if scheduler is None:
            assert engine is not None
            scheduler = Scheduler(
                engine, tokenizer, settings.context, settings.queue_size, stop_ids
            )
        self.scheduler, self.tokenizer, self.settings = scheduler, tokenizer, settings
        self.engine = scheduler.engine
        self.context, self.limits = scheduler.context, scheduler.limits
        self.jobs: dict[tuple[bytes, str], Job] = {}
        self.counts = scheduler.counts  # how requests ended, and what this front end refused
        self.counts.update(refused=0, abandoned=0)
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
            async with anyio.create_task_group() as tg:
                if self.owns_scheduler:
                    await tg.start(self.scheduler.run)
                tg.start_soon(self._receive, sock)
                tg.start_soon(self._watch_peers, sock, monitor)
                task_status.started(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        finally:
            if bound is not None:
                bound.close()
            if self.owns_scheduler:
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

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            self.peers.setdefault(frames[0].get(zmq.SRCFD), set()).add(identity)
            try:
                await self._handle(sock, identity, frames[1:])
            except Exception as e:  # a bug met by one message: that client's error, not ours
                log.exception("serving a message from client %s failed", identity.hex())
                self.counts["failed"] += 1
                await self._reply(
                    sock, identity, Error(request_id_of(frames[1:]), "failed", internal_error(e))
                )

    async def _handle(
        self, sock: zmq.asyncio.Socket, identity: bytes, frames: list[zmq.Frame]
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

            async def emit(reply: Message) -> None:
                if isinstance(reply, Done | Error):
                    self.jobs.pop(key, None)
                await self._reply(sock, identity, reply)

            job = Job(msg, emit)
            try:
                self.scheduler.submit(job)
            except Busy as e:
                await self._reply(sock, identity, Error(msg.request_id, "busy", str(e)))
                return
            self.jobs[key] = job
