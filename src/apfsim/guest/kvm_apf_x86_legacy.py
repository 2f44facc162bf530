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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from apfsim.guest.kvm_apf_x86 import (
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_TASK_SLEEP_HASHBITS,
    MSR_KVM_ASYNC_PF_EN,
    WAKE_ALL_TOKEN,
    X86ApfData,
    X86GuestPort,
    X86SleepNode,
    hash_32,
)
from apfsim.metrics.accumulators import counter_dict
from apfsim.protocols.base import AbortOutcome, GuestRegs, Injection, InjectionKind

__all__ = [
    "KVM_PV_REASON_PAGE_NOT_PRESENT",
    "KVM_PV_REASON_PAGE_READY",
    "X86LegacyApfGuest",
    "X86LegacyGuestPort",
]

KVM_PV_REASON_PAGE_NOT_PRESENT = 1
KVM_PV_REASON_PAGE_READY = 2


class X86LegacyGuestPort(X86GuestPort, Protocol):
    def smp_send_reschedule(self, cpu: int) -> None: ...


@dataclass(slots=True, eq=False)
class LegacySleepNode(X86SleepNode):
    halted: bool = False


@dataclass(slots=True)
class LegacyCounters:
    waits_schedule: int = 0
    waits_halt: int = 0
    wakes: int = 0
    resched_ipis: int = 0
    wake_all: int = 0
    dummies_created: int = 0
    dummies_consumed: int = 0
    dummies_leaked: int = 0
    dummy_alloc_retries: int = 0
    spurious_pf: int = 0


@dataclass
class X86LegacyApfGuest:
    """The pre-5.8 guest: SEND_ALWAYS, reason-based #PF dispatch, halted or scheduled waits."""

    port: X86LegacyGuestPort
    n_cpus: int
    kvmapf: bool = True
    preempt_count_config: bool = True
    # The pre-5.10 block's first word is ``reason``; 5.10 renamed it ``flags``.
    apf_reason: list[X86ApfData] = field(init=False)
    async_pf_sleepers: list[list[LegacySleepNode]] = field(init=False)
    stats: LegacyCounters = field(default_factory=LegacyCounters)

    def __post_init__(self) -> None:
        self.apf_reason = [X86ApfData() for _ in range(self.n_cpus)]
        self.async_pf_sleepers = [[] for _ in range(1 << KVM_TASK_SLEEP_HASHBITS)]

    def _bucket(self, token: int) -> list[LegacySleepNode]:
        return self.async_pf_sleepers[hash_32(token, KVM_TASK_SLEEP_HASHBITS)]

    def kvm_read_and_reset_pf_reason(self, cpu: int) -> int:
        data = self.apf_reason[cpu]
        if not data.enabled:
            return 0
        reason, data.flags = data.flags, 0
        return reason

    def kvm_async_pf_task_wait(self, cpu: int, token: int, regs: GuestRegs) -> AbortOutcome:
        bucket = self._bucket(token)
        for node in bucket:
            if node.token == token:  # a dummy: the wake came first
                bucket.remove(node)
                node.hashed = False
                self.stats.dummies_consumed += 1
                return AbortOutcome.DUMMY_CONSUMED
        if self.preempt_count_config:
            atomic = regs.preempt_count > 1 or regs.rcu_depth > 0
        else:
            atomic = not regs.user_mode
        halted = regs.is_idle_task or atomic
        node = LegacySleepNode(token, cpu, self.port.current_task(cpu), halted=halted)
        bucket.insert(0, node)
        if halted:
            self.stats.waits_halt += 1
            return AbortOutcome.WAIT_HALT
        self.stats.waits_schedule += 1
        return AbortOutcome.WAIT_SCHEDULE

    def apf_task_wake_one(self, bucket: list[LegacySleepNode], node: LegacySleepNode) -> None:
        bucket.remove(node)
        node.hashed = False
        if node.dummy:
            self.stats.dummies_leaked += 1
        elif node.halted:
            self.stats.wakes += 1
            self.stats.resched_ipis += 1
            self.port.smp_send_reschedule(node.cpu)
        else:
            self.stats.wakes += 1
            self.port.swake_up_one(node.task)

    def apf_task_wake_all(self, cpu: int) -> None:
        self.stats.wake_all += 1
        for bucket in self.async_pf_sleepers:
            for node in [n for n in bucket if n.cpu == cpu]:
                self.apf_task_wake_one(bucket, node)

    def kvm_async_pf_task_wake(self, cpu: int, token: int) -> None:
        if token == WAKE_ALL_TOKEN:
            self.apf_task_wake_all(cpu)
            return
        bucket = self._bucket(token)
        for node in bucket:
            if node.token == token:
                self.apf_task_wake_one(bucket, node)
                return
        while not self.port.kzalloc_atomic(cpu):
            self.stats.dummy_alloc_retries += 1
        bucket.insert(0, LegacySleepNode(token, cpu, self.port.current_task(cpu), dummy=True))
        self.stats.dummies_created += 1

    def do_async_page_fault(self, cpu: int, token: int, regs: GuestRegs) -> AbortOutcome:
        reason = self.kvm_read_and_reset_pf_reason(cpu)
        if reason == KVM_PV_REASON_PAGE_NOT_PRESENT:
            return self.kvm_async_pf_task_wait(cpu, token, regs)
        if reason == KVM_PV_REASON_PAGE_READY:
            self.kvm_async_pf_task_wake(cpu, token)
            return AbortOutcome.WOKE
        self.stats.spurious_pf += 1
        return AbortOutcome.NOT_APF

    # -- lifecycle and GuestProtocol ------------------------------------------------------------
    def kvm_guest_cpu_init(self, cpu: int) -> None:
        """``KVM_ASYNC_PF_SEND_ALWAYS`` with a preemptible kernel (CONFIG_PREEMPT)."""
        if not self.kvmapf:
            return
        self.port.wrmsr(cpu, MSR_KVM_ASYNC_PF_EN, KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_SEND_ALWAYS)
        self.apf_reason[cpu].enabled = 1

    def boot(self) -> None:
        for cpu in range(self.n_cpus):
            self.kvm_guest_cpu_init(cpu)

    def on_injection(self, cpu: int, injection: Injection, regs: GuestRegs) -> AbortOutcome:
        if injection.kind is not InjectionKind.PAGE_FAULT:
            return AbortOutcome.NOT_APF
        return self.do_async_page_fault(cpu, injection.payload, regs)

    def on_ret_to_user(self, cpu: int) -> None:
        pass

    def on_idle_entry(self, cpu: int) -> None:
        pass

    def waiter_woken(self, cpu: int, task: int) -> bool:
        return not any(
            n.task == task and not n.dummy for bucket in self.async_pf_sleepers for n in bucket
        )

    def counters(self) -> dict[str, int]:
        return counter_dict(self.stats)
