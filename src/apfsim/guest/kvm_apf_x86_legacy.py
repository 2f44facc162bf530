"""The x86 guest driver before 5.8 (2.6.38-5.7): both signals as #PF, kernel-mode APF.

``do_async_page_fault`` dispatches on ``kvm_read_and_reset_pf_reason()``: NOT_PRESENT ->
``kvm_async_pf_task_wait(token, !user_mode)``, PAGE_READY -> ``kvm_async_pf_task_wake``.
The wait halts (``native_safe_halt``) instead of scheduling when the task cannot schedule:
the idle task, ``preempt_count() > 1`` or an RCU read side (with CONFIG_PREEMPT_COUNT),
else any kernel-mode fault. A halted node is woken by ``smp_send_reschedule(n->cpu)``, which
also works when the page-ready #PF lands on the halted CPU itself: unlike the seed's
``wake_one`` there is no "waker is the sleeper" deferral. This is the design the seed's
review says RFCv2 repeats (tglx's "Sanitize kvm_async_pf_task_wait()" and "Restrict
ASYNC_PF to user space" removed it in 5.8, B3/B4).

The sleep table, dummy nodes and wake-all are the upstream driver's, inherited; only what
5.8 changed is overridden here.
"""

from __future__ import annotations

from dataclasses import dataclass

from apfsim.abi.x86 import (
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    MSR_KVM_ASYNC_PF_EN,
)
from apfsim.guest.kvm_apf_x86 import X86ApfGuest, X86SleepNode
from apfsim.ports import AbortOutcome, GuestRegs, Injection, InjectionKind, KernelPort
from apfsim.protocols.common import ProtocolOptions

__all__ = ["X86LegacyApfGuest"]


@dataclass
class X86LegacyApfGuest(X86ApfGuest):
    """The pre-5.8 guest: SEND_ALWAYS, reason-based #PF dispatch, halted or scheduled waits.

    The block's first word, ``flags`` since 5.10, is the pre-5.10 ``reason``.
    """

    preempt_count_config: bool = True

    @classmethod
    def create(cls, port: KernelPort, n_cpus: int, opt: ProtocolOptions) -> X86LegacyApfGuest:
        return cls(
            port=port,
            n_cpus=n_cpus,
            kvmapf=not opt.no_kvmapf,
            preempt_count_config=opt.preempt_count_config,
        )

    def kvm_async_pf_task_wait(self, cpu: int, token: int, regs: GuestRegs) -> AbortOutcome:
        if self.preempt_count_config:
            # Under the bucket's raw spinlock: preempt_count() is the faulting code's + 1.
            atomic = regs.preempt_count + 1 > 1 or regs.rcu_depth > 0
        else:
            atomic = not regs.user_mode
        halted = regs.is_idle_task or atomic
        if not self.kvm_async_pf_queue_task(cpu, token, halted):
            return AbortOutcome.DUMMY_CONSUMED
        if halted:
            self.stats.waits_halt += 1
            return AbortOutcome.WAIT_HALT
        self.stats.waits_schedule += 1
        return AbortOutcome.WAIT_SCHEDULE

    def apf_task_wake_one(self, bucket: list[X86SleepNode], node: X86SleepNode) -> None:
        """A halted waiter gets a reschedule IPI on its CPU instead of a swait wake-up."""
        if not node.halted or node.dummy:
            super().apf_task_wake_one(bucket, node)
            return
        self._hlist_del_init(bucket, node)
        self.stats.wakes += 1
        self.stats.resched_ipis += 1
        self.port.smp_send_reschedule(node.cpu)

    def do_async_page_fault(self, cpu: int, token: int, regs: GuestRegs) -> AbortOutcome:
        reason = self.kvm_read_and_reset_apf_flags(cpu)
        if reason == KVM_PV_REASON_PAGE_NOT_PRESENT:
            return self.kvm_async_pf_task_wait(cpu, token, regs)
        if reason == KVM_PV_REASON_PAGE_READY:
            self.kvm_async_pf_task_wake(cpu, token)
            return AbortOutcome.WOKE
        self.stats.spurious_pf += 1
        return AbortOutcome.NOT_APF

    def kvm_guest_cpu_init(self, cpu: int) -> None:
        """``KVM_ASYNC_PF_SEND_ALWAYS`` with a preemptible kernel (CONFIG_PREEMPT)."""
        if not self.kvmapf:
            return
        self.port.wrmsr(cpu, MSR_KVM_ASYNC_PF_EN, KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_SEND_ALWAYS)
        self.apf_reason[cpu].enabled = 1

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        if injection.kind is not InjectionKind.PAGE_FAULT:
            return AbortOutcome.NOT_APF
        return self.do_async_page_fault(cpu, injection.payload, regs)
