"""The host's memory and I/O around the vCPU threads: stage-2 state, swap reads, kworkers.

:class:`HostMemoryIo` is the simulator's :class:`~apfsim.ports.HostIo` and the host half of
:class:`~apfsim.ports.HostPorts`: the NOWAIT fault-in (zero-fill, swap-cache minor fault),
``swapin_readahead`` on the swap device, the async PF workers (``async_pf_execute`` after
the workqueue delay), the prefault of ``kvm_arch_async_page_ready`` and the write-back of
what reclaim evicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from apfsim.host.async_pf import AsyncPf
from apfsim.host.backing import IoKind, SwapDevice
from apfsim.host.memory import GuestMemory, PageState, Reclaimed
from apfsim.host.postcopy import PostcopyDestination
from apfsim.ports import (
    NOWAIT_MAPPED,
    NOWAIT_MINOR,
    NOWAIT_NEEDS_IO,
    NOWAIT_ZERO_FILL,
    Clock,
    HostProtocol,
    Probe,
    RunCounters,
)
from apfsim.runloop import waits_for_cancelled

__all__ = ["HostMemoryIo", "VcpuThread", "WorkerCpu"]


class VcpuThread(Protocol):
    """What the host's workers and hooks do to a vCPU thread."""

    def worker_completed(self, work: AsyncPf) -> None: ...

    def kick(self) -> None: ...


class WorkerCpu(Protocol):
    """The host CPUs a kworker's work runs on (``apfsim.host.sched.HostSched``)."""

    def burst(self, vcpu: int, ns: int, fn: Callable[[Any], object], arg: Any) -> None: ...


# NOTE: plain ints on the fault path, for performance (IntEnum attribute access is slow).
_MAPPED = int(PageState.MAPPED)
_UNTOUCHED = int(PageState.UNTOUCHED)
_SWAPPED = int(PageState.SWAPPED)
_SWAPCACHE = int(PageState.SWAPCACHE)
_IN_IO = int(PageState.IN_IO)
_REMOTE = int(PageState.REMOTE)
_PLACED = int(PageState.PLACED)


class HostMemoryIo:
    """Guest memory as the host sees it, its swap device and the async PF workers.

    ``host`` (the protocol's host half) and ``vcpus`` (the vCPU threads a worker wakes or
    a host hook kicks) are wired after construction: the protocol is built over this
    object's services.
    """

    def __init__(
        self,
        clock: Clock,
        memory: GuestMemory,
        device: SwapDevice,
        worker_start_ns: int,
        counters: RunCounters,
    ) -> None:
        self.engine = clock
        self.memory = memory
        self.device = device
        self.counters = counters
        self.worker_start_ns = worker_start_ns
        self.host: HostProtocol | None = None
        self.vcpus: Sequence[VcpuThread] = ()
        self.probe: Probe | None = None
        self._io_waiters: dict[int, list[tuple[Callable[[Any], object], Any]]] = {}
        self._running: dict[AsyncPf, None] = {}  # workers whose GUP is under way, in order
        self._flush_waiters: dict[int, Callable[[], object]] = {}  # cancel_work_sync
        # The kworker's CPU time: before the I/O wait (wake-up, GUP) and after it (PTE
        # install, completion), on the host CPUs when they are modelled (None: no wait).
        self.cpu: WorkerCpu | None = None
        self.worker_finish_ns = 0
        # Postcopy's destination: the pages still REMOTE are fetched from the source.
        self.postcopy: PostcopyDestination | None = None

    # -- the NOWAIT fault-in ------------------------------------------------------------------
    def resolve_nowait(self, gfn: int) -> int:
        """``hva_to_pfn`` with FOLL_NOWAIT: map what needs no I/O, report what does."""
        memory = self.memory
        state = int(memory.state[gfn])
        if state == _MAPPED:
            return NOWAIT_MAPPED
        if state == _UNTOUCHED:
            self.write_back(memory.zero_fill(gfn))
            return NOWAIT_ZERO_FILL
        if state == _SWAPCACHE:
            memory.map_swapcache(gfn)
            return NOWAIT_MINOR
        if state == _PLACED or (
            state == _REMOTE and self.postcopy is not None and self.postcopy.settle(gfn)
        ):
            self._map_placed(gfn)
            return NOWAIT_MINOR
        # REMOTE: handle_userfault with FAULT_FLAG_RETRY_NOWAIT returns VM_FAULT_RETRY at
        # once, queueing no message: nothing is requested until a thread waits for it.
        return NOWAIT_NEEDS_IO

    def write_back(self, reclaimed: Reclaimed) -> None:
        """Evicted pages go to swap under the reclaimer's plug (``shrink_lruvec``): one
        write request per run of consecutive slots."""
        writes = reclaimed.writes
        if len(writes):
            device = self.device
            for part in self.memory.requests(writes):
                device.submit(IoKind.WRITE, len(part), _ignore, None)

    def submit_swapin(self, gfn: int) -> None:
        """``do_swap_page`` -> ``swapin_readahead``: submit the read (with readahead).

        KVM's first GUP with FOLL_NOWAIT already does this before giving up on the page
        lock, so the I/O starts at the fault, whatever the protocol does next. The window's
        pages are charged first, then read under one plug: one request per run of
        consecutive slots, each page ready when its request completes.
        """
        memory = self.memory
        if int(memory.state[gfn]) == _SWAPPED:
            window = memory.readahead_window(gfn)
            self.write_back(memory.start_read(window))
            device = self.device
            for part in memory.requests(window):
                device.submit(IoKind.READ, len(part), self._read_done, part)

    def read_page(
        self, gfn: int, on_done: Callable[[Any], object], arg: Any, vcpu: int = 0
    ) -> None:
        """Wait for ``gfn`` to be in memory: join its read, starting one if needed; a
        postcopy page still on the source: sleep on the uffd (``vcpu``'s, if one each)."""
        if self.postcopy is not None and int(self.memory.state[gfn]) == _REMOTE:
            self.postcopy.wait(gfn, vcpu, on_done, arg)
            return
        self.submit_swapin(gfn)
        if int(self.memory.state[gfn]) != _IN_IO:
            self.engine.after(0, on_done, arg)
            return
        self._io_waiters.setdefault(gfn, []).append((on_done, arg))

    def _read_done(self, window: np.ndarray) -> None:
        self.memory.finish_read(window)
        for gfn in window.tolist():
            for on_done, arg in self._io_waiters.pop(gfn, ()):
                on_done(arg)

    def map_after_read(self, gfn: int) -> None:
        state = int(self.memory.state[gfn])
        if state == _SWAPCACHE:
            self.memory.map_after_read(gfn)
        elif state == _PLACED:
            self._map_placed(gfn)

    def _map_placed(self, gfn: int) -> None:
        assert self.postcopy is not None  # only postcopy places pages
        self.postcopy.map_stage2(gfn)

    def fetch_in_user(self, gfn: int, on_done: Callable[[Any], object], arg: Any) -> None:
        """A memory-fault exit to user space: the VMM's vCPU thread fetches the page itself
        (postcopy), or, for a page not on the source, faults it in with a normal GUP."""
        if self.postcopy is not None and int(self.memory.state[gfn]) in (_REMOTE, _PLACED):
            self.postcopy.fetch(gfn, on_done, arg)
            return
        self.read_page(gfn, on_done, arg)

    def prefault(self, gfn: int) -> bool:
        """``kvm_arch_async_page_ready``: map the page in stage 2 if it is still resident."""
        state = int(self.memory.state[gfn])
        if state == _SWAPCACHE:
            return self.memory.map_after_read(gfn)
        if state == _PLACED:
            self._map_placed(gfn)
            return True
        return state == _MAPPED

    # -- the async PF workers ------------------------------------------------------------------
    def start_worker(self, work: AsyncPf) -> None:
        """``schedule_work``: a kworker picks the item up after the workqueue delay."""
        self.counters.kvm_async_pf_not_present += 1
        if self.probe is not None:
            self.probe.apf_setup(work)
        self._cpu_time(work.vcpu_id, self.worker_start_ns, self._worker_run, work)

    def _cpu_time(self, vcpu: int, ns: int, fn: Callable[[Any], object], arg: Any) -> None:
        if self.cpu is None:
            self.engine.after(ns, fn, arg)
        else:
            self.cpu.burst(vcpu, ns, fn, arg)

    def _worker_run(self, work: AsyncPf) -> None:
        self._running[work] = None
        if self.cpu is None and not self.worker_finish_ns:
            self.read_page(work.gfn, self._worker_done, work, work.vcpu_id)
        else:
            self.read_page(work.gfn, self._worker_read, work, work.vcpu_id)

    def _worker_read(self, work: AsyncPf) -> None:
        """The worker wakes from the page lock: its CPU work after the I/O."""
        self._cpu_time(work.vcpu_id, self.worker_finish_ns, self._worker_done, work)

    def running_workers(self) -> Iterable[AsyncPf]:
        return self._running.keys()

    def on_worker_idle(self, vcpu: int, callback: Callable[[], object]) -> None:
        if waits_for_cancelled(self._running, vcpu):
            self._flush_waiters[vcpu] = callback
        else:
            callback()

    def _worker_done(self, work: AsyncPf) -> None:
        """End of ``async_pf_execute``: the page is in; queue the completion, wake the vCPU."""
        counters = self.counters
        counters.fault_latency.add(self.engine.now - work.start_ns)
        counters.kvm_async_pf_completed += 1
        if self.probe is not None:
            self.probe.apf_completed(work)
        del self._running[work]
        assert self.host is not None
        self.host.worker_done(work)
        self.vcpus[work.vcpu_id].worker_completed(work)
        waiter = self._flush_waiters.get(work.vcpu_id)
        if waiter is not None and not waits_for_cancelled(self._running, work.vcpu_id):
            del self._flush_waiters[work.vcpu_id]
            waiter()

    def kick(self, vcpu: int) -> None:
        """``kvm_vcpu_kick`` (a host hook's ``HostPorts.kick``)."""
        self.vcpus[vcpu].kick()


def _ignore(_: object) -> None:
    pass
