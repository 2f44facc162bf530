"""Guest memory as the host sees it: residency, stage-2 mapping, swap and memcg reclaim.

Each guest page (gfn) has four one-byte flags kept in numpy arrays (4 bytes per page):

* ``state``: a :class:`PageState`;
* ``referenced``: the stage-2 access bit that ``kvm_age_gfn`` (via the MMU notifier's
  ``clear_young``) reports to reclaim; set when the guest touches a mapped page;
* ``dirty``: the page differs from its copy in swap (or has none);
* ``swap_copy``: a valid copy of the page exists in a swap slot.

The host charges every resident page (``MAPPED``, ``SWAPCACHE``, ``IN_IO``) to one memory
cgroup with a hard limit, as QEMU under memcg does in the published experiments. A charge
that would go over the limit first runs direct reclaim (``try_to_free_mem_cgroup_pages``),
which here is CLOCK (second chance) over gfn order instead of the kernel's active/inactive
LRU lists: both evict pages that were not accessed since the last scan.

Example::

    mem = GuestMemory(n_pages=8, limit_pages=2, reclaim_batch=1)
    mem.zero_fill(0)
    mem.zero_fill(1)
    rec = mem.zero_fill(2)  # over the limit: both get a second chance, then 0 goes
    assert mem.resident == 2 and rec.writes.tolist() == [0]
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "SWAP_CLUSTER_MAX",
    "GfnArray",
    "GuestMemory",
    "IntArray",
    "PageState",
    "Reclaimed",
]

SWAP_CLUSTER_MAX = 32
"""Pages reclaimed per direct-reclaim call at least (``SWAP_CLUSTER_MAX`` in mm/vmscan.c)."""

GfnArray = npt.NDArray[np.int64]
"""Guest frame numbers produced by this module."""

IntArray = npt.NDArray[np.integer[Any]]
"""Guest frame numbers accepted by this module (any integer dtype)."""

# The first CLOCK chunk covers max(_MIN_CLOCK_CHUNK, _CLOCK_CHUNK_PER_PAGE * n) pages for a
# reclaim of n; later chunks double. Tests shrink both to exercise many chunks.
# NOTE: a few large numpy windows instead of a per-page loop, for performance.
_MIN_CLOCK_CHUNK = 1024
_CLOCK_CHUNK_PER_PAGE = 8


class PageState(IntEnum):
    """Where one guest page lives, from the host's point of view."""

    UNTOUCHED = 0  # never touched by the host: first touch = fast zero-fill, no I/O
    MAPPED = 1  # resident and mapped in stage 2 (guest access does not exit)
    SWAPCACHE = 2  # resident in host memory (swap cache) but not mapped in stage 2: minor fault
    SWAPPED = 3  # only in swap: needs a read
    IN_IO = 4  # a swap read is in flight for it (GUP NOWAIT fails: the page is locked)


_MAPPED = np.uint8(PageState.MAPPED)
_SWAPCACHE = np.uint8(PageState.SWAPCACHE)
_SWAPPED = np.uint8(PageState.SWAPPED)
_IN_IO = np.uint8(PageState.IN_IO)
# NOTE: plain ints for scalar checks on hot paths: IntEnum attribute access is slow.
_UNTOUCHED_INT = int(PageState.UNTOUCHED)
_SWAPCACHE_INT = int(PageState.SWAPCACHE)


@dataclass(slots=True, frozen=True, eq=False)
class Reclaimed:
    """What one charge cost in reclaim: pages evicted, and the gfns to write to swap."""

    evicted: int
    writes: GfnArray


def _empty_gfns() -> GfnArray:
    empty = np.empty(0, dtype=np.int64)
    empty.flags.writeable = False
    return empty


# NOTE: one shared immutable result for the common no-reclaim charge, for performance.
_NOTHING = Reclaimed(0, _empty_gfns())


class GuestMemory:
    """Host-side page state of one guest, charged to a memcg with ``limit_pages``.

    ``resident`` counts pages in ``MAPPED``, ``SWAPCACHE`` or ``IN_IO`` and never exceeds
    ``limit_pages``: every method that makes a page resident charges it first, reclaiming
    ``max(needed, reclaim_batch)`` pages when the charge would exceed the limit.
    """

    __slots__ = (
        "_hand",
        "_ra_prev_offset",
        "_ra_prev_win",
        "clock_scanned",
        "dirty",
        "discards_skipped_in_io",
        "limit_pages",
        "n_pages",
        "page_cluster",
        "pages_discarded",
        "pages_evicted",
        "pages_written",
        "ra_hits",
        "reads_started",
        "reclaim_batch",
        "referenced",
        "resident",
        "state",
        "swap_copy",
        "zero_fills",
    )

    def __init__(
        self,
        n_pages: int,
        limit_pages: int,
        page_cluster: int = 3,
        reclaim_batch: int = SWAP_CLUSTER_MAX,
    ) -> None:
        if n_pages <= 0:
            raise ValueError(f"n_pages={n_pages} must be positive")
        if limit_pages <= 0:
            raise ValueError(f"limit_pages={limit_pages} must be positive")
        if page_cluster < 0:
            raise ValueError(f"page_cluster={page_cluster} must be >= 0 (0 disables readahead)")
        if reclaim_batch <= 0:
            raise ValueError(f"reclaim_batch={reclaim_batch} must be positive")
        self.n_pages = n_pages
        self.limit_pages = limit_pages
        self.page_cluster = page_cluster
        self.reclaim_batch = reclaim_batch
        self.state = np.zeros(n_pages, dtype=np.uint8)
        self.referenced = np.zeros(n_pages, dtype=np.uint8)
        self.dirty = np.zeros(n_pages, dtype=np.uint8)
        self.swap_copy = np.zeros(n_pages, dtype=np.uint8)
        self.resident = 0
        self._hand = 0
        self.pages_evicted = 0
        self.pages_written = 0
        self.zero_fills = 0
        self.reads_started = 0
        self.clock_scanned = 0
        self.ra_hits = 0  # swapin_readahead_hits
        self._ra_prev_offset = -2  # prev_offset of the last swap-in without hits
        self._ra_prev_win = 0  # last_readahead_pages
        self.pages_discarded = 0  # populated pages dropped by discard
        self.discards_skipped_in_io = 0  # pages discard left alone: a read was in flight

    # ------------------------------------------------------------------ setup and queries

    def initialise(
        self, rng: np.random.Generator, resident_fraction: float, swapped_fraction: float
    ) -> None:
        """Start from random disjoint resident (dirty, no swap copy) and swapped page sets.

        The rest is ``UNTOUCHED``. No page starts referenced: the initial state carries no
        access history, so the first reclaim evicts in gfn order from the hand.
        """
        for name, value in (
            ("resident_fraction", resident_fraction),
            ("swapped_fraction", swapped_fraction),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1]")
        n_res = round(resident_fraction * self.n_pages)
        n_swp = round(swapped_fraction * self.n_pages)
        if n_res + n_swp > self.n_pages:
            raise ValueError(
                f"resident_fraction={resident_fraction} + swapped_fraction={swapped_fraction}"
                " exceeds 1"
            )
        if n_res > self.limit_pages:
            raise ValueError(
                f"resident_fraction={resident_fraction} gives {n_res} resident pages, over"
                f" limit_pages={self.limit_pages}; use at most"
                f" {self.limit_pages / self.n_pages:.6g}"
            )
        # Generator.permutation(n) is arange(n) (int64) shuffled in place; the same shuffle
        # of a uint32 arange makes the same draws, so the same order, at half the transient.
        order = np.arange(self.n_pages, dtype=np.uint32 if self.n_pages < 1 << 32 else np.int64)
        rng.shuffle(order)
        res, swp = order[:n_res], order[n_res : n_res + n_swp]
        self.state.fill(PageState.UNTOUCHED)
        self.referenced.fill(0)
        self.dirty.fill(0)
        self.swap_copy.fill(0)
        self.state[res] = _MAPPED
        self.dirty[res] = 1
        self.state[swp] = _SWAPPED
        self.swap_copy[swp] = 1
        self.resident = n_res
        self._hand = 0

    def first_not_mapped(self, gfns: IntArray) -> int:
        """Index of the first gfn not ``MAPPED`` (the first access that exits), or ``len(gfns)``."""
        n = len(gfns)
        if n == 0:
            return 0
        not_mapped = self.state[gfns] != _MAPPED
        i = int(not_mapped.argmax())
        return i if not_mapped[i] else n

    def touch(self, gfns: IntArray, write: bool) -> None:
        """Guest accesses to mapped pages: set the stage-2 access bit (and dirty on write)."""
        self.referenced[gfns] = 1
        if write:
            self.dirty[gfns] = 1

    def count(self, state: PageState) -> int:
        """Number of pages in ``state``."""
        return int(np.count_nonzero(self.state == state))

    def bytes_per_page(self) -> int:
        """Host memory this model spends per guest page."""
        return sum(a.itemsize for a in (self.state, self.referenced, self.dirty, self.swap_copy))

    def check(self) -> None:
        """Raise RuntimeError if ``resident`` disagrees with the arrays or exceeds the limit."""
        counted = int(np.count_nonzero((self.state >= _MAPPED) & (self.state != _SWAPPED)))
        if counted != self.resident or self.resident > self.limit_pages:
            raise RuntimeError(
                f"resident={self.resident} but {counted} pages are resident"
                f" (limit_pages={self.limit_pages})"
            )

    # ------------------------------------------------------------------ fault paths

    def zero_fill(self, gfn: int) -> Reclaimed:
        """First touch of an ``UNTOUCHED`` page: the host maps a zeroed page, no I/O."""
        self._expect(gfn, _UNTOUCHED_INT, "zero_fill")
        rec = self._charge(1)
        self.state[gfn] = _MAPPED
        self.dirty[gfn] = 1
        self.referenced[gfn] = 1
        self.zero_fills += 1
        return rec

    def map_swapcache(self, gfn: int) -> None:
        """Minor fault: map a page already in the swap cache (no charge, already resident)."""
        self._expect(gfn, _SWAPCACHE_INT, "map_swapcache")
        self.state[gfn] = _MAPPED
        self.referenced[gfn] = 1
        self.ra_hits += 1  # a readahead page was used: lookup_swap_cache counts a hit

    def map_after_read(self, gfn: int) -> bool:
        """Map the faulting page once its read is done (the prefault in ``page_ready``).

        Returns False if the page left the swap cache since ``finish_read`` (reclaim took
        it); the page then stays unmapped and the guest's next access faults again.
        """
        if self.state[gfn] != _SWAPCACHE:
            return False
        self.state[gfn] = _MAPPED
        self.referenced[gfn] = 1
        return True

    def swapin_nr_pages(self, gfn: int) -> int:
        """The adaptive readahead window (``swapin_nr_pages`` / ``__swapin_nr_pages``).

        Pages = readahead hits since the last swap-in + 2; with no hits, one page unless the
        fault is next to the previous one; else rounded up to a power of two (at least 4);
        capped at ``2**page_cluster``; never below half the previous window. So random
        swap-ins read one page and sequential ones ramp up to the full cluster.
        """
        hits, self.ra_hits = self.ra_hits, 0
        pages = hits + 2
        if pages == 2:
            if gfn not in (self._ra_prev_offset + 1, self._ra_prev_offset - 1):
                pages = 1
        else:
            roundup = 4
            while roundup < pages:
                roundup <<= 1
            pages = roundup
        pages = min(pages, 1 << self.page_cluster)
        pages = max(pages, self._ra_prev_win // 2)
        if not hits:
            self._ra_prev_offset = gfn
        self._ra_prev_win = pages
        return pages

    def cluster_window(self, gfn: int, pages: int) -> GfnArray:
        """``swap_cluster_readahead`` over a window of ``pages``: ``gfn`` first, then the
        other swapped pages of the window-aligned block.

        The kernel reads swap *slots*; we take gfn order as swap-slot order, which holds
        roughly because CLOCK evicts (and so allocates slots) in gfn order. Pages already
        resident or in flight are skipped, as ``__read_swap_cache_async`` finds them in the
        swap cache.
        """
        if pages <= 1:
            return np.array([gfn], dtype=np.int64)
        base = gfn & ~(pages - 1)
        end = min(base + pages, self.n_pages)
        others = np.flatnonzero(self.state[base:end] == _SWAPPED) + base
        others = others[others != gfn]
        window = np.empty(len(others) + 1, dtype=np.int64)
        window[0] = gfn
        window[1:] = others
        return window

    def readahead_window(self, gfn: int) -> GfnArray:
        """The gfns one swap-in of ``gfn`` reads (adaptive window, aligned cluster)."""
        return self.cluster_window(gfn, self.swapin_nr_pages(gfn))

    def start_read(self, gfns: IntArray) -> Reclaimed:
        """Swap read submitted: ``SWAPPED`` -> ``IN_IO`` (locked), charging every page first."""
        if np.any(self.state[gfns] != _SWAPPED):
            bad = np.asarray(gfns)[self.state[gfns] != _SWAPPED]
            raise ValueError(f"start_read: gfns {bad.tolist()} are not SWAPPED")
        rec = self._charge(len(gfns))
        self.state[gfns] = _IN_IO
        self.reads_started += len(gfns)
        return rec

    def finish_read(self, gfns: IntArray) -> None:
        """Swap read done: ``IN_IO`` -> ``SWAPCACHE``; clean, and the swap copy stays valid."""
        self.state[gfns] = _SWAPCACHE
        self.dirty[gfns] = 0

    # ------------------------------------------------------------------ reclaim

    def reclaim(self, n: int) -> Reclaimed:
        """Evict up to ``n`` pages with CLOCK (second chance) over gfn order.

        The hand persists between calls. ``MAPPED`` and ``SWAPCACHE`` pages are candidates
        (``IN_IO`` pages are locked and skipped). A referenced candidate has its bit cleared
        and survives; an unreferenced one is evicted to ``SWAPPED``. An evicted page that is
        dirty or has no swap copy is returned in ``writes``. Approximation: the write-back
        is modelled as starting at eviction with the frame freed at once, whereas the kernel
        keeps the page in the swap cache under writeback until the write completes.

        The scan stops after two full sweeps (every candidate has then been considered with
        its bit cleared); RuntimeError if it evicted nothing, e.g. everything is ``IN_IO``.
        """
        if n <= 0:
            return _NOTHING
        state, ref = self.state, self.referenced
        n_pages = self.n_pages
        budget = 2 * n_pages
        hand, need, scanned = self._hand, n, 0
        chunk = max(_MIN_CLOCK_CHUNK, _CLOCK_CHUNK_PER_PAGE * n)
        writes: list[GfnArray] = []
        # NOTE: each chunk is a contiguous slice visited once, so every page's decision in it
        # depends only on its own bits at the start of the chunk: the same result as the
        # one-page-at-a-time CLOCK, computed with numpy, for performance.
        while need > 0 and scanned < budget:
            end = min(hand + chunk, n_pages, hand + budget - scanned)
            st = state[hand:end]
            cand = (st == _MAPPED) | (st == _SWAPCACHE)
            victims = np.flatnonzero(cand & (ref[hand:end] == 0))
            if len(victims) >= need:
                victims = victims[:need]
                stop = int(victims[-1]) + 1
            else:
                stop = end - hand
            ref[hand : hand + stop][cand[:stop]] = 0
            if len(victims):
                # Evict now: a later chunk of the second sweep may revisit these gfns.
                writes.append(self._evict(victims + hand))
                need -= len(victims)
            scanned += stop
            hand = (hand + stop) % n_pages
            chunk = min(2 * chunk, n_pages)
        self._hand = hand
        self.clock_scanned += scanned
        evicted = n - need
        if evicted == 0:
            raise RuntimeError(
                f"reclaim: nothing evictable after two full CLOCK sweeps of {n_pages} pages"
                f" (resident={self.resident}, IN_IO={self.count(PageState.IN_IO)},"
                f" limit_pages={self.limit_pages})"
            )
        return Reclaimed(evicted, writes[0] if len(writes) == 1 else np.concatenate(writes))

    def _evict(self, gfns: GfnArray) -> GfnArray:
        """Drop resident pages to ``SWAPPED``; return those that need a swap write."""
        self.state[gfns] = _SWAPPED
        must_write = (self.dirty[gfns] != 0) | (self.swap_copy[gfns] == 0)
        writes: GfnArray = gfns[must_write]
        self.swap_copy[gfns] = 1
        self.dirty[gfns] = 0
        self.resident -= len(gfns)
        self.pages_evicted += len(gfns)
        self.pages_written += len(writes)
        return writes

    def _charge(self, npages: int) -> Reclaimed:
        """Charge ``npages`` new resident pages, reclaiming first if over the limit."""
        over = self.resident + npages - self.limit_pages
        if over <= 0:
            self.resident += npages
            return _NOTHING
        rec = self.reclaim(max(over, self.reclaim_batch))
        if self.resident + npages > self.limit_pages:
            raise RuntimeError(
                f"cannot charge {npages} pages: reclaim freed {rec.evicted}, resident="
                f"{self.resident}, limit_pages={self.limit_pages} (the rest is IN_IO)"
            )
        self.resident += npages
        return rec

    def _expect(self, gfn: int, expected: int, op: str) -> None:
        actual = int(self.state[gfn])
        if actual != expected:
            raise ValueError(
                f"{op}: gfn {gfn} is {PageState(actual).name}, expected {PageState(expected).name}"
            )

    # ------------------------------------------------------------------ discard

    def discard(self, gfns: IntArray) -> int:
        """The host discards reported guest pages (QEMU ``virtio_balloon_handle_report`` ->
        ``ram_block_discard_range`` -> ``madvise(MADV_DONTNEED)``); returns how many were
        populated (resident or swapped) and are now dropped.

        The zap empties each PTE: a resident page (``MAPPED``, ``SWAPCACHE``) is freed and
        uncharged from the memcg, a swap entry is dropped with its copy; either becomes
        ``UNTOUCHED``, so the guest's next touch is a zero-fill with no I/O. A page with a
        read in flight (``IN_IO``) is left as it is: the zap drops its swap entry but
        ``free_swap_and_cache`` only trylocks the locked folio, which stays in the swap
        cache until the read completes (then ``SWAPCACHE``, later reclaimed or mapped).
        The guest does not touch reported pages meanwhile (they are isolated from its
        allocator), so no fault waits on them.
        """
        gfns = np.asarray(gfns, dtype=np.int64)
        st = self.state[gfns]
        in_io = st == _IN_IO
        populated = (st != np.uint8(PageState.UNTOUCHED)) & ~in_io
        drop = gfns[populated]
        resident = int(np.count_nonzero((st == _MAPPED) | (st == _SWAPCACHE)))
        self.state[drop] = np.uint8(PageState.UNTOUCHED)
        self.referenced[drop] = 0
        self.dirty[drop] = 0
        self.swap_copy[drop] = 0
        self.resident -= resident
        self.pages_discarded += len(drop)
        self.discards_skipped_in_io += int(np.count_nonzero(in_io))
        return len(drop)
