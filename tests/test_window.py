"""The DRAM window cache: its contents always equal the union of the last k active sets."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.window import WindowCache, fill_gaps

N = 40
ROW = 16


def stamp(cache: WindowCache, ids: np.ndarray, start: int) -> None:
    """Stands in for the flash read: row r holds its neuron id in every byte."""
    for k, neuron in enumerate(ids):
        cache.rows[start + k] = int(neuron)


active_sets = st.lists(st.lists(st.integers(0, N - 1), max_size=N), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(sets=active_sets, window=st.integers(1, 6))
def test_unbounded_cache_holds_exactly_the_window(sets, window):
    cache = WindowCache(N, capacity=N, row_bytes=ROW, window=window)
    for t, active in enumerate(sets):
        plan = cache.step(np.array(active, dtype=np.int64))
        stamp(cache, plan.load, plan.start)
        assert len(plan.overflow) == 0
        union = set().union(*map(set, sets[max(0, t - window + 1) : t + 1]))
        assert set(cache.cached.tolist()) == union
        assert len(cache.cached) == len(union)  # no duplicates
        # Every row still holds the neuron its id says (swap-delete moved data with ids).
        assert torch.equal(
            cache.rows[: cache.count, 0], torch.from_numpy(cache.cached).to(torch.uint8)
        )
        assert all(cache.row_of[n] == r for r, n in enumerate(cache.cached))
        assert plan.hits + len(plan.load) == len(set(active))


@settings(max_examples=200, deadline=None)
@given(sets=active_sets, window=st.integers(1, 6), capacity=st.integers(1, N))
def test_bounded_cache_keeps_the_most_recent_within_capacity(sets, window, capacity):
    cache = WindowCache(N, capacity=capacity, row_bytes=ROW, window=window)
    last_seen: dict[int, int] = {}
    for t, active in enumerate(sets):
        plan = cache.step(np.array(active, dtype=np.int64))
        stamp(cache, plan.load, plan.start)
        for n in active:
            last_seen[n] = t
        union = {n for n, s in last_seen.items() if s > t - window}
        cached = set(cache.cached.tolist())
        assert cache.count <= capacity
        assert cached <= union
        # This token's neurons are all there, in the cache or in the overflow.
        assert set(active) == (cached & set(active)) | set(plan.overflow.tolist())
        assert not cached & set(plan.overflow.tolist())
        if len(set(active)) <= capacity:
            assert len(plan.overflow) == 0
            # What was dropped from the window is never more recent than what was kept.
            dropped = union - cached
            if dropped and cached:
                assert max(last_seen[n] for n in dropped) <= min(last_seen[n] for n in cached)
        assert torch.equal(
            cache.rows[: cache.count, 0], torch.from_numpy(cache.cached).to(torch.uint8)
        )


def test_step_reports_loads_evictions_and_hits():
    cache = WindowCache(10, capacity=10, row_bytes=ROW, window=2)
    p = cache.step(np.array([1, 2, 3]))
    assert p.load.tolist() == [1, 2, 3] and p.start == 0 and p.hits == 0
    p = cache.step(np.array([3, 4]))
    assert p.load.tolist() == [4] and p.start == 3 and p.hits == 1 and p.evicted == 0
    p = cache.step(np.array([4, 5]))  # 1 and 2 were last active two tokens ago: evicted
    assert p.evicted == 2 and p.load.tolist() == [5] and p.hits == 1
    assert sorted(cache.cached.tolist()) == [3, 4, 5]


@settings(max_examples=200, deadline=None)
@given(sets=active_sets, window=st.integers(1, 6), capacity=st.integers(1, N))
def test_books_only_moves_rebuild_the_rows_elsewhere(sets, window, capacity):
    """The pipeline without shared memory: the predictor keeps books only, and compute applies
    each token's composed moves, then the new rows, to its own copy. The copy always equals
    the rows a cache that moves its own data holds, and says which neuron is in each row."""
    books = WindowCache(N, capacity, ROW, window, books_only=True)
    assert books.rows is None
    mirror = torch.zeros(capacity, ROW, dtype=torch.uint8)
    mirror_ids = np.full(capacity, -1)
    for active in sets:
        plan = books.step(np.array(active, dtype=np.int64))
        to, src = plan.moves[:, 0], plan.moves[:, 1]
        assert len(set(to.tolist()) & set(src.tolist())) == 0  # one gather does it
        mirror[to] = mirror[src]
        mirror_ids[to] = mirror_ids[src]
        for k, neuron in enumerate(plan.load):  # prefetch's reads
            mirror[plan.start + k] = int(neuron)
            mirror_ids[plan.start + k] = neuron
        assert np.array_equal(mirror_ids[: books.count], books.cached)
        assert torch.equal(mirror[: books.count, 0], torch.from_numpy(books.cached).to(torch.uint8))


def brute_fill(missing: list[int], gap: int, cached: set[int]) -> list[int]:
    out = set(missing)
    for a, b in zip(missing, missing[1:], strict=False):
        between = set(range(a + 1, b))
        if 0 < len(between) <= gap and not between & cached:
            out |= between
    return sorted(out)


@settings(max_examples=300, deadline=None)
@given(
    missing=st.lists(st.integers(0, N - 1), unique=True, max_size=N),
    cached=st.sets(st.integers(0, N - 1)),
    gap=st.integers(0, 5),
)
def test_fill_gaps_adds_the_short_runs_between_reads_that_hold_no_cached_neuron(
    missing, cached, gap
):
    missing = sorted(set(missing) - cached)
    row_of = np.full(N, -1, dtype=np.int64)
    row_of[sorted(cached)] = np.arange(len(cached))
    got = fill_gaps(np.array(missing, dtype=np.int64), gap, row_of)
    assert got.tolist() == brute_fill(missing, gap, cached)


@settings(max_examples=200, deadline=None)
@given(sets=active_sets, capacity=st.integers(1, N), gap=st.integers(1, 4))
def test_read_gaps_load_the_runs_between_and_keep_the_books(sets, capacity, gap):
    """With read_gap, the plan reads the short runs between two missing neurons too
    (`Plan.extra`, never a neuron the token selected or the window holds), and the window's
    books stay exact."""
    cache = WindowCache(N, capacity, ROW, window=3, keep=True, read_gap=gap)
    for active in sets:
        active = np.unique(np.array(active, dtype=np.int64))
        missing = active[cache.row_of[active] < 0]
        held = set(cache.cached.tolist())
        plan = cache.step(active)
        read = np.concatenate([plan.load, plan.overflow])
        assert sorted(read.tolist()) == brute_fill(missing.tolist(), gap, held)
        assert set(plan.extra.tolist()) == set(read.tolist()) - set(active.tolist())
        assert not set(plan.extra.tolist()) & held
        stamp(cache, plan.load, plan.start)
        assert len(set(cache.cached.tolist())) == cache.count  # no duplicates
        assert torch.equal(
            cache.rows[: cache.count, 0], torch.from_numpy(cache.cached).to(torch.uint8)
        )
