"""The OpenAI-compatible HTTP API: a front end on the same `Scheduler` as the ZeroMQ server.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (whole, or streamed as server-sent
events with `"stream": true`), `GET /v1/models`, `GET /health` (503 while the model loads, 200
once it serves) and `GET /metrics` (Prometheus text). Built on Starlette (routing, requests,
responses), sse-starlette (the event stream, and the client's disconnect, which cancels the
generation) and prometheus-client (the exposition format); uvicorn serves it (`serve`). Bad
parameters are a 400 with OpenAI's error object, a full queue a 429.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.messages import Done, Error, Generate, Message, Token
from streamer.errors import ConfigError
from streamer.services.scheduler import Busy, Job, Scheduler

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
# OpenAI's parameters this API takes, with their types; any other is refused by name.
PARAMS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "messages": (list,),
    "prompt": (str,),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
    "repetition_penalty": (int, float),
    "seed": (int,),
    "stop": (str, list),
    "stream": (bool,),
    "stream_options": (dict,),
    "n": (int,),
    "user": (str,),
    "logprobs": (bool, int),  # chat: true/false; completions: how many alternatives
    "top_logprobs": (int,),
}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class HttpApi:
    """The app (`app`, ASGI). `scheduler` is None while the model loads: /health says 503 and
    generation routes too; `attach` makes it serve. `counts`: the pipeline launcher's counts,
    where there is one (its stage restarts go to /metrics)."""

    def __init__(self, model_name: str, counts: dict[str, int] | None = None) -> None:
        self.model_name, self.counts = model_name, counts
        self.scheduler: Scheduler | None = None
        self.created = int(time.time())
        self.requests = {"ok": 0, "bad_request": 0, "busy": 0, "failed": 0, "cancelled": 0}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/metrics", self.metrics),
                Route("/v1/models", self.models),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ]
        )

    def attach(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    # ------------------------------------------------------------------ plain routes

    async def health(self, request: Request) -> Response:
        if self.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        model = {"id": self.model_name, "object": "model", "created": self.created}
        return JSONResponse({"object": "list", "data": [{**model, "owned_by": "streamer"}]})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")

    def collect(self):
        """prometheus-client's collector protocol: the scheduler's counts at scrape time."""
        s = self.scheduler
        requests = CounterMetricFamily(
            "streamer_requests", "HTTP generation requests by outcome", labels=["outcome"]
        )
        for outcome, n in self.requests.items():
            requests.add_metric([outcome], n)
        yield requests
        totals = s.totals if s is not None else {}
        tokens = totals.get("generated_tokens", 0)
        yield CounterMetricFamily(
            "streamer_generated_tokens", "tokens generated (every front end)", value=tokens
        )
        yield CounterMetricFamily(
            "streamer_prompt_tokens",
            "prompt tokens processed",
            value=totals.get("prompt_tokens", 0),
        )
        yield CounterMetricFamily(
            "streamer_flash_read_bytes", "bytes read from flash", value=totals.get("bytes_read", 0)
        )
        decode_ms = totals.get("decode_ms", 0.0)
        yield GaugeMetricFamily(
            "streamer_ms_per_token",
            "mean decode time per generated token over the requests served",
            value=decode_ms / tokens if tokens else 0.0,
        )
        predicted = totals.get("predicted", 0)
        yield GaugeMetricFamily(
            "streamer_window_hit_rate",
            "neurons found in the DRAM window over neurons selected",
            value=totals.get("hits", 0) / predicted if predicted else 0.0,
        )
        yield GaugeMetricFamily(
            "streamer_queue_depth", "requests waiting", value=s.waiting if s else 0
        )
        yield CounterMetricFamily(
            "streamer_stage_restarts",
            "pipeline stages restarted",
            value=(self.counts or {}).get("restarts", 0),
        )

    # ------------------------------------------------------------------ generation

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        if self.scheduler is None:
            return error_response("the model is loading; try again shortly", 503)
        try:
            body = await _json_body(request)
            gen = self._request(body, chat)
            checked = self.scheduler.check(gen)
        except BadRequest as e:
            self.requests["bad_request"] += 1
            return error_response(str(e), e.status, e.param)
        except ConfigError as e:
            self.requests["bad_request"] += 1
            return error_response(str(e), 400, e.setting)
        send, receive = anyio.create_memory_object_stream[Message](float("inf"))

        async def emit(msg: Message) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await send.send(msg)  # a response that went away takes nothing more

        job = Job(gen, emit, checked=checked)
        try:
            self.scheduler.submit(job)
        except Busy as e:
            send.close()
            receive.close()
            self.requests["busy"] += 1
            return error_response(str(e), 429)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{gen.request_id}"
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = self._stream(job, send, receive, rid, chat, usage)
            return EventSourceResponse(events, ping=15)
        return await self._whole(job, send, receive, rid, chat)

    def _request(self, body: dict[str, Any], chat: bool) -> Generate:
        for name, value in body.items():
            if name not in PARAMS:
                raise BadRequest(f"parameter {name!r} is not supported by this server", name)
            if value is not None and (
                not isinstance(value, PARAMS[name])
                or (bool not in PARAMS[name] and isinstance(value, bool))
            ):
                raise BadRequest(f"parameter {name!r} has the wrong type", name)
        if body.get("n", 1) != 1:
            raise BadRequest("n must be 1: this server makes one choice per request", "n")
        model = body.get("model")
        if model not in (None, self.model_name):
            raise BadRequest(
                f"model {model!r} is not served here ({self.model_name!r} is)", "model"
            )
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or a list of strings", "stop")
        scheduler = self.scheduler
        assert scheduler is not None
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        fields = dict(
            max_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, scheduler.context // 2),
            temperature=float(_given(body, "temperature", 1.0)),
            top_p=float(_given(body, "top_p", 1.0)),
            top_k=_given(body, "top_k", 0),
            min_p=float(_given(body, "min_p", 0.0)),
            repetition_penalty=float(_given(body, "repetition_penalty", 1.0)),
            seed=_given(body, "seed", 0),
            stop=stop,
        )
        fields["logprobs"] = _logprobs(body, chat)
        if chat:
            messages = body.get("messages")
            if not messages:
                raise BadRequest("messages is required", "messages")
            fields["messages"] = messages
        else:
            if not body.get("prompt"):
                raise BadRequest("prompt is required (a string)", "prompt")
            fields["prompt"] = body["prompt"]
        return Generate(uuid.uuid4().hex, **fields)

    async def _whole(self, job: Job, send, receive, rid: str, chat: bool) -> Response:
        tokens: list[Token] = []
        async with send, receive:
            try:
                async for msg in receive:
                    if isinstance(msg, Token):
                        tokens.append(msg)
                    elif isinstance(msg, Done):
                        self.requests["ok"] += 1
                        body = self._completion(msg, rid, chat)
                        if job.request.logprobs >= 0:
                            body["choices"][0]["logprobs"] = self._logprobs(tokens, chat)
                        return JSONResponse(body)
                    if isinstance(msg, Error):
                        return self._failed(msg)
            finally:
                job.cancelled.set()  # a client gone while waiting: stop at the next token
        return error_response("the request ended without a result", 500)

    async def _stream(
        self, job: Job, send, receive, rid: str, chat: bool, usage: bool
    ) -> AsyncIterator[dict[str, str]]:
        created = int(time.time())
        finished = False
        async with send, receive:
            try:
                first, sent = True, ""
                async for msg in receive:
                    if isinstance(msg, Token):
                        logprobs = job.request.logprobs >= 0
                        if not msg.text and not first and not logprobs:
                            continue
                        delta: dict[str, Any] = {"content": msg.text}
                        if first and chat:
                            delta["role"] = "assistant"
                        first, sent = False, sent + msg.text
                        chunk = self._chunk(rid, created, chat, delta, None)
                        if logprobs:
                            chunk["choices"][0]["logprobs"] = self._logprobs([msg], chat)
                        yield _event(chunk)
                    elif isinstance(msg, Done):
                        finished = True
                        self.requests["ok"] += 1
                        if msg.text.startswith(sent) and len(msg.text) > len(sent):
                            # what the last token completed (a held-back partial character)
                            rest = {"content": msg.text[len(sent) :]}
                            yield _event(self._chunk(rid, created, chat, rest, None))
                        reason = _finish_reason(msg)
                        yield _event(self._chunk(rid, created, chat, {}, reason))
                        if usage:
                            chunk = self._chunk(rid, created, chat, None, None)
                            chunk["choices"], chunk["usage"] = [], _usage(msg)
                            yield _event(chunk)
                        yield {"data": "[DONE]"}
                        return
                    elif isinstance(msg, Error):
                        finished = True
                        self.requests["failed"] += 1
                        body = {"error": {"message": msg.message, "type": "server_error"}}
                        yield {"data": json.dumps(body)}
                        return
            finally:
                job.cancelled.set()  # stops it at the next token if the client went away
                if not finished:
                    self.requests["cancelled"] += 1

    def _logprobs(self, tokens: list[Token], chat: bool) -> dict[str, Any]:
        """OpenAI's logprobs object: chat's `content` entries, or completions' four lists."""
        assert self.scheduler is not None
        tok = self.scheduler.tokenizer

        def text(token_id: int | str) -> str:
            return tok.decode([int(token_id)], skip_special_tokens=False)

        if chat:
            return {
                "content": [
                    {
                        "token": (s := text(t.token_id)),
                        "logprob": t.logprob,
                        "bytes": list(s.encode()),
                        "top_logprobs": [
                            {"token": (a := text(i)), "logprob": lp, "bytes": list(a.encode())}
                            for i, lp in t.top_logprobs.items()
                        ],
                    }
                    for t in tokens
                ]
            }
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t.text)
        return {
            "tokens": [text(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text(i): lp for i, lp in t.top_logprobs.items()} for t in tokens],
            "text_offset": offsets,
        }

    def _failed(self, msg: Error) -> Response:
        if msg.code == "bad_request":
            self.requests["bad_request"] += 1
            return error_response(msg.message, 400)
        self.requests["cancelled" if msg.code == "cancelled" else "failed"] += 1
        return error_response(msg.message, 500)

    def _chunk(self, rid, created, chat, delta, reason) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = (delta or {}).get("content", "")
        return {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": [choice],
        }

    def _completion(self, done: Done, rid: str, chat: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(done)}
        if chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"], choice["logprobs"] = done.text, None
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": _usage(done),
            "streamer": done.summary,  # the engine's own summary, as `generate --json` gives it
        }


def _logprobs(body: dict[str, Any], chat: bool) -> int:
    """The request's logprobs as the protocol takes it: -1 (none), or how many alternatives."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if wanted is not None and not isinstance(wanted, bool):
            raise BadRequest("logprobs must be true or false", "logprobs")
        if top is not None and not wanted:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if wanted else -1
    if isinstance(wanted, bool):
        raise BadRequest("logprobs must be an integer (alternatives per token)", "logprobs")
    return -1 if wanted is None else wanted


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise BadRequest(f"the body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _given(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def _event(data: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(data, ensure_ascii=False)}


def _finish_reason(done: Done) -> str:
    return "length" if done.summary.get("stop_reason") == "length" else "stop"


def _usage(done: Done) -> dict[str, int]:
    prompt, reply = done.summary.get("prompt_tokens", 0), len(done.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": reply, "total_tokens": prompt + reply}


# --------------------------------------------------------------------------- serving


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the command handles SIGINT and SIGTERM itself
        yield


def bind_http(address: str) -> socket.socket:
    """A TCP socket bound to HOST:PORT, before the model loads: a bad or busy address is one
    error at once."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise ConfigError(f"http address {address!r}: expected HOST:PORT", "http")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        family, kind, proto, _, where = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"http address {address!r}: {e.strerror or e}", "http") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    except OSError as e:
        sock.close()
        raise ConfigError(f"http address {address!r}: {e.strerror or e}", "http") from None
    return sock


async def serve_http(
    api: HttpApi,
    sock: socket.socket,
    *,
    task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `api` on `sock` (see `bind_http`) until cancelled; open streams get 2 s to end."""
    config = uvicorn.Config(
        api.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
    )
    server = _Uvicorn(config)
    finished = anyio.Event()

    async def run() -> None:
        with anyio.CancelScope(shield=True):  # it stops when told to, below
            try:
                await server.serve(sockets=[sock])
            finally:
                finished.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while not server.started and not finished.is_set():
                await anyio.sleep(0.01)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
                with anyio.CancelScope(shield=True):
                    await finished.wait()
    finally:
        sock.close()
