"""The `streamer` command: convert, verify, calibrate, generate, eval, serve, stage, keys, ...

Each command's parser sits beside its handler: `model` (convert, verify, calibrate, synth), `run`
(generate, eval), `serve` (serve, stage, keys), `tools` (probe-disk, bench); `common` holds
what they share. Errors the engine raises on purpose (`StreamerError`, and the protocol's
`ProtocolError`: a bad endpoint or socket setting) print as one line on stderr with exit status
2, naming the command line's flag where the library names its setting; anything else is a bug
and keeps its traceback. Library code logs (`logging`); the command shows INFO and above on
stderr, as plain lines.
"""

from __future__ import annotations

import argparse
import logging
import sys

from protocol.messages import ProtocolError
from streamer.cli import model, run, serve, tools
from streamer.errors import ConfigError, StreamerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Run language models bigger than DRAM by streaming FFN neurons from flash.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (model, run, serve, tools):
        module.register(sub)
    return parser


def error_text(error: Exception, args: argparse.Namespace) -> str:
    """The error's message, with the library's setting named as the command's flag where the
    command has one (its `dest` is the setting's name)."""
    text = str(error)
    setting = error.setting if isinstance(error, ConfigError) else None
    if setting and setting in vars(args):
        text = text.replace(setting, "--" + setting.replace("_", "-"), 1)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    try:
        return args.handler(args)
    except (StreamerError, ProtocolError) as e:
        print(f"streamer {args.command}: error: {error_text(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
