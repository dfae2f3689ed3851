"""The `streamer` command: convert, verify and generate.

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

from streamer.errors import StreamerError

MODEL_HELP = (
    "a converted directory, a Hugging Face directory, a .gguf file, or 'default' "
    "(SmolLM2-135M-Instruct, converted on first use)"
)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch compute threads (default: all cores, %(default)s)",
    )


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
        "generate",
        help="generate text from a prompt",
        description="Generate text; streams it to the terminal, or prints one "
        "JSON object with --json.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
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


def _cmd_verify(args: argparse.Namespace) -> int:
    from streamer.convert import verify
    from streamer.registry import resolve_default

    directory = resolve_default() if args.model == "default" else Path(args.model)
    problems = verify(directory)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"ok {directory}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from streamer.errors import ConfigError, ModelFormatError
    from streamer.generate import Generation, SamplingParams
    from streamer.sources import load_dense, open_source

    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    source = open_source(args.model)
    spec = source.tokenizer()
    if spec is None:
        raise ModelFormatError(f"{source.description} has no tokenizer (tokenizer.json)")
    tokenizer = spec.build()
    model = load_dense(source)
    load_ms = (time.perf_counter() - t0) * 1e3

    prompt_ids = (
        tokenizer.chat(args.prompt, args.system) if args.chat else tokenizer.encode(args.prompt)
    )
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
    run = Generation(model, prompt_ids, params)
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
    summary = {
        "model": source.description,
        "mode": "dense",
        "threads": args.threads,
        "load_ms": round(load_ms, 3),
        **run.summary,
    }
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": run.token_ids,
                    "text": tokenizer.decode(run.token_ids),
                    "prompt_token_ids": prompt_ids,
                    "summary": summary,
                }
            )
        )
    else:
        print(
            f"[{summary['generated_tokens']} tokens, {summary['ms_per_token']} ms/token, "
            f"stop: {summary['stop_reason']}]",
            file=sys.stderr,
        )
    return 0


COMMANDS = {"convert": _cmd_convert, "verify": _cmd_verify, "generate": _cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except StreamerError as e:
        print(f"streamer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
