"""The engine's compiled kernels, each file saying why it is written by hand: a token's sparse
FFN on its bundle records where they lie (`sparse_ffn.c`), the flash reader's loop of reads
(`reads.c`), and the bundle checksums of the read path (`sums.c`, checked against the `xxhash`
package when it loads).

It is built at first use with the machine's C compiler (`$CC`, else `cc`) for the machine it
runs on (`-march=native`), into the cache (`$STREAMER_CACHE/kernels`, else
`$XDG_CACHE_HOME/streamer/kernels`, else `~/.cache/streamer/kernels`) under a name that hashes
the sources, the compiler and the processor's features, and loaded with ctypes; the build takes
about a second. Where no compiler is found, or the build fails, or `STREAMER_KERNELS=off`, the
engine computes the same sums in torch (`streamer.ffn`) and reads from Python threads
(`streamer.flash`), and logs once why.

The library links OpenMP, and is loaded after torch, whose own OpenMP runtime it then shares:
the kernel's threads are torch's threads, `torch.get_num_threads()` of them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import xxhash

from streamer.blocks import Kind

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("sparse_ffn.c", "reads.c", "sums.c"))
LONG_INPUT = 240  # sums.c hashes inputs longer than this (XXH3's long path)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]
KIND_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5}
ACT_CODES = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}
MAX_THREADS = 64

_lib: ctypes.CDLL | None = None
_tried = False
_why_not = ""


def cache_dir() -> Path:
    base = os.environ.get("STREAMER_CACHE")
    if base:
        return Path(base) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "streamer" / "kernels"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    """The library for this source, compiler and processor, built unless the cache has it."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    texts = [s.read_text() for s in SOURCES]
    key = hashlib.sha256(
        "\0".join([*texts, version, " ".join(FLAGS), _cpu_features()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: processes building at once (the
    # pipeline's stages) each rename a whole library.
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (and why, logged once) where it cannot be had."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("STREAMER_KERNELS", "").lower() in ("0", "off", "no", "false"):
        _why_not = "STREAMER_KERNELS=off"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _why_not = "no C compiler (cc) found"
    else:
        try:
            path = _build(compiler)
            lib = ctypes.CDLL(str(path))
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.sparse_ffn.argtypes = [p, i64, p, p, i64, i64, i32, i32, i32, i32]
            lib.sparse_ffn.argtypes += [i64, i64, i64, p, p, p, p, p, i32]
            lib.sparse_ffn.restype = i32
            err = ctypes.POINTER(ctypes.c_int)
            lib.read_runs.argtypes = [i32, i64, p, p, p, i64, i32, err]
            lib.read_runs.restype = i64
            lib.pool_new.argtypes, lib.pool_new.restype = [i32], p
            lib.pool_free.argtypes, lib.pool_free.restype = [p], None
            lib.pool_read.argtypes = [p, i32, i64, p, p, p, i64, i32, i64, i64, p, p, err]
            lib.pool_read.argtypes += [ctypes.POINTER(ctypes.c_int64)] * 2
            lib.pool_read.restype = i64
            lib.xxh3_long.argtypes = [p, i64]
            lib.xxh3_long.restype = ctypes.c_uint64
            lib.first_mismatch.argtypes = [p, i64, p, i64, i64, p, i32]
            lib.first_mismatch.restype = i64
            lib.sums_agree = _sums_agree(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _why_not = f"building the kernels with {compiler} failed ({e})"
    if _lib is None:
        log.warning(
            "the compiled kernels are not available (%s): computing the sparse FFN in torch and "
            'reading from Python threads, which is slower (README, "Decisions")',
            _why_not,
        )
    return _lib


def _sums_agree(lib: ctypes.CDLL) -> bool:
    """Whether sums.c's XXH3 equals the `xxhash` package's on inputs of every length class
    (else the checks stay in Python, and a warning says why)."""
    data = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8)
    for n in (241, 256, 1023, 1024, 1025, 3456, 4096, 16384, 19_999):
        if lib.xxh3_long(data.ctypes.data, n) != xxhash.xxh3_64_intdigest(data[:n].tobytes()):
            log.warning("the compiled XXH3 disagrees with the xxhash package: checking in Python")
            return False
    return True


def checksums() -> ctypes.CDLL | None:
    """The library, where its checksums agree with the `xxhash` package's."""
    lib = library()
    return lib if lib is not None and lib.sums_agree else None


def available() -> bool:
    return library() is not None


def reset() -> None:
    """Forget the loaded kernel (tests switch it off and on with STREAMER_KERNELS)."""
    global _lib, _tried
    _lib, _tried = None, False


class SparseFFN:
    """The kernel bound to one model's record layout (parts, kinds, offsets, activation)."""

    def __init__(
        self, parts: tuple[str, ...], spans, kinds: tuple[Kind, ...], d: int, activation: str
    ) -> None:
        self.lib = library()
        offsets = {p: a for p, (a, _) in zip(parts, spans, strict=True)}
        kind_of = dict(zip(parts, kinds, strict=True))
        self.gated = "gate" in offsets
        self.d = d
        self.offsets = (offsets.get("gate", 0), offsets["up"], offsets["down"])
        self.kind = KIND_CODES[kind_of["up"].name]
        self.down_kind = KIND_CODES[kind_of["down"].name]
        self.act = ACT_CODES[activation]
        self.scratch = torch.empty(MAX_THREADS * d)

    @classmethod
    def supports(cls, kinds: tuple[Kind, ...], activation: str) -> bool:
        return all(k.name in KIND_CODES for k in kinds) and activation in ACT_CODES

    def __call__(
        self,
        x: torch.Tensor,
        records: torch.Tensor,
        rows: np.ndarray,
        ids: np.ndarray,
        gate_bias: torch.Tensor | None,
        up_bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """out [d] (float32) = the FFN of neurons ids over records[rows] (records: [R, stride]
        bytes, contiguous), without the down bias; x: [d] float32, contiguous."""
        assert records.is_contiguous() and x.dtype == torch.float32 and x.is_contiguous()
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= records.shape[0]):
            raise IndexError(f"rows outside the {records.shape[0]} records given")
        threads = max(1, min(torch.get_num_threads(), MAX_THREADS))
        rc = self.lib.sparse_ffn(
            records.data_ptr(),
            records.stride(0),
            rows.ctypes.data,
            ids.ctypes.data,
            len(rows),
            self.d,
            self.kind,
            self.down_kind,
            int(self.gated),
            self.act,
            *self.offsets,
            x.data_ptr(),
            None if gate_bias is None else gate_bias.data_ptr(),
            None if up_bias is None else up_bias.data_ptr(),
            out.data_ptr(),
            self.scratch.data_ptr(),
            threads,
        )
        if rc != 0:
            raise ValueError("the sparse FFN kernel refused its arguments")
        return out
