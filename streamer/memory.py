"""DRAM sizes: parsing sizes and budgets, what a process holds, and the one window planner.

Both runtimes plan their DRAM with `plan_memory`: the resident part, predictors and KV cache are
fixed; what is left of the budget goes to the window caches (`cache_rows` per layer), after the
scratch rows each runtime needs beside them (the single-process engine: one whole layer, which is
also the overflow area; the pipeline: the overflow rows and two staging layers). The plan is
exact: `plan.total <= budget` whenever it is made.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from dataclasses import dataclass

import torch

from streamer.errors import ConfigError

log = logging.getLogger(__name__)

WORKING_MEMORY = 64 << 20  # activations, logits, tokenizer state: part of the fixed overhead

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}  # bare letters: binary, as fio reads them


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim; elsewhere nothing):
    converting tensors one after another leaves freed copies that RSS keeps counting."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes(peak: bool = False) -> int:
    """Resident set size of this process (VmHWM, the peak, with peak=True)."""
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def parse_size(spec: str | int, setting: str, whole: int | None = None) -> int:
    """'2GiB', '500MB', '4K', '123456' (bytes) and, where `whole` is given, '60%' of it ->
    bytes. Errors name `setting`."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        value = spec
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(spec))
        unit = m.group(2) if m else ""
        if not m or (unit == "%" and whole is None) or (unit != "%" and unit.lower() not in _UNITS):
            percent = ", or a percentage of the model such as 60%" if whole is not None else ""
            raise ConfigError(
                f"{setting} {spec!r}: expected bytes or a size such as 2GiB or 500MB{percent}",
                setting,
            )
        number = float(m.group(1))
        value = int(number / 100 * whole) if unit == "%" else int(number * _UNITS[unit.lower()])
    if value <= 0:
        raise ConfigError(f"{setting} must be positive, got {spec!r}", setting)
    return value


def parse_budget(spec: str | int | None, model_bytes: int) -> int | None:
    """The DRAM budget: a size, or a percentage of the model's size; None or '': no cap. A
    budget over the machine's memory is taken, with a warning: it cannot be what was meant."""
    if spec is None or spec == "":
        return None
    budget = parse_size(spec, "dram_budget", model_bytes)
    total = machine_memory()
    if total and budget > total:
        log.warning(
            "WARNING: the DRAM budget %s (%.1f GiB) is more than this machine's memory "
            "(%.1f GiB): it does not bound anything here",
            spec,
            budget / 2**30,
            total / 2**30,
        )
    return budget


def machine_memory() -> int | None:
    """MemTotal from /proc/meminfo, in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def nbytes(t) -> int:
    """Bytes of a tensor, or of a quantized matrix (`streamer.quant`)."""
    return int(t.nbytes)


def kv_bytes(cfg, max_len: int, dtype: torch.dtype) -> int:
    """The KV cache of `max_len` tokens."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * max_len * cfg.head_dim * dtype.itemsize


@dataclass
class MemoryPlan:
    """What a runtime holds in DRAM. Scratch is `scratch_rows + scratch_per_cache_row *
    cache_rows` rows; each cache row may carry `book_bytes` of bookkeeping (a neuron id)."""

    budget: int | None
    model_bytes: int
    resident: int
    predictors: int
    kv_cache: int
    cache_rows: int  # per layer
    row_bytes: int
    n_layers: int
    overhead: int  # runtime RSS at start + working memory
    scratch_rows: int = 0
    scratch_per_cache_row: int = 0
    book_bytes: int = 0
    extra: int = 0  # other buffers (the window mode's landing area)

    @property
    def staging(self) -> int:
        rows = self.scratch_rows + self.scratch_per_cache_row * self.cache_rows
        return rows * self.row_bytes + self.extra

    @property
    def caches(self) -> int:
        return self.cache_rows * (self.row_bytes + self.book_bytes) * self.n_layers

    @property
    def total(self) -> int:
        return self.resident + self.predictors + self.kv_cache + self.staging + self.caches

    def as_dict(self) -> dict[str, int | None]:
        return {
            "budget": self.budget,
            "model_bytes": self.model_bytes,
            "resident": self.resident,
            "predictors": self.predictors,
            "kv_cache": self.kv_cache,
            "staging": self.staging,
            "cache_rows": self.cache_rows,
            "row_bytes": self.row_bytes,
            "n_layers": self.n_layers,
            "overhead": self.overhead,
            "total": self.total,
        }

    def describe(self) -> str:
        mib = 2**20
        budget = "none" if self.budget is None else f"{self.budget / mib:.1f} MiB"
        return (
            f"DRAM budget {budget} (model {self.model_bytes / mib:.1f} MiB): resident "
            f"{self.resident / mib:.1f} + predictors {self.predictors / mib:.1f} + KV cache "
            f"{self.kv_cache / mib:.1f} + staging/scratch {self.staging / mib:.1f} + window "
            f"caches {self.caches / mib:.1f} ({self.n_layers} x {self.cache_rows} rows of "
            f"{self.row_bytes} B) = {self.total / mib:.1f} MiB; fixed overhead "
            f"{self.overhead / mib:.1f} MiB (runtime at start + working memory)"
        )


def plan_memory(plan: MemoryPlan, n_neurons: int, what: str) -> MemoryPlan:
    """`plan` with the most window rows per layer (at most `n_neurons`) its budget allows.
    Raises a ConfigError naming `what` when not even one row fits."""
    if plan.budget is None:
        plan.cache_rows = n_neurons
        return plan
    plan.cache_rows = 0
    free = plan.budget - plan.total  # after the fixed part and the fixed scratch rows
    per_row = (plan.row_bytes + plan.book_bytes) * plan.n_layers
    per_row += plan.scratch_per_cache_row * plan.row_bytes
    plan.cache_rows = min(n_neurons, free // per_row) if per_row > 0 else n_neurons
    if plan.cache_rows < 1:
        plan.cache_rows = 1
        fixed = plan.resident + plan.predictors + plan.kv_cache
        raise ConfigError(
            f"dram_budget {plan.budget} B is too small for {what}: the resident part, "
            f"predictors and KV cache take {fixed / 2**20:.1f} MiB and at least "
            f"{plan.total / 2**20:.1f} MiB are needed",
            "dram_budget",
        )
    return plan
