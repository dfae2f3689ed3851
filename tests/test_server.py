"""Serving over ZeroMQ: the client library against a real server on real sockets, in-process
and as a `streamer serve` process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import anyio
import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from protocol.codec import decode, encode
from protocol.messages import Error, Generate, Token
from protocol.sockets import SocketError
from streamer.engine import dense_engine
from streamer.generate import Generation, SamplingParams
from streamer.services.client import Client, ClientError, generate_sync
from streamer.services.server import Server, ServerSettings
from streamer.sources import HFSource
from tests.helpers import collect


@pytest.fixture
def served(hf_model, tmp_path):
    """(start, expected): start() serves a random Llama on an ipc endpoint in this event loop;
    expected(ids, n, seed) is what the single-process engine generates."""
    source = HFSource(hf_model("llama"))
    tokenizer = source.tokenizer().build()
    endpoint = f"ipc://{tmp_path}/run/front.sock"

    def expected(prompt_ids, n, seed=0, temperature=0.0):
        engine = dense_engine(source, torch.float32, 128)
        params = SamplingParams(max_tokens=n, temperature=temperature, seed=seed)
        return Generation(engine, prompt_ids, params).run()

    async def start(tg):
        engine = dense_engine(source, torch.float32, 128)
        server = Server(engine, tokenizer, ServerSettings(endpoint), stop_ids=())
        await tg.start(server.serve)
        return server

    return endpoint, start, expected


@contextlib.contextmanager
def raw_dealer(endpoint: str):
    """A bare DEALER socket connected to the server, for frames the client library never sends."""
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(endpoint)
    try:
        yield raw
    finally:
        raw.close(linger=0)
        ctx.term()


@pytest.mark.asyncio
async def test_client_gets_the_single_process_tokens(served):
    endpoint, start, expected = served
    async with anyio.create_task_group() as tg:
        await start(tg)
        async with Client(endpoint, timeout=30) as client:
            assert client.welcome.vocab_size == 320
            done = await collect(
                client, prompt_ids=[5, 17, 42], max_tokens=10, temperature=0, ignore_eos=True
            )
            assert done.token_ids == expected([5, 17, 42], 10)
            assert done.summary["generated_tokens"] == 10 and done.summary["ms_per_token"] > 0
            done = await collect(client, prompt="the quick brown fox", max_tokens=4, temperature=0)
            assert len(done.token_ids) == 4  # this server never stops early (stop_ids=())
            assert done.summary["stop_reason"] == "length"
        tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_eight_clients_three_requests_each(served):
    endpoint, start, expected = served
    want = {
        (c, r): expected([c + 3, r + 7], 6, seed=c * 10 + r, temperature=1.0)
        for c in range(8)
        for r in range(3)
    }
    got = {}

    async def one_client(c):
        async with Client(endpoint, timeout=60) as client:
            for r in range(3):
                done = await collect(
                    client,
                    prompt_ids=[c + 3, r + 7],
                    max_tokens=6,
                    temperature=1.0,
                    seed=c * 10 + r,
                    ignore_eos=True,
                )
                got[(c, r)] = done.token_ids

    async with anyio.create_task_group() as tg:
        await start(tg)
        async with anyio.create_task_group() as clients:
            for c in range(8):
                clients.start_soon(one_client, c)
        tg.cancel_scope.cancel()
    assert got == want


@pytest.mark.asyncio
async def test_cancel_stops_the_request_server_side(served):
    endpoint, start, _ = served
    async with anyio.create_task_group() as tg:
        server = await start(tg)
        async with Client(endpoint, timeout=30) as client:
            seen = 0
            # 2000 tokens would keep the server busy for seconds; leaving after 2 cancels it.
            async for _ in client.generate(prompt_ids=[1, 2], max_tokens=2000, ignore_eos=True):
                seen += 1
                if seen == 2:
                    break
            with anyio.fail_after(20):
                while server.counts["cancelled"] == 0:
                    await anyio.sleep(0.05)
            done = await collect(
                client, prompt_ids=[3], max_tokens=3, temperature=0, ignore_eos=True
            )
            assert len(done.token_ids) == 3
            assert server.jobs == {} and server.counts["done"] == 1
        tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_malformed_requests_get_errors_and_the_server_keeps_serving(served):
    endpoint, start, expected = served
    async with anyio.create_task_group() as tg:
        await start(tg)
        with raw_dealer(endpoint) as raw:
            for frames, code, rid in (
                ([b"nonsense", b"\x80"], "bad_request", ""),
                (encode(Generate("r9", prompt_ids=[1, 10**6])), "bad_request", "r9"),
                (encode(Token("r1", 0, 1)), "bad_request", "r1"),
            ):
                await raw.send_multipart(frames)
                with anyio.fail_after(10):
                    reply = decode(await raw.recv_multipart())
                assert isinstance(reply, Error) and reply.code == code
                assert reply.request_id == rid and reply.message
        async with Client(endpoint, timeout=30) as client:
            with pytest.raises(ClientError, match="max_tokens must be in"):
                await collect(client, prompt_ids=[1], max_tokens=10**6)
            with pytest.raises(ClientError, match="exceeds this server's context of 2048"):
                await collect(client, prompt_ids=[1] * 10, max_tokens=2045)
            done = await collect(client, prompt_ids=[1], max_tokens=2, temperature=0)
            assert done.token_ids == expected([1], 2)  # the refusals left it serving
        tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_no_server_is_a_clear_error_not_a_hang(tmp_path):
    with pytest.raises(ClientError, match="did not answer the handshake within 0.5 s"):
        async with Client(f"ipc://{tmp_path}/nobody.sock", timeout=0.5):
            pass


@pytest.mark.slow
def test_streamer_serve_end_to_end(tmp_path):
    """`streamer serve` as a process: ready line, the client's tokens equal the in-process
    `generate`'s, and SIGTERM stops it leaving no socket file."""
    endpoint = f"ipc://{tmp_path}/run/front.sock"
    cmd = [sys.executable, "-m", "streamer", "serve", "default", "--endpoint", endpoint]
    args = [
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == f"ready {endpoint}"
            local = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "streamer", "generate", "default", *args],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            remote = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "streamer", "generate", "--connect", endpoint, *args],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            assert remote["token_ids"] == local["token_ids"]
            assert remote["text"] == local["text"]
            assert remote["summary"]["generated_tokens"] == len(local["token_ids"])
            again = generate_sync(
                endpoint, prompt_ids=local["token_ids"][:3], max_tokens=2, temperature=0
            )
            n, why = again.summary["generated_tokens"], again.summary["stop_reason"]
            assert (n, why) == (2, "length") or (n >= 1 and why == "eos")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not os.path.exists(f"{tmp_path}/run/front.sock")


@pytest.mark.asyncio
async def test_an_endpoint_others_can_reach_is_refused(hf_model, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    source = HFSource(hf_model("llama"))
    engine = dense_engine(source, torch.float32, 16)
    server = Server(engine, source.tokenizer().build(), ServerSettings(f"ipc://{shared}/x"), ())
    with pytest.raises(SocketError, match="mode 0700"):
        await server.serve()
    assert not (shared / "x").exists()


# --------------------------------------------------------------------------- hostile input (#15)


@pytest.mark.asyncio
@pytest.mark.parametrize("temperature", [1e-40, 1.1e-307])
async def test_a_tiny_temperature_is_greedy(served, temperature):
    endpoint, start, expected = served
    async with anyio.create_task_group() as tg:
        await start(tg)
        async with Client(endpoint, timeout=30) as client:
            done = await collect(
                client, prompt_ids=[5, 17], max_tokens=4, temperature=temperature, ignore_eos=True
            )
            assert done.token_ids == expected([5, 17], 4)  # greedy's tokens
        tg.cancel_scope.cancel()


class PlantedBug:
    """The engine with a bug planted: a prompt that starts with token 13 raises a plain
    RuntimeError, as a bug anywhere in the engine or the sampler would."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def forward(self, tokens, cache, last_only=False):
        if int(tokens[0]) == 13 and cache.length == 0:
            raise RuntimeError("planted bug")
        return self.engine.forward(tokens, cache, last_only)


@pytest.mark.asyncio
async def test_a_bug_met_by_one_request_is_its_error_and_serving_goes_on(served, hf_model, caplog):
    endpoint, _, expected = served
    source = HFSource(hf_model("llama"))
    engine = PlantedBug(dense_engine(source, torch.float32, 128))
    server = Server(engine, source.tokenizer().build(), ServerSettings(endpoint), stop_ids=())
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        async with Client(endpoint, timeout=30) as client:
            with pytest.raises(ClientError, match=r"internal error \(RuntimeError: planted bug\)"):
                await collect(client, prompt_ids=[13, 2], max_tokens=3)
            done = await collect(
                client, prompt_ids=[5, 17], max_tokens=3, temperature=0, ignore_eos=True
            )
            assert done.token_ids == expected([5, 17], 3)
        tg.cancel_scope.cancel()
    assert server.counts["failed"] == 1
    assert "planted bug" in caplog.text and "Traceback" in caplog.text


CLIENT_THAT_DIES = """
import sys, anyio
from streamer.services.client import Client
async def main():
    async with Client(sys.argv[1], timeout=30) as c:
        async for event in c.generate(prompt_ids=[1, 2], max_tokens=2000, ignore_eos=True):
            print("token", flush=True)
            await anyio.sleep(3600)  # killed here, in the middle of its request
anyio.run(main)
"""


@pytest.mark.asyncio
async def test_a_client_killed_mid_request_has_its_request_cancelled(served):
    endpoint, start, expected = served
    async with anyio.create_task_group() as tg:
        server = await start(tg)
        proc = await anyio.open_process([sys.executable, "-c", CLIENT_THAT_DIES, endpoint])
        try:
            with anyio.fail_after(60):
                async for line in proc.stdout:
                    assert line.startswith(b"token")
                    break
        finally:
            proc.kill()
            await proc.wait()
        with anyio.fail_after(10):  # 2000 tokens would take longer than the client's death
            while server.counts["abandoned"] == 0 or server.jobs:
                await anyio.sleep(0.02)
        assert server.counts["cancelled"] == 1 and server.counts["done"] == 0
        async with Client(endpoint, timeout=30) as client:
            done = await collect(client, prompt_ids=[3], max_tokens=2, temperature=0)
            assert done.token_ids == expected([3], 2)
        tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_an_oversize_frame_drops_its_sender_and_others_are_served(served):
    """The front end's socket takes no frame bigger than the header limit: ZeroMQ drops the
    sender (no reply, nothing unpacked) and another client is answered."""
    endpoint, start, expected = served
    async with anyio.create_task_group() as tg:
        server = await start(tg)
        with raw_dealer(endpoint) as raw:
            header = msgpack.packb({"f": {"request_id": "big"}, "a": [None] * (2 << 20)})
            await raw.send_multipart([b"generate", header])
            async with Client(endpoint, timeout=30) as client:
                done = await collect(client, prompt_ids=[3], max_tokens=2, temperature=0)
                assert done.token_ids == expected([3], 2)
            assert await raw.poll(500) == 0  # no reply: the frame never reached the server
            assert server.counts["refused"] == 0
        tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_a_second_server_on_a_live_endpoint_is_refused(served):
    endpoint, start, _ = served
    async with anyio.create_task_group() as tg:
        await start(tg)
        with pytest.raises(SocketError, match="another process is serving on it"):
            await start(tg)
        async with Client(endpoint, timeout=30) as client:  # the first still serves
            assert client.welcome.vocab_size == 320
        tg.cancel_scope.cancel()


@pytest.mark.asyncio
async def test_a_conversation_stop_strings_and_sampling_filters_through_the_server(
    hf_model, tmp_path
):
    """messages render with the chat template; the reply's text ends before a stop string, the
    streamed text equals it, and the filters reach the sampler (the engine's own tokens)."""
    source = HFSource(hf_model("llama"))
    spec = source.tokenizer()
    spec.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer = spec.build()
    endpoint = f"ipc://{tmp_path}/run/front.sock"
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the quick"},
        {"role": "assistant", "content": "brown fox"},
        {"role": "user", "content": "jumps over"},
    ]
    prompt_ids = tokenizer.chat_messages(conversation)
    sampling = dict(temperature=0.9, top_k=7, min_p=0.05, repetition_penalty=1.4, seed=5)
    want = Generation(
        dense_engine(source, torch.float32, 128),
        prompt_ids,
        SamplingParams(max_tokens=12, **sampling),
    ).run()
    async with anyio.create_task_group() as tg:
        server = Server(
            dense_engine(source, torch.float32, 128),
            tokenizer,
            ServerSettings(endpoint),
            stop_ids=(),
        )
        await tg.start(server.serve)
        async with Client(endpoint, timeout=30) as client:
            done = await collect(client, messages=conversation, max_tokens=12, **sampling)
            assert done.token_ids == want
            text = tokenizer.decode(want)
            stop = text[len(text) // 2 : len(text) // 2 + 3]
            streamed = []
            async for event in client.generate(
                messages=conversation, max_tokens=12, stop=["never there", stop], **sampling
            ):
                streamed.append(event.text)
            assert event.summary["stop_reason"] == "stop"
            assert event.text == text[: text.find(stop)] == "".join(streamed[:-1])
            events = [e async for e in client.generate(prompt_ids=[5, 6], max_tokens=3, logprobs=2)]
            assert all(e.logprob < 0 and len(e.top_logprobs) == 2 for e in events[:-1])
            with pytest.raises(ClientError, match=r"messages\[0\] needs a role"):
                await collect(client, messages=[{"role": "wizard", "content": "x"}])
        tg.cancel_scope.cancel()
