"""The built-in task kinds: compute, random writer, sequential memory hog."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from apfsim.host.memory import GuestMemory, PageState
from apfsim.workloads.base import (
    AccessMode,
    FoldedRun,
    MinorFold,
    Plan,
    StopKind,
    Workload,
    truncate_at_unmapped,
)

__all__ = ["ComputeTask", "FaultLoopTask", "MemoryHogTask", "RandomWriterTask"]

_FOREVER_NS = 1 << 62
_MAPPED = int(PageState.MAPPED)  # NOTE: plain int for performance (IntEnum access is slow)
_PLACED = int(PageState.PLACED)
_BATCH = 2048  # accesses looked at per plan: NOTE bounded for performance (numpy batch size)
_PREFIX = 32  # accesses a plan looks at first: NOTE a short prefix for performance


class ComputeTask(Workload):
    """CPU-bound thread (the "nop blocks" / `work_thread`): its work is the CPU time it gets."""

    def __init__(self, name: str, total_work_ns: int | None = None) -> None:
        super().__init__(name)
        self.total_work_ns = total_work_ns

    def plan(self, memory: GuestMemory) -> Plan:
        if self.total_work_ns is None:
            return Plan(_FOREVER_NS, StopKind.RESUME)
        return Plan(max(0, self.total_work_ns - self.work_ns), StopKind.DONE)

    def commit(self, memory: GuestMemory, elapsed_ns: int) -> bool:
        self.work_ns += elapsed_ns
        self.ops += elapsed_ns
        return True

    @property
    def finished(self) -> bool:
        return self.total_work_ns is not None and self.work_ns >= self.total_work_ns


class RandomWriterTask(Workload):
    """Natapov's `fault_thread`: one-byte writes at random pages of a prefaulted buffer.

    ``kernel_fraction`` of the accesses run in kernel context (e.g. a copy_from_user into
    the buffer), drawn per access from the task's own random stream.
    """

    def __init__(
        self,
        name: str,
        first_gfn: int,
        n_pages: int,
        access_ns: int,
        rng: np.random.Generator,
        kernel_fraction: float = 0.0,
        kernel_mode: AccessMode = AccessMode.KERNEL,
    ) -> None:
        super().__init__(name)
        self.first_gfn = first_gfn
        self.n_pages = n_pages
        self.access_ns = access_ns
        self.rng = rng
        self.kernel_fraction = kernel_fraction
        self.kernel_mode = kernel_mode
        self._pages = np.empty(0, dtype=np.int64)
        self._modes = np.empty(0, dtype=np.int8)
        self._user_only = True  # every access of the batch runs in user mode
        self._pos = 0
        self._planned = 0
        self._evict_mark = -1
        self._run: FoldedRun | None = None  # the running plan's in-line faults

    def _refill(self) -> None:
        self._pages = self.rng.integers(
            self.first_gfn, self.first_gfn + self.n_pages, size=_BATCH, dtype=np.int64
        )
        if self.kernel_fraction > 0.0:
            kernel = self.rng.random(_BATCH) < self.kernel_fraction
            self._modes = np.where(kernel, int(self.kernel_mode), int(AccessMode.USER)).astype(
                np.int8
            )
            self._user_only = False
        else:
            self._modes = np.zeros(_BATCH, dtype=np.int8)
            self._user_only = True
        self._pos = 0

    def current_mode(self) -> AccessMode:
        # NOTE: no numpy scalar or enum construction when all accesses are user mode,
        # for performance (asked at every exit).
        if self._user_only or self._pos >= len(self._modes):
            return AccessMode.USER
        return AccessMode(int(self._modes[self._pos]))

    def plan(self, memory: GuestMemory) -> Plan:
        if self._pos >= len(self._pages):
            self._refill()
        self._evict_mark = memory.pages_evicted
        pages = self._pages[self._pos :]
        n = len(pages)
        if self._user_only:
            mode = AccessMode.USER
        else:
            modes = self._modes[self._pos :]
            first = int(modes[0])
            mode = AccessMode(first)
            changes = np.flatnonzero(modes != first)
            if len(changes):
                n = int(changes[0])
        self._run = None
        if memory.state[pages[0]] != _MAPPED:
            miss = 0  # NOTE: scalar fast path for performance: the next access already misses.
        else:
            # NOTE: a short prefix first (a miss is usually among the first few accesses), then
            # the rest, for performance: the same index as looking at all n at once.
            miss = memory.first_not_mapped(pages[: min(n, _PREFIX)])
            if miss == _PREFIX < n:
                miss += memory.first_not_mapped(pages[_PREFIX:n])
        self._planned = miss
        if miss < n:
            fold = self.fold
            if (
                fold is not None
                and self.fold_budget_ns > 0
                and memory.state[pages[miss]] == _PLACED
            ):
                return self._plan_folded(memory, pages[:n], miss, mode, fold)
            return Plan(miss * self.access_ns, StopKind.MISS, int(pages[miss]), mode)
        return Plan(n * self.access_ns, StopKind.RESUME, mode=mode)

    def _plan_folded(
        self, memory: GuestMemory, pages: np.ndarray, skip: int, mode: AccessMode, fold: MinorFold
    ) -> Plan:
        """The plan with the minor faults on placed pages in line (``MinorFold``), the first
        ``skip`` accesses being to mapped pages: it stops at the first page that is neither
        mapped nor placed, at the batch's end, or, if it would not end within
        ``fold_budget_ns``, at its last fault starting within it (taken as its own exit, so
        nothing in line is left open when the run is observed)."""
        n, a, rt = len(pages), self.access_ns, fold.round_trip_ns
        state = memory.state[pages[skip:]]
        ends = (state != _MAPPED) & (state != _PLACED)
        stop = skip + (int(ends.argmax()) if ends.any() else n - skip)
        at = np.flatnonzero(state[: stop - skip] == _PLACED) + skip
        if len(at) > 1:
            # Only the first access to a page (a block, when huge) faults; it maps the rest.
            keys = pages[at] // fold.block
            first = np.unique(keys, return_index=True)[1]
            if len(first) < len(at):
                at = at[np.sort(first)]
        starts = at * a + np.arange(len(at), dtype=np.int64) * rt
        run_ns = stop * a + len(at) * rt
        if run_ns >= self.fold_budget_ns:
            m = int(np.searchsorted(starts, self.fold_budget_ns, side="left"))
            # The plan stops at the last fault starting within the budget (the first fault,
            # if none does: a plain plan), which the vCPU then takes as its own exit.
            last = max(m, 1) - 1
            if len(at):
                stop, run_ns = int(at[last]), int(starts[last])
                at, starts = at[:last], starts[:last]
        self._planned = stop
        fault = None
        if len(at):
            fault = self._run = FoldedRun(starts, pages[at], at, rt)
        if stop < n:
            return Plan(run_ns, StopKind.MISS, int(pages[stop]), mode, fault)
        return Plan(run_ns, StopKind.RESUME, mode=mode, fold=fault)

    def truncate_fold(self, k: int) -> None:
        run = self._run
        assert run is not None
        self._planned = int(run.positions[k])
        run.truncate(k)

    def _commit_folded(self, memory: GuestMemory, elapsed_ns: int, run: FoldedRun) -> bool:
        """Commit a plan with in-line faults: those started by ``elapsed_ns`` are done (the
        CPU never stops such a plan inside a fault's round trip), and the accesses between."""
        self._run = None
        f = run.started(elapsed_ns)
        n = min((elapsed_ns - f * run.round_trip_ns) // self.access_ns, self._planned)
        fold = self.fold
        assert fold is not None
        if f:
            memory.map_placed_many(run.gfns[:f], fold.block)
            self.folded = f
        if n > 0:
            memory.touch(self._pages[self._pos : self._pos + n], write=True)
            self._pos += n
            self.ops += n
            self.work_ns += n * self.access_ns
            self._planned -= n
        return self._planned == 0 and f == len(run.starts)

    def commit(self, memory: GuestMemory, elapsed_ns: int) -> bool:
        run = self._run
        if run is not None:
            return self._commit_folded(memory, elapsed_ns, run)
        n = min(elapsed_ns // self.access_ns, self._planned)
        if n <= 0:
            return self._planned == 0
        pages = self._pages[self._pos : self._pos + n]
        done = truncate_at_unmapped(memory, pages, len(pages), self._evict_mark)
        if done:
            memory.touch(pages[:done], write=True)
        self._pos += done
        self.ops += done
        self.work_ns += done * self.access_ns
        self._planned -= done
        return self._planned == 0


class MemoryHogTask(Workload):
    """The seed's benchmark thread: allocate all free memory, write it ``passes`` times, free.

    The first touch of each freshly allocated page is the guest kernel zeroing it
    (clear_page in the anonymous fault path: kernel mode); later writes are user mode.
    ``iterations`` allocate/write/free cycles, then the task is done (its completion time
    is the "app time" of the seed's memory-only run).

    The free at the end of each iteration returns the buffer to the guest's page allocator
    (``free_pages`` -> ``__free_one_page``, where merged blocks of the reporting order call
    ``page_reporting_notify_free``); ``on_free``, when set, is told. The next iteration
    allocates the buffer again page by page at its first touch (the guest's anonymous fault),
    so during the first pass the pages not yet reached are free in the guest.
    """

    def __init__(
        self,
        name: str,
        first_gfn: int,
        n_pages: int,
        passes: int,
        iterations: int | None,
        page_write_ns: int,
        guest_fault_ns: int,
    ) -> None:
        super().__init__(name)
        self.first_gfn = first_gfn
        self.n_pages = n_pages
        self.passes = passes
        self.iterations = iterations
        self.page_write_ns = page_write_ns
        self.guest_fault_ns = guest_fault_ns
        self.iteration = 0
        self.pass_no = 0
        self.offset = 0  # next page within the pass
        self._planned = 0
        self._evict_mark = -1
        self.on_free: Callable[[MemoryHogTask], None] | None = None

    @property
    def finished(self) -> bool:
        return self.iterations is not None and self.iteration >= self.iterations

    def free_range(self) -> tuple[int, int]:
        """Free in the guest: the whole buffer once the task is done; in the first pass the
        pages past the ones planned now and the page it is faulting on (a plan's pages are
        taken as allocated at once); nothing in later passes."""
        end = self.first_gfn + self.n_pages
        if self.finished:
            return (self.first_gfn, end)
        if self.pass_no != 0:
            return (end, end)
        return (min(end, self.first_gfn + self.offset + self._planned + 1), end)

    def _cost(self) -> int:
        if self.pass_no == 0:
            return self.page_write_ns + self.guest_fault_ns
        return self.page_write_ns

    def current_mode(self) -> AccessMode:
        return AccessMode.KERNEL if self.pass_no == 0 else AccessMode.USER

    def plan(self, memory: GuestMemory) -> Plan:
        if self.finished:
            return Plan(0, StopKind.DONE)
        self._evict_mark = memory.pages_evicted
        start = self.first_gfn + self.offset
        mode = self.current_mode()
        if memory.state[start] != _MAPPED:
            # NOTE: scalar fast path for performance: the next page already misses.
            self._planned = 0
            return Plan(0, StopKind.MISS, start, mode)
        stop = min(start + _BATCH, self.first_gfn + self.n_pages)
        # NOTE: the pass is consecutive gfns, read as a slice (no index array), for performance.
        miss = memory.first_not_mapped(slice(start, stop))
        self._planned = miss
        if miss < stop - start:
            return Plan(miss * self._cost(), StopKind.MISS, start + miss, mode)
        return Plan((stop - start) * self._cost(), StopKind.RESUME, mode=mode)

    def commit(self, memory: GuestMemory, elapsed_ns: int) -> bool:
        cost = self._cost()
        n = min(elapsed_ns // cost, self._planned)
        if n <= 0:
            return self._planned == 0
        start = self.first_gfn + self.offset
        done = truncate_at_unmapped(memory, slice(start, start + n), n, self._evict_mark)
        if done:
            memory.touch(slice(start, start + done), write=True)
        self.offset += done
        self.ops += done
        self.work_ns += done * cost
        self._planned -= done
        complete = self._planned == 0
        if self.offset >= self.n_pages:
            self.offset = 0
            self.pass_no += 1
            if self.pass_no >= self.passes:
                self.pass_no = 0
                self.iteration += 1
                if self.on_free is not None:
                    self.on_free(self)
        return complete


class FaultLoopTask(Workload):
    """Exponential compute bursts, each followed by a touch of the next page of a region.

    With the region swapped out, no readahead and a device of enough parallelism, every
    touch is one fault-in of the device's service time: the machine-repairman workload of
    the analytic checks (a closed queue of tasks that alternately compute and wait).
    """

    def __init__(
        self,
        name: str,
        first_gfn: int,
        n_pages: int,
        burst_mean_ns: float,
        rng: np.random.Generator,
    ) -> None:
        super().__init__(name)
        self.first_gfn = first_gfn
        self.n_pages = n_pages
        self.burst_mean_ns = burst_mean_ns
        self.rng = rng
        self.next_page = 0
        self.burst_left = self._draw()

    def _draw(self) -> int:
        return max(1, round(self.rng.exponential(self.burst_mean_ns)))

    def plan(self, memory: GuestMemory) -> Plan:
        if self.burst_left > 0:
            return Plan(self.burst_left, StopKind.RESUME)
        gfn = self.first_gfn + self.next_page % self.n_pages
        if memory.state[gfn] != _MAPPED:
            return Plan(0, StopKind.MISS, gfn, AccessMode.USER)
        return Plan(0, StopKind.RESUME)

    def commit(self, memory: GuestMemory, elapsed_ns: int) -> bool:
        if self.burst_left > 0:
            ran = min(elapsed_ns, self.burst_left)
            self.burst_left -= ran
            self.work_ns += ran
            return self.burst_left == 0
        gfn = self.first_gfn + self.next_page % self.n_pages
        if memory.state[gfn] == _MAPPED:
            memory.touch(np.array([gfn], dtype=np.int64), write=True)
            self.next_page += 1
            self.ops += 1
            self.burst_left = self._draw()
        return True
