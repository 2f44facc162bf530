"""No async PF; a stage-2 fault on a page still on the postcopy source exits to user space.

The postcopy destination of the KVM series that take vCPU faults off the userfaultfd: Anish
Moorthy's annotated memory faults (``KVM_CAP_MEMORY_FAULT_INFO`` with
``KVM_CAP_EXIT_ON_MISSING``, v7 <20240215235405.368539-1-amoorthy@google.com>) and its
successor, James Houghton's KVM Userfault (``KVM_MEM_USERFAULT`` and a userfault bitmap,
v1 <20241204191349.1730936-1-jthoughton@google.com>, up to v3 in June 2025). Neither was
merged in the threads read (docs/protocols.md).

The stage-2 fault checks the gfn's bit in the memslot's userfault bitmap before it would
fault anything in: ``kvm_do_userfault`` (v3) reads the bitmap word, and a set bit makes
``kvm_prepare_memory_fault_exit`` fill ``kvm_run`` with ``KVM_EXIT_MEMORY_FAULT`` (flag
``KVM_MEMORY_EXIT_FLAG_USERFAULT``) and KVM_RUN return -EFAULT; Moorthy's v7 makes the same
exit from ``__gfn_to_pfn_memslot`` when the memslot has ``KVM_MEM_EXIT_ON_MISSING`` and the
user mapping is absent. The VMM's vCPU thread itself then requests the page from the source,
installs it (``UFFDIO_COPY``) and re-enters KVM_RUN: no uffd message, no fault thread, no
sleep in ``handle_userfault``. The exit comes at fault time, before KVM would queue an async
worker, so the design runs without async PF ("not compatible with async page faults", the
KVM Userfault cover letter) and without the guest's PV driver, like ``sync``. A fault that
needs I/O on a page the bitmap does not mark (swap) is an ordinary blocking GUP in the vCPU
thread, as in ``sync``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from apfsim.host.async_pf import WorkMemo, WorkTable
from apfsim.ports import FaultDecision, FaultResult, GuestView, HostPorts, SyncCause
from apfsim.protocols.common import ProtocolOptions
from apfsim.protocols.sync import SyncHost

__all__ = ["MemoryFaultExitHost"]

_SYNC = FaultResult(FaultDecision.SYNC, cause=SyncCause.NO_APF)
_USER_EXIT = FaultResult(FaultDecision.USER_EXIT)


class MemoryFaultExitHost(SyncHost):
    """A host without async PF whose memslots carry a userfault bitmap (postcopy only).

    ``userfault`` is the bitmap (None: the run has no postcopy, no memslot has the flag,
    and every fault is ``sync``'s). ``user_exits`` counts the memory-fault exits; it is
    reported only when the bitmap exists, so a run without postcopy has exactly ``sync``'s
    counters.
    """

    name: ClassVar[str] = "memory-fault-exit"

    def __init__(self, userfault: Callable[[int], bool] | None) -> None:
        self.userfault = userfault
        self.user_exits = 0

    @classmethod
    def create(
        cls, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> MemoryFaultExitHost:
        return cls(ports.userfault)

    def try_async_pf(self, vcpu: int, gfn: int, view: GuestView, now_ns: int) -> FaultResult:
        """The stage-2 fault's ``kvm_do_userfault`` (KVM Userfault v3), or
        ``__gfn_to_pfn_memslot``'s exit-on-missing check (Moorthy v7): a marked gfn makes
        ``kvm_prepare_memory_fault_exit`` and KVM_RUN returns -EFAULT; any other fault
        that needs I/O is a blocking GUP in the vCPU thread."""
        userfault = self.userfault
        if userfault is not None and userfault(gfn):
            self.user_exits += 1
            return _USER_EXIT
        return _SYNC

    def counters(self) -> dict[str, int]:
        if self.userfault is None:
            return {}
        return {"user_exits": self.user_exits}

    def freeze(self, works: WorkMemo) -> tuple[Any, ...]:
        return ()  # user_exits is a counter, not state

    def thaw(self, state: tuple[Any, ...], works: WorkTable) -> None:
        pass
