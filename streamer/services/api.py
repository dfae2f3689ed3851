"""The in-process Python API: a model loaded in this process, no server.

    import streamer

    with streamer.load("default", dram_budget="50%") as llm:
        for event in llm.generate("Why learn a second language?", chat=True):
            ...  # Token(text=...), then one Done(text, token_ids, summary)

    async for event in llm.agenerate(messages=[{"role": "user", "content": "Hi"}]):
        ...  # the same events, from inside an asyncio or anyio service

The events and the summary are the ZeroMQ client's (`protocol.messages.Token` and `Done`). One
request runs at a time on the engine; the others wait (threads and tasks alike). `config=` loads
a pipeline (`workers/`, as `streamer serve --config`) instead of the single-process engine; its
stages run in their own processes, supervised from a thread of this one.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from protocol.messages import Done, Generate, Token
from streamer.errors import ConfigError
from streamer.layout import ConvertedModel
from streamer.registry import load_tokenizer, open_source, resolve_default
from streamer.services.engines import EngineOptions, calibrate_default, open_model_engine
from streamer.services.scheduler import RequestRun, Scheduler
from workers.config import PipelineConfig
from workers.launcher import Pipeline

Event = Token | Done


def load(
    model: str | Path | None = None,
    *,
    dram_budget: str | int | None = None,
    mode: str = "auto",
    context: int = 2048,
    window: int = 4,
    dtype: str | None = None,
    quant_resident: str | None = "auto",
    config: str | Path | None = None,
    processes: bool = True,
) -> LLM:
    """A model ready to generate: `model` as the commands take it (a converted directory, a
    Hugging Face one, a .gguf file, "default"), with the engine options of `streamer generate`
    (`mode="auto"`: the flash engine where the model is converted and calibrated). `config`: a
    pipeline TOML config instead (its file's settings, `model` and `dram_budget` overriding them
    where given; processes=False runs the stages as tasks, for small models and tests)."""
    if config is not None:
        return _load_pipeline(Path(config), model, dram_budget, context, processes)
    model = model or "default"
    source = open_source(str(model))
    tokenizer = load_tokenizer(source, str(model))
    options = EngineOptions(
        mode=mode,
        window=window,
        dram_budget=dram_budget,
        dtype=dtype,
        quant_resident=quant_resident,
    )
    engine = open_model_engine(str(model), source, options, context)
    return LLM(engine, tokenizer, context)


class LLM:
    """A loaded model (see `load`). Close it (or use it as a context manager, sync or async)
    to release its files, threads and, for a pipeline, its stage processes."""

    def __init__(self, engine, tokenizer, context: int, close=None) -> None:
        # The Scheduler's checks and limits, without its queue: requests here take turns.
        self._checks = Scheduler(engine, tokenizer, context)
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, engine.cfg
        self.context = self._checks.context
        self._lock = threading.Lock()
        self._close = close or engine.close
        self.closed = False

    def _run(self, kwargs: dict[str, Any]) -> RequestRun:
        if self.closed:
            raise ConfigError("this model is closed")
        request = Generate(uuid.uuid4().hex, **kwargs)
        prompt_ids, params = self._checks.check(request)
        return RequestRun(self.engine, self.tokenizer, request, prompt_ids, params)

    def generate(self, prompt: str = "", **kwargs: Any) -> Iterator[Event]:
        """Tokens as they are made, then one Done. Takes what `Client.generate` takes: one of
        `prompt`, `prompt_ids`, `messages`; `chat`, `system`, `max_tokens`, `temperature`,
        `top_p`, `top_k`, `min_p`, `repetition_penalty`, `seed`, `stop`, `ignore_eos`. Leaving
        the loop early ends the request."""
        run = self._run({"prompt": prompt, **kwargs})
        with self._lock:
            yield from run

    def complete(self, prompt: str = "", **kwargs: Any) -> Done:
        """The finished request's Done (blocking)."""
        for event in self.generate(prompt, **kwargs):
            if isinstance(event, Done):
                return event
        raise AssertionError("a request ends with its Done")

    async def agenerate(self, prompt: str = "", **kwargs: Any) -> AsyncIterator[Event]:
        """`generate` for an event loop (asyncio or trio, through anyio): each token is made on
        a worker thread, so the loop's other tasks go on. Cancelling the task, or leaving the
        loop, ends the request at the next token."""
        run = self._run({"prompt": prompt, **kwargs})
        events, held = iter(run), False
        try:
            while not held:  # wait for the engine without blocking the loop
                with anyio.CancelScope(shield=True):
                    held = await anyio.to_thread.run_sync(self._lock.acquire, True, 0.05)
                await anyio.lowlevel.checkpoint()
            while True:
                event = await anyio.to_thread.run_sync(next, events, None)
                if event is None:
                    return
                yield event
        finally:
            run.cancelled = True
            if held:
                self._lock.release()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with self._lock:  # after the request that runs
                self._close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> LLM:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await anyio.to_thread.run_sync(self.close)


def _load_pipeline(
    path: Path, model: str | Path | None, dram_budget, context: int, processes: bool
) -> LLM:
    given: dict[str, Any] = {"context": context}
    if model is not None:
        given["model"] = str(model)
    if dram_budget is not None:
        given["dram_budget"] = str(dram_budget)
    config = PipelineConfig.from_toml(path, **given)
    if config.model == "default":
        calibrate_default(ConvertedModel(resolve_default()))
    stack = contextlib.ExitStack()
    try:
        portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
        pipeline = stack.enter_context(
            portal.wrap_async_context_manager(Pipeline.launch(config, processes))
        )
    except BaseException:
        stack.close()
        raise
    return LLM(pipeline.engine, pipeline.tokenizer, config.context, close=stack.close)
