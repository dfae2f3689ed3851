"""The pipeline's settings (`deploy/pipeline.toml`) and plan: what each stage holds, within the
DRAM budget, and the spec each stage process starts from.

`PipelineConfig` validates every key on construction; errors name the key. `plan_pipeline`
sizes the shared rows with the same planner as the single-process engine
(`streamer.memory.plan_memory`). `stage_spec` is a stage's whole setup, the same whether the
launcher spawns it or another host runs it (`streamer stage`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from protocol.messages import Limits
from protocol.sockets import Security
from streamer.cpus import DEFAULT_CONCURRENCY, parse_cpus, usable_cpus
from streamer.errors import ConfigError, ModelFormatError
from streamer.layout import ConvertedModel, dtype_name, parse_dtype
from streamer.memory import (
    WORKING_MEMORY,
    MemoryPlan,
    kv_bytes,
    parse_budget,
    plan_memory,
    rss_bytes,
)
from streamer.predictor import selection_file
from streamer.registry import open_source
from streamer.window import MAX_READ_GAP, READ_GAP
from workers.shm import SharedLayout
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
    concurrency: int = 0  # flash reads in flight; 0 = 16 per CPU, at most 32
    direct: bool = True
    serial: bool = False  # the same stages, without overlap (for comparison)
    # How bundle rows reach compute: "shared" memory (one host), "frames" (zero-copy ZeroMQ
    # frames: stages on different hosts), "auto": frames when a stage link is tcp://
    weights: str = "auto"
    # The look-ahead reads a neuron of the next layer early only if its predicted probability
    # is at least this (and above the calibrated threshold); the layer's own prediction fetches
    # the rest. Early reads that turn out unneeded cost disk time and CPU that compute shares.
    # 0: the calibrated threshold alone (README, "Decisions").
    lookahead_p: float = 0.0
    # runs of at most this many unneeded neurons between two a token must read are read (and
    # kept, not computed) too: one read instead of two (the engine's --read-gap)
    read_gap: int = READ_GAP
    dtype: str = ""  # compute dtype; "" = the stored one
    compute_threads: int = 0  # 0 = one per CPU of compute_cpus, else every core
    # CPU affinity of the stage processes (Linux), as "0" or "0-5,8": compute's CPUs, and the
    # CPUs the predictor and prefetch share. "" = wherever the OS puts them. Reading from flash
    # can cost CPU, so a look-ahead that reads while compute runs on every core may slow
    # compute by about what it saves (README, "Overlap and CPUs").
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
            (0 <= self.read_gap <= MAX_READ_GAP, f"read_gap must be in [0, {MAX_READ_GAP}]"),
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
    """What the stages hold: the model, the shared rows' layout, and the memory plan."""

    model: ConvertedModel
    shared: SharedLayout
    memory: MemoryPlan
    dtype: str  # the stages' compute dtype

    def describe(self) -> str:
        sl = self.shared
        return (
            f"pipeline: {self.memory.describe()}; windows {sl.n_layers} x {sl.capacity} rows, "
            f"overflow {sl.n_neurons - sl.capacity}, 2 staging layers of {sl.n_neurons}, in "
            "shared memory; the fixed overhead is per process"
        )


def plan_pipeline(config: PipelineConfig) -> PipelinePlan:
    source = open_source(config.model)
    if not isinstance(source, ConvertedModel):
        raise ModelFormatError(
            f"the pipeline streams from the flash layout: run `streamer convert {config.model} "
            "OUT` and `streamer calibrate OUT`, then serve OUT"
        )
    selection = selection_file(source.directory)
    if selection is None:
        raise ModelFormatError(
            f"{source.directory} has no predictors: run `streamer calibrate {config.model}`"
        )
    cfg, lay = source.config, source.layout
    resident_stored = source.manifest["resident"]["bytes"]
    n = cfg.d_ffn
    overhead = rss_bytes() + WORKING_MEMORY

    def plan_for(dtype: torch.dtype) -> MemoryPlan:
        memory = MemoryPlan(
            budget=parse_budget(config.dram_budget or None, source.model_bytes),
            model_bytes=source.model_bytes,
            resident=resident_stored * dtype.itemsize // source.dtype.itemsize,
            predictors=selection.stat().st_size,
            kv_cache=kv_bytes(cfg, min(config.context, cfg.max_positions), dtype),
            cache_rows=0,
            row_bytes=lay.stride,
            n_layers=cfg.n_layers,
            overhead=overhead,
            # the overflow (n - c rows) and two staging layers: 3n - c; each cache row's id
            scratch_rows=3 * n,
            scratch_per_cache_row=-1,
            book_bytes=8,
        )
        return plan_memory(memory, n, "the pipeline")

    if config.dtype:
        dtype = parse_dtype(config.dtype)
        memory = plan_for(dtype)
    else:  # as the single-process engine chooses: float32 where it costs the windows nothing
        dtype, memory = source.dtype, plan_for(source.dtype)
        if dtype != torch.float32:
            try:
                wide = plan_for(torch.float32)
                if wide.cache_rows == memory.cache_rows:
                    dtype, memory = torch.float32, wide
            except ConfigError:
                pass
    return PipelinePlan(
        source,
        SharedLayout(cfg.n_layers, n, memory.cache_rows, lay.stride),
        memory,
        dtype_name(dtype),
    )


def stage_limits(config: PipelineConfig, plan: PipelinePlan) -> Limits:
    """What every stage's decoder accepts, from the model and the layout."""
    cfg, sl = plan.model.config, plan.shared
    return Limits(
        vocab_size=cfg.vocab_size,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_neurons=cfg.d_ffn,
        row_bytes=sl.stride,
        n_rows=sl.n_rows,
        max_tokens=min(config.context, cfg.max_positions),
        # a vocabulary's logits; with frames, a whole layer's rows during a prompt
        max_frame_bytes=max(256 << 20, cfg.vocab_size * 4 + 4096, cfg.d_ffn * sl.stride),
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
        shared=plan.shared,
        window=config.window,
        serial=config.serial,
        frames=frames,
        lookahead_p=config.lookahead_p,
        read_gap=config.read_gap,
        concurrency=config.concurrency or DEFAULT_CONCURRENCY,
        direct=config.direct,
        threads=threads if name == "compute" else 1,
        cpus=compute_cpus if name == "compute" else config.cpus("io_cpus"),
        dtype=plan.dtype,
        heartbeat_s=config.heartbeat_s,
        limits=stage_limits(config, plan),
        security=security_of(config),
        parent_pid=parent_pid,
    )


def security_of(config: PipelineConfig) -> Security:
    return Security(Path(config.key_dir) if config.key_dir else None, insecure=config.insecure)
