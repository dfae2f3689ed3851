"""What every stage process shares: its spec, its sockets, the READY handshake and heartbeats.

A stage is started by the launcher (`workers.launcher`) with a `StageSpec`, by `spawn`. It
binds its input socket, connects to the others, sends `ready` to the launcher's health socket
once it has loaded what it needs, then a `heartbeat` every `heartbeat_s`. If it cannot go on it
sends `dead` once (with linger) and exits. SIGINT is ignored (a terminal's Ctrl-C reaches the
whole process group; the launcher decides), SIGTERM cancels the stage's task group, and a stage
whose launcher is gone exits by itself.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import torch
import zmq

from protocol.codec import decode, encode
from protocol.messages import Dead, Error, Heartbeat, Limits, Message, ProtocolError, Ready
from protocol.sockets import Security, Sockets
from streamer.errors import StreamerError
from workers.shm import SharedLayout, SharedRows

log = logging.getLogger("workers")


class StageFailed(StreamerError):
    """A stage died or stopped answering while a sequence needed it."""


@dataclass
class StageSpec:
    """Everything a stage process needs; picklable, made by the launcher."""

    name: str
    model_dir: Path
    endpoints: dict[str, str]  # predictor, prefetch, compute, rows, results, health
    shm_path: Path
    shared: SharedLayout  # the rows the stages share (or each keep, with frames)
    window: int
    serial: bool
    concurrency: int
    direct: bool
    threads: int
    dtype: str
    heartbeat_s: float
    limits: Limits
    security: Security = field(default_factory=Security)
    generation: int = 0
    parent_pid: int = 0
    frames: bool = False  # rows travel as frames; no shared memory (stages on several hosts)
    lookahead_p: float = 0.0  # the look-ahead reads only neurons at least this likely
    read_gap: int = 0  # the predictor's WindowCache(read_gap)
    cpus: tuple[int, ...] = ()  # the CPUs this stage runs on; () = any

    def rows(self) -> SharedRows:
        """This stage's view of the window rows: the launcher's shared memory, or its own."""
        if self.frames:
            return SharedRows.private(self.shared)
        return SharedRows(self.shm_path, self.shared)


class StageContext(Sockets):
    """A stage's ZeroMQ context and sockets, named by link; closes them all (linger 0)."""

    def __init__(self, spec: StageSpec, asyncio: bool = True) -> None:
        super().__init__(
            spec.security,
            asyncio=asyncio,
            hwm=100_000,
            max_frame_bytes=spec.limits.max_frame_bytes,
        )
        self.spec = spec

    def link(self, kind: int, name: str, bind: bool) -> zmq.Socket:
        return self.socket(kind, self.spec.endpoints[name], bind)


def poll_message(
    sock: zmq.Socket, limits: Limits | None, accept: Sequence[str], who: str, timeout_ms: int = 20
) -> Message | None:
    """The next message on a synchronous socket within `timeout_ms`, or None. One that fails to
    decode is logged as refused and dropped (it did not come from the stage expected)."""
    if not sock.poll(timeout_ms):
        return None
    try:
        return decode(sock.recv_multipart(copy=False), limits, accept=tuple(accept))
    except ProtocolError as e:
        log.warning("%s: refused a message: %s", who, e)
        return None
    except Exception:  # a decoder bug met by one message: logged, and the stage goes on
        log.exception("%s: decoding a message failed", who)
        return None


async def send(sock, msg) -> None:
    await sock.send_multipart(encode(msg), copy=False)


async def receive(sock, spec: StageSpec, accept: tuple[str, ...], health):
    """The next message of a kind in `accept`. One that fails to decode cannot be answered (the
    links are PUSH/PULL): it is logged and reported to the launcher, and the stage goes on."""
    while True:
        frames = await sock.recv_multipart(copy=False)
        try:
            return decode(frames, spec.limits, accept=accept)
        except ProtocolError as e:
            log.warning("%s: refused a message: %s", spec.name, e)
            await send(health, Error("", "bad_message", f"{spec.name}: {e}"))
        except Exception as e:  # a decoder bug met by one message: logged, the stage goes on
            log.exception("%s: decoding a message failed", spec.name)
            await send(health, Error("", "bad_message", f"{spec.name}: {type(e).__name__}"))


async def heartbeats(health, spec: StageSpec) -> None:
    """READY once, then a heartbeat every heartbeat_s; exit when the launcher is gone."""
    await send(health, Ready(spec.name, os.getpid(), spec.generation))
    seq = 0
    while True:
        await anyio.sleep(spec.heartbeat_s)
        if spec.parent_pid and os.getppid() != spec.parent_pid:
            raise SystemExit(f"{spec.name}: the launcher is gone; exiting")
        seq += 1
        await send(health, Heartbeat(spec.name, seq, time.time()))


def say_dead(spec: StageSpec, reason: str) -> None:
    """The one DEAD message of a stage that cannot go on (sent with linger, on its own socket)."""
    log.error("%s: %s", spec.name, reason)
    sockets = Sockets(spec.security)
    try:
        sock = sockets.socket(zmq.PUSH, spec.endpoints["health"], False, linger_ms=500)
        sock.send_multipart(encode(Dead(spec.name, reason[:2000])), copy=False)
        sock.close()  # with its linger: the message leaves before the process does
    except Exception as e:  # the launcher may be gone too: nothing more to do
        log.error("%s: could not report to the launcher: %s", spec.name, e)
    finally:
        sockets.close()


def run_stage(spec: StageSpec, serve) -> None:
    """A stage process's body: logging, threads, signals, then `serve(spec)` under anyio."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if spec.cpus:  # before any thread that should inherit it starts (OpenMP's, anyio's)
        try:
            os.sched_setaffinity(0, spec.cpus)
        except (AttributeError, OSError) as e:
            say_dead(spec, f"cannot run on CPUs {list(spec.cpus)} here: {e}")
            raise SystemExit(1) from None
    torch.set_num_threads(max(spec.threads, 1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: every thread's stack to stderr

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def on_sigterm() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()

            tg.start_soon(on_sigterm)
            await serve(spec)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    except SystemExit:
        raise
    except BaseException as e:
        say_dead(spec, f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None
