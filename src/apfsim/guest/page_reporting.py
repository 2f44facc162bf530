"""Free page reporting: the guest reports free 2 MiB blocks, the host discards them.

The guest side follows mm/page_reporting.c with virtio-balloon as the reporting device:

* a free that leaves a block of the reporting order in the buddy allocator calls
  ``page_reporting_notify_free`` -> ``__page_reporting_request``: IDLE -> REQUESTED, and
  the delayed work ``page_reporting_process`` runs ``PAGE_REPORTING_DELAY`` later (frees
  meanwhile add nothing); registering the device requests a first pass the same way;
* ``page_reporting_process`` sets ACTIVE and runs ``page_reporting_process_zone``: nothing
  unless the free memory passes the watermark (``CAPACITY << order`` pages, the low
  watermark taken as 0), then ``page_reporting_cycle`` over the free list: blocks already
  ``PG_reported`` are skipped, up to ``PAGE_REPORTING_CAPACITY`` others are isolated and
  passed to ``prdev->report``, at most ``ceil(nr_free / (CAPACITY * 16)) + 1`` calls per
  pass (the budget); past it the state goes back to REQUESTED. A last partial list is
  reported at the zone's end. At the end, ACTIVE -> IDLE, or REQUESTED -> another pass
  ``PAGE_REPORTING_DELAY`` later;
* ``prdev->report`` is ``virtballoon_free_page_report``: the block list is posted to the
  reporting virtqueue, kicked (an exit of the reporting vCPU), and the worker sleeps until
  the host has handled it (``wait_event``); the blocks go back to the free list marked
  ``PG_reported``. Allocating a page of a block clears its mark (``__ClearPageReported``
  as the block leaves the free list).

The host side of each call is QEMU's ``virtio_balloon_handle_report``: one
``ram_block_discard_range`` (``madvise(MADV_DONTNEED)``) per block, which here is
:meth:`GuestMemory.discard`.

Which guest memory is free comes from the tasks (:meth:`Workload.free_range`) and the memory
no task claims. The model has one zone, one migratetype and one free list, of blocks of
exactly the reporting order (no merging into larger orders), in gfn order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from apfsim.engine import Engine
from apfsim.host.memory import GfnArray, GuestMemory
from apfsim.workloads.base import Workload

__all__ = [
    "PAGE_REPORTING_ACTIVE",
    "PAGE_REPORTING_IDLE",
    "PAGE_REPORTING_REQUESTED",
    "PageReporting",
    "ReportingParams",
]

# prdev->state (mm/page_reporting.c)
PAGE_REPORTING_IDLE = 0
PAGE_REPORTING_REQUESTED = 1
PAGE_REPORTING_ACTIVE = 2


@dataclass(frozen=True, slots=True)
class ReportingParams:
    """The reporting constants (``guest.page_reporting``) and the host's costs per call."""

    order: int = 9  # page_reporting_order: pageblock_order, 2 MiB
    delay_ns: int = 2_000_000_000  # PAGE_REPORTING_DELAY = 2 * HZ
    capacity: int = 32  # PAGE_REPORTING_CAPACITY
    budget_divisor: int = 16  # a sixteenth of the free list per pass
    kick_ns: int = 2_000  # the virtqueue kick's exit and entry
    range_ns: int = 2_000  # per reported range: QEMU's loop and one madvise call
    page_ns: int = 100  # per populated page the zap drops


class PageReporting:
    """The page reporting device of one guest (``struct page_reporting_dev_info``).

    ``sources`` are the tasks whose memory may be free; ``static_free`` are gfn ranges no
    task claims (always free); ``kick`` makes the reporting vCPU exit for the virtqueue
    notify. Counters: ``passes``, ``report_calls``, ``pages_reported``, ``pages_discarded``.
    """

    __slots__ = (
        "_block",
        "_budget",
        "_kick",
        "_n_blocks",
        "_sources",
        "_static_free",
        "engine",
        "memory",
        "pages_discarded",
        "pages_reported",
        "params",
        "passes",
        "report_calls",
        "reported",
        "state",
    )

    def __init__(
        self,
        engine: Engine,
        memory: GuestMemory,
        params: ReportingParams,
        sources: Sequence[Workload],
        static_free: Sequence[tuple[int, int]],
        kick: Callable[[], object],
    ) -> None:
        self.engine = engine
        self.memory = memory
        self.params = params
        self._sources = list(sources)
        self._static_free = list(static_free)
        self._kick = kick
        self._block = 1 << params.order
        self._n_blocks = memory.n_pages >> params.order
        # PG_reported, per block of the reporting order
        self.reported = np.zeros(self._n_blocks, dtype=np.uint8)
        self.state = PAGE_REPORTING_IDLE
        self._budget = 0
        self.passes = 0
        self.report_calls = 0
        self.pages_reported = 0
        self.pages_discarded = 0

    # ------------------------------------------------------------------ the free list

    def free_blocks(self) -> npt.NDArray[np.bool_]:
        """Blocks of the reporting order wholly free in the guest now."""
        free = np.zeros(self._n_blocks, dtype=np.bool_)
        block = self._block
        ranges = [*self._static_free, *(w.free_range() for w in self._sources)]
        for lo, hi in ranges:
            first, last = -(-lo // block), hi // block
            if last > first:
                free[first:last] = True
        return free

    def free_pages(self) -> int:
        """Free guest pages now (the zone's NR_FREE_PAGES for the watermark test)."""
        ranges = [*self._static_free, *(w.free_range() for w in self._sources)]
        return sum(max(0, hi - lo) for lo, hi in ranges)

    def _gfns(self, blocks: GfnArray) -> GfnArray:
        block = self._block
        pages: GfnArray = (blocks[:, None] * block + np.arange(block, dtype=np.int64)).ravel()
        return pages

    def assume_reported(self) -> int:
        """The state of a guest up longer than a full report takes (about 30 s): every block
        free now was reported and discarded. Returns the pages the discard dropped (not
        counted as this run's)."""
        free = self.free_blocks()
        blocks = np.flatnonzero(free).astype(np.int64)
        self.reported[blocks] = 1
        return self.memory.discard(self._gfns(blocks))

    # ------------------------------------------------------------------ requests

    def register(self) -> None:
        """``page_reporting_register``: IDLE, then the initial request of every zone."""
        self.state = PAGE_REPORTING_IDLE
        self.request()

    def notify_free(self, task: Workload) -> None:
        """``page_reporting_notify_free`` after ``task`` freed its memory: its blocks were
        allocated since their last report (the marks were cleared then) and are now free,
        unreported."""
        lo, hi = task.free_range()
        block = self._block
        first, last = -(-lo // block), hi // block
        if last > first:
            self.reported[first:last] = 0
        self.request()

    def request(self) -> None:
        """``__page_reporting_request``: REQUESTED; work is scheduled only from IDLE."""
        if self.state == PAGE_REPORTING_REQUESTED:
            return
        previous, self.state = self.state, PAGE_REPORTING_REQUESTED
        if previous == PAGE_REPORTING_IDLE:
            self.engine.after(self.params.delay_ns, self._process)

    # ------------------------------------------------------------------ the pass

    def _process(self, _: object = None) -> None:
        """``page_reporting_process`` -> ``page_reporting_process_zone``."""
        self.state = PAGE_REPORTING_ACTIVE
        self.passes += 1
        p = self.params
        if self.free_pages() < p.capacity << p.order:
            self._done()
            return
        nr_free = int(np.count_nonzero(self.free_blocks()))
        self._budget = -(-nr_free // (p.capacity * p.budget_divisor))
        self._cycle()

    def _cycle(self, _: object = None) -> None:
        """One turn of ``page_reporting_cycle``: isolate up to CAPACITY unreported free
        blocks and report them, or stop (list done, or budget spent)."""
        free = self.free_blocks()
        reported = self.reported
        # A block allocated since it was reported is no longer marked.
        reported[~free] = 0
        capacity = self.params.capacity
        blocks = np.flatnonzero(free & (reported == 0))[:capacity].astype(np.int64)
        if len(blocks) == 0:
            self._done()
            return
        if self._budget < 0:
            self.state = PAGE_REPORTING_REQUESTED
            self._done()
            return
        took = self._report(blocks)
        if len(blocks) == capacity:
            self._budget -= 1
            self.engine.after(took, self._cycle)
        else:
            # The leftover list, reported at the zone's end; the pass is then over.
            self.engine.after(took, self._done)

    def _report(self, blocks: GfnArray) -> int:
        """``virtballoon_free_page_report`` and the host's ``virtio_balloon_handle_report``:
        kick, discard every block, mark them reported. Returns the call's duration (the
        worker sleeps until the host has handled the list)."""
        p = self.params
        dropped = self.memory.discard(self._gfns(blocks))
        self.reported[blocks] = 1
        self.report_calls += 1
        self.pages_reported += len(blocks) << p.order
        self.pages_discarded += dropped
        self._kick()
        return p.kick_ns + len(blocks) * p.range_ns + dropped * p.page_ns

    def _done(self, _: object = None) -> None:
        """The end of ``page_reporting_process``: ACTIVE -> IDLE, or another pass later."""
        if self.state == PAGE_REPORTING_REQUESTED:
            self.engine.after(self.params.delay_ns, self._process)
        else:
            self.state = PAGE_REPORTING_IDLE

    def counters(self) -> dict[str, int]:
        """The results' page-reporting figures (``memory`` in docs/results-schema.md)."""
        return {
            "page_reporting_passes": self.passes,
            "report_calls": self.report_calls,
            "pages_reported": self.pages_reported,
            "pages_discarded": self.pages_discarded,
        }
