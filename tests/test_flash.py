"""The flash reader: direct reads of real files, merged runs, the buffered fall-back."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streamer import kernels
from streamer.errors import ConfigError, StreamerError
from streamer.ffn import bundle_reads
from streamer.flash import (
    ALIGN,
    FlashReader,
    ReadStats,
    RecordCheck,
    Runs,
    aligned_buffer,
    probe_disk,
)
from streamer.layout import BundleLayout


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, size=64 * ALIGN, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data


def test_aligned_buffers_are_page_aligned():
    for size in (1, ALIGN, 3 * ALIGN + 5):
        buf = aligned_buffer(size)
        assert buf.numel() == size and buf.data_ptr() % ALIGN == 0


def test_direct_reads_return_the_files_bytes(data_file):
    path, data = data_file
    with FlashReader(path, concurrency=8) as reader:
        assert reader.direct  # the test filesystem takes O_DIRECT
        bufs = [aligned_buffer(2 * ALIGN) for _ in range(10)]
        offsets = [i * 6 * ALIGN for i in range(10)]
        stats = ReadStats()
        n = reader.read(
            [(o, memoryview(b.numpy())) for o, b in zip(offsets, bufs, strict=True)], stats
        )
        assert n == stats.bytes == 20 * ALIGN and stats.reads == 10
        for o, b in zip(offsets, bufs, strict=True):
            assert np.array_equal(b.numpy(), data[o : o + 2 * ALIGN])
        whole = aligned_buffer(len(data))
        reqs = reader.chunked(0, whole)
        assert len(reqs) == 1  # 256 KiB fits in one max_read
        reader.read(reqs)
        assert np.array_equal(whole.numpy(), data)


@pytest.fixture(params=["compiled", "python"])
def read_loop(request, monkeypatch):
    """Runs read through the compiled loop, and through Python's where it is not built."""
    if request.param == "python":
        monkeypatch.setenv("STREAMER_KERNELS", "off")
    kernels.reset()
    assert kernels.available() == (request.param == "compiled")
    yield request.param
    monkeypatch.delenv("STREAMER_KERNELS", raising=False)
    kernels.reset()


def test_runs_return_the_files_bytes(data_file, read_loop):
    path, data = data_file
    with FlashReader(path, concurrency=4) as reader:
        buf = aligned_buffer(30 * 512).view(30, 512)
        # 7 runs of 1-4 sectors at scattered offsets, into scattered rows of the buffer
        offsets = np.array([0, 9, 20, 33, 40, 101, 127]) * 512
        rows = np.array([0, 2, 6, 11, 15, 20, 26])
        count = np.array([2, 4, 1, 3, 2, 4, 1])
        runs = Runs(offsets, count * 512, buf.data_ptr() + rows * 512, [buf])
        stats = ReadStats()
        assert reader.read(runs, stats) == stats.bytes == count.sum() * 512
        assert stats.reads == 7
        for o, r, c in zip(offsets, rows, count, strict=True):
            assert np.array_equal(buf[r : r + c].numpy().ravel(), data[o : o + c * 512])


def test_threads_reading_through_one_reader_at_once_each_get_their_bytes(data_file, read_loop):
    """The prefetch stage reads a look-ahead and a correction at once: a compiled pool reads one
    batch at a time, so a second caller must not share the first one's (it hung, or returned
    before the pool's threads had read its runs)."""
    path, data = data_file
    rounds, n = 300, 48
    with FlashReader(path, concurrency=4) as reader:

        def reads(seed: int) -> int:
            rng = np.random.default_rng(seed)
            bad = 0
            for _ in range(rounds):
                buf = aligned_buffer(n * 512).view(n, 512)
                sectors = rng.choice(len(data) // 512, n, replace=False)
                runs = Runs(sectors * 512, np.full(n, 512), buf.data_ptr() + np.arange(n) * 512)
                runs.buffers.append(buf)
                assert reader.read(runs) == n * 512
                got = buf.numpy()
                bad += sum(
                    not np.array_equal(got[i], data[s * 512 : (s + 1) * 512])
                    for i, s in enumerate(sectors)
                )
            return bad

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(reads, range(3))) == [0, 0, 0]
        if read_loop == "compiled":
            assert len(reader.cpools) >= 2  # they did read at once, each on its own pool


def test_reading_past_the_end_of_a_truncated_file_fails_clearly(data_file, read_loop):
    path, _ = data_file
    with FlashReader(path) as reader:
        os.truncate(path, 10 * ALIGN)  # after the reader opened it
        buf = aligned_buffer(ALIGN)
        with pytest.raises(StreamerError, match="short read"):
            reader.read([(20 * ALIGN, memoryview(buf.numpy()))])
        runs = Runs(
            np.array([0, 20 * ALIGN]),
            np.array([ALIGN, ALIGN]),
            buf.data_ptr() + 0 * np.ones(2, dtype=np.int64),
            [buf],
        )
        with pytest.raises(StreamerError, match=f"short read at byte {20 * ALIGN}"):
            reader.read(runs)


def test_buffered_reads_return_the_same_bytes(data_file):
    path, data = data_file
    with FlashReader(path, direct=False) as reader:
        assert not reader.direct
        buf = aligned_buffer(ALIGN)
        reader.read([(3 * ALIGN, memoryview(buf.numpy()))])
        assert np.array_equal(buf.numpy(), data[3 * ALIGN : 4 * ALIGN])


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm")
def test_tmpfs_refuses_o_direct_and_the_reader_warns(caplog):
    path = f"/dev/shm/streamer-test-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(bytes(4 * ALIGN))
    try:
        with FlashReader(path) as reader:
            buf = aligned_buffer(ALIGN)
            reader.read([(0, memoryview(buf.numpy()))])
    finally:
        os.unlink(path)
    if reader.direct:
        pytest.skip("this kernel's tmpfs takes O_DIRECT: no fall-back to test here")
    assert "O_DIRECT refused" in caplog.text


def test_bundle_reads_merge_runs_adjacent_on_flash_and_in_memory():
    cfg = SimpleNamespace(gated=False, d_model=128, d_ffn=64, n_layers=2)
    lay = BundleLayout.for_config(cfg, torch.float32)  # type: ignore[arg-type]
    s = lay.stride
    dest = aligned_buffer(20 * s).view(20, s)
    assert len(bundle_reads(lay, 1, np.array([], dtype=np.int64), dest, 1 << 20)) == 0
    runs = bundle_reads(lay, 1, np.array([1, 2, 3, 7, 8, 10]), dest, 1 << 20)
    assert (runs.offsets == lay.layer_offsets[1] + np.array([1, 7, 10]) * s).all()
    assert (runs.lengths == np.array([3, 2, 1]) * s).all()
    assert (runs.addresses == dest.data_ptr() + np.array([0, 3, 5]) * s).all()
    # neurons adjacent on flash but not in memory are two reads
    runs = bundle_reads(lay, 0, np.array([4, 5, 6]), dest, 1 << 20, np.array([9, 10, 2]))
    assert (runs.lengths == np.array([2, 1]) * s).all()
    assert (runs.addresses == dest.data_ptr() + np.array([9, 2]) * s).all()
    # a run longer than max_read is read in pieces of at most max_read
    runs = bundle_reads(lay, 0, np.arange(3, 10), dest, 3 * s)
    assert (runs.offsets == np.array([3, 6, 9]) * s).all()
    assert (runs.lengths == np.array([3, 3, 1]) * s).all()
    assert (runs.addresses == dest.data_ptr() + np.array([0, 3, 6]) * s).all()


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_probe_disk_measures_each_cell(tmp_path, processes):
    rows = probe_disk(
        tmp_path, [ALIGN, 4 * ALIGN], [1, 4], seconds=0.05, file_bytes=8 << 20, processes=processes
    )
    assert [(r["chunk"], r["concurrency"]) for r in rows] == [
        (ALIGN, 1),
        (4 * ALIGN, 1),
        (ALIGN, 4),
        (4 * ALIGN, 4),
    ]
    assert all(r["gb_per_s"] > 0 and r["direct"] for r in rows)
    assert not any(p.name.startswith(".streamer-probe") for p in tmp_path.iterdir())


def test_concurrency_is_validated(data_file):
    with pytest.raises(ConfigError, match="concurrency"):
        FlashReader(data_file[0], concurrency=0)


def test_runs_are_checked_as_they_land_and_name_the_first_bad_record(tmp_path, read_loop):
    """Each record of a batch is hashed (XXH3-64 of its first record_bytes) as it lands; a
    flipped byte is the error of that record, the first in the batch's order, through either
    loop; intact records pass."""
    import xxhash

    stride, record, n = 1024, 1000, 48
    data = np.random.default_rng(3).integers(0, 256, size=n * stride, dtype=np.uint8)
    path = tmp_path / "records.bin"
    path.write_bytes(data.tobytes())
    want = np.array(
        [
            xxhash.xxh3_64_intdigest(data[i * stride : i * stride + record].tobytes())
            for i in range(n)
        ],
        dtype=np.uint64,
    )
    ids = np.array([1, 2, 3, 9, 10, 20, 30, 31, 32, 33, 40])  # runs: 1-3, 9-10, 20, 30-33, 40
    first = np.array([0, 3, 5, 6, 10])
    count = np.array([3, 2, 1, 4, 1])

    def runs(buf):
        check = RecordCheck(want[ids], first, stride, record, lambda k: ValueError(f"record {k}"))
        return Runs(
            ids[first] * stride,
            count * stride,
            buf.data_ptr() + first * stride,
            [buf],
            check,
        )

    with FlashReader(path, concurrency=4) as reader:
        buf = aligned_buffer(len(ids) * stride).view(len(ids), stride)
        assert reader.read(runs(buf)) == len(ids) * stride
        assert np.array_equal(buf.numpy(), data.reshape(n, stride)[ids])
    for bad in (31, 9):  # record 7 (of neuron 31), then record 3 (of neuron 9)
        flipped = data.copy()
        flipped[bad * stride + 17] ^= 0xFF
        flipped[32 * stride + 5] ^= 0xFF  # and a later one: the first in order is named
        path.write_bytes(flipped.tobytes())
        buf = aligned_buffer(len(ids) * stride).view(len(ids), stride)
        with (
            FlashReader(path, concurrency=4) as reader,
            pytest.raises(ValueError, match=f"record {list(ids).index(bad)}$"),
        ):
            reader.read(runs(buf))
