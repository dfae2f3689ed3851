"""The CPUs a process may use: how many, how a setting names them, and how many reads to keep in
flight by default."""

from __future__ import annotations

import os

from streamer.errors import ConfigError


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


# Reads in flight by default: 16 per usable CPU, at most 32: the reader's threads wait on the
# disk in the compiled read loop, without the interpreter's lock (README, "Decisions", has the
# measurements; 4 per CPU was best while every read took the lock).
DEFAULT_CONCURRENCY = min(32, 16 * len(usable_cpus()))


def parse_cpus(spec: str, name: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6); '' -> () (no affinity). `name` says where `spec` came
    from, in the error."""
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi if dash else lo)
            if not 0 <= first <= last:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ConfigError(
            f'{name} {spec!r}: expected CPU numbers and ranges like "0-3,6"'
        ) from None
    return tuple(sorted(cpus))
