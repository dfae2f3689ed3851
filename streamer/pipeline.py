"""The pipeline launcher and front end: starts the stage processes, watches them, serves clients.

    client ──generate/cancel──▶ front end (this process: the `streamer serve` protocol, the
      ▲                          queue, sampling, the launcher and health watch)
      └───token/done/error───────  │ forward ▲ logits
                                   ▼         │
        ┌────────────── compute (resident weights, KV cache; reads window rows) ◀─┐
        │ ffn_input, fill, reset                                   rows_ready,    │
        ▼                                                          layer_ready    │
     predictor (predictors, window books) ──fetch──▶ prefetch (O_DIRECT reads) ───┘
                  │                                  │ writes bundle rows into
                  └───── moves rows in ──▶ shared memory (/dev/shm) ◀── compute maps
     every stage ──ready, heartbeat, dead──▶ front end's health socket

`Pipeline.launch(config)` (an async context manager) makes the shared memory, spawns the three
stages, waits for each one's READY, and serves on `config.endpoint`. A stage that exits, or
sends no heartbeat for `dead_after_s`, is declared dead: the request it was serving fails at
once with an error naming the stage, the stage is killed if hung and started again, and the
next request waits for it to be READY. Shutdown stops every stage (SIGTERM, then SIGKILL after
a deadline) and removes the shared memory and the ipc socket files.

Without shared memory (`weights = "frames"`: stages on several hosts, tcp:// links), the same
messages carry the row moves and the rows themselves as zero-copy frames. Stages in `remote` run
elsewhere (`streamer stage NAME`, `run_remote_stage`): watched by their heartbeats like the
others, started and restarted by their own host.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
import zmq
import zmq.asyncio

from protocol.codec import decode, encode
from protocol.messages import Dead, Error, Forward, Heartbeat, Limits, ProtocolError, Ready
from protocol.sockets import Security, make_socket, start_authenticator
from streamer.cpus import DEFAULT_CONCURRENCY, parse_cpus, usable_cpus
from streamer.engine import WORKING_MEMORY, Telemetry, _kv_bytes, parse_budget, rss_bytes
from streamer.errors import ConfigError, ModelFormatError, StreamerError
from streamer.layout import ConvertedModel, parse_dtype
from streamer.predictor import META_FILE, WEIGHTS_FILE
from streamer.shared import SharedLayout, SharedRows
from workers.stage import StageSpec

STAGES = ("predictor", "prefetch", "compute")
LINKS = ("predictor", "prefetch", "compute", "rows", "results", "health")
STAGE_LINKS = ("predictor", "prefetch", "rows")  # the links between the three stages


@dataclass
class PipelineConfig:
    """The settings of `deploy/pipeline.toml`; every key is optional."""

    model: str = "default"
    endpoint: str = ""  # what clients connect to; "" = as `streamer serve`
    run_dir: str = ""  # the stages' ipc sockets; "" = a new private temporary directory
    shm_dir: str = "/dev/shm"
    window: int = 4
    dram_budget: str = ""  # "" = no cap; "50%", "4GiB", ...
    concurrency: int = 0  # flash reads in flight; 0 = 4 per CPU, at most 32
    direct: bool = True
    serial: bool = False  # the same stages, without overlap (for comparison)
    # How bundle rows reach compute: "shared" memory (one host), "frames" (zero-copy ZeroMQ
    # frames: stages on different hosts), "auto": frames when a stage link is tcp://
    weights: str = "auto"
    # The look-ahead reads a neuron of the next layer early only if its predicted probability
    # is at least this (and above the calibrated threshold); the layer's own prediction fetches
    # the rest. Early reads that turn out unneeded cost disk time and CPU that compute shares.
    # 0: the calibrated threshold alone. Measured on the OPT-6.7B shape (bench, 2 cores): 0.5
    # halves the look-ahead's reads (0.11 against 0.21 GB a token) and gives about the same
    # token time (1.19 against 1.21 s); on a random test model it leaves most rows to the
    # correction.
    lookahead_p: float = 0.0
    dtype: str = ""  # compute dtype; "" = the stored one
    compute_threads: int = 0  # 0 = one per CPU of compute_cpus, else every core
    # CPU affinity of the stage processes (Linux), as "0" or "0-5,8": compute's CPUs, and the
    # CPUs the predictor and prefetch share. "" = wherever the OS puts them. Reading from flash
    # costs CPU (on this project's 2-core microVM, which bounce-buffers every DMA: 25-35 us of
    # CPU per 16 KiB read), so a look-ahead that reads while compute runs on every core slows
    # compute by about what it saves; with compute_cpus and io_cpus apart it does not (README,
    # "Overlap and CPUs").
    compute_cpus: str = ""
    io_cpus: str = ""
    context: int = 2048
    queue_size: int = 64
    heartbeat_s: float = 0.2
    dead_after_s: float = 1.0
    start_timeout_s: float = 300.0
    restart: bool = True
    max_restarts: int = 5  # per stage within a minute; more and the launcher gives up
    insecure: bool = False
    key_dir: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)  # predictor, prefetch, ... overrides
    # Stages the launcher does not start: each runs on another host as `streamer stage NAME
    # --config FILE` (kept up by that host, e.g. systemd), over tcp:// links, rows as frames.
    remote: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        compute_cpus = self.cpus("compute_cpus")
        self.cpus("io_cpus")
        checks = [
            (self.window >= 1, "window must be at least 1"),
            (0 <= self.concurrency <= 1024, "concurrency must be in [0, 1024]"),
            (self.compute_threads >= 0, "compute_threads must be >= 0"),
            (self.context >= 2, "context must be at least 2"),
            (self.queue_size >= 1, "queue_size must be at least 1"),
            (0 < self.heartbeat_s < self.dead_after_s, "need 0 < heartbeat_s < dead_after_s"),
            (self.dead_after_s <= 10, "dead_after_s must be at most 10"),
            (self.start_timeout_s > 0, "start_timeout_s must be positive"),
            (self.max_restarts >= 0, "max_restarts must be >= 0"),
            (set(self.endpoints) <= set(LINKS), f"endpoints takes only {', '.join(LINKS)}"),
            (
                self.weights in ("auto", "shared", "frames"),
                "weights must be auto, shared or frames",
            ),
            (0 <= self.lookahead_p < 1, "lookahead_p must be in [0, 1)"),
            (
                not compute_cpus or self.compute_threads <= len(compute_cpus),
                "compute_threads must be at most the number of compute_cpus",
            ),
            (set(self.remote) <= set(STAGES), f"remote takes only {', '.join(STAGES)}"),
            (
                not self.remote or self.weights != "shared",
                "remote stages share no memory: weights cannot be shared",
            ),
            (
                not self.remote or set(self.endpoints) == set(LINKS),
                "remote stages need every link's endpoint in [endpoints]: "
                + ", ".join(sorted(set(LINKS) - set(self.endpoints))),
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"pipeline config: {message}")

    def cpus(self, key: str) -> tuple[int, ...]:
        """`compute_cpus` or `io_cpus`, as CPU numbers."""
        return parse_cpus(getattr(self, key), f"pipeline config: {key}")

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides: Any) -> PipelineConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"pipeline config {path} not found") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"pipeline config {path}: {e}") from None
        return cls.from_dict({**data, **overrides}, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pipeline config") -> PipelineConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for name, value in data.items():
            want = known[name].type
            ok = {
                "str": isinstance(value, str),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                "bool": isinstance(value, bool),
                "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
            }.get(
                str(want),
                isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
            )
            if not ok:
                raise ConfigError(f"{where}: {name} must be {want}, got {value!r}")
        return cls(**data)


def check_cpus(config: PipelineConfig, stages: list[str]) -> None:
    """The CPUs of `stages` (those this host runs) must be ones this host lets them run on."""
    for key, wanted in (("compute_cpus", {"compute"}), ("io_cpus", {"predictor", "prefetch"})):
        cpus = set(config.cpus(key))
        if not cpus or not wanted & set(stages):
            continue
        if not hasattr(os, "sched_setaffinity"):
            raise ConfigError(f"pipeline config: {key} needs Linux (CPU affinity)")
        have = usable_cpus()
        if not cpus <= have:
            raise ConfigError(
                f"pipeline config: {key} names CPUs {sorted(cpus - have)}, not among those "
                f"this host runs on: {sorted(have)}"
            )


@dataclass
class PipelinePlan:
    """What the stages hold, within the DRAM budget."""

    model: ConvertedModel
    layout: SharedLayout
    budget: int | None
    resident: int
    predictors: int
    kv_cache: int
    overhead: int

    @property
    def shared(self) -> int:
        return self.layout.nbytes

    @property
    def total(self) -> int:
        return self.resident + self.predictors + self.kv_cache + self.shared

    def describe(self) -> str:
        mib, lay = 2**20, self.layout
        budget = "none" if self.budget is None else f"{self.budget / mib:.1f} MiB"
        return (
            f"pipeline DRAM budget {budget}: resident {self.resident / mib:.1f} + predictors "
            f"{self.predictors / mib:.1f} + KV cache {self.kv_cache / mib:.1f} + shared rows "
            f"{self.shared / mib:.1f} (windows {lay.n_layers} x {lay.capacity} rows, overflow "
            f"{lay.n_neurons - lay.capacity}, 2 staging layers of {lay.n_neurons}; "
            f"{lay.stride} B a row) = {self.total / mib:.1f} MiB; fixed overhead per process "
            f"{self.overhead / mib:.1f} MiB"
        )


def plan_pipeline(config: PipelineConfig) -> PipelinePlan:
    from streamer.sources import open_source

    source = open_source(config.model)
    if not isinstance(source, ConvertedModel):
        raise ModelFormatError(
            f"the pipeline streams from the flash layout: run `streamer convert {config.model} "
            "OUT` and `streamer calibrate OUT`, then serve OUT"
        )
    if not (source.directory / META_FILE).is_file():
        raise ModelFormatError(
            f"{source.directory} has no predictors: run `streamer calibrate {config.model}`"
        )
    cfg, lay = source.config, source.layout
    dtype = parse_dtype(config.dtype) if config.dtype else lay.dtype
    resident = source.manifest["resident"]["bytes"] * dtype.itemsize // lay.dtype.itemsize
    predictors = (source.directory / WEIGHTS_FILE).stat().st_size
    kv = _kv_bytes(cfg, min(config.context, cfg.max_positions), dtype)
    model_bytes = source.manifest["resident"]["bytes"] + lay.file_bytes
    budget = parse_budget(config.dram_budget or None, model_bytes)
    n, layers = cfg.d_ffn, cfg.n_layers
    capacity = n
    if budget is not None:
        fixed = resident + predictors + kv
        rows = (budget - fixed) // (lay.stride + 8)
        # layers * c window rows + (n - c) overflow + 2n staging must fit in `rows`.
        capacity = min(n, (rows - 3 * n) // max(layers - 1, 1))
        if capacity < 1:
            raise ConfigError(
                f"dram_budget {config.dram_budget} is too small for the pipeline: resident, "
                f"predictors and KV cache take {fixed / 2**20:.1f} MiB and it needs at least "
                f"{(fixed + (3 * n + layers) * (lay.stride + 8)) / 2**20:.1f} MiB"
            )
    layout = SharedLayout(layers, n, capacity, lay.stride)
    return PipelinePlan(
        source, layout, budget, resident, predictors, kv, rss_bytes() + WORKING_MEMORY
    )


# --------------------------------------------------------------------------- the front end


class StageFailed(StreamerError):
    """A stage died or hung while a request needed it."""


@dataclass
class RemoteSequence:
    """The front end's handle of one sequence in compute (its `KVCache` stand-in)."""

    request_id: str
    max_len: int
    failures: int
    step: int = 0


def stage_limits(config: PipelineConfig, plan: PipelinePlan) -> Limits:
    """What every stage's decoder accepts, from the model and the layout."""
    cfg, lay = plan.model.config, plan.layout
    return Limits(
        vocab_size=cfg.vocab_size,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_neurons=cfg.d_ffn,
        row_bytes=lay.stride,
        n_rows=lay.n_rows,
        max_tokens=min(config.context, cfg.max_positions),
        # a vocabulary's logits; with frames, a whole layer's rows during a prompt
        max_frame_bytes=max(256 << 20, cfg.vocab_size * 4 + 4096, cfg.d_ffn * lay.stride),
    )


def stage_spec(
    name: str,
    config: PipelineConfig,
    plan: PipelinePlan,
    endpoints: dict[str, str],
    frames: bool,
    shm_path: Path,
    parent_pid: int = 0,
) -> StageSpec:
    """A stage's whole setup, the same whether the launcher spawns it or another host runs
    it (`streamer stage`)."""
    compute_cpus = config.cpus("compute_cpus")
    threads = config.compute_threads or len(compute_cpus) or len(usable_cpus())
    return StageSpec(
        name=name,
        model_dir=plan.model.directory,
        endpoints=endpoints,
        shm_path=shm_path,
        layout=plan.layout,
        window=config.window,
        serial=config.serial,
        frames=frames,
        lookahead_p=config.lookahead_p,
        concurrency=config.concurrency or DEFAULT_CONCURRENCY,
        direct=config.direct,
        threads=threads if name == "compute" else 1,
        cpus=compute_cpus if name == "compute" else config.cpus("io_cpus"),
        dtype=config.dtype,
        heartbeat_s=config.heartbeat_s,
        limits=stage_limits(config, plan),
        security=security_of(config),
        parent_pid=parent_pid,
    )


def security_of(config: PipelineConfig) -> Security:
    return Security(Path(config.key_dir) if config.key_dir else None, insecure=config.insecure)


def run_remote_stage(name: str, config: PipelineConfig) -> None:
    """`streamer stage NAME`: one stage of a pipeline whose launcher runs on another host
    (listed in its `remote`). It shares no memory with the others: rows travel as frames."""
    if name not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {name!r}")
    if name not in config.remote:
        raise ConfigError(
            f"the config does not list {name!r} in remote: its launcher would start it too"
        )
    check_cpus(config, [name])
    spec = stage_spec(name, config, plan_pipeline(config), config.endpoints, True, Path())
    print(f"{name}: serving the pipeline of {config.endpoints['health']}", file=sys.stderr)
    _target(name)(spec)


class RemoteEngine:
    """The `Engine` interface the server and `Generation` use, run by the compute stage."""

    def __init__(
        self,
        cfg,
        endpoints: dict[str, str],
        limits: Limits,
        mode: str,
        security: Security,
        start_timeout_s: float,
    ) -> None:
        self.cfg, self.mode, self.limits = cfg, mode, limits
        self.telemetry = Telemetry()
        self.ctx = zmq.Context()
        self.auth = (  # a CURVE server admits only the authorized client keys
            start_authenticator(self.ctx, security)
            if endpoints["results"].startswith("tcp://")
            else None
        )
        self.out = make_socket(self.ctx, zmq.PUSH, endpoints["compute"], False, security)
        self.inbox = make_socket(self.ctx, zmq.PULL, endpoints["results"], True, security)
        self.ready = threading.Event()
        self.failures, self.failure = 0, ""
        self.start_timeout_s = start_timeout_s

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.failures += 1

    def new_cache(self, max_len: int) -> RemoteSequence:
        if max_len > self.cfg.max_positions:
            raise ConfigError(
                f"context of {max_len} tokens exceeds the model's maximum of "
                f"{self.cfg.max_positions}"
            )
        return RemoteSequence(uuid.uuid4().hex, max_len, self.failures)

    def forward(self, tokens: torch.Tensor, seq: RemoteSequence, last_only: bool = False):
        """tokens: [T] -> logits [1, vocab] of the last position (compute returns no more)."""
        if not self.ready.wait(self.start_timeout_s):
            raise StageFailed(f"the pipeline's stages are not ready after {self.start_timeout_s} s")
        if seq.step == 0:
            seq.failures = self.failures
        if seq.failures != self.failures:
            raise StageFailed(self.failure)
        msg = Forward(
            seq.request_id,
            seq.step,
            tokens.numpy().astype(np.int64),
            reset=seq.step == 0,
            max_len=seq.max_len,
        )
        self.out.send_multipart(encode(msg), copy=False)
        while True:
            if seq.failures != self.failures:
                raise StageFailed(self.failure)
            if not self.inbox.poll(20):
                continue
            try:
                reply = decode(
                    self.inbox.recv_multipart(copy=False), self.limits, accept=("logits", "error")
                )
            except ProtocolError as e:
                print(f"launcher: refused a message from compute: {e}", file=sys.stderr)
                continue
            if isinstance(reply, Error) and not reply.request_id:
                print(f"launcher: {reply.message}", file=sys.stderr)  # compute refused one
            if reply.request_id != seq.request_id:
                continue  # a reply to a sequence that already failed
            if isinstance(reply, Error):
                raise StreamerError(reply.message)
            if reply.step == seq.step:
                break
        seq.step += 1
        self.telemetry.steps.append({"step": len(self.telemetry.steps), **reply.stats})
        return torch.from_numpy(np.array(reply.logits))[None]

    def close(self) -> None:
        self.fail("the pipeline is shutting down")
        self.out.close(linger=0)
        self.inbox.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


# --------------------------------------------------------------------------- the launcher


@dataclass
class StageProcess:
    name: str
    spec: StageSpec
    proc: Any = None
    started: float = 0.0
    last_seen: float = 0.0
    ready: bool = False
    said: str = ""  # its DEAD message, if it sent one
    restarts: deque = field(default_factory=deque)
    remote: bool = False  # run by another host (`streamer stage`): watched, never started

    def exited(self) -> bool:
        return self.proc is not None and not self.proc.is_alive()


def _target(name: str):
    import importlib

    return importlib.import_module(f"workers.{name}").run


class Pipeline:
    """The launcher. `async with Pipeline.launch(config) as p:` then connect to `p.endpoint`."""

    def __init__(self, config: PipelineConfig, processes: bool = True) -> None:
        self.config, self.processes = config, processes
        self.endpoint = ""
        self.counts = {"restarts": 0, "deaths": 0}
        self.stages: dict[str, StageProcess] = {}
        self._made_run_dir: Path | None = None
        self.shm: SharedRows | None = None
        self.engine: RemoteEngine | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, config: PipelineConfig, processes: bool = True
    ) -> AsyncIterator[Pipeline]:
        """Start the pipeline; stop it on exit. processes=False runs the three stages as
        tasks of this process (for small models and tests; no restarts)."""
        pipeline = cls(config, processes)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(pipeline.run)
                try:
                    yield pipeline
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # one clear error for the embedder, not a tree
            # Ours, and the protocol package's (an endpoint refused by the socket factory).
            errors = group.subgroup((StreamerError, ProtocolError))
            if errors is None:
                raise
            first = errors
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    def _endpoints(self, run_dir: Path) -> dict[str, str]:
        eps = {name: f"ipc://{run_dir}/{name}.sock" for name in LINKS}
        eps.update(self.config.endpoints)
        return eps

    def _frames(self, endpoints: dict[str, str]) -> bool:
        """Whether the stages exchange rows as frames: they may be on different hosts when a
        link between them is tcp://, and then share no memory."""
        if self.config.remote:
            return True  # a stage on another host cannot map this host's memory
        if self.config.weights != "auto":
            return self.config.weights == "frames"
        return any(endpoints[link].startswith("tcp://") for link in STAGE_LINKS)

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED):
        from streamer.server import Server, ServerSettings, default_endpoint, eos_ids

        config = self.config
        plan = plan_pipeline(config)
        model, cfg = plan.model, plan.model.config
        print(plan.describe(), file=sys.stderr, flush=True)
        if self.processes:
            check_cpus(config, [n for n in STAGES if n not in config.remote])
        tokenizer_spec = model.tokenizer()
        if tokenizer_spec is None:
            raise ModelFormatError(f"{model.directory} has no tokenizer (tokenizer.json)")
        if config.run_dir:
            run_dir = Path(config.run_dir)
        else:
            run_dir = self._made_run_dir = Path(tempfile.mkdtemp(prefix="streamer-"))
        endpoints = self._endpoints(run_dir)
        security = security_of(config)
        shm_path = Path(config.shm_dir) / f"streamer-{os.getpid()}-{uuid.uuid4().hex[:8]}.rows"
        limits = stage_limits(config, plan)
        frames = self._frames(endpoints)
        if frames:
            print("weights: rows travel as zero-copy frames (no shared memory)", file=sys.stderr)
        ctx = zmq.asyncio.Context()
        health = to_compute = auth = None
        tokenizer = tokenizer_spec.build()
        try:
            if not frames:
                self.shm = SharedRows(shm_path, plan.layout, create=True)
            if endpoints["health"].startswith("tcp://"):
                auth = start_authenticator(ctx, security)
            health = make_socket(ctx, zmq.PULL, endpoints["health"], True, security)
            to_compute = make_socket(ctx, zmq.PUSH, endpoints["compute"], False, security)
            mode = "pipeline-serial" if config.serial else "pipeline"
            self.engine = engine = RemoteEngine(
                cfg, endpoints, limits, mode, security, config.start_timeout_s
            )
            parent = os.getpid() if self.processes else 0
            for name in STAGES:
                spec = stage_spec(name, config, plan, endpoints, frames, shm_path, parent)
                self.stages[name] = StageProcess(name, spec, remote=name in config.remote)
            settings = ServerSettings(
                config.endpoint or default_endpoint(),
                security,
                queue_size=config.queue_size,
                model_name=model.description,
                context=config.context,
            )
            server = Server(engine, tokenizer, eos_ids(tokenizer_spec, tokenizer, cfg), settings)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._fail_on_cancel)
                tg.start_soon(self._listen, health)
                for st in self.stages.values():
                    self._start(st, tg)
                await self._wait_ready()
                tg.start_soon(self._watch, to_compute, tg)
                self.endpoint = await tg.start(server.serve)
                task_status.started(self.endpoint)
        finally:
            self._stop_all()
            for sock in (health, to_compute):
                if sock is not None:
                    sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
            if self.shm is not None:
                self.shm.unlink()
            for ep in endpoints.values():
                if ep.startswith("ipc://"):
                    Path(ep[len("ipc://") :]).unlink(missing_ok=True)
            if self._made_run_dir is not None:
                shutil.rmtree(self._made_run_dir, ignore_errors=True)

    async def _fail_on_cancel(self) -> None:
        """On shutdown, the request waiting on a worker thread fails at once (a thread cannot
        be cancelled; it would keep the task group open)."""
        try:
            await anyio.sleep_forever()
        finally:
            self.engine.fail("the pipeline is shutting down")

    def _start(self, st: StageProcess, tg) -> None:
        st.ready, st.said = False, ""
        st.started = st.last_seen = time.monotonic()
        if st.remote:
            return  # its host starts it; it is ready when its READY comes
        if self.processes:
            mp = multiprocessing.get_context("spawn")
            st.proc = mp.Process(
                target=_target(st.name), args=(st.spec,), name=f"streamer-{st.name}"
            )
            with _environment(OMP_WAIT_POLICY="PASSIVE"):
                st.proc.start()
        else:
            tg.start_soon(self._stage_task, st)

    async def _stage_task(self, st: StageProcess) -> None:
        """A stage run as a task of this process: its failure fails the request in flight, then
        stops the pipeline (there is no process to restart)."""
        import importlib

        module = importlib.import_module(f"workers.{st.name}")
        try:
            await module.serve(st.spec)
        except Exception as e:
            text = f"the {st.name} stage failed: {type(e).__name__}: {e}"
            print(f"launcher: {text}", file=sys.stderr, flush=True)
            self.engine.fail(text)
            raise

    async def _listen(self, health) -> None:
        while True:
            frames = await health.recv_multipart(copy=False)
            try:
                msg = decode(frames, accept=("ready", "heartbeat", "dead", "error"))
            except ProtocolError as e:
                print(f"launcher: refused a health message: {e}", file=sys.stderr, flush=True)
                continue
            if isinstance(msg, Error):
                print(f"launcher: {msg.message}", file=sys.stderr, flush=True)
                continue
            st = self.stages.get(msg.stage)
            if st is None:
                continue
            if isinstance(msg, Ready):
                if not self.processes or st.remote or msg.pid == st.proc.pid:
                    st.ready, st.last_seen = True, time.monotonic()
                    if all(s.ready for s in self.stages.values()):
                        self.engine.ready.set()
            elif isinstance(msg, Heartbeat):
                st.last_seen = time.monotonic()
            elif isinstance(msg, Dead):
                st.said = msg.reason

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while not all(st.ready for st in self.stages.values()):
            for st in self.stages.values():
                if st.exited():
                    await anyio.sleep(0.2)  # let its DEAD message arrive
                    raise StreamerError(
                        f"the {st.name} stage failed to start: "
                        f"{st.said or f'exit code {st.proc.exitcode}'}"
                    )
            if time.monotonic() > deadline:
                waiting = [st.name for st in self.stages.values() if not st.ready]
                raise StreamerError(
                    f"stage(s) {', '.join(waiting)} not ready in {self.config.start_timeout_s} s"
                )
            await anyio.sleep(0.05)

    async def _watch(self, to_compute, tg) -> None:
        """Every 50 ms: a stage that exited, or that is silent too long, is dead."""
        cfg = self.config
        while True:
            await anyio.sleep(0.05)
            now = time.monotonic()
            for st in self.stages.values():
                if st.exited():
                    reason = f"exited ({_exit_text(st.proc.exitcode)})"
                elif st.ready and now - st.last_seen > cfg.dead_after_s:
                    reason = f"sent no heartbeat for {now - st.last_seen:.1f} s"
                elif not st.ready and now - st.started > cfg.start_timeout_s:
                    reason = f"was not ready {cfg.start_timeout_s:.0f} s after starting"
                else:
                    continue
                await self._declare_dead(st, reason, to_compute, tg)

    async def _declare_dead(self, st: StageProcess, reason: str, to_compute, tg) -> None:
        await anyio.sleep(0.05)  # its DEAD message, if any, arrives first
        if st.said:
            reason += f": {st.said}"
        text = f"the {st.name} stage {reason}"
        print(f"launcher: {text}", file=sys.stderr, flush=True)
        self.counts["deaths"] += 1
        self.engine.ready.clear()
        self.engine.fail(text)
        if st.name != "compute":
            await to_compute.send_multipart(encode(Dead(st.name, reason)), copy=False)
        if not self.processes:
            raise StreamerError(text)
        if st.remote:  # its own host restarts it; the next request waits for its READY
            self._start(st, tg)
            return
        _kill(st.proc)
        now = time.monotonic()
        while st.restarts and now - st.restarts[0] > 60:
            st.restarts.popleft()
        if not self.config.restart or len(st.restarts) >= self.config.max_restarts:
            raise StreamerError(
                f"{text}; not restarting it ({len(st.restarts)} restarts in the last minute)"
            )
        st.restarts.append(now)
        self.counts["restarts"] += 1
        st.spec.generation += 1
        self._start(st, tg)

    def _stop_all(self) -> None:
        """SIGTERM to every stage, then SIGKILL to those still there after the deadline."""
        procs = [st.proc for st in self.stages.values() if st.proc is not None]
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 5
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.01))
        for p in procs:
            _kill(p)


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables for the processes started inside (a spawned child inherits the
    environment at its start), unless the user set them. OMP_WAIT_POLICY=PASSIVE: a stage's
    idle OpenMP threads sleep instead of spinning on the cores the other stages need (measured
    on the OPT-6.7B shape, 2 cores: --serial 1.61 s a token with ACTIVE, 0.95 s PASSIVE)."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _kill(proc) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
