"""Reading neuron bundles from flash: direct I/O into page-aligned buffers, many reads in flight.

`FlashReader` opens a file with O_DIRECT so that the OS page cache never serves as hidden DRAM
(the paper's cold-cache measurements). Where the filesystem refuses O_DIRECT (tmpfs, some
network filesystems) it falls back to buffered reads followed by `posix_fadvise(DONTNEED)`, and
logs a warning once. Reads run on a thread pool, `concurrency` of them in flight: the engine's
bundle reads (`Runs`) each thread's stripe in one call of the compiled read loop
(`streamer.kernels`), other reads (and every read where the loop is not built) as `os.preadv`
calls (the GIL is released while the kernel reads, and taken for every call). Adjacent bundles
become one larger read. `probe_disk` measures what the disk itself can do with the same
machinery.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from streamer import kernels
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


@dataclass
class ReadStats:
    bytes: int = 0
    reads: int = 0
    seconds: float = 0.0
    # the reader threads' time checking bundles as they landed, added up over the threads
    # (inside `seconds`, overlapped with other reads)
    check_seconds: float = 0.0


@dataclass
class RecordCheck:
    """What a batch of bundle reads is checked against as it lands: record r of run i (`stride`
    bytes apart) hashes, XXH3-64 of its first `record_bytes`, to want[first[i] + r];
    `error(k)` is the exception for want[k]'s record (naming its layer and neuron)."""

    want: np.ndarray  # uint64, a record each
    first: np.ndarray  # int64, a run each
    stride: int
    record_bytes: int
    error: Callable[[int], Exception]

    def __add__(self, other: RecordCheck) -> RecordCheck:
        n = len(self.want)

        def error(k: int) -> Exception:
            return self.error(k) if k < n else other.error(k - n)

        return RecordCheck(
            np.concatenate([self.want, other.want]),
            np.concatenate([self.first, other.first + n]),
            self.stride,
            self.record_bytes,
            error,
        )


@dataclass
class Runs:
    """A batch of reads as arrays: run i reads lengths[i] bytes at file offset offsets[i] into
    memory at address addresses[i], inside one of the `buffers` (which the batch keeps alive),
    checked as it lands where `check` is given. What the engine's bundle reads are
    (`streamer.ffn.bundle_reads`): thousands a token, made and handed to the compiled read
    loop without a Python object per read."""

    offsets: np.ndarray
    lengths: np.ndarray
    addresses: np.ndarray
    buffers: list[torch.Tensor] = field(default_factory=list)
    check: RecordCheck | None = None

    @classmethod
    def empty(cls) -> Runs:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z)

    def __len__(self) -> int:
        return len(self.offsets)

    def __add__(self, other: Runs) -> Runs:
        if not len(other):
            return self
        if not len(self):
            return other
        if (self.check is None) != (other.check is None):
            raise ValueError("runs with checks and runs without do not add up")
        return Runs(
            np.concatenate([self.offsets, other.offsets]),
            np.concatenate([self.lengths, other.lengths]),
            np.concatenate([self.addresses, other.addresses]),
            self.buffers + other.buffers,
            None if self.check is None else self.check + other.check,  # type: ignore[operator]
        )

    def verify(self) -> None:
        """The check in Python (where the compiled loop is not built)."""
        c = self.check
        if c is None:
            return
        lengths, addresses = self.lengths.tolist(), self.addresses.tolist()
        for i, (n, addr) in enumerate(zip(lengths, addresses, strict=True)):
            for r in range(n // c.stride):
                data = ctypes.string_at(addr + r * c.stride, c.record_bytes)
                if xxhash.xxh3_64_intdigest(data) != int(c.want[c.first[i] + r]):
                    raise c.error(int(c.first[i]) + r)

    def requests(self) -> list[tuple[int, memoryview]]:
        """The same reads as (file offset, destination) pairs (the Python path)."""
        return [
            (off, memoryview((ctypes.c_char * n).from_address(addr)).cast("B"))
            for off, n, addr in zip(
                self.offsets.tolist(), self.lengths.tolist(), self.addresses.tolist(), strict=True
            )
        ]


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
        # the compiled reader's pools of threads, for Runs (the first started here, all stopped
        # by close). A pool reads one batch at a time: a caller takes a free one, or starts
        # another while every pool is busy (the prefetch stage reads a look-ahead and a
        # correction at once, from two threads).
        self.lib = kernels.library()
        self.cpools: list[int] = []  # every pool started
        self.free_pools: list[int] = []
        self.pools_lock = threading.Lock()
        if self.lib is not None:
            self._give_pool(self._new_pool())
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
            with self.pools_lock:
                for cpool in self.cpools:
                    self.lib.pool_free(cpool)
                self.cpools, self.free_pools = [], []
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

    def _failed(self, runs: Runs, got: int, error: int, record: int) -> Exception:
        at = int(runs.offsets[-got - 1])
        if error == -1 and runs.check is not None:  # a record's checksum
            return runs.check.error(int(runs.check.first[-got - 1]) + record)
        if error == 0:
            return StreamerError(f"{self.path}: short read at byte {at} (file truncated?)")
        return StreamerError(f"{self.path}: read at byte {at} failed: {os.strerror(error)}")

    def _read_runs(self, lib, runs: Runs) -> int:
        """The compiled loop over runs on this thread (the probe's jobs; no checks)."""
        error = ctypes.c_int(0)
        got = lib.read_runs(
            self.fd,
            len(runs),
            runs.offsets.ctypes.data,
            runs.lengths.ctypes.data,
            runs.addresses.ctypes.data,
            self.size,
            int(not self.direct),
            ctypes.byref(error),
        )
        if got < 0:
            raise self._failed(runs, got, error.value, 0)
        return got

    def _new_pool(self) -> int:
        cpool = self.lib.pool_new(self.concurrency)
        if not cpool:
            raise MemoryError("the compiled reader could not start its threads")
        with self.pools_lock:
            self.cpools.append(cpool)
        return cpool

    def _take_pool(self) -> int:
        with self.pools_lock:
            if self.free_pools:
                return self.free_pools.pop()
        return self._new_pool()

    def _give_pool(self, cpool: int) -> None:
        with self.pools_lock:
            self.free_pools.append(cpool)

    def _read_pooled(self, runs: Runs, stats: ReadStats | None) -> int:
        """The compiled reader's threads over the whole batch, each record checked as it lands
        where the runs say how (the interpreter's lock released for the call)."""
        error, record, check_ns = ctypes.c_int(0), ctypes.c_int64(-1), ctypes.c_int64(0)
        c = runs.check
        arrays = [
            np.ascontiguousarray(a, dtype=np.int64)
            for a in (runs.offsets, runs.lengths, runs.addresses)
        ]
        want = None if c is None else np.ascontiguousarray(c.want, dtype=np.uint64)
        first = None if c is None else np.ascontiguousarray(c.first, dtype=np.int64)
        cpool = self._take_pool()
        try:
            got = self.lib.pool_read(
                cpool,
                self.fd,
                len(runs),
                *(a.ctypes.data for a in arrays),
                self.size,
                int(not self.direct),
                0 if c is None else c.stride,
                0 if c is None else c.record_bytes,
                None if want is None else want.ctypes.data,
                None if first is None else first.ctypes.data,
                ctypes.byref(error),
                ctypes.byref(record),
                ctypes.byref(check_ns),
            )
        finally:
            self._give_pool(cpool)
        if stats is not None:
            stats.check_seconds += check_ns.value / 1e9
        if got < 0:
            raise self._failed(runs, got, error.value, record.value)
        return got

    def read(
        self, requests: list[tuple[int, memoryview]] | Runs, stats: ReadStats | None = None
    ) -> int:
        """Read each (file offset, destination) pair, or each of the Runs, `concurrency` at a
        time; bytes read. Runs go through the compiled read loop where it is built
        (`streamer.kernels`), pairs (and Runs without it) through Python's preadv.

        With O_DIRECT, offsets, lengths and destinations must be aligned to the sector."""
        t0 = time.perf_counter()
        n_reads = len(requests)
        lib = kernels.library() if isinstance(requests, Runs) else None
        if self.sizes is not None:
            if isinstance(requests, Runs):
                lengths = requests.lengths.tolist()
            else:
                lengths = [len(view) for _, view in requests]
            for n in lengths:
                self.sizes[n] = self.sizes.get(n, 0) + 1
        if n_reads == 0:
            total = 0
        elif lib is not None and self.cpools:
            assert isinstance(requests, Runs)
            total = self._read_pooled(requests, stats)
        else:
            pairs = requests.requests() if isinstance(requests, Runs) else requests
            if len(pairs) == 1:
                total = self._pread(*pairs[0])
            else:
                # `concurrency` threads, each reading its stripe of the requests one after
                # another: as many reads in flight, without a future (and a wake-up) per read,
                # which costs about as much CPU as a 16 KiB read takes the disk.
                k = min(self.concurrency, len(pairs))
                total = sum(self.pool.map(self._pread_all, [pairs[i::k] for i in range(k)]))
            if isinstance(requests, Runs):
                requests.verify()
        if stats is not None:
            stats.bytes += total
            stats.reads += n_reads
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


def size_classes(sizes: dict[int, int]) -> list[tuple[int, int, int]]:
    """Read sizes -> (probe chunk, reads, bytes) per power-of-two class of sizes: the class's
    mean read, rounded up to the O_DIRECT sector."""
    classes: dict[int, list[int]] = {}
    for size, count in sizes.items():
        c = classes.setdefault(max(size - 1, 1).bit_length(), [0, 0])
        c[0] += count
        c[1] += size * count
    return [(-(-(b // n) // SECTOR) * SECTOR, n, b) for _, (n, b) in sorted(classes.items()) if n]


def probe_reads(
    path: str | os.PathLike, sizes: dict[int, int], tokens: int, concurrency: int, seconds: float
) -> dict:
    """What the disk takes for a run's reads (`FlashReader.sizes`, over `tokens` tokens), per
    token: probed at each class of read size they made (`size_classes`) with their concurrency,
    the I/O time a perfect engine would spend on the same reads."""
    classes, ms = [], 0.0
    for chunk, reads, nbytes in size_classes(sizes):
        gbs = probe_disk(path, [chunk], [concurrency], seconds=seconds)[0]["gb_per_s"]
        ms += nbytes / (gbs * 1e9) * 1e3 / tokens
        classes.append({"chunk": chunk, "reads": reads / tokens, "gb_per_s": gbs})
    return {"io_ms": round(ms, 3), "classes": classes}


def _probe_cell(reader: FlashReader, size: int, chunk: int, conc: int, seconds: float) -> dict:
    """`conc` threads each keep one random read of `chunk` bytes in flight (fio's psync jobs),
    through the loop the engine's bundle reads take (the compiled one where it is built)."""
    slots = size // chunk
    deadline = time.perf_counter() + seconds
    lib = kernels.library()

    def job(seed: int) -> tuple[int, int]:
        # Like a fio job: its own random order over the whole file, each chunk once per pass.
        order = np.random.default_rng(seed).permutation(slots) * chunk
        buf = aligned_buffer(chunk)
        done = reads = 0
        if lib is not None:  # 32 reads a call, into the same buffer
            lengths = np.full(32, chunk, dtype=np.int64)
            addresses = np.full(32, buf.data_ptr(), dtype=np.int64)
            while time.perf_counter() < deadline:
                at = np.take(order, np.arange(reads, reads + 32), mode="wrap")
                done += reader._read_runs(lib, Runs(at, lengths, addresses))
                reads += 32
            return done, reads
        offsets, view, fd = order.tolist(), [buf.numpy()], reader.fd
        while True:
            if reads % 32 == 0 and time.perf_counter() >= deadline:
                return done, reads
            done += os.preadv(fd, view, offsets[reads % slots])
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
