"""Guest memory as the host sees it: residency, stage-2 mapping, swap slots and memcg reclaim.

Each guest page (gfn) has three one-byte flags and a swap slot kept in numpy arrays:

* ``state``: a :class:`PageState`;
* ``referenced``: the stage-2 access bit that ``kvm_age_gfn`` (via the MMU notifier's
  ``clear_young``) reports to reclaim; set when the guest touches a mapped page;
* ``dirty``: the page differs from its copy in its swap slot (meaningless without one: a page
  without a slot is always written when evicted);
* ``slot``: the page's swap slot (``int32``, -1 = none): a valid copy of the page exists
  in swap exactly when it holds a slot.

The swap area (``SwapSlots``) hands out slots as mm/swapfile.c does: ascending within a
per-CPU cluster of ``SWAPFILE_CLUSTER`` slots (``scan_swap_map_try_ssd_cluster``), a new
cluster from the free list when that one is used up, and a first-fit scan when no cluster is
free. A slot is taken when a page without one is evicted (``add_to_swap`` ->
``folio_alloc_swap``) and released when a write fault maps the page (``do_swap_page`` ->
``should_try_to_free_swap``); readahead pages never mapped keep theirs.

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
    assert mem.slot[0] == 0  # the first slot of the first cluster
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_REQUEST_PAGES",
    "PMD_PAGES",
    "SWAPFILE_CLUSTER",
    "SWAP_CLUSTER_MAX",
    "SWAP_RA_ORDER_CEILING",
    "GfnArray",
    "GuestMemory",
    "IntArray",
    "PageState",
    "Readahead",
    "Reclaimed",
]

SWAP_CLUSTER_MAX = 32
"""Pages reclaimed per direct-reclaim call at least (``SWAP_CLUSTER_MAX`` in mm/vmscan.c)."""

SWAPFILE_CLUSTER = 256
"""Slots per swap cluster (mm/swap.h): 256 without ``CONFIG_THP_SWAP``. We swap 4 KiB pages
only, so the THP size (``HPAGE_PMD_NR`` = 512) does not apply."""

SWAP_RA_ORDER_CEILING = 5
"""VMA readahead's largest window is ``1 << min(page_cluster, 5)`` pages on 64-bit
(mm/swap_state.c)."""

PMD_PAGES = 512
"""Pages under one page-table page (2 MiB with 4 KiB pages): VMA readahead never crosses it
(``swap_ra_clamp_pfn``). Guest frame numbers stand for QEMU's virtual pages, whose RAM block
is 2 MiB aligned."""

MAX_REQUEST_PAGES = 128
"""The largest merged request, 512 KiB: a queue's ``max_sectors`` stops a back merge
(block/blk-merge.c). Assumption: ``BLK_DEF_MAX_SECTORS`` was 1024 sectors (512 KiB) in older
include/linux/blkdev.h and 2560 later (version not checked); devices often cap lower. Only
reclaim batches above 128 pages reach it."""

Readahead = Literal["vma", "cluster"]
"""``swap_vma_readahead`` (neighbours in virtual order) or ``swap_cluster_readahead``
(neighbours in swap-slot order)."""

GfnArray = npt.NDArray[np.int64]
"""Guest frame numbers produced by this module."""

IntArray = npt.NDArray[np.integer[Any]]
"""Guest frame numbers accepted by this module (any integer dtype)."""

# The first CLOCK chunk covers max(_MIN_CLOCK_CHUNK, _CLOCK_CHUNK_PER_PAGE * n) pages for a
# reclaim of n; later chunks double. Tests shrink both to exercise many chunks.
# NOTE: a few large numpy windows instead of a per-page loop, for performance.
_MIN_CLOCK_CHUNK = 1024
_CLOCK_CHUNK_PER_PAGE = 8
# The first-fit scan of a swap area without free clusters looks at this many slots at once.
_SCAN_CHUNK = 4096


class PageState(IntEnum):
    """Where one guest page lives, from the host's point of view."""

    UNTOUCHED = 0  # never touched by the host: first touch = fast zero-fill, no I/O
    MAPPED = 1  # resident and mapped in stage 2 (guest access does not exit)
    SWAPCACHE = 2  # resident in host memory (swap cache) but not mapped in stage 2: minor fault
    SWAPPED = 3  # only in swap: needs a read
    IN_IO = 4  # a swap read is in flight for it (GUP NOWAIT fails: the page is locked)
    REMOTE = 5  # postcopy: still on the source (PTE none in a uffd-registered VMA)
    PLACED = 6  # postcopy: placed by UFFDIO_COPY, not yet mapped in stage 2: minor fault


_MAPPED = np.uint8(PageState.MAPPED)
_SWAPCACHE = np.uint8(PageState.SWAPCACHE)
_SWAPPED = np.uint8(PageState.SWAPPED)
_IN_IO = np.uint8(PageState.IN_IO)
_REMOTE = np.uint8(PageState.REMOTE)
_PLACED = np.uint8(PageState.PLACED)
_PLACED_INT = int(PageState.PLACED)
_UNTOUCHED = np.uint8(PageState.UNTOUCHED)
# NOTE: plain ints for scalar checks on hot paths: IntEnum attribute access is slow.
_UNTOUCHED_INT = int(PageState.UNTOUCHED)
_SWAPCACHE_INT = int(PageState.SWAPCACHE)
_SWAPPED_INT = int(PageState.SWAPPED)


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


def _ra_pages(prev: int, cur: int, hits: int, max_pages: int, prev_win: int) -> int:
    """``__swapin_nr_pages``: the adaptive readahead window (mm/swap_state.c).

    Pages = hits + 2; with no hits, one page unless ``cur`` is next to ``prev``; else
    rounded up to a power of two (at least 4); capped at ``max_pages``; never below half
    ``prev_win``.
    """
    pages = hits + 2
    if pages == 2:
        if cur != prev + 1 and cur != prev - 1:
            pages = 1
    else:
        roundup = 4
        while roundup < pages:
            roundup <<= 1
        pages = roundup
    if pages > max_pages:
        pages = max_pages
    half = prev_win // 2
    return pages if pages >= half else half


class GuestMemory:
    """Host-side page state of one guest, charged to a memcg with ``limit_pages``.

    ``resident`` counts pages in ``MAPPED``, ``SWAPCACHE``, ``IN_IO`` or ``PLACED`` and never
    exceeds ``limit_pages``: every method that makes a page resident charges it first, reclaiming
    ``max(needed, reclaim_batch)`` pages when the charge would exceed the limit.

    The swap area has ``swap_slots`` slots (default: twice the guest, rounded up to whole
    clusters) in clusters of ``swap_cluster``; ``owner[s]`` is the gfn holding slot ``s``
    (-1 = free). One reclaiming context allocates: the per-CPU cluster of the one host CPU
    that runs the vCPU thread and its kworker (``system_wq`` runs the item on the queuing
    CPU), an assumption exact for one vCPU.
    """

    __slots__ = (
        "_cluster_used",
        "_cpu_cluster",
        "_cpu_next",
        "_free_clusters",
        "_hand",
        "_on_free_list",
        "_ra_prev_offset",
        "_ra_prev_win",
        "_scan_next",
        "_vma",
        "_vma_prev",
        "_vma_win",
        "clock_scanned",
        "dirty",
        "discards_skipped_in_io",
        "limit_pages",
        "n_pages",
        "n_slots",
        "owner",
        "page_cluster",
        "pages_discarded",
        "pages_evicted",
        "pages_written",
        "ra_hits",
        "readahead",
        "reads_started",
        "reclaim_batch",
        "referenced",
        "resident",
        "slot",
        "state",
        "swap_cluster",
        "zero_fills",
    )

    def __init__(
        self,
        n_pages: int,
        limit_pages: int,
        page_cluster: int = 3,
        reclaim_batch: int = SWAP_CLUSTER_MAX,
        readahead: Readahead = "cluster",
        swap_cluster: int = SWAPFILE_CLUSTER,
        swap_slots: int | None = None,
    ) -> None:
        if n_pages <= 0:
            raise ValueError(f"n_pages={n_pages} must be positive")
        if limit_pages <= 0:
            raise ValueError(f"limit_pages={limit_pages} must be positive")
        if page_cluster < 0:
            raise ValueError(f"page_cluster={page_cluster} must be >= 0 (0 disables readahead)")
        if reclaim_batch <= 0:
            raise ValueError(f"reclaim_batch={reclaim_batch} must be positive")
        if readahead not in ("vma", "cluster"):
            raise ValueError(f"readahead={readahead!r} must be 'vma' or 'cluster'")
        if swap_cluster <= 0:
            raise ValueError(f"swap_cluster={swap_cluster} must be positive")
        if swap_slots is None:
            swap_slots = 2 * n_pages
        if swap_slots < n_pages:
            raise ValueError(f"swap_slots={swap_slots} must be >= n_pages={n_pages}")
        n_clusters = -(-swap_slots // swap_cluster)
        self.n_pages = n_pages
        self.limit_pages = limit_pages
        self.page_cluster = page_cluster
        self.reclaim_batch = reclaim_batch
        self.readahead: Readahead = readahead
        self._vma = readahead == "vma"
        self.swap_cluster = swap_cluster
        self.n_slots = n_clusters * swap_cluster
        self.state = np.zeros(n_pages, dtype=np.uint8)
        self.referenced = np.zeros(n_pages, dtype=np.uint8)
        self.dirty = np.zeros(n_pages, dtype=np.uint8)
        self.slot = np.full(n_pages, -1, dtype=np.int32)
        self.owner = np.full(self.n_slots, -1, dtype=np.int32)
        # NOTE: Python lists, not arrays: one scalar read and write per swap-in, and list
        # indexing is several times cheaper than numpy's, for performance (counts <= 256
        # are cached small ints: 8 bytes a cluster).
        self._cluster_used: list[int] = [0] * n_clusters
        self._on_free_list: list[bool] = [True] * n_clusters
        self._free_clusters: deque[int] = deque(range(n_clusters))
        self._cpu_cluster = -1  # the per-CPU cluster (percpu_cluster), -1 = none
        self._cpu_next = 0  # its next slot to try
        self._scan_next = 0  # the first-fit scan's cursor (cluster_next)
        self.resident = 0
        self._hand = 0
        self.pages_evicted = 0
        self.pages_written = 0
        self.zero_fills = 0
        self.reads_started = 0
        self.clock_scanned = 0
        self.ra_hits = 0  # swapin_readahead_hits (cluster) or the VMA's hits (vma)
        self._ra_prev_offset = -2  # prev_offset of the last swap-in without hits
        self._ra_prev_win = 0  # last_readahead_pages
        self._vma_prev = -2  # the VMA's last fault page (SWAP_RA_ADDR)
        self._vma_win = 0  # the VMA's last window (SWAP_RA_WIN)
        self.pages_discarded = 0  # populated pages dropped by discard
        self.discards_skipped_in_io = 0  # pages discard left alone: a read was in flight

    # ------------------------------------------------------------------ setup and queries

    def initialise(
        self, rng: np.random.Generator, resident_fraction: float, swapped_fraction: float
    ) -> None:
        """Start from random disjoint resident (dirty, no slot) and swapped page sets.

        The rest is ``UNTOUCHED``. No page starts referenced: the initial state carries no
        access history, so the first reclaim evicts in gfn order from the hand. The swapped
        pages take slots in gfn order from the start of the swap area, as if one CLOCK
        sweep had evicted them: the order this model's own reclaim allocates in.
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
        self._reset_swap()
        self.state[res] = _MAPPED
        self.dirty[res] = 1
        self.state[swp] = _SWAPPED
        self._fill_swap_in_order(np.sort(swp))
        self.resident = n_res
        self._hand = 0

    def initialise_remote(self) -> None:
        """Postcopy's switch-over with no precopy: every page is on the source
        (``REMOTE``), none resident. QEMU discards the destination's RAM at ADVISE and
        registers it MISSING at LISTEN (``postcopy_ram_incoming_setup``); with precopy,
        ``postcopy_switch`` instead."""
        self.state.fill(_REMOTE)
        self.referenced.fill(0)
        self.dirty.fill(0)
        self._reset_swap()
        self.resident = 0
        self._hand = 0

    def postcopy_switch(self, remote: npt.NDArray[np.bool_], block: int = 1) -> None:
        """Postcopy's switch-over after precopy, on the destination: the ``remote`` pages were
        discarded (``REMOTE``); every other page precopy sent is resident but not yet in
        stage 2 (``PLACED``), except a never-touched one, which stays a zero page to fill;
        with huge host pages of ``block`` pages, a host page any of whose pages was touched
        arrived whole. The VM is stopped: no task has a plan made against the source's
        mappings."""
        st = self.state
        other = (st != _MAPPED) & (st != _UNTOUCHED)
        if other.any():
            self._expect(int(np.argmax(other)), int(PageState.MAPPED), "postcopy_switch")
        touched = (st != _UNTOUCHED).reshape(-1, block).any(axis=1)
        st[np.repeat(touched, block)] = _PLACED
        st[remote] = _REMOTE
        placed = st == _PLACED
        self.resident = int(np.count_nonzero(placed))
        self.referenced.fill(0)
        self.dirty[:] = placed

    def place(self, gfns: IntArray) -> int:
        """``UFFDIO_COPY`` placed these pages: ``REMOTE`` -> ``PLACED`` (resident, dirty:
        anonymous memory with no swap copy). Pages already placed or mapped are left alone;
        returns how many changed."""
        remote = gfns[self.state[gfns] == _REMOTE]
        n = len(remote)
        if n:
            self._charge(n)  # the postcopy destination has room for the whole guest
            self.state[remote] = _PLACED
            self.dirty[remote] = 1
        return n

    def place_one(self, gfn: int) -> None:
        """``place`` of one gfn. NOTE: scalar, for performance (one per requested page)."""
        if self.state[gfn] == _REMOTE:
            self._charge(1)
            self.state[gfn] = _PLACED
            self.dirty[gfn] = 1

    def map_placed(self, gfn: int, block: int = 1) -> None:
        """Minor fault on a placed page: ``hva_to_pfn`` finds the PTE, stage 2 maps it; with
        ``block`` > 1 (a hugetlbfs host page) ``user_mem_abort`` maps the whole aligned
        block of ``block`` pages, every one of them placed with it."""
        self._expect(gfn, _PLACED_INT, "map_placed")
        if block == 1:
            self.state[gfn] = _MAPPED
            self.referenced[gfn] = 1
            return
        lo = gfn - gfn % block
        st = self.state[lo : lo + block]
        st[st == _PLACED] = _MAPPED
        self.referenced[lo : lo + block] = 1

    def map_placed_many(self, gfns: IntArray, block: int = 1) -> None:
        """``map_placed`` for each of ``gfns`` in order (the minor faults a task's plan took
        inside one segment, ``workloads.base.MinorFold``): every one must still be placed."""
        if block > 1:
            gfns = ((gfns - gfns % block)[:, None] + np.arange(block, dtype=np.int64)).ravel()
        st = self.state[gfns]
        placed = st == _PLACED
        if block == 1 and not placed.all():
            bad = int(gfns[int(np.argmin(placed))])
            self._expect(bad, _PLACED_INT, "map_placed_many")
        self.state[gfns[placed]] = _MAPPED
        self.referenced[gfns] = 1

    def first_not_mapped(self, gfns: IntArray | slice) -> int:
        """Index of the first gfn not ``MAPPED`` (the first access that exits), or the
        number of gfns. A ``slice`` is a run of consecutive gfns, read without an index array."""
        not_mapped = self.state[gfns] != _MAPPED
        n = len(not_mapped)
        if n == 0:
            return 0
        i = int(not_mapped.argmax())
        return i if not_mapped[i] else n

    def touch(self, gfns: IntArray | slice, write: bool) -> None:
        """Guest accesses to mapped pages: set the stage-2 access bit (and dirty on write)."""
        self.referenced[gfns] = 1
        if write:
            self.dirty[gfns] = 1

    def count(self, state: PageState) -> int:
        """Number of pages in ``state``."""
        return int(np.count_nonzero(self.state == state))

    def bytes_per_page(self) -> int:
        """Host memory this model spends per guest page (the slot owners of the swap area
        included, rounded up)."""
        flags = sum(a.itemsize for a in (self.state, self.referenced, self.dirty, self.slot))
        return flags + -(-self.owner.nbytes // self.n_pages)

    def check(self) -> None:
        """Raise RuntimeError if ``resident`` or the slot maps disagree with the page states."""
        st = self.state
        counted = int(np.count_nonzero((st >= _MAPPED) & (st != _SWAPPED) & (st != _REMOTE)))
        if counted != self.resident or self.resident > self.limit_pages:
            raise RuntimeError(
                f"resident={self.resident} but {counted} pages are resident"
                f" (limit_pages={self.limit_pages})"
            )
        held = np.flatnonzero(self.slot >= 0)
        if not np.array_equal(self.owner[self.slot[held]], held) or np.count_nonzero(
            self.owner >= 0
        ) != len(held):
            raise RuntimeError("slot and owner maps disagree")
        if np.any(self.slot[self.state == _SWAPPED] < 0):
            raise RuntimeError("a SWAPPED page holds no swap slot")
        used = np.bincount(self.slot[held] // self.swap_cluster, minlength=len(self._cluster_used))
        if not np.array_equal(used, np.array(self._cluster_used)):
            raise RuntimeError("per-cluster slot counts disagree with the owner map")
        listed = np.array(self._free_clusters, dtype=np.int64)
        if (
            len(set(self._free_clusters)) != len(listed)
            or not np.array_equal(np.flatnonzero(self._on_free_list), np.sort(listed))
            or np.any(used[listed] != 0)
            or self._cpu_cluster in self._free_clusters
        ):
            raise RuntimeError("the free cluster list holds a used or per-CPU cluster")
        cl = self._cpu_cluster
        if cl >= 0 and np.any(self.owner[self._cpu_next : (cl + 1) * self.swap_cluster] >= 0):
            raise RuntimeError("a slot above the per-CPU cluster's cursor is in use")

    # ------------------------------------------------------------------ swap slots

    def _reset_swap(self) -> None:
        self.slot.fill(-1)
        self.owner.fill(-1)
        n_clusters = len(self._cluster_used)
        self._cluster_used = [0] * n_clusters
        self._on_free_list = [True] * n_clusters
        self._free_clusters = deque(range(n_clusters))
        self._cpu_cluster = -1
        self._cpu_next = 0
        self._scan_next = 0

    def _fill_swap_in_order(self, gfns: IntArray) -> None:
        """On an empty swap area, what ``alloc_swap(gfns)`` does, without its int64
        transients (a 64 GiB guest places 8 M swapped pages at once)."""
        k, size = len(gfns), self.swap_cluster
        self.slot[gfns] = np.arange(k, dtype=np.int32)
        self.owner[:k] = gfns
        full, rest = divmod(k, size)
        taken = full + (1 if rest else 0)
        self._cluster_used[:full] = [size] * full
        for cl in range(taken):
            self._on_free_list[cl] = False
            self._free_clusters.popleft()
        if rest:
            self._cluster_used[full] = rest
            self._cpu_cluster, self._cpu_next = full, k

    def alloc_swap(self, gfns: GfnArray) -> GfnArray:
        """``folio_alloc_swap`` for each of ``gfns`` (no slot yet), in order; returns the slots.

        Slots come ascending from the per-CPU cluster; when it is used up, the next cluster
        is taken from the head of the free list (``scan_swap_map_try_ssd_cluster``); with no
        free cluster left, a first-fit scan from a moving cursor (``scan_swap_map_slots``).
        """
        k = len(gfns)
        slots = np.empty(k, dtype=np.int64)
        got = 0
        size, counts = self.swap_cluster, self._cluster_used
        # A cluster leaves the free list with every slot free, and while it is the per-CPU
        # one only this path allocates in it (the scan runs without one): the slots above
        # the cursor are free, so no search is needed.
        while got < k:
            cl = self._cpu_cluster
            if cl < 0:
                if not self._free_clusters:
                    got += self._scan_alloc(slots[got:])
                    break
                cl = self._free_clusters.popleft()
                self._on_free_list[cl] = False
                self._cpu_cluster = cl
                self._cpu_next = cl * size
            nxt = self._cpu_next
            n = min((cl + 1) * size - nxt, k - got)
            slots[got : got + n] = np.arange(nxt, nxt + n)
            got += n
            counts[cl] += n
            self._cpu_next = nxt + n
            if nxt + n == (cl + 1) * size:
                self._drop_cpu_cluster()
        self.owner[slots] = gfns
        self.slot[gfns] = slots
        return slots

    def _scan_alloc(self, out: GfnArray) -> int:
        """First-fit scan for ``len(out)`` free slots from ``_scan_next``, wrapping."""
        owner, n_slots = self.owner, self.n_slots
        got, pos, seen = 0, self._scan_next, 0
        while got < len(out) and seen < n_slots:
            end = min(pos + _SCAN_CHUNK, n_slots)
            free = np.flatnonzero(owner[pos:end] < 0)[: len(out) - got] + pos
            out[got : got + len(free)] = free
            got += len(free)
            if len(free) and got == len(out):
                pos = int(free[-1]) + 1
            else:
                seen += end - pos
                pos = end
            if pos >= n_slots:
                pos = 0
        if got < len(out):
            raise RuntimeError(f"swap area of {n_slots} slots is full")
        self._scan_next = pos
        used, size = self._cluster_used, self.swap_cluster
        for s in out.tolist():
            used[s // size] += 1
        return got

    def _drop_cpu_cluster(self) -> None:
        cl = self._cpu_cluster
        self._cpu_cluster = -1
        if self._cluster_used[cl] == 0 and not self._on_free_list[cl]:
            self._on_free_list[cl] = True
            self._free_clusters.append(cl)

    def free_swap(self, gfn: int) -> None:
        """Release ``gfn``'s slot (``folio_free_swap``): the page alone holds its contents now
        and is written to a new slot at its next eviction.

        A cluster whose last slot is freed goes to the tail of the free list, unless it is
        the per-CPU cluster still being filled.
        """
        slot = self.slot
        s = int(slot[gfn])
        if s < 0:
            return
        slot[gfn] = -1
        self.owner[s] = -1
        cl = s // self.swap_cluster
        counts = self._cluster_used
        used = counts[cl] - 1
        counts[cl] = used
        if not used and cl != self._cpu_cluster and not self._on_free_list[cl]:
            self._on_free_list[cl] = True
            self._free_clusters.append(cl)

    def requests(self, gfns: GfnArray) -> list[GfnArray]:
        """The block requests one plug makes of I/O to ``gfns``' slots.

        ``blk_attempt_plug_merge`` back- or front-merges a page's bio into a plugged request
        only when its sectors are contiguous, so each maximal run of consecutive slots (at
        most ``MAX_REQUEST_PAGES``) is one request, in slot order.
        """
        n = len(gfns)
        if n == 1:
            return [gfns]
        slots = self.slot[gfns]
        # NOTE: distinct slots spanning exactly n are one run; checked on a list first, for
        # performance (most windows are one run, and numpy reductions of a few items cost more).
        listed = slots.tolist()
        if n <= MAX_REQUEST_PAGES and max(listed) - min(listed) == n - 1:
            return [gfns]
        order = np.argsort(slots, kind="stable")
        ordered, sorted_slots = gfns[order], slots[order]
        cuts = np.flatnonzero(np.diff(sorted_slots) != 1) + 1
        parts = np.split(ordered, cuts) if len(cuts) else [ordered]
        if all(len(p) <= MAX_REQUEST_PAGES for p in parts):
            return parts
        return [
            p[i : i + MAX_REQUEST_PAGES] for p in parts for i in range(0, len(p), MAX_REQUEST_PAGES)
        ]

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
        """Minor fault: map a page already in the swap cache (no charge, already resident).

        ``lookup_swap_cache`` counts a readahead hit; the write fault frees the slot.
        """
        state = self.state
        if state[gfn] != _SWAPCACHE:
            self._expect(gfn, _SWAPCACHE_INT, "map_swapcache")
        state[gfn] = _MAPPED
        self.referenced[gfn] = 1
        self.ra_hits += 1
        self.free_swap(gfn)

    def map_after_read(self, gfn: int) -> bool:
        """Map the faulting page once its read is done (the prefault in ``page_ready``).

        The fault is a write (the async PF worker's GUP has FOLL_WRITE; the workloads
        write), so ``do_swap_page`` frees the slot (``should_try_to_free_swap``). Returns
        False if the page left the swap cache since ``finish_read`` (reclaim took it); the
        page then stays unmapped and the guest's next access faults again.
        """
        if self.state[gfn] != _SWAPCACHE:
            return False
        self.state[gfn] = _MAPPED
        self.referenced[gfn] = 1
        self.free_swap(gfn)
        return True

    def swapin_nr_pages(self, offset: int) -> int:
        """Cluster readahead's window for a fault on swap ``offset`` (``swapin_nr_pages``).

        Global state: the hits since the last swap-in, ``prev_offset`` (updated only by a
        swap-in without hits) and the last window. Random swap-ins read one page,
        sequential ones ramp up to ``2**page_cluster``.
        """
        max_pages = 1 << self.page_cluster
        if max_pages <= 1:
            return 1
        hits, self.ra_hits = self.ra_hits, 0
        pages = _ra_pages(self._ra_prev_offset, offset, hits, max_pages, self._ra_prev_win)
        if not hits:
            self._ra_prev_offset = offset
        self._ra_prev_win = pages
        return pages

    def vma_nr_pages(self, gfn: int) -> int:
        """VMA readahead's window for a fault on ``gfn`` (``swap_ra_info``).

        Guest memory is one VMA: its state is the last fault page and window and the hits
        since; the window is at most ``2**min(page_cluster, SWAP_RA_ORDER_CEILING)``.
        """
        max_win = 1 << min(self.page_cluster, SWAP_RA_ORDER_CEILING)
        if max_win == 1:
            return 1
        hits, self.ra_hits = self.ra_hits, 0
        win = _ra_pages(self._vma_prev, gfn, hits, max_win, self._vma_win)
        self._vma_prev, self._vma_win = gfn, win
        return win

    def cluster_window(self, gfn: int, pages: int) -> GfnArray:
        """``swap_cluster_readahead`` over ``pages`` slots: ``gfn`` first, then the other
        swapped pages whose slots lie in the window-aligned block around ``gfn``'s slot.

        Free slots and pages already resident or in flight are skipped, as
        ``__read_swap_cache_async`` finds them free or in the swap cache.
        """
        if pages <= 1:
            return np.array([gfn], dtype=np.int64)
        base = int(self.slot[gfn]) & ~(pages - 1)
        state = self.state
        # NOTE: a list walk over at most 64 slots, for performance (cheaper than the
        # handful of numpy calls a vectorised filter of so few items needs).
        owners = self.owner[base : min(base + pages, self.n_slots)]
        window = [gfn]
        # A free slot's -1 indexes the last page: its state is read, then ignored.
        for owner, st in zip(owners.tolist(), state[owners].tolist(), strict=True):
            if owner >= 0 and owner != gfn and st == _SWAPPED_INT:
                window.append(owner)
        return np.array(window, dtype=np.int64)

    def vma_window(self, gfn: int, win: int, prev: int) -> GfnArray:
        """``swap_vma_readahead`` over ``win`` pages: ``gfn`` first, then the other swapped
        pages around it in gfn (virtual) order, each read from its own slot.

        Forward after a fault on ``gfn - 1``, backward after one on ``gfn + 1``, else
        centred; clamped to guest memory and to ``gfn``'s 2 MiB PMD region.
        """
        if win <= 1:
            return np.array([gfn], dtype=np.int64)
        if gfn == prev + 1:
            lo, hi = gfn, gfn + win
        elif gfn == prev - 1:
            lo, hi = gfn - win + 1, gfn + 1
        else:
            left = (win - 1) // 2
            lo, hi = gfn - left, gfn + win - left
        pmd = gfn & ~(PMD_PAGES - 1)
        lo = max(lo, pmd, 0)
        hi = min(hi, pmd + PMD_PAGES, self.n_pages)
        # NOTE: a list walk over at most 32 pages, for performance (as in cluster_window).
        window = [gfn]
        for i, st in enumerate(self.state[lo:hi].tolist()):
            if st == _SWAPPED_INT and lo + i != gfn:
                window.append(lo + i)
        return np.array(window, dtype=np.int64)

    def readahead_window(self, gfn: int) -> GfnArray:
        """The gfns one swap-in of ``gfn`` reads (``swapin_readahead``): VMA or cluster."""
        if self._vma:
            prev = self._vma_prev
            return self.vma_window(gfn, self.vma_nr_pages(gfn), prev)
        return self.cluster_window(gfn, self.swapin_nr_pages(int(self.slot[gfn])))

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
        """Swap read done: ``IN_IO`` -> ``SWAPCACHE``; clean, and the page keeps its slot."""
        self.state[gfns] = _SWAPCACHE
        self.dirty[gfns] = 0

    # ------------------------------------------------------------------ reclaim

    def reclaim(self, n: int) -> Reclaimed:
        """Evict up to ``n`` pages with CLOCK (second chance) over gfn order.

        The hand persists between calls. ``MAPPED`` and ``SWAPCACHE`` pages are candidates
        (``IN_IO`` pages are locked and skipped). A referenced candidate has its bit cleared
        and survives; an unreferenced one is evicted to ``SWAPPED``. An evicted page that is
        dirty or has no swap slot is returned in ``writes``. Approximation: the write-back
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
        """Drop resident pages to ``SWAPPED``; return those that need a swap write.

        A page without a slot gets one now (``add_to_swap``), in eviction order; a dirty page
        with a slot is written to that slot; a clean one with a slot is dropped unwritten.
        """
        self.state[gfns] = _SWAPPED
        no_slot = self.slot[gfns] < 0
        must_write = (self.dirty[gfns] != 0) | no_slot
        writes: GfnArray = gfns[must_write]
        if no_slot.any():
            self.alloc_swap(gfns[no_slot])
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
        uncharged from the memcg, a swap entry is dropped and its slot freed; either becomes
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
        for gfn in drop[self.slot[drop] >= 0].tolist():
            self.free_swap(gfn)  # the zap's free_swap_and_cache: the slot is free again
        self.resident -= resident
        self.pages_discarded += len(drop)
        self.discards_skipped_in_io += int(np.count_nonzero(in_io))
        return len(drop)
