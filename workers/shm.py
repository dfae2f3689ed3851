"""The pipeline's shared memory: the window caches that prefetch writes and compute reads.

One file on a tmpfs (`/dev/shm`: memory, never disk), made by the launcher before any stage
starts and removed by it at shutdown, mapped by every stage on the host. Bundle rows travel no
other way on one host: ZeroMQ messages carry only neuron ids and row numbers. Regions, in rows of
`stride` bytes (the bundle size, a multiple of 4 KiB, so that O_DIRECT reads land in place):

    [0, L·c)                the window caches, c rows per layer (layer l at l·c)
    [L·c, L·c + n − c)      overflow: a token's neurons beyond its layer's capacity
    [.., + 2n)              two staging slots of a whole layer each: a prompt's layers, and
                            decode's look-ahead reads
    then L·c int64          the neuron id of each cache row (the predictor's books, which
                            compute reads to pick each row's bias)

Compute multiplies each token's own rows where they lie in its layer's window (the rows the
predictor names in `Fetch.take`), and the overflow (`streamer.ffn.TokenFFN`).

Stages on different hosts share no memory (`weights = "frames"`): each maps the same regions
privately (`SharedRows.private`), the rows travel as zero-copy frames, and compute applies the
predictor's row moves itself.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamer.errors import ConfigError


@dataclass(frozen=True)
class SharedLayout:
    n_layers: int
    n_neurons: int
    capacity: int  # cache rows per layer
    stride: int

    def cache_base(self, layer: int) -> int:
        return layer * self.capacity

    @property
    def scratch_base(self) -> int:
        return self.n_layers * self.capacity

    def stage_base(self, slot: int) -> int:
        return self.scratch_base + self.n_neurons - self.capacity + slot * self.n_neurons

    @property
    def n_rows(self) -> int:
        return self.stage_base(2)

    @property
    def ids_offset(self) -> int:
        return self.n_rows * self.stride

    @property
    def nbytes(self) -> int:
        return self.ids_offset + self.n_layers * self.capacity * 8


class SharedRows:
    """The mapped file; `create=True` makes it (the launcher), else it must exist (a stage)."""

    def __init__(self, path: str | os.PathLike, layout: SharedLayout, create: bool = False):
        self.path: Path | None = Path(path)
        self.layout = layout
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise ConfigError(f"shared memory {self.path}: {e.strerror}") from None
        try:
            if create:
                os.ftruncate(fd, layout.nbytes)
            elif os.fstat(fd).st_size != layout.nbytes:
                raise ConfigError(
                    f"shared memory {self.path} has {os.fstat(fd).st_size} bytes, "
                    f"this stage expects {layout.nbytes}"
                )
            mm = mmap.mmap(fd, layout.nbytes, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._map(mm)

    @classmethod
    def private(cls, layout: SharedLayout) -> SharedRows:
        """The same regions in this process's own memory (anonymous, so untouched pages cost
        nothing): a stage that shares no memory with the others, whose rows come as frames."""
        self = cls.__new__(cls)
        self.path, self.layout = None, layout
        self._map(mmap.mmap(-1, layout.nbytes))
        return self

    def _map(self, mm: mmap.mmap) -> None:
        layout = self.layout
        flat = np.frombuffer(mm, dtype=np.uint8)  # keeps `mm` alive
        self.rows = torch.from_numpy(flat[: layout.ids_offset]).view(layout.n_rows, layout.stride)
        self.ids = (
            flat[layout.ids_offset :].view(np.int64).reshape(layout.n_layers, layout.capacity)
        )

    def cache(self, layer: int) -> torch.Tensor:
        base = self.layout.cache_base(layer)
        return self.rows[base : base + self.layout.capacity]

    @property
    def scratch(self) -> torch.Tensor:
        lay = self.layout
        return self.rows[lay.scratch_base : lay.scratch_base + lay.n_neurons - lay.capacity]

    def stage(self, slot: int) -> torch.Tensor:
        base = self.layout.stage_base(slot)
        return self.rows[base : base + self.layout.n_neurons]

    def unlink(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
