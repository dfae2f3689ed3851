"""The services' one engine loop: requests from any front end wait in a bounded queue and run one
at a time, in order, token by token on a worker thread, so the event loop keeps answering.

Front ends (the ZeroMQ server, the HTTP API, the in-process `streamer.api`) are written against
this and never drive an engine themselves, so that several of them can share one engine: each
submits a `Job` with the request (the protocol's `Generate`) and an `emit` coroutine that gets the
request's messages (`Token`s, then one `Done` or `Error`), and sets `cancelled` to stop it at the
next token. Whatever fails while one request runs (a bug included) is that request's `Error` and a
logged traceback, never the loop's end.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import anyio

from protocol.messages import Done, Error, Generate, Limits, Message, ProtocolError, Token
from streamer.errors import ConfigError, StreamerError
from streamer.generate import Generation, SamplingParams
from streamer.interface import EngineLike
from streamer.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)


# Summed over the requests served, from each one's summary: what `/metrics` reports.
TOTALS = ("prompt_tokens", "generated_tokens", "decode_ms", "bytes_read", "predicted", "hits")


@dataclass
class Job:
    request: Generate
    emit: Callable[[Message], Awaitable[None]]  # the request's messages, in order
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    # what `Scheduler.check` made of the request, where its front end checked it already
    checked: tuple[list[int], SamplingParams] | None = None


class Busy(StreamerError):
    """The queue is full."""


class Scheduler:
    """Runs the jobs submitted to it on one engine (`run`, in a task group); `counts` says how
    requests ended. Replies end at `stop_ids` (None: the model's end-of-sequence ids)."""

    def __init__(
        self,
        engine: EngineLike,
        tokenizer: Tokenizer,
        context: int = 2048,
        queue_size: int = 64,
        stop_ids: tuple[int, ...] | None = None,
    ) -> None:
        self.engine, self.tokenizer, self.queue_size = engine, tokenizer, queue_size
        self.eos_ids = tokenizer.stop_ids(engine.cfg) if stop_ids is None else stop_ids
        self.context = min(context, engine.cfg.max_positions)
        cfg = engine.cfg
        # what a request may hold: every front end's bound (the ZeroMQ server decodes with it)
        self.limits = Limits(
            vocab_size=cfg.vocab_size, n_layers=cfg.n_layers, max_tokens=self.context
        )
        self.counts = {"done": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self.totals = dict.fromkeys(TOTALS, 0.0)  # over finished requests (`/metrics`)
        self.waiting = 0  # jobs queued, not yet running
        self.running = False
        self._send: anyio.abc.ObjectSendStream[Job] | None = None  # while `run` runs

    def submit(self, job: Job) -> None:
        """Queue a job; Busy when `queue_size` jobs already wait."""
        if self._send is None:
            raise StreamerError("the server is not running (yet, or any more)")
        try:
            self._send.send_nowait(job)
        except anyio.WouldBlock:
            raise Busy(f"{self.queue_size} requests are already waiting; try again later") from None
        self.waiting += 1

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        """Run jobs as they come, until cancelled."""
        send, receive = anyio.create_memory_object_stream[Job](self.queue_size)
        async with send, receive:
            self._send = send
            task_status.started()
            try:
                async for job in receive:
                    await self._one(job)
            finally:
                self._send = None

    async def _one(self, job: Job) -> None:
        self.waiting -= 1
        self.running = True
        rid = job.request.request_id
        try:
            try:
                await self._generate(job)
            except ConfigError as e:  # the request's own settings
                self.counts["failed"] += 1
                await job.emit(Error(rid, "bad_request", str(e)))
            except StreamerError as e:
                self.counts["failed"] += 1
                await job.emit(Error(rid, "failed", str(e)))
            except Exception as e:  # a bug met by one request: its error, not the loop's end
                log.exception("request %r failed", rid)
                self.counts["failed"] += 1
                await job.emit(Error(rid, "failed", internal_error(e)))
        except Exception:  # its front end could not take the error either
            log.exception("request %r: its error could not be delivered", rid)
        finally:
            self.running = False

    def check(self, r: Generate) -> tuple[list[int], SamplingParams]:
        """The request's prompt ids and sampling, or a ConfigError naming what is wrong with it
        and, where one field is, that field as its `setting` (front ends call it to refuse a
        request before they answer)."""
        try:
            r.check(self.limits)  # a request made in this process was never decoded
        except ProtocolError as e:
            found = re.match(r"generate\.(\w+)", str(e))
            setting = found.group(1) if found else None
            raise ConfigError(str(e).removeprefix("generate."), setting) from None
        tok = self.tokenizer
        if r.prompt_ids:
            prompt_ids = list(r.prompt_ids)
        elif r.messages:
            prompt_ids = tok.chat_messages(list(r.messages))
        else:
            prompt_ids = tok.chat(r.prompt, r.system or None) if r.chat else tok.encode(r.prompt)
        if len(prompt_ids) + r.max_tokens > self.context:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({r.max_tokens}) "
                f"exceeds this server's context of {self.context} tokens",
                "max_tokens",
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
        return prompt_ids, params

    async def _generate(self, job: Job) -> None:
        r = job.request
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            await job.emit(Error(r.request_id, "cancelled", "cancelled"))
            return
        prompt_ids, params = job.checked or self.check(r)
        run = RequestRun(self.engine, self.tokenizer, r, prompt_ids, params)
        events = iter(run)
        while True:
            msg = await anyio.to_thread.run_sync(next, events, None)
            if msg is None:
                break
            if isinstance(msg, Token):
                self.counts["tokens"] += 1
            else:
                reason = msg.summary["stop_reason"]
                self.counts["cancelled" if reason == "cancelled" else "done"] += 1
                for k in TOTALS:
                    self.totals[k] += msg.summary.get(k) or 0
            await job.emit(msg)
            if job.cancelled.is_set():
                run.cancelled = True


class RequestRun:
    """One request on an engine, made synchronously: iterate for its `Token`s, then its `Done`
    (with the same summary as `streamer generate --json`). Setting `cancelled` ends it at the
    next token."""

    def __init__(
        self,
        engine: EngineLike,
        tokenizer: Tokenizer,
        request: Generate,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> None:
        self.engine, self.tokenizer, self.request = engine, tokenizer, request
        self.prompt_ids, self.params = prompt_ids, params
        self.cancelled = False

    def __iter__(self) -> Iterator[Token | Done]:
        r = self.request
        t0 = time.perf_counter()
        self.engine.telemetry.reset()
        run = Generation(self.engine, self.prompt_ids, self.params, top_logprobs=r.logprobs)
        stream = TextStream(self.tokenizer, r.stop)
        for token in run:
            delta = stream.push(run.token_ids)
            i = len(run.token_ids) - 1
            if r.logprobs >= 0:
                logprob, top = run.logprobs[i]
                alternatives = {str(t): lp for t, lp in top}
                yield Token(r.request_id, i, token, delta, logprob, alternatives)
            else:
                yield Token(r.request_id, i, token, delta)
            if stream.stopped:
                run.stop_reason = "stop"
                break
            if self.cancelled:
                run.stop_reason = "cancelled"
                break
        stream.finish(run.token_ids)
        summary = {
            "mode": self.engine.mode,
            **run.summary,
            **self.engine.telemetry.summary(),
            "request_ms": round((time.perf_counter() - t0) * 1e3, 3),
        }
        yield Done(r.request_id, run.token_ids, stream.shown, summary)


def internal_error(e: Exception) -> str:
    return f"internal error ({type(e).__name__}: {e}); the server logged the traceback"
