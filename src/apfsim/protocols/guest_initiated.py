"""Guest-initiated async PF: Paolo Bonzini's proposal in the seed's review (May 2020).

"The idea is to inject stage2 page faults into the guest even before the host starts
populating the page. The guest then invokes a hypercall, telling the host to populate the
page table and inject the 'page ready' event (interrupt) when it's done." Only pages absent
from the host (known through the MMU notifier: here, swapped out) are routed to the guest;
pages merely missing from stage 2 (never touched, in the swap cache) are still handled by the
host synchronously.

Modelled on the x86 machinery for page-ready (interrupt + token slot + ACK + kick):

* ``try_async_pf``: an absent page gets a token and a not-present exception at once, with no
  work item and no I/O started. A fault on a gfn the guest was told about but did not ask to
  populate (it could not sleep) is then faulted in synchronously.
* ``HC_APF_POPULATE(token)``: the host queues the work (``kvm_setup_async_pf``) and starts the
  worker; page-ready comes as an interrupt when it is done.
* The guest decides per context: a task that may sleep (user mode or a preemptible kernel
  context) makes the hypercall and sleeps; otherwise it returns and retries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from apfsim.abi.x86 import KVM_PV_REASON_PAGE_NOT_PRESENT, X86ApfData
from apfsim.guest.kvm_apf_x86 import X86ApfGuest
from apfsim.host.async_pf import AsyncPf, WorkMemo, WorkTable, kvm_setup_async_pf
from apfsim.ports import (
    AbortOutcome,
    FaultDecision,
    FaultResult,
    GuestRegs,
    GuestView,
    GupNowaitFn,
    HostPorts,
    KickFn,
    PrefaultFn,
    StartWorkerFn,
    SyncCause,
)
from apfsim.protocols.common import ProtocolOptions
from apfsim.protocols.x86 import X86Host

__all__ = ["HC_APF_POPULATE", "GuestInitiatedGuest", "GuestInitiatedHost"]

HC_APF_POPULATE = 0x4B564D10  # model-local hypercall number (the proposal named none)
ClockFn = Callable[[], int]


class GuestInitiatedHost(X86Host):
    name = "guest-initiated"

    def __init__(
        self,
        blocks: list[X86ApfData],
        prefault: PrefaultFn,
        kick: KickFn,
        gup_nowait: GupNowaitFn,
        start_worker: StartWorkerFn,
        now: ClockFn,
    ) -> None:
        super().__init__(blocks, prefault, kick, gup_nowait)
        self.start_worker = start_worker
        self.now = now
        self.told: list[dict[int, int]] = [{} for _ in blocks]  # token -> gfn, not yet populated
        self.declined = 0
        self.populates = 0

    @classmethod
    def create(
        cls, blocks: Sequence[Any], n_vcpus: int, ports: HostPorts, opt: ProtocolOptions
    ) -> GuestInitiatedHost:
        return cls(
            list(blocks),
            ports.prefault,
            ports.kick,
            ports.gup_nowait,
            ports.start_worker,
            ports.now,
        )

    def try_async_pf(self, vcpu: int, gfn: int, view: GuestView, now_ns: int) -> FaultResult:
        arch = self.arch[vcpu]
        arch.view = view
        told = self.told[vcpu]
        cause = self.kvm_can_do_async_pf(vcpu, view)
        if cause is not None:
            self.gup_nowait_first(gfn)
            return FaultResult(FaultDecision.SYNC, cause=cause)
        if not self.apf_enabled(vcpu) or gfn in told.values():
            # APF off, or the guest was told and retried without asking: synchronous.
            self.gup_nowait_first(gfn)
            cause = SyncCause.NO_APF if not self.apf_enabled(vcpu) else SyncCause.GUEST_DECLINED
            if cause is SyncCause.GUEST_DECLINED:
                self.declined += 1
                for token, told_gfn in list(told.items()):
                    if told_gfn == gfn:
                        del told[token]
            return FaultResult(FaultDecision.SYNC, cause=cause)
        if arch.gfns.find(gfn):
            self.stats.repeated_faults += 1
            return FaultResult(FaultDecision.HALT)
        token = self.alloc_apf_token(vcpu)
        told[token] = gfn
        arch.block.flags = KVM_PV_REASON_PAGE_NOT_PRESENT
        arch.pending_pf = token
        self.stats.not_present_injected += 1
        return FaultResult(FaultDecision.ASYNC)

    def freeze_own(self, works: WorkMemo) -> tuple[Any, ...]:
        told = tuple([tuple(told.items()) for told in self.told])
        return (*super().freeze_own(works), told)

    def thaw_own(self, state: tuple[Any, ...], works: WorkTable) -> None:
        super().thaw_own(state[:2], works)
        self.told = [dict(told) for told in state[2]]

    def kvm_arch_async_page_not_present(self, vcpu_id: int, work: AsyncPf) -> bool:
        """The guest was told before the work existed: only track the gfn."""
        self.arch[vcpu_id].gfns.add(work.gfn)
        return True

    def guest_call(self, vcpu: int, call: int, val: int) -> int:
        if call != HC_APF_POPULATE:
            return super().guest_call(vcpu, call, val)
        gfn = self.told[vcpu].pop(val, None)
        if gfn is None:
            return -1
        work = kvm_setup_async_pf(self.apf[vcpu], self, gfn, val, self.now())
        if work is None:
            return -2  # queue full: the guest retries and the host faults in synchronously
        self.populates += 1
        self.gup_nowait_first(gfn)  # the worker's GUP starts the read
        self.start_worker(work)
        return 0

    def counters(self) -> dict[str, int]:
        out = super().counters()
        out["populate_hypercalls"] = self.populates
        out["declined"] = self.declined
        return out


class GuestInitiatedGuest(X86ApfGuest):
    """The x86 driver, except that not-present is also accepted in kernel mode."""

    def kvm_handle_async_pf(self, cpu: int, token: int, regs: GuestRegs) -> AbortOutcome:
        flags = self.kvm_read_and_reset_apf_flags(cpu)
        if not flags & KVM_PV_REASON_PAGE_NOT_PRESENT:
            self.stats.spurious_pf += 1
            return AbortOutcome.NOT_APF
        can_sleep = regs.user_mode or (
            regs.preempt_count == 0
            and regs.rcu_depth == 0
            and not regs.irqs_off
            and not regs.is_idle_task
        )
        if not can_sleep:
            return AbortOutcome.RETRY
        if self.port.hypercall(cpu, HC_APF_POPULATE, token) != 0:
            return AbortOutcome.RETRY
        return self.kvm_async_pf_task_wait_schedule(cpu, token)
