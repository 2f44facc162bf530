"""Precopy before postcopy's switch-over: rounds over the guest's dirty set.

QEMU's migration thread sends every page once (``ram_save_iterate`` over a bitmap that
``ram_init_bitmaps`` sets in full and dirty logging starts), then, round after round, the
pages the guest dirtied since the last ``migration_bitmap_sync`` (KVM's dirty log, fetched
and cleared). After ``precopy_rounds`` rounds the switch-over (``migrate_start_postcopy`` ->
``postcopy_start``) stops the VM, syncs once more and sends the discard bitmap
(``postcopy_each_ram_send_discard``): the pages dirtied since the last sync are discarded on
the destination and come by postcopy; the others arrived in precopy.

Modelled: each round's bytes (a zero page as its header and flag byte, ``save_zero_page``;
any other as a whole target page with its header) at the link's rate, the source's CPU
never the bottleneck; the dirty log is the guest's writes (``GuestMemory.dirty``, which no
reclaim uses here: postcopy's host holds the whole guest). A sync sees the writes of task
segments that ended by then (a segment is at most a plan's batch); the switch-over's stop
ends every running segment first. The write-protect faults of dirty logging on the source
are not charged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from apfsim.engine import Engine
from apfsim.host.memory import GuestMemory, PageState
from apfsim.host.postcopy import PAGE_HEADER_BYTES, TARGET_PAGE, ZERO_PAGE_BYTES, PostcopyParams

__all__ = ["DISCARD_RANGE_BYTES", "Precopy", "PrecopyRound"]

I64 = npt.NDArray[np.int64]
# One (start, length) pair of be64 in a MIG_CMD_POSTCOPY_RAM_DISCARD command
# (migration/savevm.c: qemu_savevm_send_postcopy_ram_discard).
DISCARD_RANGE_BYTES = 16
_UNTOUCHED = np.uint8(PageState.UNTOUCHED)


@dataclass(frozen=True, slots=True)
class PrecopyRound:
    """One pass of the migration thread over the dirty set."""

    pages: int  # 4 KiB pages sent (zero pages included)
    zero_pages: int
    bytes: int
    start_ns: int
    end_ns: int
    dirtied: int  # pages the guest dirtied during the round (the next round's set)


class Precopy:
    """The source's precopy rounds; ``on_done`` runs at the end of the last round."""

    def __init__(
        self,
        engine: Engine,
        memory: GuestMemory,
        params: PostcopyParams,
        rounds: int,
        on_done: Callable[[], object],
    ) -> None:
        if rounds < 1:
            raise ValueError(f"precopy needs at least one round, got {rounds}")
        self.engine = engine
        self.memory = memory
        self.params = params
        self.rounds = rounds
        self.on_done = on_done
        self.done: list[PrecopyRound] = []
        self.switch_ns = -1  # when the switch-over stopped the VM (-1: not yet)
        self._round = (0, 0, 0, 0)  # the round being sent: start, pages, zero pages, bytes

    def start(self) -> None:
        """``ram_init_bitmaps``: every page is in the first round's set; logging starts."""
        memory = self.memory
        memory.dirty.fill(0)  # KVM_MEM_LOG_DIRTY_PAGES: the log starts empty
        self._send(memory.n_pages, int(np.count_nonzero(memory.state == _UNTOUCHED)))

    def _send(self, pages: int, zero: int) -> None:
        now = self.engine.now
        nbytes = zero * ZERO_PAGE_BYTES + (pages - zero) * (TARGET_PAGE + PAGE_HEADER_BYTES)
        self._round = (now, pages, zero, nbytes)
        self.engine.at(now + round(nbytes * self.params.ns_per_byte), self._round_end)

    def sync(self) -> I64:
        """``migration_bitmap_sync``: the pages written since the last sync (the log is
        cleared: ``kvm_clear_dirty_log``)."""
        dirty = self.memory.dirty
        pages = np.flatnonzero(dirty).astype(np.int64)
        dirty[pages] = 0
        return pages

    def _round_end(self, _: object = None) -> None:
        if len(self.done) + 1 == self.rounds:
            self.on_done()  # the switch-over: it stops the VM, then calls final_sync
            return
        nxt = self.sync()
        self._record(len(nxt))
        self._send(len(nxt), 0)  # a dirtied page holds data

    def final_sync(self) -> I64:
        """The switch-over's sync, with the VM stopped: the pages to discard."""
        self.switch_ns = self.engine.now
        pages = self.sync()
        self._record(len(pages))
        return pages

    def _record(self, dirtied: int) -> None:
        start, pages, zero, nbytes = self._round
        self.done.append(PrecopyRound(pages, zero, nbytes, start, self.engine.now, dirtied))

    def discard_bytes(self, remote: I64) -> int:
        """The discard bitmap's size: one range per run of consecutive discarded host pages
        (``postcopy_chunk_hostpages`` rounds the dirty pages out to whole host pages)."""
        if not len(remote):
            return 0
        hosts = np.unique(remote // self.params.host_page_pages)
        runs = 1 + int(np.count_nonzero(np.diff(hosts) != 1))
        return runs * DISCARD_RANGE_BYTES

    def results(self) -> dict[str, Any]:
        """The rounds, in order, and when the switch-over stopped the VM (None: not yet)."""
        rounds = [
            {
                "pages": r.pages,
                "zero_pages": r.zero_pages,
                "mib": round(r.bytes / (1 << 20), 3),
                "start_s": round(r.start_ns / 1e9, 9),
                "duration_ms": round((r.end_ns - r.start_ns) / 1e6, 6),
                "dirtied": r.dirtied,
            }
            for r in self.done
        ]
        switch = round(self.switch_ns / 1e9, 9) if self.switch_ns >= 0 else None
        return {"rounds": rounds, "switch_over_s": switch}
