"""Generic async page fault lifecycle: a model of ``virt/kvm/async_pf.c``.

This module owns only the lifecycle of work items, exactly as the kernel's generic file
does: the per-vCPU ``queue`` (every outstanding item) and ``done`` (completed, not yet
delivered) lists, the ``queued`` counter capped by ``ASYNC_PF_PER_VCPU``, and who frees an
item. Everything about *delivery* (tokens, how the guest is told, when a completion may be
dequeued) belongs to the architecture and is reached through :class:`ArchHooks`, whose
method names are the kernel's ``kvm_arch_*`` hooks.

The functions are plain code over explicit state and touch no engine or clock, so the
simulator and the model checker drive the same transitions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

__all__ = [
    "ASYNC_PF_PER_VCPU",
    "ArchHooks",
    "AsyncPf",
    "VcpuAsyncPf",
    "WorkMemo",
    "WorkState",
    "WorkTable",
    "async_pf_execute",
    "kvm_async_pf_wakeup_all",
    "kvm_check_async_pf_completion",
    "kvm_clear_async_pf_completion_queue",
    "kvm_setup_async_pf",
]

ASYNC_PF_PER_VCPU = 64
"""Outstanding async PFs per vCPU (x86 and the arm64 RFCv2 both use 64)."""


class WorkState(Enum):
    """Where a ``struct kvm_async_pf`` is in its life."""

    RUNNING = "running"  # on `queue`, the worker's GUP is in progress
    DONE = "done"  # on `queue` and `done`, waiting for kvm_check_async_pf_completion
    DELIVERED = "delivered"  # unlinked and freed by kvm_check_async_pf_completion
    CANCELLED = "cancelled"  # dropped by kvm_clear_async_pf_completion_queue


@dataclass(eq=False)
class AsyncPf:
    """One outstanding async fault: ``struct kvm_async_pf``.

    ``token`` stands for the arch record (``struct kvm_arch_async_pf``): the core copies it
    and never interprets it.
    """

    vcpu_id: int
    gfn: int
    token: int
    wakeup_all: bool = False
    notpresent_injected: bool = False
    state: WorkState = WorkState.RUNNING
    start_ns: int = 0

    @property
    def cr2_or_gpa(self) -> int:
        """The faulting guest-physical address (stage-2 faults are on IPAs)."""
        return self.gfn << 12


@dataclass
class VcpuAsyncPf:
    """``vcpu->async_pf``: the per-vCPU lists and counter."""

    vcpu_id: int
    queue: list[AsyncPf] = field(default_factory=list)
    done: deque[AsyncPf] = field(default_factory=deque)
    queued: int = 0

    def freeze(self, works: WorkMemo) -> tuple[Any, ...]:
        """The lists as positions in ``works`` (the model checker's state key)."""
        return (tuple(map(works.ref, self.queue)), tuple(map(works.ref, self.done)), self.queued)

    def thaw(self, state: tuple[Any, ...], works: WorkTable) -> None:
        queue, done, self.queued = state
        self.queue = list(map(works.get, queue))
        self.done = deque(map(works.get, done))


class WorkMemo:
    """Freezing a state: each ``kvm_async_pf`` item once, in first-seen order, however many
    lists hold it (``queue`` and ``done``, the host's workers, an arch's flush list)."""

    __slots__ = ("_index", "items")

    def __init__(self) -> None:
        self._index: dict[int, int] = {}
        self.items: list[tuple[Any, ...]] = []

    def ref(self, work: AsyncPf) -> int:
        i = self._index.get(id(work))
        if i is None:
            i = self._index[id(work)] = len(self.items)
            self.items.append(
                (
                    work.vcpu_id,
                    work.gfn,
                    work.token,
                    work.wakeup_all,
                    work.notpresent_injected,
                    work.state,
                    work.start_ns,
                )
            )
        return i


class WorkTable:
    """Thawing a state: the items of a :class:`WorkMemo`, each made once, so lists that
    shared an item share it again."""

    __slots__ = ("_items", "_made")

    def __init__(self, items: tuple[tuple[Any, ...], ...]) -> None:
        self._items = items
        self._made: list[AsyncPf | None] = [None] * len(items)

    def get(self, i: int) -> AsyncPf:
        work = self._made[i]
        if work is None:
            work = self._made[i] = AsyncPf(*self._items[i])
        return work


class ArchHooks(Protocol):
    """The architecture's half of async PF, named as in the kernel."""

    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        """Tell the guest "not present"; return whether it was actually injected."""
        ...

    def kvm_arch_async_page_present(self, vcpu_id: int, work: AsyncPf) -> None:
        """Tell the guest "page ready" (or only end a halt), once per dequeued item."""
        ...

    def kvm_arch_async_page_ready(self, vcpu_id: int, work: AsyncPf) -> None:
        """Prefault the page into stage 2 before the guest is told it is ready."""
        ...

    def kvm_arch_can_dequeue_async_page_present(self, vcpu_id: int) -> bool:
        """Whether a completed item may be delivered now."""
        ...

    def kvm_arch_async_page_present_queued(self, vcpu_id: int) -> None:
        """The first item landed on ``done``: request delivery / kick (if the arch does)."""
        ...


def kvm_setup_async_pf(
    apf: VcpuAsyncPf, hooks: ArchHooks, gfn: int, token: int, now_ns: int
) -> AsyncPf | None:
    """Queue a fault-in for ``gfn``; the caller starts the worker I/O.

    Returns the item, or ``None`` when ``queued`` is at ``ASYNC_PF_PER_VCPU`` (the page
    fault has to be handled synchronously).
    """
    if apf.queued >= ASYNC_PF_PER_VCPU:
        return None
    work = AsyncPf(vcpu_id=apf.vcpu_id, gfn=gfn, token=token, start_ns=now_ns)
    apf.queue.append(work)
    apf.queued += 1
    # The core records what the hook reports instead of asking again at completion.
    work.notpresent_injected = hooks.kvm_arch_async_page_not_present(apf.vcpu_id, work)
    return work


def async_pf_execute(apf: VcpuAsyncPf, hooks: ArchHooks, work: AsyncPf) -> bool:
    """The worker finished its GUP: move the item to ``done``.

    Returns whether it was the first on ``done`` (the caller then wakes a blocked vCPU, as
    the kernel's worker does whether or not the fault-in succeeded).
    """
    if work.state is not WorkState.RUNNING:
        return False  # cancelled while the I/O was in flight: nothing to deliver
    work.state = WorkState.DONE
    first = not apf.done
    apf.done.append(work)
    if first:
        hooks.kvm_arch_async_page_present_queued(apf.vcpu_id)
    return first


def kvm_check_async_pf_completion(apf: VcpuAsyncPf, hooks: ArchHooks) -> list[AsyncPf]:
    """Deliver completed items while the arch allows it; returns the delivered ones."""
    delivered: list[AsyncPf] = []
    while apf.done and hooks.kvm_arch_can_dequeue_async_page_present(apf.vcpu_id):
        work = apf.done.popleft()
        if not work.wakeup_all:
            hooks.kvm_arch_async_page_ready(apf.vcpu_id, work)
        hooks.kvm_arch_async_page_present(apf.vcpu_id, work)
        if not work.wakeup_all:
            apf.queue.remove(work)
        apf.queued -= 1
        # Ownership ends here: the item is freed and must not be used again.
        work.state = WorkState.DELIVERED
        delivered.append(work)
    return delivered


def kvm_clear_async_pf_completion_queue(apf: VcpuAsyncPf) -> list[AsyncPf]:
    """Drop every outstanding and completed item (APF disabled, vCPU reset or destroy).

    The in-flight I/O still finishes on the host, but nothing is delivered to the guest.
    Returns the cancelled items.
    """
    cancelled = list(apf.queue)
    cancelled.extend(w for w in apf.done if w.wakeup_all)
    for work in cancelled:
        work.state = WorkState.CANCELLED
    apf.queue.clear()
    apf.done.clear()
    apf.queued = 0
    return cancelled


def kvm_async_pf_wakeup_all(apf: VcpuAsyncPf, hooks: ArchHooks, token: int) -> AsyncPf | None:
    """Queue a wake-all item (delivered with token ``~0``) if ``done`` is empty.

    Returns the item, or ``None`` when ``done`` already had entries (as in the kernel).
    """
    if apf.done:
        return None
    work = AsyncPf(vcpu_id=apf.vcpu_id, gfn=0, token=token, wakeup_all=True, state=WorkState.DONE)
    apf.done.append(work)
    apf.queued += 1
    hooks.kvm_arch_async_page_present_queued(apf.vcpu_id)
    return work
