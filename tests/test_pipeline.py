"""The pipeline of stage processes against the single-process engine: the same tokens, in
processes and as tasks of one process, serial and overlapped; stages killed or hung
while serving; many clients; the launcher's config and clean shutdown."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import zmq
import zmq.asyncio

from protocol.messages import Token
from protocol.sockets import SocketError
from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.cpus import parse_cpus
from streamer.engine import load_engine
from streamer.errors import ConfigError, ModelFormatError
from streamer.generate import Generation, SamplingParams
from streamer.layout import ConvertedModel
from streamer.registry import DEFAULT_NAME, resolve_default
from streamer.services.client import Client, ClientError
from streamer.services.pipeline import serve_pipeline
from streamer.sources import HFSource
from tests.helpers import collect, pipeline_config
from tests.models import make_sparse_opt
from workers.config import LINKS, STAGES, PipelineConfig, plan_pipeline
from workers.launcher import (
    PID_FILE,
    RUN_DIR_PREFIX,
    SHM_PREFIX,
    reclaim_leftovers,
    run_remote_stage,
)

PROMPT = [5, 17, 42, 99, 7, 3, 250, 12]


@pytest.fixture(scope="module")
def calibrated(hf_model, tmp_path_factory):
    """calibrated(family) -> a converted, calibrated random model directory (made once);
    "family:kind" converts its bundles to a quantized kind."""
    made = {}

    def get(family: str):
        if family not in made:
            name, _, quant = family.partition(":")
            out = tmp_path_factory.mktemp(f"{name}-{quant}-pipeline") / "m"
            src = HFSource(hf_model(name))
            convert(src, out, dtype="float32", progress=False, quant=quant or None)
            calibrate(out, CalibrationSettings(ranks="16", epochs=4, max_tokens=512), False)
            made[family] = out
        return made[family]

    return get


def engine_tokens(directory, prompt, n, capacity=None, window=4, read_gap=0):
    """Greedy tokens of the single-process engine (mode all) with `capacity` rows per layer."""
    budget = None
    if capacity is not None:
        with load_engine(directory, mode="all", max_len=2048) as e:
            e.plan.cache_rows = capacity
            budget = e.plan.total  # exactly what `capacity` rows a layer need
    # the resident part as stored, as the pipeline holds it (the budget was planned for it)
    with load_engine(
        directory, "all", window, budget, max_len=2048, read_gap=read_gap, quant_resident="none"
    ) as e:
        if capacity is not None:
            assert e.plan.cache_rows == capacity
        params = SamplingParams(max_tokens=n, temperature=0, stop_ids=())
        return Generation(e, prompt, params).run()


def left_behind(tmp_path) -> list[str]:
    found = [p.name for p in tmp_path.glob("streamer-*.rows")]
    return found + [p.name for p in (tmp_path / "run").glob("*.sock")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("family", "processes", "serial", "budget", "weights", "gap"),
    [
        ("llama", True, False, None, "shared", 0),
        ("llama", False, False, None, "shared", 0),
        ("llama", True, True, None, "shared", 0),
        ("opt", False, False, None, "shared", 0),
        # read gaps: neurons read between two needed ones travel as `extra`, kept, not computed
        ("opt", True, False, "tight", "shared", 2),
        ("opt", False, True, "tight", "shared", 0),
        # stages that share no memory (as on several hosts): rows and row moves as frames
        ("opt", True, False, "tight", "frames", 0),
        ("llama", True, False, None, "frames", 2),
        # quantized bundles: rows travel between stages, and sit in the windows, as blocks
        ("opt:q4_0", True, False, "tight", "frames", 2),
    ],
)
async def test_pipeline_tokens_equal_the_single_process_engine(
    calibrated, tmp_path, family, processes, serial, budget, weights, gap
):
    directory = calibrated(family)
    # stages as tasks share this event loop: a loaded machine may delay their heartbeats
    slack = {} if processes else {"dead_after_s": 10.0}
    cfg = pipeline_config(
        tmp_path, directory, serial=serial, weights=weights, read_gap=gap, **slack
    )
    if budget == "tight":  # windows of 24 rows: evictions and overflow every token
        memory = plan_pipeline(cfg).memory
        memory.cache_rows = 24
        cfg.dram_budget = str(memory.total)  # exactly what 24 rows a layer need
        assert plan_pipeline(cfg).shared.capacity == 24
    want = engine_tokens(directory, PROMPT, 24, 24 if budget else None, read_gap=gap)
    async with (
        serve_pipeline(cfg, processes=processes) as p,
        Client(p.endpoint, timeout=60) as client,
    ):
        done = await collect(
            client, prompt_ids=PROMPT, max_tokens=24, temperature=0, ignore_eos=True
        )
        again = await collect(
            client, prompt_ids=PROMPT, max_tokens=24, temperature=0, ignore_eos=True
        )
        shared = list(tmp_path.glob("streamer-*.rows"))
        assert len(shared) == (0 if weights == "frames" else 1)
    assert done.token_ids == want
    assert again.token_ids == want  # a second sequence starts from empty windows again
    s = done.summary
    assert s["mode"] == ("pipeline-serial" if serial else "pipeline")
    assert s["per_token"]["wait_ms"] >= 0 and s["per_token"]["io_ms"] >= 0
    assert s["bytes_read"] > 0 and s["predicted"] > 0
    assert s["ffn_bytes"] == ConvertedModel(directory).layout.file_bytes
    if budget:
        assert s["overflow"] + s["evicted"] > 0
    if serial:
        assert s["copied"] == 0  # no look-ahead reads
    assert left_behind(tmp_path) == []


@pytest.mark.asyncio
async def test_eight_clients_three_requests_each(calibrated, tmp_path):
    directory = calibrated("llama")
    want = {
        (c, r): engine_tokens(directory, [c + 3, r + 7, 11], 5) for c in range(8) for r in (0, 1, 2)
    }
    got = {}

    async def one_client(endpoint, c):
        async with Client(endpoint, timeout=120) as client:
            for r in range(3):
                done = await collect(
                    client,
                    prompt_ids=[c + 3, r + 7, 11],
                    max_tokens=5,
                    temperature=0,
                    ignore_eos=True,
                )
                got[(c, r)] = done.token_ids

    async with (
        serve_pipeline(pipeline_config(tmp_path, directory)) as p,
        anyio.create_task_group() as tg,
    ):
        for c in range(8):
            tg.start_soon(one_client, p.endpoint, c)
    assert got == want


@pytest.mark.asyncio
async def test_cpus_the_host_lacks_are_refused_before_a_stage_starts(calibrated, tmp_path):
    missing = max(os.sched_getaffinity(0)) + 1
    cfg = pipeline_config(tmp_path, calibrated("opt"), compute_cpus=f"0,{missing}")
    with pytest.raises(ConfigError, match=rf"compute_cpus names CPUs \[{missing}\], not among"):
        async with serve_pipeline(cfg):
            pass
    assert not [f for f in tmp_path.iterdir() if f.name.startswith("streamer")]  # no shm left


@pytest.mark.asyncio
async def test_a_refused_endpoint_is_one_clear_error(calibrated, tmp_path):
    """The socket factory refuses an ipc directory others may enter: the embedder gets that
    error itself (not a tree of task-group errors), and nothing is left behind."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    cfg = pipeline_config(tmp_path, calibrated("opt"), endpoint=f"ipc://{shared}/front.sock")
    with pytest.raises(SocketError, match="mode 0700"):
        async with serve_pipeline(cfg):
            pass
    assert not [f for f in tmp_path.iterdir() if f.name.startswith("streamer")]  # no shm left


@pytest.fixture(scope="module")
def io_bound_opt(tmp_path_factory):
    """A sparse OPT whose FFN is 256 MiB in float16 (8 layers of 8192 neurons, 4 KiB bundles):
    a prompt's whole-layer reads take about as long as its compute here. Eight layers, since
    the first layer has no look-ahead: with four, it was a quarter of a token's reads."""
    base = tmp_path_factory.mktemp("io-bound-opt")
    hf = make_sparse_opt(
        base / "hf",
        hidden_size=1024,
        ffn_dim=8192,
        num_attention_heads=16,
        num_hidden_layers=8,
        max_position_embeddings=512,
    )
    out = convert(HFSource(hf), base / "m", dtype="float16", progress=False).directory
    calibrate(out, CalibrationSettings(ranks="32", epochs=4, max_tokens=512), False)
    return out


def cpu_split() -> dict[str, str]:
    """Compute on one CPU, predictor and prefetch on the others (where there are two or more):
    what the stages need for the overlap to pay, since reading costs CPU too."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {}
    return {"compute_cpus": str(cpus[0]), "io_cpus": ",".join(map(str, cpus[1:]))}


@pytest.mark.bench
@pytest.mark.asyncio
async def test_overlap_hides_io_that_serial_waits_for(io_bound_opt, tmp_path):
    """The same stages with and without overlap, same tokens. With overlap, compute waits for
    less I/O, in the prompt (whole layers read one ahead of compute, which is then faster) and
    in decoding (look-ahead reads), and tokens come faster; both report compute's wait for I/O
    per step. Both pipelines at once, requests alternating; five each after a warm-up: medians
    of their telemetry, and the median time between two tokens as the client sees them.
    Sampled tokens with a window of one token, so that each token reads many of its neurons
    (several MB): I/O matters. Compute has a CPU to itself, predictor and prefetch the rest
    (reads cost CPU here: about 25 us each), with 8 reads in flight, which one CPU serves as
    fast as 32 with less switching between threads."""
    if not cpu_split():
        pytest.skip("overlap needs a CPU for I/O apart from compute's; this host has one")
    prompt = list(range(5, 69))
    results, gaps = {True: [], False: []}, {True: [], False: []}
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for serial in (True, False):
            (tmp_path / str(serial)).mkdir()
            cfg = pipeline_config(
                tmp_path / str(serial),
                io_bound_opt,
                serial=serial,
                context=512,
                window=1,
                concurrency=8,
                **cpu_split(),
            )
            p = await stack.enter_async_context(serve_pipeline(cfg))
            clients[serial] = await stack.enter_async_context(Client(p.endpoint, timeout=120))
            for name, cpus in (("compute", cfg.compute_cpus), ("prefetch", cfg.io_cpus)):
                if cpus:
                    pid = p.stages[name].proc.pid
                    assert os.sched_getaffinity(pid) == {int(c) for c in cpus.split(",")}
        # Both pipelines are up (the idle one only heartbeats); their requests alternate, so
        # that whatever else the machine does meanwhile slows both alike.
        for i in range(6):
            for serial, client in clients.items():
                arrived, done = [], None
                async for event in client.generate(
                    prompt_ids=prompt, max_tokens=24, temperature=1.0, seed=3, ignore_eos=True
                ):
                    arrived.append(time.perf_counter())
                    done = event
                results[serial].append(done)
                if i:  # after the warm-up; the last event is the summary, not a token
                    gaps[serial] += [b - a for a, b in itertools.pairwise(arrived[:-1])]
    between = {serial: statistics.median(g) * 1e3 for serial, g in gaps.items()}
    serial, overlap = results[True], results[False]
    assert [r.token_ids for r in overlap] == [r.token_ids for r in serial]
    assert len(set(serial[0].token_ids)) > 8  # sampled: tokens (and active sets) vary

    def median(runs, part, key):
        return statistics.median(r.summary[part][key] for r in runs[1:])

    print(f"\nmedians of 5 requests (64-token prompt, 24 tokens), ms; {cpu_split()}:")
    print(f"{'':8} {'prefill':>8} {'wait':>8} {'per token':>10} {'wait':>8} {'io':>8}")
    for name, runs, gap in (
        ("serial", serial, between[True]),
        ("overlap", overlap, between[False]),
    ):
        print(
            f"{name:8} {median(runs, 'prefill', 'total_ms'):8.1f} "
            f"{median(runs, 'prefill', 'wait_ms'):8.1f} {gap:10.1f} "
            f"{median(runs, 'per_token', 'wait_ms'):8.1f} {median(runs, 'per_token', 'io_ms'):8.1f}"
            f" loaded {median(runs, 'per_token', 'loaded'):.0f} copied "
            f"{median(runs, 'per_token', 'copied'):.0f}"
        )
        busy = ("predict_ms", "mem_ms", "prefetch_ms", "lookahead_wait_ms", "reads")
        print("         ", {k: round(median(runs, "per_token", k), 1) for k in busy})
    for runs in (serial, overlap):
        assert all(r.summary["per_token"]["wait_ms"] >= 0 for r in runs)
        assert median(runs, "prefill", "bytes_read") >= 8 * 8192 * 4096  # every layer, whole
        assert median(runs, "per_token", "bytes_read") >= 4 << 20  # several MB a token
    assert median(overlap, "prefill", "wait_ms") < median(serial, "prefill", "wait_ms")
    assert median(overlap, "prefill", "total_ms") < median(serial, "prefill", "total_ms")
    # Decoding: most rows come from look-ahead reads, compute waits less, tokens come faster.
    assert median(overlap, "per_token", "copied") > median(overlap, "per_token", "loaded") / 2
    assert median(overlap, "per_token", "wait_ms") < median(serial, "per_token", "wait_ms")
    assert between[False] < between[True]


async def _generate_until_killed(client, pid: int, sig: int) -> tuple[ClientError, float]:
    """Start a long generation, signal `pid` after its first token; the error and its delay."""
    t_kill = None
    try:
        async for event in client.generate(
            prompt_ids=PROMPT, max_tokens=1500, temperature=0, ignore_eos=True
        ):
            if t_kill is None and isinstance(event, Token):
                os.kill(pid, sig)
                t_kill = time.monotonic()
    except ClientError as e:
        return e, time.monotonic() - t_kill
    raise AssertionError("the generation finished although a stage was killed")


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["kill", "hang"])
async def test_a_dead_or_hung_stage_fails_the_request_and_comes_back(calibrated, tmp_path, how):
    """kill -9 (or SIGSTOP) each stage in turn during a generation: the client gets an error
    naming the stage within 2 s, the launcher starts the stage again, the next request works."""
    directory = calibrated("llama")
    want = engine_tokens(directory, PROMPT, 6)
    async with serve_pipeline(pipeline_config(tmp_path, directory)) as p:
        async with Client(p.endpoint, timeout=120) as client:
            for name in STAGES:
                pid = p.stages[name].proc.pid
                sig = signal.SIGKILL if how == "kill" else signal.SIGSTOP
                error, delay = await _generate_until_killed(client, pid, sig)
                assert f"the {name} stage" in str(error)
                assert delay < 2.0, f"{name}: the error came {delay:.2f} s after the {how}"
                done = await collect(
                    client, prompt_ids=PROMPT, max_tokens=6, temperature=0, ignore_eos=True
                )
                assert done.token_ids == want
                assert p.stages[name].proc.pid != pid
        assert p.counts["restarts"] == 3


def test_config_is_validated(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('model = "default"\nwindoww = 4\n')
    with pytest.raises(ConfigError, match="unknown key"):
        PipelineConfig.from_toml(path)
    path.write_text('window = "four"\n')
    with pytest.raises(ConfigError, match="window must be int"):
        PipelineConfig.from_toml(path)
    path.write_text("window = 0\n")
    with pytest.raises(ConfigError, match="window must be at least 1"):
        PipelineConfig.from_toml(path)
    path.write_text("heartbeat_s = 2.0\ndead_after_s = 1.0\n")
    with pytest.raises(ConfigError, match="heartbeat_s"):
        PipelineConfig.from_toml(path)
    with pytest.raises(ConfigError, match="not found"):
        PipelineConfig.from_toml(tmp_path / "missing.toml")
    assert parse_cpus("0-2, 5", "compute_cpus") == (0, 1, 2, 5) and parse_cpus("", "x") == ()
    for bad in ("x", "3-1", "-1", "1-", "0,a"):
        with pytest.raises(ConfigError, match=f"compute_cpus '{bad}'"):
            PipelineConfig(compute_cpus=bad)
    with pytest.raises(ConfigError, match="io_cpus"):
        PipelineConfig(io_cpus="one")
    with pytest.raises(ConfigError, match="compute_threads must be at most"):
        PipelineConfig(compute_cpus="0", compute_threads=2)
    with pytest.raises(ConfigError, match=r"concurrency must be in \[0, 1024\]"):
        PipelineConfig(concurrency=-1)
    shipped = PipelineConfig.from_toml(
        os.path.join(os.path.dirname(__file__), "..", "deploy", "pipeline.toml")
    )
    assert shipped == PipelineConfig()


def test_an_uncalibrated_model_is_a_clear_error(hf_model, tmp_path):
    out = tmp_path / "m"
    convert(HFSource(hf_model("llama")), out, dtype="float32", progress=False)
    with pytest.raises(ModelFormatError, match="no predictors: run `streamer calibrate"):
        plan_pipeline(pipeline_config(tmp_path, out))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_streamer_serve_config_with_the_default_model(tmp_path):
    """The shipped deploy/pipeline.toml serving the default model: `generate --connect` prints
    the tokens of the in-process engine with the same predictors; SIGTERM stops every stage
    and leaves no shared memory or socket file behind."""
    cache = tmp_path / "cache"
    shutil.copytree(resolve_default(progress=False), cache / "models" / DEFAULT_NAME)
    env = {**os.environ, "STREAMER_CACHE": str(cache)}

    def streamer(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", *args], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    streamer("calibrate", "default", "--ranks", "32", "--epochs", "2", "--max-tokens", "1024")
    run = tmp_path / "run"
    shipped = Path(__file__).parent.parent / "deploy" / "pipeline.toml"
    endpoint = f"ipc://{run}/front.sock"
    args = ["--prompt", "What is the capital of France?", "--chat", "--temperature", "0"]
    args += ["--max-tokens", "16", "--ignore-eos", "--json"]
    cmd = [sys.executable, "-m", "streamer", "serve", "--config", str(shipped)]
    cmd += ["--endpoint", endpoint]
    shm_before = set(Path("/dev/shm").glob("streamer-*"))
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout.readline().strip() == f"ready {endpoint}"
            stages = _children(proc.pid)
            assert (
                len([p for p in stages if "spawn" in Path(f"/proc/{p}/cmdline").read_text()]) == 3
            )
            local = json.loads(streamer("generate", "default", "--mode", "all", *args))
            remote = json.loads(streamer("generate", "--connect", endpoint, *args))
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert remote["token_ids"] == local["token_ids"] and len(local["token_ids"]) == 16
    assert remote["text"] == local["text"]
    assert remote["summary"]["mode"] == "pipeline"
    assert remote["summary"]["per_token"]["wait_ms"] >= 0
    left = [p for p in stages if Path(f"/proc/{p}").exists()]
    assert not left, [Path(f"/proc/{p}/cmdline").read_text() for p in left]
    assert set(Path("/dev/shm").glob("streamer-*")) == shm_before
    assert list(run.glob("*.sock")) == []


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.asyncio
async def test_every_link_over_tcp_with_curve(calibrated, tmp_path, caplog):
    """tcp:// for the client endpoint and every stage link, CURVE-authenticated: same tokens;
    a peer whose key is not authorized gets nothing into any stage."""
    from protocol.sockets import Security, make_keys, make_socket

    directory = calibrated("llama")
    make_keys(tmp_path / "keys")
    ports = _free_ports(7)
    links = ("predictor", "prefetch", "compute", "rows", "results", "health")
    cfg = pipeline_config(
        tmp_path,
        directory,
        endpoint=f"tcp://127.0.0.1:{ports[0]}",
        key_dir=str(tmp_path / "keys"),
        endpoints={name: f"tcp://127.0.0.1:{p}" for name, p in zip(links, ports[1:], strict=True)},
        # stages as tasks of this process share its event loop: on a loaded machine a heartbeat
        # can be late by more than the default 1 s; liveness is tested with processes elsewhere
        dead_after_s=10.0,
    )
    want = engine_tokens(directory, PROMPT, 8)
    security = Security(tmp_path / "keys")
    async with (
        serve_pipeline(cfg, processes=False) as p,
        Client(p.endpoint, security, timeout=60) as client,
    ):
        done = await collect(
            client, prompt_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True
        )
        stranger = tmp_path / "stranger"  # the right server key, a client key never authorized
        make_keys(stranger)
        shutil.copy(tmp_path / "keys" / "server.key", stranger / "server.key")
        caplog.clear()

        def push_garbage(keys) -> None:  # on a thread: closing with linger blocks
            ctx = zmq.Context()
            for link in ("predictor", "prefetch", "compute", "rows", "health"):
                sock = make_socket(ctx, zmq.PUSH, cfg.endpoints[link], False, Security(keys))
                sock.send_multipart([b"garbage", b"\xc1"])
                sock.close(linger=1000)
            ctx.term()

        for keys, admitted in ((stranger, False), (tmp_path / "keys", True)):
            await anyio.to_thread.run_sync(push_garbage, keys)
            await anyio.sleep(0.5)
            # compute reads the rows link during a forward: run one
            again = await collect(client, prompt_ids=PROMPT, max_tokens=2, temperature=0)
            assert again.token_ids == want[:2]
            refused = sum("refused a" in r.getMessage() for r in caplog.records)
            caplog.clear()
            assert refused == (5 if admitted else 0), (keys, refused)
    assert done.token_ids == want


@pytest.mark.asyncio
async def test_a_stage_on_another_host(calibrated, tmp_path):
    """`remote = ["prefetch"]`: the launcher starts predictor and compute; `streamer stage
    prefetch --config` runs apart (its own process tree, as on another host), over tcp:// with
    CURVE, sharing no memory: the rows reach compute as frames. Same tokens as the engine.
    kill -9 it during a generation: the client gets an error within 2 s; started again (as its
    host's systemd would), the next request succeeds."""
    from protocol.sockets import Security, make_keys

    directory = calibrated("llama")
    make_keys(tmp_path / "keys")
    ports = _free_ports(7)
    links = ("predictor", "prefetch", "compute", "rows", "results", "health")
    table = "\n".join(f'{k} = "tcp://127.0.0.1:{p}"' for k, p in zip(links, ports[1:], strict=True))
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f'model = "{directory}"\nendpoint = "tcp://127.0.0.1:{ports[0]}"\n'
        f'key_dir = "{tmp_path / "keys"}"\nshm_dir = "{tmp_path}"\nremote = ["prefetch"]\n'
        f"heartbeat_s = 0.2\ndead_after_s = 1.0\n\n[endpoints]\n{table}\n"
    )
    cfg = PipelineConfig.from_toml(path)
    want = engine_tokens(directory, PROMPT, 8)

    def start_stage() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "streamer", "stage", "prefetch", "--config", str(path)]
        return subprocess.Popen(cmd, start_new_session=True)  # not the launcher's child

    stage = start_stage()
    try:
        async with (
            serve_pipeline(cfg) as p,
            Client(p.endpoint, Security(tmp_path / "keys"), timeout=120) as client,
        ):
            assert p.stages["prefetch"].proc is None  # the launcher did not start it
            done = await collect(
                client, prompt_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True
            )
            assert done.token_ids == want
            assert list(tmp_path.glob("streamer-*.rows")) == []  # no shared memory
            error, delay = await _generate_until_killed(client, stage.pid, signal.SIGKILL)
            assert "the prefetch stage" in str(error) and delay < 2.0, (error, delay)
            stage.wait()
            stage = start_stage()
            done = await collect(
                client, prompt_ids=PROMPT, max_tokens=8, temperature=0, ignore_eos=True
            )
            assert done.token_ids == want
            assert p.counts["deaths"] == 1 and p.counts["restarts"] == 0
    finally:
        stage.terminate()
        assert stage.wait(10) == 0  # SIGTERM stops it cleanly


def test_remote_stages_need_every_endpoint_and_frames(tmp_path):
    with pytest.raises(ConfigError, match="every link's endpoint.*health"):
        PipelineConfig(remote=["compute"], endpoints={"predictor": "tcp://127.0.0.1:5"})
    eps = {k: f"tcp://127.0.0.1:{5000 + i}" for i, k in enumerate(LINKS)}
    with pytest.raises(ConfigError, match="weights cannot be shared"):
        PipelineConfig(remote=["compute"], endpoints=eps, weights="shared")
    with pytest.raises(ConfigError, match="remote takes only"):
        PipelineConfig(remote=["frontend"], endpoints=eps)
    with pytest.raises(ConfigError, match="does not list 'prefetch' in remote"):
        run_remote_stage("prefetch", PipelineConfig(remote=["compute"], endpoints=eps))


def test_a_dead_launchers_leftovers_are_reclaimed_and_a_live_ones_kept(tmp_path):
    """What a launcher killed with -9 leaves (its shared memory file, its run directory) is
    removed by the next one; what a live launcher owns is not."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names a process that no longer exists
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    tmp.mkdir()
    kept, removed = [], []
    for pid, bucket in ((gone.pid, removed), (os.getpid(), kept)):
        rows = shm / f"{SHM_PREFIX}{pid}-0a1b2c3d.rows"
        rows.write_bytes(b"\0" * 4096)
        run = tmp / f"{RUN_DIR_PREFIX}{pid}x"
        run.mkdir()
        (run / PID_FILE).write_text(str(pid))
        (run / "compute.sock").touch()
        bucket += [rows, run]
    unrelated = tmp / f"{RUN_DIR_PREFIX}notes"  # no pid file: not a run directory
    unrelated.mkdir()
    reclaim_leftovers(shm, tmp)
    assert not any(p.exists() for p in removed)
    assert all(p.exists() for p in kept) and unrelated.exists()
