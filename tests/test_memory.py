"""Guest memory as the host sees it: states, charging, CLOCK reclaim and readahead."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from apfsim.host import memory
from apfsim.host.memory import GuestMemory, PageState

sys.path.insert(0, str(Path(__file__).parent))
from memory_helpers import IO, C, M, S, U, gfns


def memory_with(states: list[PageState], referenced: list[int], limit: int = 1000) -> GuestMemory:
    """A GuestMemory with the given per-page states and access bits (dirty everywhere)."""
    mem = GuestMemory(len(states), limit)
    mem.state[:] = np.array(states, dtype=np.uint8)
    mem.referenced[:] = np.array(referenced, dtype=np.uint8)
    mem.dirty[:] = 1
    mem.alloc_swap(np.flatnonzero(mem.state == S))  # swapped pages hold slots, in gfn order
    mem.resident = int(np.isin(mem.state, [M, C, IO]).sum())
    return mem


@contextmanager
def clock_chunks(minimum: int, per_page: int) -> Iterator[None]:
    saved = memory._MIN_CLOCK_CHUNK, memory._CLOCK_CHUNK_PER_PAGE
    memory._MIN_CLOCK_CHUNK, memory._CLOCK_CHUNK_PER_PAGE = minimum, per_page
    try:
        yield
    finally:
        memory._MIN_CLOCK_CHUNK, memory._CLOCK_CHUNK_PER_PAGE = saved


# ---------------------------------------------------------------------- initialise


def test_initialise_respects_fractions_and_flags() -> None:
    mem = GuestMemory(1000, limit_pages=600)
    mem.initialise(np.random.default_rng(1), resident_fraction=0.5, swapped_fraction=0.3)
    assert (mem.count(M), mem.count(S), mem.count(U)) == (500, 300, 200)
    assert mem.resident == 500
    resident, swapped = mem.state == M, mem.state == S
    assert mem.dirty[resident].all() and (mem.slot[resident] < 0).all()
    assert (mem.slot[swapped] >= 0).all() and not mem.dirty[swapped].any()
    # The swapped pages hold the first slots of the swap area, in gfn order.
    assert mem.slot[swapped].tolist() == list(range(300))
    assert not mem.referenced.any()
    mem.check()


def test_initialise_is_random_but_seeded() -> None:
    a, b, c = (GuestMemory(500, 500) for _ in range(3))
    a.initialise(np.random.default_rng(7), 0.4, 0.4)
    b.initialise(np.random.default_rng(7), 0.4, 0.4)
    c.initialise(np.random.default_rng(8), 0.4, 0.4)
    assert np.array_equal(a.state, b.state)
    assert not np.array_equal(a.state, c.state)


def test_initialise_rejects_resident_over_limit() -> None:
    mem = GuestMemory(1000, limit_pages=400)
    with pytest.raises(ValueError, match="over limit_pages=400"):
        mem.initialise(np.random.default_rng(0), 0.5, 0.1)


@pytest.mark.parametrize(("res", "swp"), [(0.7, 0.4), (-0.1, 0.0), (0.0, 1.5)])
def test_initialise_rejects_bad_fractions(res: float, swp: float) -> None:
    with pytest.raises(ValueError):
        GuestMemory(100, 100).initialise(np.random.default_rng(0), res, swp)


def test_bytes_per_page_at_most_16() -> None:
    mem = GuestMemory(64, 32)
    arrays = (mem.state, mem.referenced, mem.dirty, mem.slot)
    flags = sum(a.itemsize for a in arrays)
    # Plus the owner of each slot of a swap area twice the guest (whole clusters).
    assert flags == 7 and mem.bytes_per_page() == flags + -(-mem.owner.nbytes // 64)
    big = GuestMemory(1 << 18, 1 << 17)  # 1 GiB: whole clusters, no rounding
    assert big.bytes_per_page() == 7 + 8 <= 16


# ---------------------------------------------------------------------- access and faults


def test_first_not_mapped_and_touch() -> None:
    mem = memory_with([M, M, S, M, U], [0] * 5)
    mem.dirty[:] = 0
    assert mem.first_not_mapped(gfns(0, 1, 3)) == 3
    assert mem.first_not_mapped(gfns(1, 0, 2, 3)) == 2
    assert mem.first_not_mapped(gfns(4)) == 0
    assert mem.first_not_mapped(gfns()) == 0
    mem.touch(gfns(0, 1), write=False)
    mem.touch(gfns(3), write=True)
    assert mem.referenced.tolist() == [1, 1, 0, 1, 0]
    assert mem.dirty.tolist() == [0, 0, 0, 1, 0]


def test_first_not_mapped_and_touch_on_a_run_of_gfns() -> None:
    """The memory hog's slice form answers as the index-array form does."""
    mem = memory_with([M, M, S, M, U], [0] * 5)
    mem.dirty[:] = 0
    for lo, hi in [(0, 2), (0, 5), (1, 4), (3, 5), (4, 5), (2, 2)]:
        assert mem.first_not_mapped(slice(lo, hi)) == mem.first_not_mapped(gfns(*range(lo, hi)))
    mem.touch(slice(0, 2), write=True)
    assert mem.referenced.tolist() == [1, 1, 0, 0, 0]
    assert mem.dirty.tolist() == [1, 1, 0, 0, 0]


def test_zero_fill() -> None:
    mem = GuestMemory(8, 4)
    rec = mem.zero_fill(5)
    assert rec.evicted == 0 and len(rec.writes) == 0
    assert mem.state[5] == M and mem.dirty[5] == 1 and mem.referenced[5] == 1
    assert mem.slot[5] == -1
    assert mem.resident == 1 and mem.zero_fills == 1
    with pytest.raises(ValueError, match="gfn 5 is MAPPED, expected UNTOUCHED"):
        mem.zero_fill(5)


def test_zero_fill_at_limit_reclaims_a_batch() -> None:
    mem = GuestMemory(100, limit_pages=40, reclaim_batch=32)
    for gfn in range(40):
        mem.zero_fill(gfn)
    mem.referenced[:] = 0
    rec = mem.zero_fill(40)
    assert rec.evicted == 32
    assert rec.writes.tolist() == list(range(32))  # all dirty, none has a swap copy
    assert mem.resident == 40 - 32 + 1
    assert (mem.pages_evicted, mem.pages_written) == (32, 32)
    mem.check()


def test_swap_in_cycle_and_write_back_only_when_dirty() -> None:
    mem = GuestMemory(16, limit_pages=16, page_cluster=0, reclaim_batch=1)
    mem.state[:] = S
    mem.alloc_swap(np.arange(16, dtype=np.int64))
    window = mem.readahead_window(3)
    assert window.tolist() == [3]
    mem.start_read(window)
    assert mem.state[3] == IO and mem.resident == 1 and mem.reads_started == 1
    mem.finish_read(window)
    assert mem.state[3] == C and mem.dirty[3] == 0 and mem.slot[3] == 3
    mem.referenced[3] = 0
    rec = mem.reclaim(1)  # clean swap-cache page, slot kept: dropped without a write
    assert rec.evicted == 1 and len(rec.writes) == 0 and mem.slot[3] == 3
    mem.start_read(gfns(3))
    mem.finish_read(gfns(3))
    assert mem.map_after_read(3)  # the write fault frees the slot
    assert mem.state[3] == M and mem.referenced[3] == 1 and mem.slot[3] == -1
    mem.referenced[3] = 0
    assert mem.reclaim(1).writes.tolist() == [3]  # written again, to a new slot
    assert mem.slot[3] == 16 and mem.pages_written == 1
    mem.check()


def test_clean_page_without_swap_copy_is_written() -> None:
    mem = memory_with([M, M, C], [0, 0, 0])
    mem.dirty[:] = 0
    mem.alloc_swap(gfns(1, 2))
    rec = mem.reclaim(3)
    assert rec.evicted == 3 and rec.writes.tolist() == [0]
    assert (mem.slot >= 0).all() and not mem.dirty.any()


def test_map_swapcache_and_map_after_read_after_reclaim() -> None:
    mem = memory_with([C, C], [0, 0])
    mem.map_swapcache(0)
    assert mem.state[0] == M and mem.referenced[0] == 1
    mem.reclaim(1)  # takes gfn 1 out of the swap cache before its prefault
    assert not mem.map_after_read(1)
    assert mem.state[1] == S
    with pytest.raises(ValueError, match="expected SWAPCACHE"):
        mem.map_swapcache(1)


def test_start_read_rejects_pages_not_swapped() -> None:
    mem = memory_with([S, M], [0, 0])
    with pytest.raises(ValueError, match=r"gfns \[1\] are not SWAPPED"):
        mem.start_read(gfns(0, 1))


# ---------------------------------------------------------------------- readahead


def all_swapped(mem: GuestMemory) -> GuestMemory:
    """Every page swapped, with slots in gfn order (slot == gfn)."""
    mem.state[:] = S
    mem.alloc_swap(np.arange(mem.n_pages, dtype=np.int64))
    return mem


def test_cluster_window_is_the_aligned_cluster() -> None:
    mem = all_swapped(GuestMemory(64, 64, page_cluster=3))
    mem.state[[9, 14]] = [M, IO]
    assert mem.cluster_window(13, 8).tolist() == [13, 8, 10, 11, 12, 15]
    assert mem.cluster_window(8, 8).tolist() == [8, 10, 11, 12, 13, 15]
    assert mem.cluster_window(63, 8).tolist() == [63, 56, 57, 58, 59, 60, 61, 62]
    assert mem.cluster_window(13, 4).tolist() == [13, 12, 15]


def test_cluster_window_truncated_at_end_of_swap_area() -> None:
    mem = all_swapped(GuestMemory(20, 20, page_cluster=3, swap_cluster=4, swap_slots=20))
    assert mem.cluster_window(17, 8).tolist() == [17, 16, 18, 19]


def test_readahead_is_one_page_for_random_swapins() -> None:
    """__swapin_nr_pages: no hits and a non-adjacent offset read only the target."""
    mem = all_swapped(GuestMemory(64, 64, page_cluster=3))
    assert mem.readahead_window(13).tolist() == [13]
    assert mem.readahead_window(40).tolist() == [40]


def test_readahead_ramps_up_on_sequential_hits() -> None:
    """Adjacent faults read 2 pages' worth (rounded to one) then hits grow the window to 8."""
    mem = GuestMemory(64, 64, page_cluster=3)
    mem.state[:] = S
    assert mem.swapin_nr_pages(10) == 1
    assert mem.swapin_nr_pages(11) == 2  # adjacent, no hits: hits + 2
    mem.ra_hits = 3
    assert mem.swapin_nr_pages(12) == 8  # 3 + 2 rounded up to a power of two, capped at 8
    assert mem.swapin_nr_pages(40) == 4  # no hits, far away: never below half the last window
    mem.ra_hits = 1
    assert mem.swapin_nr_pages(41) == 4  # 1 + 2 rounds up to 4


def test_minor_fault_on_swapcache_counts_a_readahead_hit() -> None:
    mem = all_swapped(GuestMemory(16, 16, page_cluster=3))
    mem.start_read(np.array([4, 5], dtype=np.int64))
    mem.finish_read(np.array([4, 5], dtype=np.int64))
    mem.map_swapcache(5)
    assert mem.ra_hits == 1
    assert mem.slot[5] == -1 and mem.slot[4] == 4  # the write fault frees the mapped one's


def test_page_cluster_zero_reads_one_page() -> None:
    mem = all_swapped(GuestMemory(64, 64, page_cluster=0))
    assert mem.readahead_window(13).tolist() == [13]


# ---------------------------------------------------------------------- CLOCK


def test_second_chance_by_hand() -> None:
    mem = memory_with([M] * 8, [1, 0, 1, 0, 0, 1, 1, 0])
    assert mem.reclaim(2).writes.tolist() == [1, 3]
    assert mem.referenced.tolist() == [0, 0, 0, 0, 0, 1, 1, 0]  # 0 and 2 lost their chance
    assert mem.state.tolist() == [M, S, M, S, M, M, M, M]
    # The hand is at 4: evict 4, spare 5 and 6, evict 7, wrap and evict 0.
    assert mem.reclaim(3).writes.tolist() == [4, 7, 0]
    assert mem.state.tolist() == [S, S, M, S, S, M, M, S]
    assert mem.referenced.tolist() == [0] * 8
    assert mem.clock_scanned == 4 + 5
    mem.check()


def test_in_io_is_never_evicted() -> None:
    mem = memory_with([IO, M, IO, C, IO], [0, 1, 0, 0, 0])
    rec = mem.reclaim(10)
    assert rec.evicted == 2 and sorted(rec.writes.tolist()) == [1, 3]
    assert mem.state.tolist() == [IO, S, IO, S, IO]


def test_reclaim_raises_when_everything_is_in_io() -> None:
    mem = memory_with([IO] * 4 + [S] * 4, [1] * 8, limit=4)
    with pytest.raises(RuntimeError, match="nothing evictable after two full CLOCK sweeps"):
        mem.reclaim(1)
    with pytest.raises(RuntimeError):
        mem.start_read(gfns(5))
    assert mem.resident == 4 and mem.state[5] == S


def test_charge_larger_than_evictable_raises() -> None:
    mem = memory_with([IO, IO, M, S, S, S], [0] * 6, limit=3)
    with pytest.raises(RuntimeError, match="cannot charge 3 pages"):
        mem.start_read(gfns(3, 4, 5))
    mem.check()


def reference_clock(
    state: np.ndarray, ref: np.ndarray, hand: int, n: int
) -> tuple[list[int], int, int]:
    """One-page-at-a-time CLOCK: (evicted gfns in order, new hand, pages scanned)."""
    n_pages = len(state)
    evicted: list[int] = []
    scanned = 0
    while len(evicted) < n and scanned < 2 * n_pages:
        if state[hand] in (M, C):
            if ref[hand]:
                ref[hand] = 0
            else:
                state[hand] = S
                evicted.append(hand)
        hand = (hand + 1) % n_pages
        scanned += 1
    return evicted, hand, scanned


clock_case = st.integers(1, 120).flatmap(
    lambda n_pages: st.tuples(
        st.lists(st.sampled_from(list(PageState)), min_size=n_pages, max_size=n_pages),
        st.lists(st.integers(0, 1), min_size=n_pages, max_size=n_pages),
        st.lists(st.integers(0, 1), min_size=n_pages, max_size=n_pages),
        st.lists(st.integers(0, 1), min_size=n_pages, max_size=n_pages),
        st.integers(0, n_pages - 1),
        st.lists(st.integers(1, 2 * n_pages + 2), min_size=1, max_size=4),
    )
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(case=clock_case, chunk=st.sampled_from([(1, 1), (2, 1), (5, 2), (1024, 8)]))
def test_vectorised_clock_equals_reference(
    case: tuple[list[PageState], list[int], list[int], list[int], int, list[int]],
    chunk: tuple[int, int],
) -> None:
    states, refs, dirty, swap_copy, hand, requests = case
    mem = memory_with(states, refs)
    mem.dirty[:] = dirty
    mem.alloc_swap(np.flatnonzero(np.array(swap_copy, dtype=bool) & (mem.slot < 0)))
    mem._hand = hand
    exp_state, exp_ref = mem.state.copy(), mem.referenced.copy()
    exp_dirty, exp_copy = mem.dirty.copy(), (mem.slot >= 0).astype(np.uint8)
    exp_resident, exp_scanned = mem.resident, 0
    next_slot = int(np.count_nonzero(exp_copy))  # one cluster, never freed: in order
    with clock_chunks(*chunk):
        for n in requests:
            victims, hand, scanned = reference_clock(exp_state, exp_ref, hand, n)
            exp_writes = [g for g in victims if exp_dirty[g] or not exp_copy[g]]
            fresh = [g for g in victims if not exp_copy[g]]
            exp_dirty[victims], exp_copy[victims] = 0, 1
            exp_resident -= len(victims)
            exp_scanned += scanned
            if victims:
                rec = mem.reclaim(n)
                assert rec.evicted == len(victims)
                assert rec.writes.tolist() == exp_writes
            else:
                with pytest.raises(RuntimeError):
                    mem.reclaim(n)
            assert np.array_equal(mem.state, exp_state)
            assert np.array_equal(mem.referenced, exp_ref)
            assert np.array_equal(mem.dirty, exp_dirty)
            assert np.array_equal(mem.slot >= 0, exp_copy == 1)
            # add_to_swap in eviction order: ascending slots of the one per-CPU cluster.
            assert mem.slot[fresh].tolist() == list(range(next_slot, next_slot + len(fresh)))
            next_slot += len(fresh)
            assert (mem._hand, mem.resident, mem.clock_scanned) == (
                hand,
                exp_resident,
                exp_scanned,
            )


class MemoryMachine(RuleBasedStateMachine):
    """Random fault, read, map, touch and reclaim sequences: the limit always holds."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = GuestMemory(96, limit_pages=24, page_cluster=2, reclaim_batch=8)
        self.mem.initialise(np.random.default_rng(0), 0.2, 0.5)
        self.in_flight: list[np.ndarray] = []

    def pick(self, state: PageState, index: int) -> int | None:
        candidates = np.flatnonzero(self.mem.state == state)
        return int(candidates[index % len(candidates)]) if len(candidates) else None

    def evictable(self) -> int:
        return self.mem.count(M) + self.mem.count(C)

    def can_charge(self, npages: int) -> bool:
        return self.mem.limit_pages - self.mem.resident + self.evictable() >= npages

    @rule(index=st.integers(0, 10**6))
    def zero_fill(self, index: int) -> None:
        gfn = self.pick(U, index)
        if gfn is None:
            return
        if self.can_charge(1):
            self.mem.zero_fill(gfn)
        else:
            with pytest.raises(RuntimeError):
                self.mem.zero_fill(gfn)

    @rule(index=st.integers(0, 10**6))
    def swap_in(self, index: int) -> None:
        gfn = self.pick(S, index)
        if gfn is None:
            return
        window = self.mem.readahead_window(gfn)
        if self.can_charge(len(window)):
            self.mem.start_read(window)
            self.in_flight.append(window)
        else:
            with pytest.raises(RuntimeError):
                self.mem.start_read(window)

    @rule(index=st.integers(0, 10**6), map_it=st.booleans())
    def finish_read(self, index: int, map_it: bool) -> None:
        if self.in_flight:
            window = self.in_flight.pop(index % len(self.in_flight))
            self.mem.finish_read(window)
            if map_it:
                assert self.mem.map_after_read(int(window[0]))

    @rule(index=st.integers(0, 10**6))
    def minor_fault(self, index: int) -> None:
        gfn = self.pick(C, index)
        if gfn is not None:
            self.mem.map_swapcache(gfn)

    @rule(data=st.lists(st.integers(0, 95), max_size=8), write=st.booleans())
    def touch(self, data: list[int], write: bool) -> None:
        touched = np.array(data, dtype=np.int64)
        touched = touched[self.mem.state[touched] == M]
        self.mem.touch(touched, write)

    @rule(n=st.integers(1, 40))
    def reclaim(self, n: int) -> None:
        before = self.evictable()
        if before:
            assert self.mem.reclaim(n).evicted == min(n, before)

    @invariant()
    def within_limit(self) -> None:
        self.mem.check()
        assert self.mem.resident <= self.mem.limit_pages
        in_io = sum(len(w) for w in self.in_flight)
        assert self.mem.count(IO) == in_io


TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_module_example() -> None:
    mem = GuestMemory(n_pages=8, limit_pages=2, reclaim_batch=1)
    mem.zero_fill(0)
    mem.zero_fill(1)
    rec = mem.zero_fill(2)
    assert mem.resident == 2 and rec.writes.tolist() == [0]


def test_initial_layout_is_the_permutation_of_the_seed() -> None:
    """initialise shuffles a uint32 arange (half the transient of Generator.permutation's
    int64): the layout and the generator's state after it must be those of permutation."""
    n, res, swp = 10_000, 0.25, 0.5
    mem = GuestMemory(n, limit_pages=n)
    rng = np.random.default_rng(11)
    mem.initialise(rng, res, swp)
    ref = np.random.default_rng(11)
    order = ref.permutation(n)
    n_res, n_swp = round(res * n), round(swp * n)
    expect = np.zeros(n, dtype=np.uint8)
    expect[order[:n_res]] = PageState.MAPPED
    expect[order[n_res : n_res + n_swp]] = PageState.SWAPPED
    assert (mem.state == expect).all()
    assert rng.bit_generator.state == ref.bit_generator.state
