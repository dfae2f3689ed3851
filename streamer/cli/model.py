"""Commands that make and check models: convert, verify, calibrate, synth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from streamer.blocks import KINDS, kind
from streamer.calibrate import CalibrationSettings, calibrate
from streamer.cli.common import add_threads, set_threads
from streamer.convert import convert, verify
from streamer.errors import ConfigError
from streamer.registry import converted_dir, default_gguf, open_source
from streamer.sources import GGUFSource
from streamer.synth import synth


def register(sub) -> None:
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
    p.add_argument(
        "--quant",
        metavar="KIND",
        help=f"the FFN bundles' kind: {', '.join(KINDS)} (default: --dtype's own float kind; "
        "q8_0 and q4_* are GGUF's blocks of 32 values)",
    )
    p.add_argument(
        "--quant-down",
        metavar="KIND",
        help="the down vectors' kind, where it should differ from --quant (e.g. --quant q4_1 "
        "--quant-down q8_0: a 4-bit GGUF file's gate and up blocks kept, down in 8 bits)",
    )
    p.add_argument(
        "--gptq",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto (default): the 4-bit parts that are not the source's own blocks are quantized "
        "by GPTQ on the shipped calibration text, layer by layer, where the source has a "
        "tokenizer (else rounded to nearest, with a warning); on: GPTQ or an error; off: "
        "rounded to nearest (much faster on big models)",
    )
    p.add_argument("--force", action="store_true", help="replace a model OUT already holds")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser(
        "verify",
        help="check a converted model's files against its manifest",
        description="Check sizes and per-layer SHA-256 checksums.",
    )
    p.add_argument("model", metavar="MODEL", help="a converted directory or 'default'")
    p.set_defaults(handler=cmd_verify)

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
        help="gated models: the fraction of (token, neuron) pairs left out, by magnitude "
        "(default: 0.45 for the ranker, 0.5 for the low-rank predictors)",
    )
    p.add_argument(
        "--gap",
        type=int,
        default=0,
        help="the ranker's: also select every run of at most GAP neurons between two selected "
        "ones, so that one longer read replaces two (default: %(default)s)",
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
        choices=("auto", "ranker", "lowrank", "sgd"),
        default="auto",
        help="how neurons are selected: ranker (gated models: a 4-bit copy of gate and up in "
        "DRAM scores every neuron; only thresholds are fit, in seconds), lowrank (closed-form "
        "reduced-rank regression on the neurons' pre-activations), sgd (a low-rank predictor "
        "by gradient descent on binary cross-entropy), auto: lowrank for ReLU models, ranker "
        "for gated ones (default: %(default)s)",
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
    add_threads(p)
    p.set_defaults(handler=cmd_calibrate)

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
    add_threads(p)
    p.set_defaults(handler=cmd_synth)


def cmd_convert(args: argparse.Namespace) -> int:
    for name in (args.quant, args.quant_down):
        if name is not None:
            kind(name)  # an unknown kind is refused before the source is opened
    # the default model from its own GGUF file, so that --quant q4_1 keeps the file's blocks
    source = GGUFSource(default_gguf()) if args.src == "default" else open_source(args.src)
    result = convert(
        source,
        args.out,
        dtype=args.dtype,
        force=args.force,
        quant=args.quant,
        quant_down=args.quant_down,
        gptq=args.gptq,
    )
    what = f"{args.dtype}, FFN {result.quant}"
    if result.converted:
        print(
            f"converted {source.description} -> {result.directory} "
            f"({result.bytes_written / 2**20:.1f} MiB, {what})"
        )
    else:
        print(f"{result.directory} already holds this model ({what}); nothing to do")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    directory = converted_dir(args.model)
    problems = verify(directory)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"ok {directory}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    for path in [*args.text, *([args.heldout] if args.heldout else [])]:
        if not path.is_file():
            raise ConfigError(f"text file {path} not found")
    settings = CalibrationSettings(
        texts=args.text,
        heldout=args.heldout,
        ranks=args.ranks,
        sparsity=args.sparsity,
        gap=args.gap,
        target_recall=args.recall,
        epochs=args.epochs,
        fit=args.fit,
        batch=args.batch,
        lr=args.lr,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
    )
    directory = converted_dir(args.model)
    report = calibrate(directory, settings)
    if args.json:
        print(json.dumps(report))
        return 0
    if report["fit"] == "ranker":
        columns = [
            ("layer", "layer", "d"),
            ("selected", "selected", ".3f"),
            ("mass rec", "mass_recall", ".3f"),
            ("threshold", "threshold", ".4f"),
        ]
    else:
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
    sparse = "sparse" if "sparse" in ppl else "predictor"
    others = f"oracle {ppl['oracle']:.3f}, " if "oracle" in ppl else ""
    print(
        f"perplexity on {report['heldout_tokens']} held-out tokens: dense {ppl['dense']:.3f}, "
        f"{others}{sparse} {ppl[sparse]:.3f} ({(ppl[sparse] / ppl['dense'] - 1) * 100:+.1f}%)"
    )
    what = "the ranker" if report["fit"] == "ranker" else "predictors"
    print(f"saved {what} to {directory} ({report['seconds']} s)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    set_threads(args.threads)
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
