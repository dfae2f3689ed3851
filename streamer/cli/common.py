"""What several commands share: the engine's and the network's options, checks that run before
anything is loaded, and opening an engine for a model argument."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from protocol.sockets import Security
from streamer.cpus import DEFAULT_CONCURRENCY, usable_cpus
from streamer.engine import MODES as ENGINE_MODES
from streamer.engine import Engine
from streamer.errors import ConfigError
from streamer.memory import parse_size
from streamer.quant import RESIDENT_CHOICES
from streamer.services.engines import EngineOptions, open_model_engine
from streamer.sources import Source
from streamer.window import MAX_READ_GAP, READ_GAP

log = logging.getLogger("streamer")

MODEL_HELP = (
    "a converted directory, a Hugging Face directory, a .gguf file, or 'default' "
    "(SmolLM2-135M-Instruct, converted on first use)"
)
MODES = ("auto", *ENGINE_MODES)
DEFAULT_WINDOW = 4
DEFAULT_CONTEXT = 2048


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=len(usable_cpus()),
        help="torch compute threads (default: every CPU this process may use, %(default)s)",
    )


def add_engine(p: argparse.ArgumentParser) -> None:
    """The engine's options. Those a pipeline config can also set default to None here, so that
    only flags given on the command line override the config file."""
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
        help=f"tokens whose active neurons stay in DRAM (default: {DEFAULT_WINDOW})",
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
        help=f"flash reads in flight (default: 16 per CPU, at most 32: {DEFAULT_CONCURRENCY} here)",
    )
    g.add_argument(
        "--read-gap",
        type=int,
        metavar="N",
        help="mode all: also read the runs of at most N neurons lying between two it must "
        f"read, and compute them (one read instead of two; default: {READ_GAP})",
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
    g.add_argument(
        "--quant-resident",
        choices=RESIDENT_CHOICES,
        default="auto",
        help="q4: keep the resident part's matrices (attention, embeddings, LM head) in 4 bits, "
        "in groups of 32 with a scale and an offset (lossless up to bfloat16 rounding for a "
        "model converted from Q4_1, as the default model is); none: as stored; auto (the "
        "default): q4 only when --dram-budget is too small for them as stored; q8: "
        "projections in 8 bits with a scale per row (attention matvecs read half the bytes)",
    )
    add_threads(p)


def add_security(p: argparse.ArgumentParser) -> None:
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


def security(args: argparse.Namespace) -> Security:
    return Security(key_dir=args.keys, insecure=args.insecure)


def set_threads(threads: int) -> None:
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}", "threads")
    torch.set_num_threads(threads)


def check_engine_args(args: argparse.Namespace) -> None:
    """What can be checked without the model, before it is opened (which may convert it)."""
    if args.window is not None and args.window < 1:
        raise ConfigError(f"window must be at least 1, got {args.window}", "window")
    if args.read_gap is not None and not 0 <= args.read_gap <= MAX_READ_GAP:
        raise ConfigError(
            f"read_gap must be in [0, {MAX_READ_GAP}], got {args.read_gap}", "read_gap"
        )
    if args.concurrency is not None and not 1 <= args.concurrency <= 1024:
        raise ConfigError(
            f"concurrency must be in [1, 1024], got {args.concurrency}", "concurrency"
        )
    if args.dram_budget:  # its syntax: a percentage's bytes need the model, so any whole will do
        parse_size(args.dram_budget, "dram_budget", whole=1 << 60)


def open_engine(args: argparse.Namespace, source: Source, max_len: int) -> Engine:
    """The engine of `source` (opened from `args.model`) for generate, eval and serve."""
    options = EngineOptions(
        mode=args.mode,
        window=DEFAULT_WINDOW if args.window is None else args.window,
        dram_budget=args.dram_budget,
        concurrency=DEFAULT_CONCURRENCY if args.concurrency is None else args.concurrency,
        direct=not args.buffered,
        dtype=args.dtype,
        quant_resident=args.quant_resident,
        progress=True,
        read_gap=READ_GAP if args.read_gap is None else args.read_gap,
    )
    return open_model_engine(str(args.model), source, options, max_len)
