"""The `streamer` command: convert, verify, calibrate, generate, eval, serve, stage, keys, ...

Errors the engine raises on purpose (`StreamerError`) print as one line on stderr with exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from streamer.cpus import DEFAULT_CONCURRENCY, usable_cpus
from streamer.errors import ConfigError, ModelFormatError, StreamerError

MODEL_HELP = (
    "a converted directory, a Hugging Face directory, a .gguf file, or 'default' "
    "(SmolLM2-135M-Instruct, converted on first use)"
)
MODES = ("auto", "dense", "naive", "hybrid", "predictor", "window", "all", "oracle")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=len(usable_cpus()),
        help="torch compute threads (default: every CPU this process may use, %(default)s)",
    )


def _add_engine(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("flash engine")
    g.add_argument(
        "--mode",
        default="auto",
        choices=MODES,
        help="dense: all in DRAM; naive: every weight from flash per token; hybrid: "
        "resident part in DRAM, whole FFN from flash; predictor: predicted neurons "
        "only; window: + sliding window, one read per vector; all: + bundled reads; "
        "oracle: the true active set. auto (default): all when the model is "
        "converted and calibrated, else dense",
    )
    g.add_argument(
        "--window",
        type=int,
        default=4,
        help="tokens whose active neurons stay in DRAM (default: %(default)s)",
    )
    g.add_argument(
        "--dram-budget",
        metavar="SIZE",
        help="DRAM for weights and caches: bytes, 2GiB, 500MB, or 60%% of the model "
        "(default: no cap)",
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="flash reads in flight (default: 4 per CPU, at most 32: %(default)s here)",
    )
    g.add_argument(
        "--buffered",
        action="store_true",
        help="buffered reads instead of O_DIRECT (not cold-cache figures)",
    )
    g.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="compute dtype (default: float32 for dense, the stored dtype otherwise)",
    )
    _add_threads(p)


def _add_security(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="CURVE keys for tcp:// endpoints (`streamer keys DIR`)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain tcp:// without CURVE (trusted networks only)",
    )


def _security(args: argparse.Namespace):
    from protocol.sockets import Security

    return Security(key_dir=args.keys, insecure=args.insecure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Run language models bigger than DRAM by streaming FFN neurons from flash.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="write a model in the on-flash layout",
        description="Convert SRC into OUT: resident weights in safetensors, FFN "
        "neuron bundles aligned for O_DIRECT, a manifest with checksums.",
    )
    p.add_argument("src", metavar="SRC", help="a Hugging Face directory, a .gguf file or 'default'")
    p.add_argument("out", metavar="OUT", type=Path, help="the directory to create")
    p.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="storage dtype of the converted weights (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace a model OUT already holds")

    p = sub.add_parser(
        "verify",
        help="check a converted model's files against its manifest",
        description="Check sizes and per-layer SHA-256 checksums.",
    )
    p.add_argument("model", metavar="MODEL", help="a converted directory or 'default'")

    p = sub.add_parser(
        "calibrate",
        help="train the activation predictors of a converted model",
        description="Record which FFN neurons fire on calibration text, train a "
        "low-rank predictor and a look-ahead predictor per layer, and report "
        "recall, precision and perplexity on held-out text.",
    )
    p.add_argument("model", metavar="MODEL", help="a converted directory or 'default'")
    p.add_argument(
        "--text",
        type=Path,
        action="append",
        default=[],
        help="calibration text file (repeatable; default: text shipped with streamer)",
    )
    p.add_argument(
        "--heldout",
        type=Path,
        help="held-out text for the report (default: text shipped with streamer)",
    )
    p.add_argument(
        "--ranks",
        default="128",
        help="predictor rank: RANK, or per layer as 0-27:256,28-31:1152 (default: %(default)s)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="SwiGLU models: fraction of neurons counted inactive, by magnitude "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--recall",
        type=float,
        default=0.99,
        help="each layer's threshold keeps this fraction of the active neurons' "
        "activation mass on validation text (default: %(default)s)",
    )
    p.add_argument(
        "--fit",
        choices=("auto", "lowrank", "sgd"),
        default="auto",
        help="how predictors are fit: lowrank (closed-form reduced-rank regression on the "
        "neurons' pre-activations), sgd (binary cross-entropy by gradient descent), auto: "
        "lowrank for ReLU models, sgd for SwiGLU (default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=int, default=30, help="sgd training epochs (default: %(default)s)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=256,
        help="training samples per step; smaller takes more, cheaper steps, which a large "
        "model's predictors need (default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=float, default=3e-3, help="Adam's learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=8192,
        help="most calibration tokens used (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the model's dtype while recording, one layer in DRAM at a time: float32 "
        "(default), or bfloat16, fast on CPUs with AMX",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_threads(p)

    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text; streams it to the terminal, or prints one "
        "JSON object with --json.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default="default",
        help=MODEL_HELP + " (default: default)",
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--max-tokens", type=int, default=128, help="most tokens to generate (default: %(default)s)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="0 for greedy decoding (default: %(default)s)",
    )
    p.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling mass (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the model's chat template as a user turn",
    )
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--stats", action="store_true", help="print a telemetry table on stderr")
    p.add_argument(
        "--connect",
        metavar="ENDPOINT",
        help="ask a running `streamer serve` instead of loading MODEL here",
    )
    _add_security(p)
    _add_engine(p)

    p = sub.add_parser(
        "eval",
        help="perplexity of a text in any mode",
        description="Perplexity of each token given the ones before it.",
    )
    p.add_argument("model", metavar="MODEL", help="a converted directory or 'default'")
    p.add_argument("--text", type=Path, required=True, help="the text file")
    p.add_argument(
        "--context", type=int, default=512, help="tokens per sequence (default: %(default)s)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=4096, help="most tokens scored (default: %(default)s)"
    )
    p.add_argument(
        "--json", action="store_true", help="print {perplexity, tokens, mode, ...} as JSON"
    )
    _add_engine(p)

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
        default=2048,
        help="most tokens of prompt plus reply a request may use (default: %(default)s)",
    )
    _add_security(p)
    _add_engine(p)

    p = sub.add_parser(
        "synth",
        help="write a 7B-shaped model with real sparsity (for the benchmark)",
        description="Write a Hugging Face directory with the shapes of a 7B model and random "
        "weights made so that a forward pass is sparse like the trained model's (some neurons "
        "far more often active than others, consecutive tokens sharing their active sets), "
        "then measure that sparsity. Convert and calibrate it like any model.",
    )
    p.add_argument("out", metavar="OUT", type=Path, help="a new directory")
    p.add_argument("--like", required=True, help="opt-6.7b, falcon-7b or llama-2-7b")
    p.add_argument("--layers", type=int, help="fewer layers than the real model")
    p.add_argument(
        "--scale",
        type=int,
        default=1,
        help="divide the widths (and vocabulary) by this power of two: a small model of the "
        "same family (default: %(default)s, the real shapes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument(
        "--tokens", type=int, default=96, help="tokens the sparsity is measured on (default: 96)"
    )
    p.add_argument("--window", type=int, default=5, help="for the newly-loaded fraction (5)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_threads(p)

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

    p = sub.add_parser(
        "keys",
        help="make CURVE key pairs for tcp:// endpoints",
        description="Write a server and a client key pair (pyzmq certificate files) into DIR "
        "(mode 0700; secret files 0600). A server admits the client public keys in DIR.",
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="the directory for the keys")

    p = sub.add_parser(
        "probe-disk",
        help="random-read throughput of a disk, with O_DIRECT",
        description="Reads a scratch file (made next to PATH when it is a "
        "directory) at random aligned offsets, per chunk size and concurrency.",
    )
    p.add_argument(
        "path",
        metavar="PATH",
        nargs="?",
        default=".",
        help="a file to read, or a directory on the disk (default: .)",
    )
    p.add_argument(
        "--chunks", default="4K,16K,64K,256K,1M", help="chunk sizes (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency", default="1,4,8,16,32,64", help="reads in flight (default: %(default)s)"
    )
    p.add_argument(
        "--seconds", type=float, default=1.0, help="time per cell (default: %(default)s)"
    )
    p.add_argument("--file-size", default="1GiB", help="scratch file size (default: %(default)s)")
    p.add_argument(
        "--processes",
        action="store_true",
        help="one process per read in flight, as fio's jobs (default: the engine's reader threads)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

    p = sub.add_parser(
        "bench",
        help="the paper's Tables 2 and 3 on this machine, beside naive loading and a peer",
        description="In one run at one DRAM budget, with cold reads: the disk probe; the "
        "ablation rows naive, hybrid, predictor, window, all; the pipeline with overlap and "
        "--serial; transformers + accelerate disk offload. Prints a Markdown table and writes "
        "bench.json and bench.png under --out.",
    )
    p.add_argument("model", metavar="MODEL", help="a converted, calibrated directory or 'default'")
    p.add_argument("--dram-budget", default="50%", help="for every row (default: %(default)s)")
    p.add_argument("--window", type=int, default=4, help="tokens in the window (default: 4)")
    p.add_argument("--tokens", type=int, default=8, help="decoded tokens per row (default: 8)")
    p.add_argument(
        "--text",
        type=Path,
        help="the text every row runs: 16 tokens of prompt, then one token per step "
        "(default: the held-out text shipped with streamer)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="decoding time per row; it stops after the token that passes it (default: 60)",
    )
    p.add_argument(
        "--rows",
        help="which rows, in order: naive,hybrid,predictor,window,all,pipeline,serial,"
        "accelerate (default: all of them)",
    )
    p.add_argument(
        "--hf",
        type=Path,
        help="the peer's Hugging Face directory (default: the one MODEL was converted from)",
    )
    p.add_argument("--out", type=Path, default=Path("bench"), help="output directory (./bench)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="reads in flight (default: 4 per CPU, at most 32: %(default)s here)",
    )
    p.add_argument("--probe-seconds", type=float, default=2.0, help="disk probe time (2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--compute-cpus",
        default="",
        help='pipeline rows: the CPUs of compute, e.g. "0" (default: any), with at most '
        "--threads threads",
    )
    p.add_argument(
        "--io-cpus", default="", help="pipeline rows: the CPUs predictor and prefetch share"
    )
    p.add_argument(
        "--lookahead-p",
        type=float,
        default=0.0,
        help="pipeline rows: read early only neurons at least this likely (default: 0, the "
        "calibrated threshold)",
    )
    _add_threads(p)
    return parser


def _cmd_convert(args: argparse.Namespace) -> int:
    from streamer.convert import convert
    from streamer.sources import open_source

    source = open_source(args.src)
    result = convert(source, args.out, dtype=args.dtype, force=args.force)
    if result.converted:
        print(
            f"converted {source.description} -> {result.directory} "
            f"({result.bytes_written / 2**20:.1f} MiB, {args.dtype})"
        )
    else:
        print(f"{result.directory} already holds this model ({args.dtype}); nothing to do")
    return 0


def _converted_dir(model: str) -> Path:
    from streamer.layout import MANIFEST
    from streamer.registry import resolve_default

    directory = resolve_default() if model == "default" else Path(model).expanduser()
    if not (directory / MANIFEST).is_file():
        raise ModelFormatError(
            f"{model} is not a converted model directory: run `streamer convert` first"
        )
    return directory


def _cmd_verify(args: argparse.Namespace) -> int:
    from streamer.convert import verify

    directory = _converted_dir(args.model)
    problems = verify(directory)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"ok {directory}")
    return 0


def _set_threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from streamer.calibrate import CalibrationSettings, calibrate

    _set_threads(args.threads)
    for path in [*args.text, *([args.heldout] if args.heldout else [])]:
        if not path.is_file():
            raise ConfigError(f"text file {path} not found")
    settings = CalibrationSettings(
        texts=args.text,
        heldout=args.heldout,
        ranks=args.ranks,
        sparsity=args.sparsity,
        target_recall=args.recall,
        epochs=args.epochs,
        fit=args.fit,
        batch=args.batch,
        lr=args.lr,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
    )
    directory = _converted_dir(args.model)
    report = calibrate(directory, settings)
    if args.json:
        print(json.dumps(report))
        return 0
    columns = [
        ("layer", "layer", "d"),
        ("rank", "rank", "d"),
        ("active", "active", ".3f"),
        ("predicted", "predicted", ".3f"),
        ("recall", "recall", ".3f"),
        ("precision", "precision", ".3f"),
        ("mass rec", "mass_recall", ".3f"),
        ("ahead pred", "lookahead_predicted", ".3f"),
        ("ahead rec", "lookahead_recall", ".3f"),
        ("ahead mass", "lookahead_mass_recall", ".3f"),
    ]
    print(" ".join(f"{title:>10}" for title, _, _ in columns))
    for r in report["layers"]:
        print(
            " ".join(f"{r[key]:>10{fmt}}" if key in r else f"{'-':>10}" for _, key, fmt in columns)
        )
    ppl = report["perplexity"]
    print(
        f"perplexity on {report['heldout_tokens']} held-out tokens: dense {ppl['dense']:.3f}, "
        f"oracle {ppl['oracle']:.3f}, predictor {ppl['predictor']:.3f} "
        f"({(ppl['predictor'] / ppl['dense'] - 1) * 100:+.1f}%)"
    )
    print(f"saved predictors to {directory} ({report['seconds']} s)")
    return 0


def _open_engine(args: argparse.Namespace, max_len: int):
    """(engine, source) for generate and eval; `--mode auto` picks all or dense."""
    from streamer.engine import load_engine
    from streamer.layout import MANIFEST, ConvertedModel
    from streamer.predictor import META_FILE
    from streamer.sources import open_source

    source = open_source(args.model)
    mode = args.mode
    converted = isinstance(source, ConvertedModel)
    if mode == "auto":
        calibrated = converted and (source.directory / META_FILE).is_file()
        mode = "all" if calibrated else "dense"
        if not calibrated:
            why = "not calibrated: run `streamer calibrate`" if converted else "not converted"
            print(f"mode dense (the model is {why} for the flash modes)", file=sys.stderr)
    if mode == "dense" and not converted:
        import torch

        from streamer.engine import dense_engine

        dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
        return dense_engine(source, dtype, max_len), source
    if not converted:
        raise ModelFormatError(
            f"mode {mode} streams from the flash layout: run `streamer "
            f"convert {args.model} OUT` and pass OUT"
        )
    assert (source.directory / MANIFEST).is_file()
    engine = load_engine(
        source.directory,
        mode=mode,
        window=args.window,
        dram_budget=args.dram_budget,
        concurrency=args.concurrency,
        direct=not args.buffered,
        dtype=args.dtype,
        max_len=max_len,
    )
    if engine.mode != "dense" or args.dram_budget:
        print(f"mode {engine.mode}: {engine.plan.describe()}", file=sys.stderr)
    return engine, source


def _cmd_generate(args: argparse.Namespace) -> int:
    from streamer.engine import rss_bytes
    from streamer.generate import Generation, SamplingParams
    from streamer.sources import open_source

    if args.connect:
        return _generate_remote(args)
    _set_threads(args.threads)
    t0 = time.perf_counter()
    spec = open_source(args.model).tokenizer()
    if spec is None:
        raise ModelFormatError(f"{args.model} has no tokenizer (tokenizer.json)")
    tokenizer = spec.build()
    prompt_ids = (
        tokenizer.chat(args.prompt, args.system) if args.chat else tokenizer.encode(args.prompt)
    )
    if args.max_tokens < 1:
        raise ConfigError(f"max_tokens must be at least 1, got {args.max_tokens}")
    engine, source = _open_engine(args, len(prompt_ids) + args.max_tokens)
    load_ms = (time.perf_counter() - t0) * 1e3
    stop = set() if args.ignore_eos else set(source.config.eos_token_ids)
    eos = tokenizer.token_id(spec.eos_token)
    if eos is not None and not args.ignore_eos:
        stop.add(eos)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_ids=tuple(sorted(stop)),
    )
    with engine:
        run = Generation(engine, prompt_ids, params)
        if args.json:
            run.run()
        else:
            shown = ""
            for _ in run:
                text = tokenizer.decode(run.token_ids)
                # Hold back a partial UTF-8 character until its last byte arrives.
                if not text.endswith("\ufffd") and text.startswith(shown):
                    sys.stdout.write(text[len(shown) :])
                    sys.stdout.flush()
                    shown = text
            sys.stdout.write(tokenizer.decode(run.token_ids)[len(shown) :] + "\n")
    telemetry = engine.telemetry
    summary = {
        "model": source.description,
        "mode": engine.mode,
        "threads": args.threads,
        "window": args.window,
        "load_ms": round(load_ms, 3),
        **run.summary,
        **telemetry.summary(),
        "peak_rss_bytes": rss_bytes(peak=True),
        "memory": engine.plan.__dict__ | {"total": engine.plan.total},
    }
    if args.stats:
        _print_stats(telemetry, summary)
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": run.token_ids,
                    "text": tokenizer.decode(run.token_ids),
                    "prompt_token_ids": prompt_ids,
                    "summary": summary,
                    "steps": telemetry.steps,
                }
            )
        )
    else:
        print(
            f"[{summary['generated_tokens']} tokens, {summary['ms_per_token']} ms/token, "
            f"mode {engine.mode}, stop: {summary['stop_reason']}]",
            file=sys.stderr,
        )
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    import anyio

    from protocol.messages import Done
    from streamer.client import Client

    async def main() -> Done:
        async with Client(args.connect, _security(args)) as client:
            async for event in client.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                chat=args.chat,
                system=args.system or "",
                ignore_eos=args.ignore_eos,
            ):
                if isinstance(event, Done):
                    return event
                if not args.json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        raise StreamerError("the server ended the request without a result")

    done = anyio.run(main)
    if args.json:
        print(json.dumps({"token_ids": done.token_ids, "text": done.text, "summary": done.summary}))
    else:
        print()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import anyio

    from streamer.server import Server, ServerSettings, default_endpoint, eos_ids
    from streamer.sources import open_source

    if args.config is not None:
        return _serve_pipeline(args)
    if args.serial:
        raise ConfigError("--serial is a pipeline setting: it needs --config")
    args.model = args.model or "default"
    _set_threads(args.threads)
    if args.context < 2:
        raise ConfigError(f"--context must be at least 2, got {args.context}")
    spec = open_source(args.model).tokenizer()
    if spec is None:
        raise ModelFormatError(f"{args.model} has no tokenizer (tokenizer.json)")
    tokenizer = spec.build()
    engine, source = _open_engine(args, args.context)
    settings = ServerSettings(
        args.endpoint or default_endpoint(),
        _security(args),
        model_name=source.description,
        context=args.context,
    )
    server = Server(engine, tokenizer, eos_ids(spec, tokenizer, source.config), settings)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            endpoint = await tg.start(server.serve)
            print(f"ready {endpoint}", flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

    anyio.run(main)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from streamer.synth import synth

    _set_threads(args.threads)
    if args.tokens < args.window + 2:
        raise ConfigError(f"--tokens must be at least --window + 2, got {args.tokens}")
    report = synth(
        args.like,
        args.out,
        layers=args.layers,
        scale=args.scale,
        seed=args.seed,
        dtype=args.dtype,
        progress=not args.json,
        measure_tokens=args.tokens,
        window=args.window,
    )
    if args.json:
        print(json.dumps(report))
        return 0
    k = report["window"]
    paper = report["paper"]
    print(
        f"{args.out}: {report['like']}, {report['layers']} layers, d {report['d_model']}, "
        f"FFN {report['d_ffn']}, {report['bytes'] / 1e9:.2f} GB, {report['seconds']} s"
    )
    print(f"{'':34} {'measured':>9} {'paper':>7}")
    print(
        f"{'sparsity (inactive per token)':34} {report['sparsity']:9.1%} "
        f"{paper.get('sparsity', float('nan')):7.1%}"
    )
    print(f"{'active per token':34} {report['active_per_token']:9.2%}")
    print(f"{'activations in the top 10% neurons':34} {report['top10_share']:9.1%}")
    new = report[f"new_per_token_window{k}"]
    paper_new = paper.get(f"new_per_token_window{k}", float("nan"))
    print(f"{f'newly needed per token, window {k}':34} {new:9.2%} {paper_new:7.1%}")
    print(f"next: streamer convert {args.out} OUT && streamer calibrate OUT")
    return 0


def _serve_pipeline(args: argparse.Namespace) -> int:
    import signal

    import anyio
    import torch

    from streamer.pipeline import Pipeline, PipelineConfig

    given = {
        "model": args.model,
        "endpoint": args.endpoint,
        "serial": args.serial or None,
        "key_dir": str(args.keys) if args.keys else None,
        "insecure": args.insecure or None,
        "dram_budget": args.dram_budget,
        "dtype": args.dtype,
        "direct": False if args.buffered else None,
        # Options with defaults override the file only when they differ from the default.
        "window": args.window if args.window != 4 else None,
        "concurrency": args.concurrency if args.concurrency != DEFAULT_CONCURRENCY else None,
        "context": args.context if args.context != 2048 else None,
    }
    if args.mode not in ("auto", "all"):
        raise ConfigError(f"the pipeline runs mode all; --mode {args.mode} needs no --config")
    config = PipelineConfig.from_toml(
        args.config, **{k: v for k, v in given.items() if v is not None}
    )
    torch.set_num_threads(1)  # this process only samples; the cores are compute's

    async def main() -> None:
        async with Pipeline.launch(config) as pipeline:
            print(f"ready {pipeline.endpoint}", flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    return

    try:
        anyio.run(main)
    finally:
        # `spawn` started multiprocessing's resource tracker; stop (and reap) it too, so that
        # nothing of ours outlives the launcher. (A private API: absent, the tracker exits
        # by itself when this process does.)
        from multiprocessing import resource_tracker

        stop = getattr(resource_tracker._resource_tracker, "_stop", None)
        if stop is not None:
            stop()
    return 0


def _print_stats(telemetry, summary: dict[str, Any]) -> None:
    out = sys.stderr
    per = summary.get("per_token")
    print(
        f"mode {summary['mode']}, {summary['generated_tokens']} tokens, peak RSS "
        f"{summary['peak_rss_bytes'] / 2**20:.1f} MiB",
        file=out,
    )
    if not per:
        return
    print(
        "per decoded token: "
        + ", ".join(
            f"{k} {per[k]:.1f}" if isinstance(per[k], float) else f"{k} {per[k]}"
            for k in (
                "bytes_read",
                "reads",
                "predicted",
                "hits",
                "loaded",
                "evicted",
                "overflow",
                "io_ms",
                "mem_ms",
                "compute_ms",
                "total_ms",
            )
        ),
        file=out,
    )
    decode = [s for s in telemetry.steps if s["tokens"] == 1]
    if decode and decode[0]["layers"]:
        print(
            f"{'layer':>5} {'KiB read':>9} {'reads':>6} {'predicted':>9} {'hits':>6} "
            f"{'loaded':>6} {'evicted':>7} {'cached':>6} {'io ms':>7} {'mem ms':>7}",
            file=out,
        )
        n = len(decode)
        for i in range(len(decode[0]["layers"])):
            rows = [s["layers"][i] for s in decode]

            def mean(k: str, rows=rows) -> float:
                return sum(r[k] for r in rows) / n

            print(
                f"{i:>5} {mean('bytes_read') / 1024:>9.1f} {mean('reads'):>6.1f} "
                f"{mean('predicted'):>9.1f} {mean('hits'):>6.1f} {mean('loaded'):>6.1f} "
                f"{mean('evicted'):>7.1f} {mean('cached'):>6.1f} {mean('io_ms'):>7.2f} "
                f"{mean('mem_ms'):>7.2f}",
                file=out,
            )


def _cmd_eval(args: argparse.Namespace) -> int:
    from streamer.calibrate import perplexity

    _set_threads(args.threads)
    if not args.text.is_file():
        raise ConfigError(f"text file {args.text} not found")
    if args.context < 2:
        raise ConfigError(f"--context must be at least 2, got {args.context}")
    from streamer.sources import open_source

    spec = open_source(args.model).tokenizer()
    if spec is None:
        raise ModelFormatError(f"{args.model} has no tokenizer (tokenizer.json)")
    tokens = spec.build().encode(args.text.read_text())[: args.max_tokens]
    engine, _ = _open_engine(args, args.context)
    if engine.flash_ffn is not None and hasattr(engine.flash_ffn, "dense_prefill"):
        engine.flash_ffn.dense_prefill = False  # score every token through the window
    t0 = time.perf_counter()
    with engine:
        ppl, n = perplexity(engine, tokens, args.context)
    result = {
        "perplexity": round(ppl, 4),
        "tokens": n,
        "mode": engine.mode,
        "window": args.window,
        "seconds": round(time.perf_counter() - t0, 2),
        **{k: v for k, v in engine.telemetry.summary().items() if k != "per_token"},
    }
    print(
        json.dumps(result)
        if args.json
        else f"perplexity {ppl:.4f} over {n} tokens (mode {engine.mode})"
    )
    return 0


def _size(text: str) -> int:
    from streamer.engine import parse_budget

    value = parse_budget(text, 0)
    assert value is not None
    return value


def _cmd_probe_disk(args: argparse.Namespace) -> int:
    from streamer.flash import ALIGN, probe_disk

    try:
        chunks = [_size(c) for c in args.chunks.split(",")]
        concs = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise ConfigError("--chunks and --concurrency take comma-separated lists") from None
    if any(c % ALIGN for c in chunks):
        raise ConfigError(f"chunk sizes must be multiples of {ALIGN} for O_DIRECT")
    if not os.path.exists(args.path):
        raise ConfigError(f"{args.path} not found")
    rows = probe_disk(
        args.path,
        chunks,
        concs,
        seconds=args.seconds,
        file_bytes=_size(args.file_size),
        processes=args.processes,
    )
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows[0]["direct"]:
        print("(buffered reads: O_DIRECT was refused on this filesystem)")
    print("GB/s of random reads; rows: chunk size, columns: reads in flight")
    print(f"{'chunk':>8} " + " ".join(f"{c:>7}" for c in concs))
    for chunk in chunks:
        cells = {r["concurrency"]: r["gb_per_s"] for r in rows if r["chunk"] == chunk}
        print(f"{chunk // 1024:>6}Ki " + " ".join(f"{cells[c]:>7.3f}" for c in concs))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from streamer.bench import ROWS, BenchSettings, markdown, run_bench

    _set_threads(args.threads)
    settings = BenchSettings(
        dram_budget=args.dram_budget,
        window=args.window,
        tokens=args.tokens,
        text=args.text,
        max_seconds=args.max_seconds,
        rows=tuple(r.strip() for r in args.rows.split(",")) if args.rows else ROWS,
        hf=args.hf,
        out=args.out,
        concurrency=args.concurrency,
        probe_seconds=args.probe_seconds,
        threads=args.threads,
        compute_cpus=args.compute_cpus,
        io_cpus=args.io_cpus,
        lookahead_p=args.lookahead_p,
    )
    report = run_bench(_converted_dir(args.model), settings)
    print(json.dumps(report, default=str) if args.json else markdown(report))
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from streamer.pipeline import PipelineConfig, run_remote_stage

    run_remote_stage(args.name, PipelineConfig.from_toml(args.config))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from protocol.sockets import make_keys

    for name, path in make_keys(args.dir).items():
        print(f"{name}: {path}")
    return 0


COMMANDS = {
    "convert": _cmd_convert,
    "verify": _cmd_verify,
    "calibrate": _cmd_calibrate,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
    "probe-disk": _cmd_probe_disk,
    "bench": _cmd_bench,
    "stage": _cmd_stage,
    "keys": _cmd_keys,
    "serve": _cmd_serve,
    "synth": _cmd_synth,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from protocol.messages import ProtocolError

    try:
        return COMMANDS[args.command](args)
    except (StreamerError, ProtocolError) as e:  # a bad endpoint or socket setting, too
        print(f"streamer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
