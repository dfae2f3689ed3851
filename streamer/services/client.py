"""The ZeroMQ client library.

    async with Client("ipc:///run/streamer/front.sock") as c:
        async for event in c.generate("Why is the sky blue?", max_tokens=64, temperature=0):
            if isinstance(event, Token):
                print(event.text, end="")
            else:  # Done, the last event: token_ids, text, summary
                print(event.summary["ms_per_token"])

One DEALER socket per client, a handshake (`hello`/`welcome`) on entering, and a reader task that
routes replies to the request they belong to, so one client can run several requests at once.
Leaving the `async for` early, or cancelling the task, sends `cancel`: the server stops the
request. A server that does not answer within `timeout` seconds raises `ClientError` instead of
hanging. `generate_sync` is the blocking wrapper for scripts.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import zmq

from protocol.codec import decode, encode
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
    Token,
    Welcome,
)
from protocol.sockets import Security, Sockets
from streamer.errors import StreamerError


class ClientError(StreamerError):
    """The server refused a request, failed, or did not answer in time."""


class Client:
    def __init__(
        self, endpoint: str, security: Security | None = None, timeout: float = 60.0
    ) -> None:
        self.endpoint, self.security, self.timeout = endpoint, security, timeout
        self.welcome: Welcome | None = None
        self._routes: dict[str, anyio.abc.ObjectSendStream[Message]] = {}

    async def __aenter__(self) -> Client:
        self._sockets = Sockets(self.security, asyncio=True)
        self._sock = self._sockets.socket(zmq.DEALER, self.endpoint, bind=False)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            send, inbox = self._route("")
            with send, inbox:
                await self._sock.send_multipart(encode(Hello(PROTOCOL_VERSION, "client")))
                self._tg.start_soon(self._read)
                reply = await self._next(inbox, "the handshake")
                self._routes.pop("")
            if not isinstance(reply, Welcome):
                raise ClientError(f"{self.endpoint} refused the handshake: {reply}")
            self.welcome = reply
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._sockets.close()

    def _route(self, request_id: str):
        send, receive = anyio.create_memory_object_stream[Message](math.inf)
        self._routes[request_id] = send
        return send, receive

    async def _read(self) -> None:
        limits = Limits()
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                msg = decode(frames, limits, accept=("welcome", "token", "done", "error"))
            except ProtocolError as e:
                msg = Error("", "bad_reply", f"the server sent a malformed message: {e}")
            request_id = getattr(msg, "request_id", "")
            route = self._routes.get(request_id) or self._routes.get("")
            if route is not None:
                route.send_nowait(msg)

    async def _next(self, inbox: anyio.abc.ObjectReceiveStream[Message], what: str) -> Message:
        try:
            with anyio.fail_after(self.timeout):
                return await inbox.receive()
        except TimeoutError:
            raise ClientError(
                f"{self.endpoint} did not answer {what} within {self.timeout} s "
                "(is the server running?)"
            ) from None

    async def generate(
        self,
        prompt: str = "",
        *,
        prompt_ids: list[int] | None = None,
        max_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int = 0,
        chat: bool = False,
        system: str = "",
        ignore_eos: bool = False,
        messages: list[dict[str, str]] | None = None,
        stop: list[str] | tuple[str, ...] = (),
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        logprobs: int = -1,
    ) -> AsyncIterator[Token | Done]:
        """Tokens as they are made, then one Done; raises ClientError on an error reply. One of
        `prompt`, `prompt_ids` and `messages` (a conversation of several turns, {"role",
        "content"} each, rendered with the model's chat template); the reply's text ends before
        the first of `stop` it would contain."""
        request = Generate(
            uuid.uuid4().hex,
            prompt,
            list(prompt_ids or []),
            max_tokens,
            temperature,
            top_p,
            seed,
            chat,
            system,
            ignore_eos,
            messages=[dict(m) for m in messages or []],
            stop=list(stop),
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            logprobs=logprobs,
        )
        send, inbox = self._route(request.request_id)
        finished = False
        try:
            await self._sock.send_multipart(encode(request), copy=False)
            while True:
                msg = await self._next(inbox, f"request {request.request_id}")
                if isinstance(msg, Error):
                    finished = True
                    raise ClientError(f"{msg.code}: {msg.message}")
                if isinstance(msg, Done):
                    finished = True
                    yield msg
                    return
                if isinstance(msg, Token):
                    yield msg
        finally:
            self._routes.pop(request.request_id, None)
            send.close()
            inbox.close()
            if not finished:  # left early or cancelled: stop it server-side
                with anyio.CancelScope(shield=True):
                    await self._sock.send_multipart(encode(Cancel(request.request_id)))


def generate_sync(
    endpoint: str,
    prompt: str = "",
    security: Security | None = None,
    timeout: float = 60.0,
    **kwargs: Any,
) -> Done:
    """Blocking: the finished request's Done (token_ids, text, summary)."""

    async def main() -> Done:
        async with Client(endpoint, security, timeout) as client:
            async for event in client.generate(prompt, **kwargs):
                if isinstance(event, Done):
                    return event
        raise ClientError("the server closed the request without a result")

    return anyio.run(main)
