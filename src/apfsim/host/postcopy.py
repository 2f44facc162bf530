"""Postcopy live migration's destination: guest pages still on the source, fetched on fault.

After the switch-over the destination runs the guest with its RAM registered in one
userfaultfd (MISSING mode). A host thread that touches a missing page sleeps in
``handle_userfault`` on the uffd's wait queue; QEMU's fault thread
(``postcopy_ram_fault_thread``) reads one ``uffd_msg`` per ``read()`` and sends
``MIG_RP_MSG_REQ_PAGES`` on the return path; the source queues the host page on its one
migration stream behind the background scan (``ram_save_queue_pages`` ->
``get_queued_page``), or with ``postcopy-preempt`` sends it at once on a second channel
(``ram_save_host_page_urgent``). The destination's receiving thread places each whole host
page with ``UFFDIO_COPY``, whose ``wake_userfault`` walks every waiter of the uffd. Pages the
background stream delivers satisfy later faults without a request.

Sources: QEMU ``migration/ram.c``, ``migration/postcopy-ram.c``, ``migration/migration.c``,
``docs/devel/migration/postcopy.rst``; Linux ``fs/userfaultfd.c``; the kernel selftest
``tools/testing/selftests/kvm/demand_paging_test.c`` for the local source. Every cost below
is a parameter (``[postcopy]`` in a scenario, docs/model.md says where each comes from).

The link is one server shared by the channels: it sends frames of at most ``frame_bytes``
(the 64 KiB TSO/GSO segment a NIC queue interleaves flows at), round robin between the
main and the preempt channel when both have data. A page's departure is exact within its
frame; its placement is computed when the frame ends, so a waiter is woken at most one frame
late (a frame is 52 us at 10 Gb/s). The uffd's spinlock is not modelled as a shared
resource: each ``wake_userfault`` charges its walk (``wake_entry_ns`` per waiter) to the
placing thread, each enqueue and read ``uffd_lock_ns`` to its own thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from apfsim.engine import Engine
from apfsim.host.memory import GuestMemory
from apfsim.metrics.accumulators import LatencySamples

__all__ = ["PostcopyDestination", "PostcopyParams", "PostcopyStats"]

I64 = npt.NDArray[np.int64]
TARGET_PAGE = 4096  # TARGET_PAGE_SIZE: the unit of the dirty bitmap and of the wire format
PAGE_HEADER_BYTES = 8  # the be64 offset|flags word before each page (ram_save_page)
ZERO_PAGE_BYTES = PAGE_HEADER_BYTES + 1  # RAM_SAVE_FLAG_ZERO and its one byte (save_zero_page)
HOST_PAGE_PAGES = {"4k": 1, "2m": 512, "1g": 262144}
_SCAN_MAX = 4096  # host pages one scan step considers
_REFILL_PAGES = 64  # the migration thread's step: ram_save_iterate checks every 64 pages
_SOLO_FRAMES = 16  # with one channel, a step carries this many frames (nothing interleaves)

Waker = Callable[[Any], object]


@dataclass(frozen=True, slots=True)
class PostcopyParams:
    """The destination's and the link's physical parameters, in ns and bytes."""

    source: Literal["network", "local"]  # QEMU's migration stream, or a local copy (selftest)
    host_page_pages: int  # 4 KiB pages per host page: 1, 512 (2 MiB) or 262144 (1 GiB)
    link_bits_per_s: float
    one_way_ns: int  # half the round trip
    preempt: bool  # postcopy-preempt: requested pages on their own channel
    background: bool  # the source streams every page not yet sent
    buffer_bytes: int  # socket send buffer + QEMUFile buffer: how far the stream runs ahead
    receive_buffer_bytes: int  # the destination socket's: data sent but not yet placed
    frame_bytes: int
    uffds: int  # one per vCPU (demand_paging_test) or 1 (QEMU)
    uffd_lock_ns: int  # enqueue (handle_userfault) or refile (userfaultfd_ctx_read) under the lock
    wake_entry_ns: int  # wake_userfault's walk, per waiter on the uffd
    fault_read_ns: int  # the fault thread's poll() + read() of one uffd_msg
    request_send_ns: int  # migrate_send_rp_req_pages: write + flush of one message
    source_request_ns: int  # the source's return-path thread: read, queue, wake the sender
    uffdio_copy_ns: int  # UFFDIO_COPY of a 4 KiB page: ioctl, allocation, PTE install
    copy_ns_per_page: int  # memcpy of one 4 KiB target page (a huge page copies all of its)
    zeropage_ns: int  # UFFDIO_ZEROPAGE: map the zero page, no copy
    wakeup_ns: int  # a woken thread's scheduler wake-up and fault retry
    local_delay_ns: int  # the selftest's -d: the handler's delay before UFFDIO_COPY
    exit_to_user_ns: int  # KVM_RUN returning -EFAULT to the VMM and the ioctl re-entry

    @property
    def ns_per_byte(self) -> float:
        return 8e9 / self.link_bits_per_s

    @classmethod
    def of(cls, cfg: Any, vcpus: int) -> PostcopyParams:
        """From a scenario's ``[postcopy]`` table (``apfsim.scenario.PostcopyConfig``)."""
        return cls(
            source=cfg.source,
            host_page_pages=HOST_PAGE_PAGES[cfg.page_size],
            link_bits_per_s=cfg.link_gbps * 1e9,
            one_way_ns=round(cfg.rtt_us * 500),
            preempt=cfg.preempt,
            background=cfg.background,
            buffer_bytes=(cfg.socket_buffer_kib + cfg.qemufile_buffer_kib) * 1024,
            receive_buffer_bytes=cfg.receive_buffer_kib * 1024,
            frame_bytes=cfg.frame_kib * 1024,
            uffds=vcpus if cfg.uffds == "per-vcpu" else 1,
            uffd_lock_ns=cfg.uffd_lock_ns,
            wake_entry_ns=cfg.wake_entry_ns,
            fault_read_ns=cfg.fault_read_ns,
            request_send_ns=cfg.request_send_ns,
            source_request_ns=cfg.source_request_ns,
            uffdio_copy_ns=cfg.uffdio_copy_ns,
            copy_ns_per_page=round(TARGET_PAGE / cfg.copy_gbytes_per_s),
            zeropage_ns=cfg.zeropage_ns,
            wakeup_ns=cfg.wakeup_ns,
            local_delay_ns=round(cfg.local_delay_us * 1000),
            exit_to_user_ns=cfg.exit_to_user_ns,
        )

    def downtime_ns(self, device_state_bytes: int, discard_bytes: int = 0) -> int:
        """The switch-over's pause (``postcopy_start``): the discard list (the pages dirtied
        since precopy's last sync; none without precopy, whose destination discarded all of
        RAM at ADVISE) and the package (device state, LISTEN, RUN) cross the link and the
        destination loads it; no RAM moves."""
        if self.source == "local":
            return 0
        nbytes = device_state_bytes + discard_bytes
        return round(nbytes * self.ns_per_byte) + 2 * self.one_way_ns


@dataclass(slots=True)
class PostcopyStats:
    """What the destination counts; ``latency`` is request -> placed, per requested page."""

    faults_blocked: int = 0  # threads that slept in handle_userfault
    messages_read: int = 0  # uffd_msg read by the fault thread
    requests_sent: int = 0  # REQ_PAGES sent (duplicates included)
    requests_skipped: int = 0  # the source found the page already sent
    requests_received: int = 0  # a message for a page already received: nothing sent
    user_fetches: int = 0  # memory-fault exits: the vCPU thread fetched the page itself
    pages_requested: int = 0  # host pages placed because of a request
    pages_background: int = 0  # host pages placed from the background stream
    zero_pages: int = 0
    bytes_main: int = 0
    bytes_preempt: int = 0
    wake_walks: int = 0  # wake_userfault calls that walked a non-empty uffd
    entries_walked: int = 0
    last_placed_ns: int = 0


class _Channel:
    """One migration channel's byte stream: host pages queued in order, not yet sent."""

    __slots__ = ("ends", "pages", "queued", "sent", "zero")

    def __init__(self) -> None:
        self.pages: deque[I64] = deque()
        self.ends: deque[I64] = deque()  # stream offset of each page's last byte + 1
        self.zero: deque[npt.NDArray[np.bool_]] = deque()
        self.queued = 0  # bytes appended
        self.sent = 0  # bytes the link has carried

    @property
    def backlog(self) -> int:
        return self.queued - self.sent

    def append(self, pages: I64, sizes: I64, zero: npt.NDArray[np.bool_]) -> None:
        ends = np.cumsum(sizes) + self.queued
        self.pages.append(pages)
        self.ends.append(ends)
        self.zero.append(zero)
        self.queued = int(ends[-1])

    def transmit(self, nbytes: int) -> tuple[I64, I64, npt.NDArray[np.bool_]]:
        """Carry ``nbytes``; the pages whose last byte went, and each one's offset into
        this frame at which it finished."""
        start = self.sent
        self.sent = stop = start + nbytes
        done_p: list[I64] = []
        done_e: list[I64] = []
        done_z: list[npt.NDArray[np.bool_]] = []
        while self.ends:
            ends = self.ends[0]
            k = int(np.searchsorted(ends, stop, side="right"))
            if k == 0:
                break
            pages, zero = self.pages[0], self.zero[0]
            done_p.append(pages[:k])
            done_e.append(ends[:k] - start)
            done_z.append(zero[:k])
            if k == len(ends):
                self.pages.popleft()
                self.ends.popleft()
                self.zero.popleft()
            else:
                self.pages[0], self.ends[0], self.zero[0] = pages[k:], ends[k:], zero[k:]
                break
        if not done_p:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, np.empty(0, dtype=np.bool_)
        if len(done_p) == 1:
            return done_p[0], done_e[0], done_z[0]
        return np.concatenate(done_p), np.concatenate(done_e), np.concatenate(done_z)


class PostcopyDestination:
    """The destination's userfaultfd, fault thread and receiving threads, and the source's
    migration stream (a :class:`BackingStore` for the pages still ``REMOTE``).

    ``memory`` must have room for the whole guest (the destination's memcg does not reclaim
    during postcopy here). Host page ``h`` holds gfns ``[h * host_page_pages, ...)``.
    """

    def __init__(
        self,
        engine: Engine,
        memory: GuestMemory,
        params: PostcopyParams,
        zero: npt.NDArray[np.bool_],
        start: bool = True,
    ) -> None:
        """``start``: the run begins at the switch-over (else precopy runs first and
        ``switch_over`` starts postcopy)."""
        if memory.limit_pages < memory.n_pages:
            raise ValueError(
                f"postcopy needs host memory for the whole guest: limit_pages="
                f"{memory.limit_pages} < n_pages={memory.n_pages}"
            )
        hp = params.host_page_pages
        if memory.n_pages % hp:
            raise ValueError(
                f"guest of {memory.n_pages} pages is not a whole number of {hp}-page host pages"
            )
        self.engine = engine
        self.memory = memory
        self.params = p = params
        self.n_host = n_host = memory.n_pages // hp
        # The source's RAMBlock->bmap inverted (1 = sent), its zero pages (whole host page),
        # and the destination's placement time of each host page (-1: not yet departed).
        self.sent = np.zeros(n_host, dtype=np.uint8)
        self.zero = np.asarray(
            np.asarray(zero, dtype=np.bool_).reshape(n_host, hp).all(axis=1), dtype=np.bool_
        )
        self.placed_ns = np.full(n_host, -1, dtype=np.int64)
        self.stats = PostcopyStats()
        self.latency = LatencySamples()
        self._waiters: dict[int, list[tuple[Waker, Any, int]]] = {}
        self._requested_at: dict[int, int] = {}  # page_requested: first request time
        self._n_waiting = [0] * p.uffds
        self._reader_free = [0] * p.uffds  # each uffd's fault (or handler) thread
        self._rp_free = 0  # the source's return-path thread
        self._place_free = [0, 0]  # the listen thread, the preempt thread
        self._main, self._urgent = _Channel(), _Channel()
        self._requests: deque[int] = deque()  # src_page_requests
        self._cursor = 0  # the background scan's next host page
        self._scan_done = not p.background or p.source == "local"
        self._link_busy = False
        self._rr = 0  # round robin between the channels
        self._landing: deque[tuple[int, I64]] = deque()  # placed pages awaiting settle
        page_bytes = hp * (TARGET_PAGE + PAGE_HEADER_BYTES)
        self._page_bytes = page_bytes
        self._zero_bytes = hp * ZERO_PAGE_BYTES
        self._copy_ns = p.uffdio_copy_ns + hp * p.copy_ns_per_page
        self._refill_bytes = _REFILL_PAGES * (TARGET_PAGE + PAGE_HEADER_BYTES)
        # NOTE: without the preempt channel nothing interleaves on the link, so it carries
        # 16 frames a step (the same departures, in fewer events), for performance.
        self._step_bytes = p.frame_bytes * (1 if p.preempt else _SOLO_FRAMES)
        # How long a receiving thread takes to place a full receive buffer of pages.
        self._rcv_drain_ns = p.receive_buffer_bytes * self._copy_ns // page_bytes
        self._kick_pending = False
        if start and not self._scan_done:
            self._fill_main()
            self._kick_link()

    def switch_over(self, remote: I64, run_at: int) -> None:
        """After precopy, with the VM stopped: the destination holds every page but the
        discarded ``remote`` gfns (whole host pages: ``postcopy_chunk_hostpages``), which
        postcopy fetches once the destination runs, at ``run_at`` (after the downtime)."""
        hp = self.params.host_page_pages
        now = self.engine.now
        discarded = np.zeros(self.n_host, dtype=np.bool_)
        discarded[remote // hp] = True
        self.sent[~discarded] = 1
        self.placed_ns[~discarded] = now
        self.zero[discarded] = False  # dirtied: they hold data
        self.stats.last_placed_ns = run_at
        mask = np.repeat(discarded, hp) if hp > 1 else discarded
        self.memory.postcopy_switch(mask, hp)
        if not self._scan_done:
            self.engine.at(run_at, self._start_stream)

    def _start_stream(self, _: object = None) -> None:
        self._fill_main()
        self._kick_link()

    # -- the destination's fault path --------------------------------------------------------
    def map_stage2(self, gfn: int) -> None:
        """The minor fault on a placed page: stage 2 maps it (its whole block when the host
        page is huge)."""
        self.memory.map_placed(gfn, self.params.host_page_pages)

    def settle(self, gfn: int) -> bool:
        """True if ``gfn``'s host page has been placed by now (and mark it resident)."""
        h = gfn // self.params.host_page_pages
        t = int(self.placed_ns[h])
        if 0 <= t <= self.engine.now:
            self._place_host(h)
            return True
        return False

    def wait(self, gfn: int, uffd: int, on_done: Waker, arg: Any) -> None:
        """A thread's GUP sleeps in ``handle_userfault`` on a missing page."""
        p, now = self.params, self.engine.now
        h = gfn // p.host_page_pages
        if self.settle(gfn):
            self.engine.after(0, on_done, arg)
            return
        u = uffd % p.uffds
        self.stats.faults_blocked += 1
        self._waiters.setdefault(h, []).append((on_done, arg, u))
        self._n_waiting[u] += 1
        t = int(self.placed_ns[h])
        if t >= 0:  # already departed: the copy will wake it; the message is read anyway
            self.engine.at(max(now, t) + p.wakeup_ns, self._wake_one, h)
        # Enqueued under the lock; the fault thread reads messages in order, one per read().
        read_at = max(now + p.uffd_lock_ns, self._reader_free[u]) + p.fault_read_ns
        self._reader_free[u] = read_at
        self.engine.at(read_at, self._read_msg, (h, u))

    def _read_msg(self, msg: tuple[int, int]) -> None:
        h, u = msg
        p, now = self.params, self.engine.now
        self.stats.messages_read += 1
        if self.placed_ns[h] < 0:
            self._requested_at.setdefault(h, now)  # page_requested: latency starts here
        if p.source == "local":
            # demand_paging_test's handler: (delay, then) UFFDIO_COPY from its own buffer.
            if self.placed_ns[h] >= 0:
                return
            start = max(now + p.local_delay_ns, self._reader_free[u])
            done = start + self._place_cost(h, u)
            self._reader_free[u] = done
            self.sent[h] = 1
            self._placed_one(h, done)
            return
        if self.placed_ns[h] >= 0 and self.placed_ns[h] <= now:
            self.stats.requests_received += 1  # receivedmap has it: send nothing
            return
        self._send_request(h, now + p.request_send_ns)
        self._reader_free[u] = max(self._reader_free[u], now + p.request_send_ns)

    def fetch(self, gfn: int, on_done: Waker, arg: Any) -> None:
        """A memory-fault exit: the vCPU's own thread requests the page (no uffd message)
        and waits for it on the VMM's own wait (``on_done`` once placed and woken)."""
        p, now = self.params, self.engine.now
        h = gfn // p.host_page_pages
        self.stats.user_fetches += 1
        if self.settle(gfn):
            self.engine.after(p.exit_to_user_ns, on_done, arg)
            return
        t = int(self.placed_ns[h])
        if t < 0 and p.source == "local":
            # The vCPU thread copies the page itself (UFFDIO_COPY: it walks the uffd's
            # waiters, if any), then re-enters KVM_RUN.
            self._requested_at.setdefault(h, now)
            start = now + p.exit_to_user_ns + p.local_delay_ns
            done = start + self._copy_cost(h) + self._walk_cost(0)
            self.sent[h] = 1
            self._placed_one(h, done)
            self.engine.at(done, self._fetched, (h, on_done, arg))
            return
        sent_at = now + p.exit_to_user_ns + p.request_send_ns
        if t >= 0:
            # On the wire already: the VMM cannot know, so it asks anyway (the source skips
            # the request) and waits for the placement.
            self._send_request(h, sent_at)
            self.engine.at(max(sent_at, t) + p.wakeup_ns, self._fetched, (h, on_done, arg))
            return
        self._waiters.setdefault(h, []).append((on_done, arg, -1))
        self._requested_at.setdefault(h, now)
        self._send_request(h, sent_at)

    def _fetched(self, item: tuple[int, Waker, Any]) -> None:
        h, on_done, arg = item
        self._place_host(h)
        on_done(arg)

    # -- the source ----------------------------------------------------------------------------
    def _send_request(self, h: int, sent_at: int) -> None:
        """``migrate_send_rp_req_pages``: the message crosses; the return-path thread takes it."""
        p = self.params
        self.stats.requests_sent += 1
        at = max(sent_at + p.one_way_ns, self._rp_free) + p.source_request_ns
        self._rp_free = at
        self.engine.at(at, self._rp_request, h)

    def _rp_request(self, h: int) -> None:
        """``ram_save_queue_pages``: urgent send (preempt) or the migration thread's FIFO."""
        if self.sent[h]:
            self.stats.requests_skipped += 1  # get_queued_page_not_dirty: already sent
            return
        if self.params.preempt:
            self._append(self._urgent, np.array([h], dtype=np.int64))
        else:
            self._requests.append(h)
            self._fill_main()
        self._kick_link()

    def _append(self, channel: _Channel, pages: I64) -> None:
        self.sent[pages] = 1
        zero = self.zero[pages]
        sizes = np.where(zero, self._zero_bytes, self._page_bytes).astype(np.int64)
        channel.append(pages, sizes, zero)

    def _fill_main(self) -> None:
        """The migration thread keeps the socket full: a queued request as soon as there is
        room (``get_queued_page``; the scan moves to the requested page), the scan in steps
        of ``_REFILL_PAGES`` target pages (``ram_save_iterate``'s 64-page check)."""
        main, cap = self._main, self.params.buffer_bytes
        while self._requests and main.backlog < cap:
            h = self._requests.popleft()
            if self.sent[h]:
                self.stats.requests_skipped += 1
                continue
            self._append(main, np.array([h], dtype=np.int64))
            self._cursor = h + 1
        room = cap - main.backlog
        if self._scan_done or room < self._refill_bytes:
            return
        pages = self._scan(min(_SCAN_MAX, 4 * (room // self._page_bytes + 1)))
        if not len(pages):
            self._scan_done = True
            return
        # As many as fit (zero pages are 9 bytes on the wire), at least one.
        sizes = np.where(self.zero[pages], self._zero_bytes, self._page_bytes)
        k = max(1, int(np.searchsorted(np.cumsum(sizes), room, side="right")))
        pages = pages[:k]
        self._cursor = int(pages[-1]) + 1
        self._append(main, pages)

    def _scan(self, n: int) -> I64:
        """``find_dirty_block`` from the cursor: up to ``n`` host pages not yet sent, in
        RAM order, wrapping once (the cursor is not moved)."""
        sent, out = self.sent, []
        got, cursor = 0, self._cursor
        for lo, hi in ((cursor, self.n_host), (0, cursor)):
            pos = lo
            while got < n and pos < hi:
                end = min(hi, pos + max(4 * n, 4096))
                found = np.flatnonzero(sent[pos:end] == 0)[: n - got] + pos
                if len(found):
                    out.append(found)
                    got += len(found)
                pos = end
            if got >= n:
                break
        return np.concatenate(out).astype(np.int64) if out else np.empty(0, dtype=np.int64)

    # -- the link ------------------------------------------------------------------------------
    def _kick_link(self) -> None:
        """Start the next frame: round robin between the channels when both have data.

        The frame's pages, their departures and their placements are computed as it starts
        (the link is committed to it), so every waiter is woken at its page's own time."""
        if self._link_busy:
            return
        main, urgent = self._main, self._urgent
        if not main.backlog and not urgent.backlog:
            if self._landing:  # idle: settle the last frames when their copies end
                self.engine.at(max(self.engine.now, self._landing[-1][0]), self._settle_landed)
            return
        p, now = self.params, self.engine.now
        # TCP flow control: a channel whose receiving thread has a receive buffer's worth
        # of pages still to place is closed until it drains.
        open_at = [self._place_free[i] - self._rcv_drain_ns - p.one_way_ns for i in (0, 1)]
        ready = [c for i, c in ((0, main), (1, urgent)) if c.backlog and open_at[i] <= now]
        if not ready:
            if not self._kick_pending:
                waiting = [open_at[i] for i, c in ((0, main), (1, urgent)) if c.backlog]
                self._kick_pending = True
                self.engine.at(min(waiting), self._window_open)
            return
        if len(ready) == 2:
            channel = urgent if self._rr else main
            self._rr ^= 1
        else:
            channel = ready[0]
        n = min(self._step_bytes, channel.backlog)
        self._link_busy = True
        self.engine.after(max(1, round(n * p.ns_per_byte)), self._frame_done, channel)
        pages, offsets, zero = channel.transmit(n)
        if channel is main:
            self.stats.bytes_main += n
        else:
            self.stats.bytes_preempt += n
        if not len(pages):
            return
        arrive = now + np.round(offsets * p.ns_per_byte).astype(np.int64) + p.one_way_ns
        thread = 0 if channel is main else 1
        cost = np.where(zero, p.zeropage_ns, self._copy_ns).astype(np.int64)
        cost += self._walk_cost(0)  # QEMU registers all of guest RAM in one uffd
        # The receiving thread places in order: done_i = max(arrive_i, done_{i-1}) + c_i.
        csum = np.cumsum(cost)
        start = np.maximum.accumulate(np.maximum(arrive - (csum - cost), self._place_free[thread]))
        done = start + csum
        self._place_free[thread] = int(done[-1])
        self.stats.zero_pages += int(np.count_nonzero(zero))
        self._placed(pages, done, land=True)

    def _window_open(self, _: object = None) -> None:
        self._kick_pending = False
        self._kick_link()

    def _frame_done(self, channel: _Channel) -> None:
        self._link_busy = False
        self._settle_landed()
        if channel is self._main:
            self._fill_main()
        self._kick_link()

    # -- placement ------------------------------------------------------------------------------
    def _walk_cost(self, u: int) -> int:
        n = self._n_waiting[u] if u >= 0 else 0
        return n * self.params.wake_entry_ns

    def _copy_cost(self, h: int) -> int:
        return self.params.zeropage_ns if self.zero[h] else self._copy_ns

    def _place_cost(self, h: int, u: int) -> int:
        return self._copy_cost(h) + self._walk_cost(u)

    def _placed_one(self, h: int, done: int) -> None:
        """``_placed`` of one host page copied on request (the local handler, a memory-fault
        exit). NOTE: scalar, for performance (a fault each, at every page)."""
        if self.placed_ns[h] >= 0:
            raise RuntimeError(f"host pages [{h}] placed twice (UFFDIO_COPY would fail -EEXIST)")
        self.placed_ns[h] = done
        stats = self.stats
        stats.last_placed_ns = max(stats.last_placed_ns, done)
        if h in self._waiters:
            self.engine.at(max(self.engine.now, done) + self.params.wakeup_ns, self._wake_one, h)
        since = self._requested_at.pop(h, None)
        if since is None:
            stats.pages_background += 1
        else:
            stats.pages_requested += 1
            self.latency.add(max(done, since) - since)

    def _placed(self, pages: I64, done: I64, land: bool = False) -> None:
        """``UFFDIO_COPY`` of each host page ends at ``done``: ``wake_userfault`` wakes its
        waiters; the page counts as received from then on."""
        stats, now = self.stats, self.engine.now
        if np.any(self.placed_ns[pages] >= 0):
            twice = pages[self.placed_ns[pages] >= 0].tolist()
            raise RuntimeError(f"host pages {twice} placed twice (UFFDIO_COPY would fail -EEXIST)")
        self.placed_ns[pages] = done
        if land:  # a page placed for a waiter is settled when the waiter wakes
            self._landing.append((int(done.max()), pages))
        stats.last_placed_ns = max(stats.last_placed_ns, int(done.max()))
        waiters, requested = self._waiters, self._requested_at
        wake = self.params.wakeup_ns
        n_req = 0
        if len(pages) == 1 or not (waiters or requested):
            hit = pages.tolist() if waiters or requested else []
        else:
            # NOTE: only the few pages someone waits for or asked for are visited, not the
            # whole frame, for performance.
            in_frame = set(pages.tolist())
            hit = [h for h in {**waiters, **requested} if h in in_frame]
        for h in hit:
            t = int(self.placed_ns[h])
            if h in waiters:
                self.engine.at(max(now, t) + wake, self._wake_one, h)
            since = requested.pop(h, None)
            if since is not None:
                n_req += 1
                self.latency.add(max(t, since) - since)
        stats.pages_requested += n_req
        stats.pages_background += len(pages) - n_req

    def _wake_one(self, h: int) -> None:
        """The woken threads retry their fault: the page is there."""
        waiting = self._waiters.pop(h, None)
        if waiting is None:
            return
        self._place_host(h)
        uffd_waiters = sum(1 for _, _, u in waiting if u >= 0)
        if uffd_waiters:
            self.stats.wake_walks += 1
            self.stats.entries_walked += sum(self._n_waiting)
        for on_done, arg, u in waiting:
            if u >= 0:
                self._n_waiting[u] -= 1
            on_done(arg)

    def _settle_landed(self, _: object = None) -> None:
        """Pages placed by now become resident in the host page tables (``PLACED``)."""
        now, landing = self.engine.now, self._landing
        while landing and landing[0][0] <= now:
            self._place_states(landing.popleft()[1])

    def _place_host(self, h: int) -> None:
        if self.params.host_page_pages == 1:
            self.memory.place_one(h)
        else:
            self._place_states(np.array([h], dtype=np.int64))

    def _place_states(self, pages: I64) -> None:
        hp = self.params.host_page_pages
        if hp > 1:
            pages = (pages[:, None] * hp + np.arange(hp, dtype=np.int64)).ravel()
        self.memory.place(pages)

    # -- results --------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Every host page placed (the source's bitmap empty, every page received)."""
        return bool(np.all(self.placed_ns >= 0)) and int(self.placed_ns.max()) <= self.engine.now
