"""Commands that measure: probe-disk (the disk alone) and bench (every mode and the pipeline)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from streamer.apps.bench import ROWS, BenchSettings, run_bench
from streamer.apps.bench_report import markdown
from streamer.cli.common import add_threads, set_threads
from streamer.cpus import DEFAULT_CONCURRENCY
from streamer.errors import ConfigError
from streamer.flash import ALIGN, probe_disk
from streamer.memory import parse_size
from streamer.quant import RESIDENT_CHOICES
from streamer.registry import converted_dir
from streamer.window import READ_GAP


def register(sub) -> None:
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
    p.set_defaults(handler=cmd_probe_disk)

    p = sub.add_parser(
        "bench",
        help="the paper's Tables 2 and 3 on this machine, beside naive loading and a peer",
        description="In one run at one DRAM budget, with cold reads: the disk probe; the "
        "dense reference (whole model in DRAM, outside the budget); the ablation rows naive, "
        "hybrid, predictor, window, all; the pipeline with overlap and "
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
        help="which rows, in order: dense,naive,hybrid,predictor,window,all,pipeline,serial,"
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
        help="reads in flight (default: 16 per CPU, at most 32: %(default)s here)",
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
    p.add_argument(
        "--read-gap",
        type=int,
        metavar="N",
        help=f"the all and pipeline rows' read gap (see generate --help; default {READ_GAP})",
    )
    p.add_argument(
        "--quant-resident",
        choices=RESIDENT_CHOICES,
        default="auto",
        help="engine rows: the resident part's matrices in 4 or 8 bits, as stored (none), or "
        "in 4 bits where the budget needs it (auto, the default; see generate --help)",
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="engine rows: the compute dtype (default: float32 for dense, the stored dtype "
        "otherwise)",
    )
    p.add_argument(
        "--also",
        type=Path,
        nargs="+",
        default=[],
        metavar="DIR",
        help="other conversions of MODEL (convert --quant KIND), calibrated: an all row each, "
        "named all-KIND, at the same DRAM budget in bytes",
    )
    add_threads(p)
    p.set_defaults(handler=cmd_bench)


def cmd_probe_disk(args: argparse.Namespace) -> int:
    chunks = [parse_size(c, "--chunks") for c in args.chunks.split(",")]
    try:
        concs = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise ConfigError(
            f"--concurrency {args.concurrency!r}: expected a comma-separated list of numbers"
        ) from None
    if any(c % ALIGN for c in chunks):
        raise ConfigError(f"chunk sizes must be multiples of {ALIGN} for O_DIRECT")
    if not os.path.exists(args.path):
        raise ConfigError(f"{args.path} not found")
    rows = probe_disk(
        args.path,
        chunks,
        concs,
        seconds=args.seconds,
        file_bytes=parse_size(args.file_size, "--file-size"),
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


def cmd_bench(args: argparse.Namespace) -> int:
    set_threads(args.threads)
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
        quant_resident=args.quant_resident,
        dtype=args.dtype,
        also=tuple(args.also),
        read_gap=READ_GAP if args.read_gap is None else args.read_gap,
    )
    report = run_bench(converted_dir(args.model), settings)
    print(json.dumps(report, default=str) if args.json else markdown(report))
    return 0
