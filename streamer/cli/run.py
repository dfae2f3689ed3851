"""Commands that run a model: generate (here, or through a running server) and eval."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import torch

from protocol.messages import Done
from streamer.calibrate import paired_ratio, perplexity
from streamer.cli.common import (
    DEFAULT_WINDOW,
    MODEL_HELP,
    add_engine,
    add_security,
    check_engine_args,
    open_engine,
    security,
    set_threads,
)
from streamer.errors import ConfigError, StreamerError
from streamer.generate import Generation, SamplingParams
from streamer.memory import rss_bytes
from streamer.registry import load_tokenizer, open_source
from streamer.services.client import Client
from streamer.telemetry import COUNTERS, LAYER_COLUMNS, TIMES
from streamer.tokenizer import TextStream, check_messages

log = logging.getLogger("streamer")


def register(sub) -> None:
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
    p.add_argument("--prompt", help="the prompt text (or --messages)")
    p.add_argument(
        "--messages",
        type=Path,
        metavar="FILE",
        help='a conversation instead of --prompt: a JSON list of {"role": "system"|"user"|'
        '"assistant", "content": TEXT}, rendered with the chat template, several turns',
    )
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
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: off)")
    p.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below this share of the best (0: off)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already seen by this (1: off)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end the reply before this text (may be given again)",
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
    add_security(p)
    add_engine(p)
    p.set_defaults(handler=cmd_generate)

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
        "--against",
        metavar="REF",
        help="also score the text with REF (a model with the same tokenizer) in dense mode, as "
        "stored, and "
        "report the perplexity ratio to it, with a 95%% interval (a paired bootstrap over the "
        "tokens)",
    )
    p.add_argument(
        "--json", action="store_true", help="print {perplexity, tokens, mode, ...} as JSON"
    )
    add_engine(p)
    p.set_defaults(handler=cmd_eval)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.connect:
        return _generate_remote(args)
    # Every flag is checked before the model is opened (which may convert it first).
    check_engine_args(args)
    messages = _messages(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )
    set_threads(args.threads)
    t0 = time.perf_counter()
    source = open_source(args.model)
    tokenizer = load_tokenizer(source, args.model)
    if messages:
        prompt_ids = tokenizer.chat_messages(messages)
    elif args.chat:
        prompt_ids = tokenizer.chat(args.prompt, args.system)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    engine = open_engine(args, source, len(prompt_ids) + args.max_tokens)
    load_ms = (time.perf_counter() - t0) * 1e3
    stops = () if args.ignore_eos else tokenizer.stop_ids(source.config)
    params = dataclasses.replace(params, stop_ids=stops)
    with engine:
        run = Generation(engine, prompt_ids, params)
        stream = TextStream(tokenizer, args.stop)
        for _ in run:
            delta = stream.push(run.token_ids)
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
            if stream.stopped:
                run.stop_reason = "stop"
                break
        rest = stream.finish(run.token_ids)
        if not args.json:
            sys.stdout.write(rest + "\n")
    telemetry = engine.telemetry
    summary = {
        "model": source.description,
        "mode": engine.mode,
        "threads": args.threads,
        "window": args.window or DEFAULT_WINDOW,
        "load_ms": round(load_ms, 3),
        **run.summary,
        **telemetry.summary(),
        "peak_rss_bytes": rss_bytes(peak=True),
        "memory": engine.plan.as_dict(),
    }
    if args.stats:
        _print_stats(telemetry, summary)
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": run.token_ids,
                    "text": stream.shown,
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


def _messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """--messages' conversation (checked), or None; exactly one of it and --prompt."""
    if (args.prompt is None) == (args.messages is None):
        raise ConfigError("give exactly one of --prompt and --messages")
    if args.messages is None:
        return None
    try:
        messages = json.loads(args.messages.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--messages {args.messages}: {e}") from None
    check_messages(messages)
    return messages


def _generate_remote(args: argparse.Namespace) -> int:
    messages = _messages(args)

    async def main() -> Done:
        async with Client(args.connect, security(args)) as client:
            async for event in client.generate(
                args.prompt or "",
                messages=messages,
                stop=args.stop,
                top_k=args.top_k,
                min_p=args.min_p,
                repetition_penalty=args.repetition_penalty,
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
    values = (
        f"{k} {per[k]:.1f}" if isinstance(per[k], float) else f"{k} {per[k]}"
        for k in (*COUNTERS, *TIMES)
    )
    print("per decoded token: " + ", ".join(values), file=out)
    decode = [s for s in telemetry.steps if s["tokens"] == 1]
    if not decode or not decode[0]["layers"]:
        return
    print(f"{'layer':>5} " + " ".join(f"{k:>10}" for k in LAYER_COLUMNS), file=out)
    for i in range(len(decode[0]["layers"])):
        means = [sum(s["layers"][i][k] for s in decode) / len(decode) for k in LAYER_COLUMNS]
        print(f"{i:>5} " + " ".join(f"{m:>10.1f}" for m in means), file=out)


def cmd_eval(args: argparse.Namespace) -> int:
    check_engine_args(args)
    if not args.text.is_file():
        raise ConfigError(f"text file {args.text} not found")
    if args.context < 2:
        raise ConfigError(f"context must be at least 2, got {args.context}", "context")
    set_threads(args.threads)
    source = open_source(args.model)
    text = args.text.read_text()
    tokens = load_tokenizer(source, args.model).encode(text)[: args.max_tokens]
    ref_source = None
    if args.against is not None:  # checked before either model is loaded
        ref_source = open_source(args.against)
        if load_tokenizer(ref_source, args.against).encode(text)[: args.max_tokens] != tokens:
            raise ConfigError(
                f"{args.against} tokenizes the text differently from {args.model}: a ratio "
                "needs the same tokens",
                "against",
            )
    engine = open_engine(args, source, args.context)
    if engine.flash_ffn is not None and hasattr(engine.flash_ffn, "dense_prefill"):
        engine.flash_ffn.dense_prefill = False  # score every token through the window
    t0 = time.perf_counter()
    nlls: list = []
    with engine:
        ppl, n = perplexity(engine, tokens, args.context, progress=True, per_token=nlls)
    result = {
        "perplexity": round(ppl, 4),
        "tokens": n,
        "mode": engine.mode,
        "window": args.window or DEFAULT_WINDOW,
        "seconds": round(time.perf_counter() - t0, 2),
        **{k: v for k, v in engine.telemetry.summary().items() if k != "per_token"},
    }
    line = f"perplexity {ppl:.4f} over {n} tokens (mode {engine.mode})"
    if ref_source is not None:
        # the reference as stored: dense, no budget, its resident part unquantized
        dense = {"mode": "dense", "dram_budget": None, "quant_resident": "none"}
        dense = argparse.Namespace(**{**vars(args), **dense})
        ref: list = []
        with open_engine(dense, ref_source, args.context) as ref_engine:
            ref_ppl, _ = perplexity(ref_engine, tokens, args.context, progress=True, per_token=ref)
        ratio, lo, hi = paired_ratio(torch.cat(nlls).numpy(), torch.cat(ref).numpy())
        result["against"] = {
            "model": str(args.against),
            "perplexity": round(ref_ppl, 4),
            "ratio": round(ratio, 4),
            "ratio_95": [round(lo, 4), round(hi, 4)],
        }
        line += f"; {args.against} (dense) {ref_ppl:.4f}: ratio {ratio:.4f}"
        line += f" (95%: {lo:.4f}-{hi:.4f})"
    print(json.dumps(result) if args.json else line)
    return 0
