"""Reading neuron bundles from flash: direct I/O into page-aligned buffers, many reads in flight.

`FlashReader` opens a file with O_DIRECT so that the OS page cache never serves as hidden DRAM
(the paper's cold-cache measurements). Where the filesystem refuses O_DIRECT (tmpfs, some
network filesystems) it falls back to buffered reads followed by `posix_fadvise(DONTNEED)`, and
logs a warning once. Reads run on a thread pool of `os.preadv` calls (the GIL is released
while the kernel reads); `concurrency` is how many are in flight. Adjacent bundles become one
larger read. `probe_disk` measures what the disk itself can do with the same machinery.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from streamer.cpus import DEFAULT_CONCURRENCY
from streamer.errors import ConfigError, StreamerError

log = logging.getLogger(__name__)
ALIGN = 4096
# The smallest unit the reader asks of O_DIRECT (bundle records are padded to it): the logical
# block size of most devices; one that needs more gets buffered reads (a warning says so).
SECTOR = 512
_warned: set[str] = set()


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """Zeroed, page-aligned memory (an anonymous mmap) as a uint8 tensor; O_DIRECT needs this."""
    mm = mmap.mmap(-1, max(nbytes, ALIGN))
    arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
    return torch.from_numpy(arr)  # keeps `mm` alive through the numpy base


def merge_runs(ids: np.ndarray, rows: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Sorted neuron ids -> (first index, length) of each run of consecutive ids (and, if
    given, consecutive destination rows)."""
    if len(ids) == 0:
        return []
    step = np.diff(ids) != 1
    if rows is not None:
        step |= np.diff(rows) != 1
    breaks = np.flatnonzero(step) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(ids)]))
    return list(zip(starts.tolist(), (ends - starts).tolist(), strict=True))


@dataclass
class ReadStats:
    bytes: int = 0
    reads: int = 0
    seconds: float = 0.0


class FlashReader:
    """Concurrent positional reads of one file, direct when the filesystem allows it."""

    def __init__(
        self,
        path: str | os.PathLike,
        concurrency: int = DEFAULT_CONCURRENCY,
        direct: bool = True,
        max_read: int = 1 << 20,
    ) -> None:
        if not 1 <= concurrency <= 1024:
            raise ConfigError(f"concurrency must be in [1, 1024], got {concurrency}")
        if max_read < ALIGN or max_read % ALIGN:
            raise ConfigError(f"max_read must be a positive multiple of {ALIGN}, got {max_read}")
        self.path = str(path)
        self.concurrency = concurrency
        self.max_read = max_read
        self.direct = False
        if direct:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                probe = aligned_buffer(ALIGN).numpy()
                os.preadv(self.fd, [probe], 0)
                os.preadv(self.fd, [probe[SECTOR : 2 * SECTOR]], SECTOR)
                self.direct = True
            except OSError as e:
                if getattr(self, "fd", None) is not None:
                    os.close(self.fd)
                self._warn_buffered(e)
        if not self.direct:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise StreamerError(f"cannot open {self.path}: {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="flash")
        # read size -> reads of that size, kept when set to a dict (bench turns it on: the
        # disk is then probed at each size the engine read)
        self.sizes: dict[int, int] | None = None

    def _warn_buffered(self, error: OSError) -> None:
        fs = os.path.dirname(os.path.abspath(self.path))
        if fs not in _warned:
            _warned.add(fs)
            log.warning(
                "WARNING: O_DIRECT refused for %s (%s); falling back to buffered reads with "
                "posix_fadvise(DONTNEED). Reads may be served from the page cache, so flash "
                "timings here are not cold-cache figures.",
                self.path,
                error.strerror,
            )

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            self.pool.shutdown(wait=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FlashReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pread(self, offset: int, view: memoryview) -> int:
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0 and offset + done >= self.size:
                break  # an aligned read may run past the end of the file: the rest stays as is
            if n <= 0:
                raise StreamerError(
                    f"{self.path}: short read at byte {offset + done} (file truncated?)"
                )
            done += n
        if not self.direct:
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return done

    def _pread_all(self, requests: list[tuple[int, memoryview]]) -> int:
        return sum(self._pread(offset, view) for offset, view in requests)

    def read(self, requests: list[tuple[int, memoryview]], stats: ReadStats | None = None) -> int:
        """Read each (file offset, destination) pair, `concurrency` at a time; bytes read.

        With O_DIRECT, offsets, lengths and destinations must be 4096-aligned."""
        t0 = time.perf_counter()
        if self.sizes is not None:
            for _, view in requests:
                self.sizes[len(view)] = self.sizes.get(len(view), 0) + 1
        if len(requests) == 1:
            total = self._pread(*requests[0])
        else:
            # `concurrency` threads, each reading its stripe of the requests one after another:
            # as many reads in flight, without a future (and a wake-up) per read, which costs
            # about as much CPU as a 16 KiB read takes the disk.
            k = min(self.concurrency, len(requests))
            stripes = [requests[i::k] for i in range(k)]
            total = sum(self.pool.map(self._pread_all, stripes))
        if stats is not None:
            stats.bytes += total
            stats.reads += len(requests)
            stats.seconds += time.perf_counter() - t0
        return total

    def chunked(self, offset: int, dest: torch.Tensor) -> list[tuple[int, memoryview]]:
        """Requests reading dest.numel() bytes at offset in chunks of at most max_read."""
        view = memoryview(dest.numpy()).cast("B")
        return [
            (offset + i, view[i : i + self.max_read]) for i in range(0, len(view), self.max_read)
        ]


def probe_disk(
    path: str | os.PathLike,
    chunk_sizes: list[int],
    concurrencies: list[int],
    seconds: float = 1.0,
    file_bytes: int = 1 << 30,
    processes: bool = False,
) -> list[dict]:
    """Random-read throughput of the disk holding `path`, by chunk size and concurrency.

    Reads a scratch file of `file_bytes` (created next to `path` when `path` is a directory, and
    removed afterwards) at random aligned offsets with O_DIRECT for about `seconds` per cell.
    Each of the `concurrency` jobs is a thread of the engine's reader, or with `processes` a
    process of its own, as fio's jobs are (no shared interpreter lock between them)."""
    target = os.fspath(path)
    scratch = None
    if os.path.isdir(target):
        scratch = os.path.join(target, f".streamer-probe-{os.getpid()}")
        _write_scratch(scratch, file_bytes)
        target = scratch
    try:
        size = os.path.getsize(target)
        if size < max(chunk_sizes) * 4:
            raise ConfigError(f"{target} is too small ({size} bytes) to probe")
        rows = []
        if processes:
            # Fork only once the reader's threads are gone (closing the reader joins them).
            with FlashReader(target, concurrency=1) as reader:
                direct = reader.direct
            for conc in concurrencies:
                for chunk in chunk_sizes:
                    rows.append(_probe_processes(target, direct, size, chunk, conc, seconds))
            return rows
        for conc in concurrencies:
            with FlashReader(target, concurrency=conc) as reader:
                for chunk in chunk_sizes:
                    rows.append(_probe_cell(reader, size, chunk, conc, seconds))
        return rows
    finally:
        if scratch is not None:
            os.unlink(scratch)


def _probe_cell(reader: FlashReader, size: int, chunk: int, conc: int, seconds: float) -> dict:
    """`conc` threads each keep one random read of `chunk` bytes in flight (fio's psync jobs)."""
    slots = size // chunk
    deadline = time.perf_counter() + seconds

    def job(seed: int) -> tuple[int, int]:
        # Like a fio job: its own random order over the whole file, each chunk once per pass.
        offsets = (np.random.default_rng(seed).permutation(slots) * chunk).tolist()
        buf = [aligned_buffer(chunk).numpy()]
        fd, done, reads = reader.fd, 0, 0
        while True:
            if reads % 32 == 0 and time.perf_counter() >= deadline:
                return done, reads
            done += os.preadv(fd, buf, offsets[reads % slots])
            reads += 1

    t0 = time.perf_counter()
    results = list(reader.pool.map(job, range(conc)))
    elapsed = time.perf_counter() - t0
    total = sum(r[0] for r in results)
    return {
        "chunk": chunk,
        "concurrency": conc,
        "direct": reader.direct,
        "reads": sum(r[1] for r in results),
        "gb_per_s": total / elapsed / 1e9,
    }


def _probe_job(
    path: str, direct: bool, size: int, chunk: int, seed: int, start: float, seconds: float
) -> int:
    """Bytes one process reads from `start` to `start + seconds` (time.monotonic, shared by
    all processes, so that every job runs in the same window)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        slots = size // chunk
        offsets = (np.random.default_rng(seed).permutation(slots) * chunk).tolist()
        buf = [np.frombuffer(mmap.mmap(-1, chunk), dtype=np.uint8)]
        time.sleep(max(0.0, start - time.monotonic()))
        done = reads = 0
        while time.monotonic() < start + seconds:
            done += os.preadv(fd, buf, offsets[reads % slots])
            reads += 1
        return done
    finally:
        os.close(fd)


def _probe_processes(
    path: str, direct: bool, size: int, chunk: int, conc: int, seconds: float
) -> dict:

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(conc, mp_context=ctx) as pool:
        start = time.monotonic() + 0.5 + 0.02 * conc  # time for every process to be forked
        jobs = [
            pool.submit(_probe_job, path, direct, size, chunk, seed, start, seconds)
            for seed in range(conc)
        ]
        total = sum(j.result() for j in jobs)
    return {
        "chunk": chunk,
        "concurrency": conc,
        "direct": direct,
        "reads": None,
        "gb_per_s": total / seconds / 1e9,
    }


def _write_scratch(path: str, nbytes: int) -> None:
    block = np.random.default_rng(1).integers(0, 255, size=8 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(0, nbytes, len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
