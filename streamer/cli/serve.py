"""Commands that serve: serve (one process, or the pipeline with --config), stage, keys."""

from __future__ import annotations

import argparse
import signal
from functools import partial
from multiprocessing import resource_tracker
from pathlib import Path

import anyio
import torch

from protocol.sockets import make_keys
from streamer.cli.common import (
    DEFAULT_CONTEXT,
    MODEL_HELP,
    add_engine,
    add_security,
    check_engine_args,
    open_engine,
    security,
    set_threads,
)
from streamer.errors import ConfigError
from streamer.layout import ConvertedModel
from streamer.quant import RESIDENT_KINDS
from streamer.registry import load_tokenizer, open_source, resolve_default
from streamer.services.engines import calibrate_default
from streamer.services.http import HttpApi, bind_http, serve_http
from streamer.services.pipeline import serve_pipeline
from streamer.services.scheduler import Scheduler
from streamer.services.server import Server, ServerSettings, bind, default_endpoint
from workers.config import PipelineConfig
from workers.launcher import run_remote_stage


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve generation over ZeroMQ",
        description="Load MODEL, bind ENDPOINT, print `ready ENDPOINT`, and serve `generate` "
        "requests (protocol/README.md) until SIGINT or SIGTERM. Without --config: the "
        "single-process engine. With --config FILE (deploy/pipeline.toml): the pipeline of "
        "predictor, prefetch and compute processes; MODEL and the options given here override "
        "the file's.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help=MODEL_HELP)
    p.add_argument("--config", type=Path, help="run the pipeline with this TOML config")
    p.add_argument(
        "--serial",
        action="store_true",
        help="pipeline: the same stages without overlapping I/O and compute (for comparison)",
    )
    p.add_argument(
        "--endpoint",
        help="ipc://PATH or tcp://HOST:PORT (default: "
        "ipc://$XDG_RUNTIME_DIR/streamer/front.sock, else under /tmp/streamer-UID)",
    )
    p.add_argument(
        "--context",
        type=int,
        help=f"most tokens of prompt plus reply a request may use (default: {DEFAULT_CONTEXT})",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the OpenAI-compatible HTTP API here (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics), from the same engine",
    )
    add_security(p)
    add_engine(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "stage",
        help="run one pipeline stage for a launcher on another host",
        description="Run the predictor, prefetch or compute stage of the pipeline in FILE, "
        "which lists it under `remote` (so its launcher does not start it) and gives every "
        "link a tcp:// endpoint. Rows travel as zero-copy frames: no memory is shared. The "
        "model must be at the config's path on this host too. Stops on SIGTERM.",
    )
    p.add_argument("name", choices=("predictor", "prefetch", "compute"), help="the stage")
    p.add_argument("--config", type=Path, required=True, help="the pipeline's TOML config")
    p.set_defaults(handler=cmd_stage)

    p = sub.add_parser(
        "keys",
        help="make CURVE key pairs for tcp:// endpoints",
        description="Write a server and a client key pair (pyzmq certificate files) into DIR "
        "(mode 0700; secret files 0600). A server admits the client public keys in DIR.",
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="the directory for the keys")
    p.set_defaults(handler=cmd_keys)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _serve_pipeline(args)
    if args.serial:
        raise ConfigError("--serial is a pipeline setting: it needs --config")
    args.model = args.model or "default"
    context = DEFAULT_CONTEXT if args.context is None else args.context
    check_engine_args(args)
    if context < 2:
        raise ConfigError(f"context must be at least 2, got {context}", "context")
    set_threads(args.threads)
    settings = ServerSettings(args.endpoint or default_endpoint(), security(args), context=context)
    # First: a bad or busy endpoint is refused before the model loads.
    http = bind_http(args.http) if args.http else None
    try:
        bound = bind(settings)
    except BaseException:
        if http is not None:
            http.close()
        raise
    api = HttpApi(api_model_name(args.model)) if http is not None else None

    def load():
        source = open_source(args.model)
        tokenizer = load_tokenizer(source, args.model)
        return source, tokenizer, open_engine(args, source, context)

    async def main() -> None:
        engine = None
        try:
            async with anyio.create_task_group() as tg:
                if api is not None:  # up while the model loads: /health says 503
                    await tg.start(serve_http, api, http)
                    print(f"http http://{args.http}", flush=True)
                source, tokenizer, engine = await anyio.to_thread.run_sync(load)
                settings.model_name = source.description
                scheduler = Scheduler(engine, tokenizer, context, settings.queue_size)
                await tg.start(scheduler.run)
                if api is not None:
                    api.attach(scheduler)
                server = Server(None, tokenizer, settings, scheduler=scheduler)
                endpoint = await tg.start(partial(server.serve, bound=bound))
                print(f"ready {endpoint}", flush=True)
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return
        finally:
            bound.close()
            if engine is not None:
                engine.close()

    anyio.run(main)
    return 0


def api_model_name(model: str) -> str:
    """The model's id in the HTTP API: "default", or the directory's or file's name."""
    return model if model == "default" else Path(model).name


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """The config file's settings, overridden by every option given on the command line."""
    given = {
        "model": args.model,
        "endpoint": args.endpoint,
        "serial": args.serial or None,
        "key_dir": str(args.keys) if args.keys else None,
        "insecure": args.insecure or None,
        "dram_budget": args.dram_budget,
        "dtype": args.dtype,
        "direct": False if args.buffered else None,
        # None where the option was not given (no parser default): the file's value stands.
        "window": args.window,
        "concurrency": args.concurrency,
        "context": args.context,
        "read_gap": args.read_gap,
    }
    if args.mode not in ("auto", "all"):
        raise ConfigError(f"the pipeline runs mode all; --mode {args.mode} needs no --config")
    if args.quant_resident in RESIDENT_KINDS:
        raise ConfigError("the pipeline keeps the resident part as stored: no --quant-resident")
    return PipelineConfig.from_toml(
        args.config, **{k: v for k, v in given.items() if v is not None}
    )


def _serve_pipeline(args: argparse.Namespace) -> int:
    config = pipeline_config(args)
    if config.model == "default":
        calibrate_default(ConvertedModel(resolve_default()))
    torch.set_num_threads(1)  # this process only samples; the cores are compute's

    http = bind_http(args.http) if args.http else None
    api = HttpApi(api_model_name(config.model)) if http is not None else None

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            if api is not None:  # up while the stages start: /health says 503
                await tg.start(serve_http, api, http)
                print(f"http http://{args.http}", flush=True)
            async with serve_pipeline(config, api=api) as pipeline:
                print(f"ready {pipeline.endpoint}", flush=True)
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        # `spawn` started multiprocessing's resource tracker; stop (and reap) it too, so that
        # nothing of ours outlives the launcher. (A private API: absent, the tracker exits
        # by itself when this process does.)
        stop = getattr(resource_tracker._resource_tracker, "_stop", None)
        if stop is not None:
            stop()
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    run_remote_stage(args.name, PipelineConfig.from_toml(args.config))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    for name, path in make_keys(args.dir).items():
        print(f"{name}: {path}")
    return 0
