"""What a guest task does, as seen by the guest CPU model.

A task is asked for a *plan* from its current position: how long it can run before it
stops, and why (a stage-2 miss on some gfn, a change of execution context, or the end of
its work). Per-access work is vectorised: a plan looks at a batch of upcoming accesses with
numpy and finds the first one whose page is not mapped in stage 2, so the event loop sees
only misses and scheduling points. When the CPU is interrupted early, ``commit`` applies
exactly the accesses that ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from mypy_extensions import mypyc_attr

from apfsim.host.memory import GuestMemory

__all__ = ["AccessMode", "FoldedRun", "MinorFold", "Plan", "StopKind", "Workload"]


class AccessMode(IntEnum):
    """The guest execution context an access runs in."""

    USER = 0  # EL0: user code
    KERNEL = 1  # EL1, preemptible (copy_from_user, clear_page in the fault path)
    KERNEL_ATOMIC = 2  # EL1 with preempt_count() > 1 (spinlock held, softirq, ...)
    KERNEL_RCU = 3  # EL1 inside an RCU read-side critical section
    KERNEL_IRQS_OFF = 4  # EL1 with interrupts masked


class StopKind(IntEnum):
    MISS = 0  # the next access faults to the host (page not mapped in stage 2)
    RESUME = 1  # nothing happens: the plan ended early (batch end, context change)
    DONE = 2  # the task has finished all its work


@dataclass(frozen=True, slots=True)
class MinorFold:
    """The cost of a stage-2 fault on a page postcopy has placed: ``kvm_handle_guest_abort``
    -> ``user_mem_abort``, whose GUP finds the host PTE (a minor fault) and maps it.

    Such a fault needs no I/O, no protocol decision and nothing from the guest, so a task's
    plan may take it in line, at its exact cost, instead of stopping at it: the run of
    accesses and faults is one segment (``guest/cpu.py:GuestCpu.unfold`` turns it back into
    separate exits when anything reaches the vCPU meanwhile). ``handled_ns``: exit, stage-2
    handling and the minor fault (the vCPU then starts its entry); ``round_trip_ns``: that
    and the entry; ``block``: the pages one fault maps (a huge host page maps whole)."""

    handled_ns: int
    round_trip_ns: int
    block: int


class FoldedRun:
    """The faults a plan takes in line (``MinorFold``), in order: each one's start, as ns
    from the segment's start, its gfn, and the index of the access it precedes."""

    __slots__ = ("gfns", "positions", "round_trip_ns", "starts")

    def __init__(
        self, starts: np.ndarray, gfns: np.ndarray, positions: np.ndarray, round_trip_ns: int
    ) -> None:
        self.starts = starts
        self.gfns = gfns
        self.positions = positions
        self.round_trip_ns = round_trip_ns

    def started(self, offset_ns: int) -> int:
        """How many of the faults started before ``offset_ns`` (one starting exactly then
        has not)."""
        return int(np.searchsorted(self.starts, offset_ns, side="left"))

    def truncate(self, k: int) -> None:
        """Keep the first ``k`` faults (the plan now stops at fault ``k``)."""
        self.starts = self.starts[:k]
        self.gfns = self.gfns[:k]
        self.positions = self.positions[:k]


@dataclass(slots=True)
class Plan:
    run_ns: int
    kind: StopKind
    gfn: int = -1
    mode: AccessMode = AccessMode.USER
    fold: FoldedRun | None = None  # faults taken in line (``MinorFold``), if any


# Subclassed by interpreted code (tracing, tests) in the compiled build.
@mypyc_attr(allow_interpreted_subclasses=True)
class Workload(ABC):
    """A task's behaviour. ``work_ns`` is CPU time spent on useful work."""

    name: str
    work_ns: int
    ops: int  # operations done (accesses or pages written), for the results

    # Minor faults on placed pages taken in line (None: every fault stops the plan); set by
    # the composition root for a task whose pages no other task touches.
    fold: MinorFold | None
    fold_budget_ns: int  # a plan takes in line only faults that start within this, from now
    folded: int  # faults the last commit took in line (the CPU charges and clears them)

    def __init__(self, name: str) -> None:
        self.name = name
        self.work_ns = 0
        self.ops = 0
        self.fold = None
        self.fold_budget_ns = 0
        self.folded = 0

    @abstractmethod
    def plan(self, memory: GuestMemory) -> Plan:
        """How far the task gets from here if it is not interrupted."""

    @abstractmethod
    def commit(self, memory: GuestMemory, elapsed_ns: int) -> bool:
        """Apply ``elapsed_ns`` of the last plan; True if it ran to the plan's stop."""

    def truncate_fold(self, k: int) -> None:
        """The running plan now stops at its ``k``-th in-line fault, which exits as its own
        (only a workload that folds faults has such plans)."""
        raise NotImplementedError(f"{type(self).__name__} takes no fault in line")

    def current_mode(self) -> AccessMode:
        """The context the task is executing in now (for injection decisions)."""
        return AccessMode.USER

    def free_range(self) -> tuple[int, int]:
        """The gfns ``[lo, hi)`` of this task's memory that the guest's page allocator holds
        free now (none if ``hi <= lo``): what free page reporting may report."""
        return (0, 0)

    @property
    def finished(self) -> bool:
        return False


def truncate_at_unmapped(
    memory: GuestMemory, pages: np.ndarray | slice, n: int, evict_mark: int
) -> int:
    """Accesses that really ran out of the ``n`` planned ones, ``pages`` (an index array or a
    slice of consecutive gfns).

    A plan is made against the stage-2 state at its start; if reclaim unmapped one of the
    planned pages meanwhile, execution stops there (the access will fault when replanned).
    Only reclaim unmaps pages, so with no eviction since the plan (``evict_mark``) all ran.
    NOTE: the counter test skips a numpy pass on most commits, for performance.
    """
    if n <= 0:
        return 0
    if memory.pages_evicted == evict_mark:
        return n
    return min(n, memory.first_not_mapped(pages))
