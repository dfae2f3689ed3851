"""The flash reader: direct reads of real files, merged runs, the buffered fall-back."""

from __future__ import annotations

import os

import numpy as np
import pytest

from streamer.errors import ConfigError, StreamerError
from streamer.flash import ALIGN, FlashReader, ReadStats, aligned_buffer, merge_runs, probe_disk


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


def test_reading_past_the_end_of_a_truncated_file_fails_clearly(data_file):
    path, _ = data_file
    with FlashReader(path) as reader:
        os.truncate(path, 10 * ALIGN)  # after the reader opened it
        buf = aligned_buffer(ALIGN)
        with pytest.raises(StreamerError, match="short read"):
            reader.read([(20 * ALIGN, memoryview(buf.numpy()))])


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


def test_merge_runs():
    assert merge_runs(np.array([], dtype=np.int64)) == []
    assert merge_runs(np.array([3])) == [(0, 1)]
    assert merge_runs(np.array([1, 2, 3, 7, 8, 10])) == [(0, 3), (3, 2), (5, 1)]


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
