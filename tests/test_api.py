"""The in-process Python API, `streamer.load`: sync and async generation with the client's events,
inside a running anyio task group beside other tasks, and a launched pipeline."""

from __future__ import annotations

import time

import anyio
import pytest
import torch

import streamer
from protocol.messages import Done, Token
from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.engine import dense_engine, load_engine
from streamer.errors import ConfigError
from streamer.generate import Generation, SamplingParams
from streamer.sources import HFSource

PROMPT = "the quick brown"


def greedy(engine, tokenizer, n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0)
    return Generation(engine, tokenizer.encode(PROMPT), params).run()


def test_load_and_generate_give_the_clients_events_and_the_engines_tokens(hf_model):
    directory = hf_model("llama")
    source = HFSource(directory)
    tokenizer = source.tokenizer().build()
    want = greedy(dense_engine(source, torch.float32, 64), tokenizer, 8)
    with streamer.load(directory, context=64) as llm:
        assert isinstance(llm, streamer.LLM) and llm.engine.mode == "dense"
        events = list(llm.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True))
        assert all(isinstance(e, Token) for e in events[:-1]) and isinstance(events[-1], Done)
        done = events[-1]
        assert done.token_ids == want == [e.token_id for e in events[:-1]]
        assert done.text == tokenizer.decode(want)
        assert done.text.startswith("".join(e.text for e in events[:-1]))
        assert done.summary["generated_tokens"] == 8 and done.summary["mode"] == "dense"
        # leaving the loop early ends that request; the next one runs
        for _ in llm.generate(PROMPT, max_tokens=30, ignore_eos=True):
            break
        assert llm.complete(PROMPT, max_tokens=8, temperature=0, ignore_eos=True).token_ids == want
        with pytest.raises(ConfigError, match="top_p must be in"):
            llm.complete(PROMPT, max_tokens=4, top_p=2.0)
        with pytest.raises(ConfigError, match="exceeds this server's context of 64"):
            llm.complete(PROMPT, max_tokens=62)
    with pytest.raises(ConfigError, match="closed"):
        llm.complete(PROMPT)


@pytest.mark.asyncio
async def test_agenerate_inside_a_task_group_beside_other_tasks(hf_model):
    """Two requests and a ticker in one task group: the loop keeps running while tokens are
    made (the ticker ticks), the requests take turns on the engine, each gets its own tokens."""
    directory = hf_model("llama")
    source = HFSource(directory)
    tokenizer = source.tokenizer().build()
    want = greedy(dense_engine(source, torch.float32, 64), tokenizer, 12)
    got: dict[str, list[int]] = {}
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.001)

    async def ask(name: str, temperature: float = 0.0, seed: int = 0) -> None:
        kw = dict(max_tokens=12, ignore_eos=True, temperature=temperature, seed=seed)
        events = [e async for e in llm.agenerate(PROMPT, **kw)]
        got[name] = events[-1].token_ids

    async with streamer.load(directory, context=64) as llm:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            t0 = time.perf_counter()
            async with anyio.create_task_group() as requests:
                requests.start_soon(ask, "greedy")
                requests.start_soon(ask, "sampled", 1.0, 3)
            elapsed = time.perf_counter() - t0
            tg.cancel_scope.cancel()
        # a cancelled task ends its request and frees the engine for the next
        with anyio.move_on_after(0.0):
            await ask("cancelled")
        kw = dict(max_tokens=12, temperature=0, ignore_eos=True)
        again = [e async for e in llm.agenerate(PROMPT, **kw)]
    assert (
        got["greedy"] == want
        and again[-1].token_ids[: len(want)] == want[: len(again[-1].token_ids)]
    )
    assert len(got["sampled"]) == 12 and got["sampled"] != want
    assert ticks > elapsed / 0.01  # the loop was not blocked while tokens were made


def test_load_a_pipeline_from_its_config(hf_model, tmp_path):
    out = convert(HFSource(hf_model("opt")), tmp_path / "m", "float32", progress=False).directory
    calibrate(out, CalibrationSettings(ranks="16", epochs=4, max_tokens=512), False)
    config = tmp_path / "pipeline.toml"
    config.write_text(f'shm_dir = "{tmp_path}"\ndead_after_s = 10.0\n')
    with load_engine(out, mode="all", max_len=64) as e:
        tokenizer = HFSource(hf_model("opt")).tokenizer().build()
        want = greedy(e, tokenizer, 10)
    with streamer.load(out, config=config, context=64, processes=False) as llm:
        done = llm.complete(PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
    assert done.token_ids == want and done.summary["mode"] == "pipeline"
    assert list(tmp_path.glob("streamer-*.rows")) == []  # the pipeline's shared memory is gone
