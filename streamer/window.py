"""The DRAM window cache of one layer: the neurons active for any of the last k tokens.

The paper's memory management [3.3]: a preallocated matrix of bundle rows sized for the most
neurons the window may hold, the neuron id of each row, and a count. Per token, neurons that left
the window are deleted by moving the last rows into the holes (swap-delete, O(c·d) copying), new
neurons are appended at the end, and compute runs on rows `[:count]` directly. No allocation per
token. When the window would exceed the capacity the DRAM budget gives it, the least recently
active neurons go first; a token whose own active set exceeds the capacity gets the rest in a
scratch area (`Plan.overflow`) that is not kept. With `keep`, a neuron that left the window stays
until its row is needed (least recently active first): what DRAM holds is never read again, so a
bigger budget never reads more (the engine's `window` and `all` modes). With `read_gap`, the short
runs of neurons between two that must be read are read too (`fill_gaps`, `Plan.extra`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from streamer.flash import aligned_buffer

NEVER = np.iinfo(np.int64).min // 2
# The `all` mode (both runtimes) reads the runs of at most this many unneeded neurons between two
# it must read: one read instead of two, where a read costs more than a few bundles' bytes
# (README, "Decisions").
READ_GAP = 0  # the paper's bundling alone; 1 or 2 trade bytes for reads (README, "Decisions")
MAX_READ_GAP = 64


def copy_rows(dest: torch.Tensor, dest_rows, src: torch.Tensor, src_rows) -> None:
    """dest[dest_rows] = src[src_rows] for rows of bytes, through numpy: its fancy indexing
    copies rows about ten times faster than torch's does on uint8 (README, "Decisions")."""
    dest.numpy()[np.asarray(dest_rows)] = src.numpy()[np.asarray(src_rows)]


@dataclass
class Plan:
    """What one token needs read: `load` ids go to rows `[start, start + len(load))`."""

    load: np.ndarray  # sorted neuron ids to read into the cache
    start: int
    overflow: np.ndarray  # sorted ids that did not fit: read into scratch, not kept
    hits: int  # active neurons already in the cache
    evicted: int  # rows freed this token
    # [k, 2]: (to, from) row moves of this token's swap-deletes, composed into one gather
    # (every `from` lies beyond every `to`); only for a `books_only` cache
    moves: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    # neurons read that the token did not select: the short runs between two it needs
    # (`read_gap`), in `load` or `overflow` like the others; kept, not computed
    extra: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def fill_gaps(missing: np.ndarray, gap: int, row_of: np.ndarray) -> np.ndarray:
    """`missing` (sorted neuron ids to read) with every run of at most `gap` neurons lying
    between two of them added, unless the run holds a cached neuron (a run read whole lands in
    consecutive rows, and a cached neuron has its row): one read instead of two, where a read
    costs more than the bytes between (README, "Decisions")."""
    if gap <= 0 or len(missing) < 2:
        return missing
    d = np.diff(missing)
    small = np.flatnonzero((d > 1) & (d <= gap + 1))
    if len(small) == 0:
        return missing
    lens = d[small] - 1
    owner = np.repeat(np.arange(len(small)), lens)  # which gap each filler lies in
    first = np.cumsum(lens) - lens
    fill = missing[small][owner] + 1 + np.arange(len(owner)) - first[owner]
    cached = row_of[fill] >= 0
    if cached.any():
        ok = np.ones(len(small), dtype=bool)
        ok[owner[cached]] = False
        fill = fill[ok[owner]]
    return np.union1d(missing, fill)


class WindowCache:
    """`rows` may be given (the pipeline's shared memory, [capacity, row_bytes]); `ids` too, so
    that another process can read which neuron each row holds. `books_only`: no rows at all,
    only which neuron is in which row, with each token's row moves in `Plan.moves` (the
    pipeline's predictor when compute does not share its memory, and applies the moves)."""

    def __init__(
        self,
        n_neurons: int,
        capacity: int,
        row_bytes: int,
        window: int,
        rows: torch.Tensor | None = None,
        ids: np.ndarray | None = None,
        books_only: bool = False,
        keep: bool = False,
        read_gap: int = 0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 token, got {window}")
        self.n_neurons = n_neurons
        self.capacity = min(capacity, n_neurons)
        self.window = window
        self.keep = keep
        self.read_gap = read_gap  # runs of at most this many unneeded neurons are read too
        if rows is None and not books_only:
            rows = aligned_buffer(self.capacity * row_bytes).view(self.capacity, row_bytes)
        self.rows = rows
        self._old_row = np.full(n_neurons, -1, dtype=np.int64) if books_only else None
        self.ids = np.empty(self.capacity, dtype=np.int64) if ids is None else ids
        self.ids[:] = -1  # neuron id of each row
        self.row_of = np.full(n_neurons, -1, dtype=np.int64)  # row of each neuron, -1 if absent
        self.last_active = np.full(n_neurons, NEVER, dtype=np.int64)
        self.count = 0
        self.t = -1  # index of the current token

    @property
    def cached(self) -> np.ndarray:
        return self.ids[: self.count]

    def _delete(self, neurons: np.ndarray, move_rows: bool = True) -> None:
        """Swap-delete: the last rows move into the holes the deleted neurons leave."""
        if len(neurons) == 0:
            return
        holes = self.row_of[neurons]
        new_count = self.count - len(holes)
        is_hole = np.zeros(self.count, dtype=bool)
        is_hole[holes] = True
        fill = holes[holes < new_count]  # holes inside the kept range
        tail = np.flatnonzero(~is_hole[new_count:]) + new_count  # kept rows beyond it
        if len(fill):
            if move_rows and self.rows is not None:
                copy_rows(self.rows, fill, self.rows, tail)
            moved = self.ids[tail]
            self.ids[fill] = moved
            self.row_of[moved] = fill
        self.row_of[neurons] = -1
        self.ids[new_count : self.count] = -1
        self.count = new_count

    def step(self, active: np.ndarray, move_rows: bool = True, gaps: bool = True) -> Plan:
        """Advance one token whose active neurons are `active` (unique ids); what to read.
        move_rows=False keeps the books only (rows are written wholesale after, see `fill`);
        gaps=False reads no read gaps (`fill`: nothing is read)."""
        self.t += 1
        active = np.asarray(active, dtype=np.int64)
        if len(active) > 1 and not (np.diff(active) > 0).all():
            active = np.unique(active)  # the predictors give sorted unique ids already
        self.last_active[active] = self.t
        cached = self.cached
        if self._old_row is not None:
            before = cached.copy()
            self._old_row[before] = np.arange(len(before))
        if self.keep:
            expired = cached[:0]  # they go below, oldest first, only when room is needed
        else:
            expired = cached[self.last_active[cached] <= self.t - self.window]
        self._delete(expired, move_rows)
        missing = active[self.row_of[active] < 0]
        hits = len(active) - len(missing)
        extra = None
        if self.read_gap > 0 and gaps:
            filled = fill_gaps(missing, self.read_gap, self.row_of)
            if len(filled) > len(missing):
                extra = np.setdiff1d(filled, missing, assume_unique=True)
                missing = filled
        evicted = len(expired)
        excess = self.count + len(missing) - self.capacity
        if excess > 0:
            # Least recently active first, never a neuron this token needs.
            cached = self.cached
            old = cached[self.last_active[cached] < self.t]
            victims = old[np.argsort(self.last_active[old], kind="stable")[:excess]]
            self._delete(victims, move_rows)
            evicted += len(victims)
        moves = None
        if self._old_row is not None:
            src = self._old_row[self.cached]  # where each kept neuron's row was
            moved = np.flatnonzero(src != np.arange(self.count))
            moves = np.stack([moved, src[moved]], axis=1)
            self._old_row[before] = -1
        room = self.capacity - self.count
        load, overflow = missing[:room], missing[room:]
        start = self.count
        rows = np.arange(start, start + len(load))
        self.ids[rows] = load
        self.row_of[load] = rows
        self.count += len(load)
        plan = Plan(load, start, overflow, hits, evicted)
        if moves is not None:
            plan.moves = moves
        if extra is not None:
            plan.extra = extra
        return plan

    def fill(self, active_sets: list[np.ndarray], layer_rows: torch.Tensor | None) -> None:
        """After a prompt: step through its last tokens' active sets, then copy every kept
        neuron's row from `layer_rows` (the whole layer, as prefill read it) in one gather.
        layer_rows=None: the books only (the pipeline's predictor; compute writes the rows)."""
        for active in active_sets:
            self.step(active, move_rows=False, gaps=False)
        if layer_rows is not None and self.count:
            np.take(layer_rows.numpy(), self.cached, axis=0, out=self.rows.numpy()[: self.count])

    def reset(self) -> None:
        """Forget every neuron (a new sequence, or the predictor-only mode's per-token reload)."""
        self.row_of[self.cached] = -1
        self.ids[: self.count] = -1
        self.count = 0
        self.last_active[:] = NEVER
        self.t = -1
