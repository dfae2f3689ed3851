"""The pipeline's launcher: starts the stage processes, watches them, restarts the dead.

    client ──generate/cancel──▶ front end (the server of `streamer.services`, over this
      ▲                          module's `RemoteEngine`: the queue, sampling)
      └───token/done/error───────  │ forward ▲ logits
                                   ▼         │
        ┌────────────── compute (resident weights, KV cache; reads window rows) ◀─┐
        │ ffn_input, fill, reset                                   rows_ready,    │
        ▼                                                          layer_ready    │
     predictor (predictors, window books) ──fetch──▶ prefetch (O_DIRECT reads) ───┘
                  │                                  │ writes bundle rows into
                  └───── moves rows in ──▶ shared memory (/dev/shm) ◀── compute maps
     every stage ──ready, heartbeat, dead──▶ the launcher's health socket

`Pipeline.launch(config)` (an async context manager) makes the shared memory, spawns the three
stages and waits for each one's READY; `pipeline.engine` is then the engine interface over them
(`streamer.services.pipeline.serve_pipeline` puts the server in front of it). A stage that exits,
or sends no heartbeat for `dead_after_s`, is declared dead: the request it was serving fails at
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
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import anyio
import anyio.abc
import zmq

from protocol.codec import decode, encode
from protocol.messages import Dead, Error, Heartbeat, ProtocolError, Ready
from protocol.sockets import Sockets
from streamer.errors import ConfigError, StreamerError, first_error
from streamer.registry import load_tokenizer
from streamer.tokenizer import Tokenizer
from workers import compute, predictor, prefetch
from workers.config import (
    LINKS,
    STAGE_LINKS,
    STAGES,
    PipelineConfig,
    PipelinePlan,
    check_cpus,
    plan_pipeline,
    security_of,
    stage_limits,
    stage_spec,
)
from workers.remote import RemoteEngine
from workers.shm import SharedRows
from workers.stage import StageSpec

log = logging.getLogger("launcher")
MODULES = {"predictor": predictor, "prefetch": prefetch, "compute": compute}
SHM_PREFIX = "streamer-"  # then the launcher's pid: streamer-PID-RANDOM.rows
RUN_DIR_PREFIX = "streamer-"  # a run directory made by a launcher, with its pid in PID_FILE
PID_FILE = "launcher.pid"


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


class Pipeline:
    """The launcher. `async with Pipeline.launch(config) as p:` then decode with `p.engine`
    (`streamer.services.pipeline.serve_pipeline` also serves it to clients)."""

    def __init__(self, config: PipelineConfig, processes: bool = True) -> None:
        self.config, self.processes = config, processes
        self.endpoint = ""  # where the front end serves, once one does
        self.counts = {"restarts": 0, "deaths": 0, "refused": 0}
        self.stages: dict[str, StageProcess] = {}
        self._made_run_dir: Path | None = None
        self.shm: SharedRows | None = None
        self.engine: RemoteEngine | None = None
        self.plan: PipelinePlan | None = None
        self.tokenizer: Tokenizer | None = None

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
            raise first_error(group) from None

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
        config = self.config
        self.plan = plan = plan_pipeline(config)
        model, cfg = plan.model, plan.model.config
        log.info("%s", plan.describe())
        if self.processes:
            check_cpus(config, [n for n in STAGES if n not in config.remote])
        self.tokenizer = load_tokenizer(model)  # before anything is made: a clear error
        reclaim_leftovers(Path(config.shm_dir), Path(tempfile.gettempdir()))
        if config.run_dir:
            run_dir = Path(config.run_dir)
        else:
            run_dir = self._made_run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
            async with aiofiles.open(run_dir / PID_FILE, "w") as f:  # on the event loop
                await f.write(str(os.getpid()))
        endpoints = self._endpoints(run_dir)
        security = security_of(config)
        shm_path = Path(config.shm_dir) / f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.rows"
        frames = self._frames(endpoints)
        if frames:
            log.info("weights: rows travel as zero-copy frames (no shared memory)")
        limits = stage_limits(config, plan)
        sockets = Sockets(security, asyncio=True, max_frame_bytes=limits.max_frame_bytes)
        try:
            if not frames:
                self.shm = SharedRows(shm_path, plan.shared, create=True)
            health = sockets.socket(zmq.PULL, endpoints["health"], True)
            to_compute = sockets.socket(zmq.PUSH, endpoints["compute"], False)
            mode = "pipeline-serial" if config.serial else "pipeline"
            self.engine = RemoteEngine(
                cfg,
                endpoints,
                limits,
                mode,
                security,
                config.start_timeout_s,
                ffn_bytes=model.layout.file_bytes,
            )
            parent = os.getpid() if self.processes else 0
            for name in STAGES:
                spec = stage_spec(name, config, plan, endpoints, frames, shm_path, parent)
                self.stages[name] = StageProcess(name, spec, remote=name in config.remote)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._fail_on_cancel)
                tg.start_soon(self._listen, health)
                for st in self.stages.values():
                    self._start(st, tg)
                await self._wait_ready()
                tg.start_soon(self._watch, to_compute, tg)
                task_status.started()
        finally:
            self._stop_all()
            if self.engine is not None:
                self.engine.close()
            sockets.close()
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
                target=MODULES[st.name].run, args=(st.spec,), name=f"streamer-{st.name}"
            )
            with _environment(OMP_WAIT_POLICY="PASSIVE"):
                st.proc.start()
        else:
            tg.start_soon(self._stage_task, st)

    async def _stage_task(self, st: StageProcess) -> None:
        """A stage run as a task of this process: its failure fails the request in flight, then
        stops the pipeline (there is no process to restart)."""
        try:
            await MODULES[st.name].serve(st.spec)
        except Exception as e:
            text = f"the {st.name} stage failed: {type(e).__name__}: {e}"
            log.error("launcher: %s", text)
            self.engine.fail(text)
            raise

    async def _listen(self, health) -> None:
        while True:
            frames = await health.recv_multipart(copy=False)
            try:
                msg = decode(frames, accept=("ready", "heartbeat", "dead", "error"))
            except ProtocolError as e:
                log.warning("launcher: refused a health message: %s", e)
                continue
            if isinstance(msg, Error):  # a stage refused a message
                self.counts["refused"] += 1
                log.warning("launcher: %s", msg.message)
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
        log.error("launcher: %s", text)
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


def reclaim_leftovers(shm_dir: Path, tmp_dir: Path) -> None:
    """Remove what launchers killed before their cleanup left: shared memory files (named by
    the launcher's pid) and run directories (holding its pid in PID_FILE), where that process
    is gone. What a live process owns, or another user's, is never touched."""
    for path in shm_dir.glob(f"{SHM_PREFIX}*-*.rows"):
        pid = path.name[len(SHM_PREFIX) :].partition("-")[0]
        if _left_by_dead(path, pid):
            path.unlink(missing_ok=True)
    for directory in tmp_dir.glob(f"{RUN_DIR_PREFIX}*"):
        try:
            pid = (directory / PID_FILE).read_text().strip()
        except OSError:  # not a run directory, or not ours
            continue
        if _left_by_dead(directory, pid):
            shutil.rmtree(directory, ignore_errors=True)


def _left_by_dead(path: Path, pid: str) -> bool:
    try:
        mine = path.stat().st_uid == os.getuid()
    except OSError:  # gone already (another launcher reclaimed it)
        return False
    if not (mine and pid.isdigit()) or _alive(int(pid)):
        return False
    log.info("removing %s, left by launcher %s, which is gone", path, pid)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables for the processes started inside (a spawned child inherits the
    environment at its start), unless the user set them. OMP_WAIT_POLICY=PASSIVE: a stage's
    idle OpenMP threads sleep instead of spinning on the cores the other stages need (README,
    "Overlap and CPUs", has the measurement)."""
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
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


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
    log.info("%s: serving the pipeline of %s", name, config.endpoints["health"])
    MODULES[name].run(spec)
