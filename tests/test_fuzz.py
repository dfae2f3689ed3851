"""Mutated frames against live receivers: the single-process server's front end and every
socket of the pipeline's stages. Afterwards a valid request still gets the baseline tokens, and
no stage died. The default run sends FRAMES mutated messages to each; `-m soak` sends SOAK."""

from __future__ import annotations

import math
import random

import anyio
import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from protocol.codec import encode
from protocol.messages import MESSAGES, Limits
from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.engine import dense_engine, load_engine
from streamer.generate import Generation, SamplingParams
from streamer.services.client import Client
from streamer.services.pipeline import serve_pipeline
from streamer.services.server import Server, ServerSettings
from streamer.sources import HFSource
from tests.helpers import EXAMPLES, PROMPT, collect, pipeline_config

FRAMES = 2000
SOAK = 10000
STAGE_LINKS = ("predictor", "prefetch", "compute", "rows")
HOSTILE_VALUES = [
    -1,
    2**63,
    2**64 - 1,
    1e308,
    math.nan,
    "",
    "x" * 300,
    None,
    True,
    [2**63, 0],
    {"a": 1},
    b"\xff" * 9,
]
HOSTILE_DIMS = [0, 1, 2**31, 2**40 + 1, 2**63, 2**64 - 1]


def mutated(rng: random.Random, n: int) -> list[list[bytes]]:
    """n messages: a valid one of some kind, changed one to three times (a flipped byte, a cut
    header, another kind's name, a frame dropped, doubled or added, a field set to a hostile
    value, an array described with hostile dtype, dimensions or frame)."""
    seeds = [[bytes(f) for f in encode(msg)] for msg in EXAMPLES]
    kinds = sorted(MESSAGES)
    out = []
    for _ in range(n):
        frames = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(8)
            if op == 0 and frames[1:]:
                h = bytearray(frames[1])
                if h:
                    h[rng.randrange(len(h))] ^= 1 << rng.randrange(8)
                frames[1] = bytes(h)
            elif op == 1 and frames[1:]:
                frames[1] = frames[1][: rng.randrange(len(frames[1]) + 1)]
            elif op == 2:
                frames[0] = rng.choice(kinds).encode()
            elif op == 3 and len(frames) > 1:
                i = rng.randrange(len(frames))
                frames = (
                    frames[:i] + frames[i + 1 :] if rng.random() < 0.5 else frames + [frames[i]]
                )
            elif op == 4:
                frames.append(rng.randbytes(rng.choice([0, 1, 7, 64, 4096])))
            elif op in (5, 6) and len(frames) > 1:
                try:
                    header = msgpack.unpackb(frames[1], strict_map_key=False)
                    section = header["f" if op == 5 else "a"]
                except Exception:  # an earlier mutation broke it: leave it broken
                    continue
                if not isinstance(section, dict):
                    continue
                if op == 5 and section:
                    section[rng.choice(sorted(section))] = rng.choice(HOSTILE_VALUES)
                elif op == 6:
                    name = rng.choice([*section, "x", "data", "neurons", "prompt"])
                    dims = [rng.choice(HOSTILE_DIMS) for _ in range(rng.randint(0, 3))]
                    dtype = rng.choice(["float32", "uint8", "int64", "V8", "O", "float64"])
                    section[name] = [dtype, dims, rng.randrange(-1, len(frames) + 1)]
                frames[1] = msgpack.packb(header, use_bin_type=True)
            elif op == 7:
                frames = [rng.randbytes(rng.randrange(32)) for _ in range(rng.randint(1, 9))]
        out.append(frames)
    return out


def counts(request: pytest.FixtureRequest) -> int:
    return SOAK if "soak" in (request.config.option.markexpr or "") else FRAMES


async def send_all(endpoint: str, kind: int, messages: list[list[bytes]], refused) -> int:
    """Send the messages, then wait until the receiver has refused no more for a second (it
    has worked through them); how many it refused."""
    before = refused()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(kind)
    sock.connect(endpoint)
    try:
        for frames in messages:
            await sock.send_multipart(frames)
        seen, still = refused(), 0
        with anyio.fail_after(120):
            while still < 10:
                await anyio.sleep(0.1)
                now = refused()
                seen, still = now, (still + 1 if now == seen else 0)
    finally:
        sock.close(linger=0)
        ctx.term()
    return seen - before


@pytest.mark.asyncio
@pytest.mark.soak
async def test_mutated_frames_to_the_server_leave_it_serving(hf_model, tmp_path, request):
    source = HFSource(hf_model("llama"))
    params = SamplingParams(max_tokens=6, temperature=0, stop_ids=())
    want = Generation(dense_engine(source, torch.float32, 64), PROMPT, params).run()
    endpoint = f"ipc://{tmp_path}/run/front.sock"
    engine = dense_engine(source, torch.float32, 128)
    server = Server(engine, source.tokenizer().build(), ServerSettings(endpoint), stop_ids=())
    rng = random.Random(15)
    messages = mutated(rng, counts(request))
    big = Limits().max_header_bytes + 1
    messages += [[b"generate", b"\x90" * big], [b"hello", b"\xc0" * big]]  # oversize headers
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        refused = await send_all(
            endpoint,
            zmq.DEALER,
            messages,
            lambda: server.counts["refused"] + server.counts["failed"],
        )
        async with Client(endpoint, timeout=60) as client:
            done = await collect(
                client, prompt_ids=PROMPT, max_tokens=6, temperature=0, ignore_eos=True
            )
        tg.cancel_scope.cancel()
    assert done.token_ids == want
    assert refused > len(messages) / 2  # the frames reached the decoder


@pytest.mark.asyncio
@pytest.mark.soak
async def test_mutated_frames_to_every_stage_socket_leave_the_pipeline_serving(
    hf_model, tmp_path, request
):
    model = tmp_path / "m"
    convert(HFSource(hf_model("llama")), model, dtype="float32", progress=False)
    calibrate(model, CalibrationSettings(ranks="16", epochs=2, max_tokens=256), False)
    with load_engine(model, mode="all", max_len=64) as e:
        want = Generation(e, PROMPT, SamplingParams(max_tokens=6, temperature=0)).run()
    config = pipeline_config(tmp_path, model)
    rng = random.Random(16)
    async with serve_pipeline(config) as p:
        pids = {name: st.proc.pid for name, st in p.stages.items()}
        # one frame over the stages' limit: ZeroMQ drops its sender before it is buffered
        oversize = memoryview(bytearray(p.stages["compute"].spec.limits.max_frame_bytes + 1))
        for link in STAGE_LINKS:
            messages = mutated(rng, counts(request))
            endpoint = p.stages["compute"].spec.endpoints[link]
            await send_all(endpoint, zmq.PUSH, [[b"fetch", b"\x82", oversize]], lambda: 0)
            refused = await send_all(endpoint, zmq.PUSH, messages, lambda: p.counts["refused"])
            # the stages that read a socket all the time report what they refuse; compute
            # reads `rows` only while it waits for rows: the request below meets them there
            if link != "rows":
                assert refused > len(messages) / 2, link  # the frames reached the decoder
        async with Client(p.endpoint, timeout=60) as client:
            done = await collect(
                client, prompt_ids=PROMPT, max_tokens=6, temperature=0, ignore_eos=True
            )
        assert done.token_ids == want
        assert {name: st.proc.pid for name, st in p.stages.items()} == pids
        assert p.counts["deaths"] == 0
