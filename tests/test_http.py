"""The OpenAI-compatible HTTP API driven by the official `openai` client: chat and completions,
whole and streamed, against the engine's own greedy tokens; errors, health, metrics, and a
client that drops its stream."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager

import anyio
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.engine import dense_engine, load_engine
from streamer.generate import Generation, SamplingParams
from streamer.services.http import HttpApi, bind_http, serve_http
from streamer.services.pipeline import serve_pipeline
from streamer.services.scheduler import Scheduler
from streamer.sources import HFSource
from tests.helpers import pipeline_config

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the quick"},
    {"role": "assistant", "content": "brown fox"},
    {"role": "user", "content": "jumps over"},
]


class Slow:
    """An engine that takes `delay` seconds more per forward: a reply long enough in time to
    drop mid-stream."""

    def __init__(self, engine, delay: float) -> None:
        self.engine, self.delay = engine, delay
        self.cfg, self.mode, self.telemetry = engine.cfg, engine.mode, engine.telemetry

    def new_cache(self, max_len):
        return self.engine.new_cache(max_len)

    def forward(self, tokens, cache, last_only=False):
        time.sleep(self.delay)
        return self.engine.forward(tokens, cache, last_only)

    def close(self):
        self.engine.close()


@pytest.fixture
def model(hf_model):
    source = HFSource(hf_model("llama"))
    spec = source.tokenizer()
    spec.chat_template = TEMPLATE
    return source, spec.build()


def greedy(source, prompt_ids, n):
    engine = dense_engine(source, torch.float32, 256)
    return Generation(engine, prompt_ids, SamplingParams(max_tokens=n, temperature=0)).run()


@asynccontextmanager
async def served(source, tokenizer, delay: float = 0.0, loaded: bool = True):
    """(api, base url, scheduler): the HTTP API on a free port, serving a dense engine."""
    sock = bind_http("127.0.0.1:0")
    port = sock.getsockname()[1]
    api = HttpApi("tiny-llama")
    engine = dense_engine(source, torch.float32, 256)
    if delay:
        engine = Slow(engine, delay)
    scheduler = Scheduler(engine, tokenizer, context=256, stop_ids=())
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(serve_http, api, sock)
            await tg.start(scheduler.run)
            if loaded:
                api.attach(scheduler)
            yield api, f"http://127.0.0.1:{port}", scheduler
            tg.cancel_scope.cancel()
    finally:
        engine.close()


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


async def get(url: str) -> tuple[int, str]:
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await anyio.to_thread.run_sync(fetch)


@pytest.mark.asyncio
async def test_chat_and_completions_whole_and_streamed_equal_the_engines_tokens(model):
    source, tok = model
    want_chat = tok.decode(greedy(source, tok.chat_messages(CHAT), 10))
    prompt = "the quick brown"
    want_text = tok.decode(greedy(source, tok.encode(prompt), 10))
    async with served(source, tok) as (_, base, _), client(base) as c:
        models = await c.models.list()
        assert [m.id for m in models.data] == ["tiny-llama"]
        r = await c.chat.completions.create(
            model="tiny-llama", messages=CHAT, max_tokens=10, temperature=0
        )
        assert r.choices[0].message.content == want_chat
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 10
        assert r.usage.prompt_tokens == len(tok.chat_messages(CHAT))
        parts, roles = [], set()
        stream = await c.chat.completions.create(
            model="tiny-llama",
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                roles.add(choice.delta.role)
        assert "".join(parts) == want_chat and "assistant" in roles
        assert usage is not None and usage.completion_tokens == 10
        r = await c.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0
        )
        assert r.choices[0].text == want_text and r.usage.total_tokens > 10
        stream = await c.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
        assert "".join([ch.choices[0].text async for ch in stream]) == want_text
        # a stop string ends the text before it
        stop = want_text[3:6]
        r = await c.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0, stop=[stop]
        )
        assert r.choices[0].text == want_text[: want_text.find(stop)]
        assert r.choices[0].finish_reason == "stop"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=10_000), "max_tokens"),
        (dict(n=2), "n"),
        (dict(model="gpt-4"), "model"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "messages"),
        (dict(extra_body={"logit_bias_magic": 1}), "logit_bias_magic"),
    ],
)
async def test_a_bad_parameter_is_a_400_with_an_openai_error_body(model, kwargs, param):
    source, tok = model
    request = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 4, **kwargs}
    async with served(source, tok) as (api, base, scheduler), client(base) as c:
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(**request)
        assert e.value.status_code == 400
        body = e.value.body
        assert body["type"] == "invalid_request_error" and param in body["message"]
        # and the server goes on serving
        r = await c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert api.requests["bad_request"] == 1 and scheduler.counts["failed"] == 0


@pytest.mark.asyncio
async def test_health_is_503_while_loading_then_200_and_metrics_count_tokens(model):
    source, tok = model
    async with served(source, tok, loaded=False) as (api, base, scheduler), client(base) as c:
        status, body = await get(base + "/health")
        assert status == 503 and json.loads(body)["status"] == "loading"
        with pytest.raises(openai.APIStatusError) as e:
            await c.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        api.attach(scheduler)
        assert (await get(base + "/health"))[0] == 200

        def metric(text: str, name: str) -> float:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name:
                        return sample.value
            raise AssertionError(f"{name} not in /metrics")

        status, before = await get(base + "/metrics")
        assert status == 200
        start = metric(before, "streamer_generated_tokens_total")
        await c.completions.create(model="tiny-llama", prompt="the", max_tokens=7)
        await c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=5)
        after = (await get(base + "/metrics"))[1]
        assert metric(after, "streamer_generated_tokens_total") == start + 12
        assert metric(after, "streamer_requests_total") >= 2
        assert metric(after, "streamer_ms_per_token") > 0
        assert metric(after, "streamer_queue_depth") == 0


@pytest.mark.asyncio
async def test_a_client_that_drops_its_stream_frees_the_server_within_2_s(model):
    source, tok = model
    async with served(source, tok, delay=0.02) as (api, base, scheduler), client(base) as c:
        stream = await c.completions.create(
            model="tiny-llama", prompt="the quick", max_tokens=200, stream=True
        )
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.close()
        t0 = time.perf_counter()
        while scheduler.running or scheduler.counts["cancelled"] == 0:
            assert time.perf_counter() - t0 < 2.0, "the server still generates for a gone client"
            await anyio.sleep(0.02)
        assert scheduler.counts["tokens"] < 200
        # and it serves the next request
        r = await c.completions.create(model="tiny-llama", prompt="the", max_tokens=3)
        assert r.usage.completion_tokens == 3


@pytest.mark.asyncio
async def test_logprobs_are_the_models_own(model):
    """logprobs of each generated token (and the likeliest alternatives) equal log_softmax of
    the dense model's logits at that position, for chat (whole and streamed) and completions."""
    source, tok = model
    prompt_ids = tok.chat_messages(CHAT)
    engine = dense_engine(source, torch.float32, 256)
    reply = greedy(source, prompt_ids, 6)
    seq = prompt_ids + reply
    logits = engine.forward(torch.tensor(seq), engine.new_cache(len(seq)))
    logp = torch.log_softmax(logits.double(), -1)[len(prompt_ids) - 1 : -1]
    want = [logp[i, t].item() for i, t in enumerate(reply)]
    best3 = [logp[i].topk(3).values.tolist() for i in range(len(reply))]
    async with served(source, tok) as (_, base, _), client(base) as c:
        kw = dict(model="tiny-llama", messages=CHAT, max_tokens=6, temperature=0)
        r = await c.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
        content = r.choices[0].logprobs.content
        assert [e.logprob for e in content] == pytest.approx(want, abs=1e-5)
        tops = [a.logprob for e in content for a in e.top_logprobs]
        assert tops == pytest.approx([v for row in best3 for v in row], abs=1e-5)
        assert [e.token for e in content] == [tok.decode([t]) for t in reply]
        stream = await c.chat.completions.create(logprobs=True, stream=True, **kw)
        streamed = [
            e.logprob
            async for chunk in stream
            for choice in chunk.choices
            if choice.logprobs
            for e in choice.logprobs.content
        ]
        assert streamed == pytest.approx(want, abs=1e-5)
        text = tok.decode(prompt_ids, skip_special_tokens=False)
        r = await c.completions.create(
            model="tiny-llama", prompt=text, max_tokens=6, temperature=0, logprobs=2
        )
        lp = r.choices[0].logprobs
        assert lp.token_logprobs == pytest.approx(want, abs=1e-5)
        assert all(len(top) <= 2 for top in lp.top_logprobs)
        with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
            await c.chat.completions.create(top_logprobs=2, **kw)


@pytest.mark.asyncio
async def test_the_pipeline_behind_the_http_api(hf_model, tmp_path):
    """`serve --config ... --http`: /health says 503 until the stages are ready, then the API
    serves the pipeline's tokens (those of the single-process engine) and its stage restarts
    count in /metrics."""
    out = convert(HFSource(hf_model("opt")), tmp_path / "m", "float32", progress=False).directory
    calibrate(out, CalibrationSettings(ranks="16", epochs=4, max_tokens=512), False)
    tokenizer = HFSource(hf_model("opt")).tokenizer().build()
    with load_engine(out, mode="all", max_len=64) as e:
        params = SamplingParams(max_tokens=6, temperature=0, stop_ids=tokenizer.stop_ids(e.cfg))
        want = tokenizer.decode(Generation(e, tokenizer.encode("the quick"), params).run())
    config = pipeline_config(tmp_path, out, dead_after_s=10.0, context=64)
    sock = bind_http("127.0.0.1:0")
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    api = HttpApi("m")
    async with anyio.create_task_group() as tg:
        await tg.start(serve_http, api, sock)
        assert (await get(base + "/health"))[0] == 503
        async with serve_pipeline(config, processes=False, api=api), client(base) as c:
            assert (await get(base + "/health"))[0] == 200
            r = await c.completions.create(
                model="m", prompt="the quick", max_tokens=6, temperature=0
            )
            assert r.choices[0].text == want
            assert r.model_extra["streamer"]["mode"] == "pipeline"
            metrics = (await get(base + "/metrics"))[1]
            assert "streamer_stage_restarts_total 0.0" in metrics
        tg.cancel_scope.cancel()
