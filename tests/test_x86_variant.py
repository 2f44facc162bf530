"""The ``x86`` variant (upstream since 5.10): host hooks of ``arch/x86/kvm/x86.c`` /
``mmu/mmu.c`` (spec §1) and the guest driver of ``arch/x86/kernel/kvm.c`` (spec §2).

The driver runs against :class:`FakePort`, whose ``wrmsr`` forwards to a real
:class:`X86Host` sharing the guest's per-CPU ``apf_reason`` blocks (as the simulator wires
them), so enable, page-ready delivery and the ACK go through both halves together. The
end-to-end runs at the bottom use tiny scenarios of one simulated second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest

import apfsim
from apfsim.abi.x86 import (
    HYPERVISOR_CALLBACK_VECTOR,
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    MSR_KVM_ASYNC_PF_ACK,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    WAKE_ALL_TOKEN,
)
from apfsim.api import run_protocol
from apfsim.guest.kvm_apf_x86 import (
    KVM_TASK_SLEEP_HASHBITS,
    X86ApfGuest,
    X86DriverCounters,
    X86SleepNode,
)
from apfsim.host.async_pf import ASYNC_PF_PER_VCPU, AsyncPf, WorkState
from apfsim.metrics.results import ProtocolResult
from apfsim.ports import (
    AbortOutcome,
    FaultDecision,
    GuestRegs,
    GuestView,
    HostPorts,
    Injection,
    InjectionKind,
    SyncCause,
)
from apfsim.protocols.common import hash_32
from apfsim.protocols.sync import NoApfGuest
from apfsim.protocols.x86 import X86Counters, X86Host, make_x86_token
from apfsim.registry import PROTOCOLS, ProtocolOptions, build_protocol
from apfsim.simulation import Simulation

USER_VIEW = GuestView(privileged=False)
KERNEL_VIEW = GuestView(privileged=True)
IRQS_OFF_VIEW = GuestView(privileged=True, irqs_off=True)
USER_REGS = GuestRegs(user_mode=True)
KERNEL_REGS = GuestRegs(user_mode=False)
IRQ_REGS = GuestRegs(user_mode=False, irqs_off=True)  # sysvec: wherever the CPU was
EN_INT = KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
PF = InjectionKind.PAGE_FAULT
IRQ = Injection(InjectionKind.INTERRUPT, HYPERVISOR_CALLBACK_VECTOR)


# ---------------------------------------------------------------------- fake kernel


@dataclass
class FakePort:
    """The guest kernel services the x86 driver calls, recorded.

    ``current`` maps CPU → task (default ``100 + cpu``); ``kzalloc_failures`` fails the next
    N GFP_ATOMIC allocations; ``wrmsr`` logs the guest's ``token`` word at the time of the
    write and forwards to ``host.guest_call`` (a WRMSR exit).
    """

    host: X86Host | None = None
    guest: X86ApfGuest | None = None
    current: dict[int, int] = field(default_factory=dict)
    kzalloc_failures: int = 0
    kzalloc_calls: int = 0
    swoken: list[int] = field(default_factory=list)
    msrs: list[tuple[int, int, int]] = field(default_factory=list)
    log: list[tuple[Any, ...]] = field(default_factory=list)

    def current_task(self, cpu: int) -> int:
        return self.current.get(cpu, 100 + cpu)

    def swake_up_one(self, task: int) -> None:
        self.swoken.append(task)
        self.log.append(("swake", task))

    def kzalloc_atomic(self, cpu: int) -> bool:
        self.kzalloc_calls += 1
        if self.kzalloc_failures > 0:
            self.kzalloc_failures -= 1
            return False
        return True

    def wrmsr(self, cpu: int, msr: int, val: int) -> None:
        token = None if self.guest is None else self.guest.apf_reason[cpu].token
        self.msrs.append((cpu, msr, val))
        self.log.append(("wrmsr", msr, val, token))
        if self.host is not None:
            self.host.guest_call(cpu, msr, val)

    # The rest of the simulator's KernelPort (the x86 driver never calls these).
    def rq_is_locked(self, cpu: int) -> bool:
        return False

    def smp_send_reschedule(self, cpu: int) -> None:
        self.log.append(("resched", cpu))

    def smccc_apf(self, cpu: int, val: int) -> int:
        return -1

    def smccc(self, cpu: int, function: int, val: int) -> int:
        return -1

    def hypercall(self, cpu: int, nr: int, arg: int) -> int:
        return -1

    def forget(self) -> None:
        self.swoken.clear()
        self.msrs.clear()
        self.log.clear()


@dataclass
class Vm:
    """An x86 guest driver and host wired through the shared ``apf_reason`` blocks."""

    port: FakePort
    guest: X86ApfGuest
    host: X86Host
    kicks: list[int]
    prefaulted: list[int]

    def fault(
        self,
        cpu: int,
        gfn: int,
        task: int | None = None,
        view: GuestView = USER_VIEW,
        regs: GuestRegs = USER_REGS,
    ) -> tuple[AsyncPf, AbortOutcome]:
        """A needs-I/O stage-2 fault taken async; the guest handles the injected #PF."""
        if task is not None:
            self.port.current[cpu] = task
        result = self.host.try_async_pf(cpu, gfn, view, now_ns=0)
        assert result.decision is FaultDecision.ASYNC and result.work is not None
        injection = self.host.take_injection(cpu)
        assert injection == Injection(PF, result.work.token)
        return result.work, self.guest.on_injection(cpu, injection, regs)

    def take(self, cpu: int) -> AbortOutcome | None:
        """The guest takes the one event injected at this entry (if any)."""
        injection = self.host.take_injection(cpu)
        if injection is None:
            return None
        return self.guest.on_injection(cpu, injection, IRQ_REGS)

    def enter(self, cpu: int) -> tuple[list[AsyncPf], AbortOutcome | None]:
        """``vcpu_enter_guest``: KVM_REQ_APF_READY → completions, then the injected event."""
        delivered = self.host.run_loop_iteration(cpu, KERNEL_VIEW)
        return delivered, self.take(cpu)

    def nodes(self) -> list[X86SleepNode]:
        return [n for bucket in self.guest.async_pf_sleepers for n in bucket]


def make_vm(n_cpus: int = 1, *, boot: bool = True, kvmapf: bool = True) -> Vm:
    """A booted VM whose guest already consumed the enable's wake-all on every CPU."""
    port = FakePort()
    guest = X86ApfGuest(port=port, n_cpus=n_cpus, kvmapf=kvmapf)
    kicks: list[int] = []
    prefaulted: list[int] = []

    def prefault(gfn: int) -> bool:
        prefaulted.append(gfn)
        return True

    host = X86Host(guest.apf_reason, prefault, kicks.append)
    port.host, port.guest = host, guest
    vm = Vm(port, guest, host, kicks, prefaulted)
    if boot:
        guest.boot()
        if kvmapf:
            for cpu in range(n_cpus):
                delivered, outcome = vm.enter(cpu)
                assert [w.wakeup_all for w in delivered] == [True]
                assert outcome is AbortOutcome.WOKE
        port.forget()
        kicks.clear()
        host.stats, guest.stats = X86Counters(), X86DriverCounters()
    return vm


# ---------------------------------------------------------------------- tokens


def test_make_x86_token_is_id_shifted_over_vcpu_id() -> None:
    """``(apf.id << 12) | vcpu_id`` as a u32."""
    assert make_x86_token(3, 2) == 0x3002
    assert make_x86_token(0xF_FFFF, 0xFFF) == 0xFFFF_FFFF
    assert make_x86_token(0x10_0001, 5) == 0x1005  # id << 12 is truncated to 32 bits


@pytest.mark.parametrize("vcpu", [0, 1, 7])
def test_alloc_apf_token_skips_zero_and_carries_vcpu_id(vcpu: int) -> None:
    """``alloc_apf_token``: id 0 is skipped (B9), so the first token is ``1 << 12 | vcpu``."""
    vm = make_vm(n_cpus=8, boot=False)
    tokens = [vm.host.alloc_apf_token(vcpu) for _ in range(3)]
    assert tokens == [0x1000 | vcpu, 0x2000 | vcpu, 0x3000 | vcpu]
    assert all(t & 0xFFF == vcpu for t in tokens)


def test_tokens_unique_for_a_full_20_bit_cycle_and_never_zero() -> None:
    """ "make apf token non-zero to fix bug": 2^20-1 distinct non-zero tokens, then wrap to id 1."""
    vm = make_vm(boot=False)
    tokens = [vm.host.alloc_apf_token(0) for _ in range(1 << 20)]
    cycle = tokens[:-1]
    assert 0 not in tokens
    assert len(set(cycle)) == len(cycle) == (1 << 20) - 1
    assert cycle[-1] == 0xFFFF_F000
    assert tokens[-1] == tokens[0] == 0x1000  # the counter wrapped past id 0


def test_tokens_of_different_vcpus_never_collide() -> None:
    """The low 12 bits are the vCPU id, so tokens are unique across vCPUs."""
    vm = make_vm(n_cpus=4, boot=False)
    tokens = [vm.host.alloc_apf_token(v) for v in range(4) for _ in range(50)]
    assert len(set(tokens)) == len(tokens)


def test_async_faults_use_consecutive_tokens() -> None:
    """``kvm_arch_setup_async_pf`` allocates one token per queued fault."""
    vm = make_vm(n_cpus=2)
    a, _ = vm.fault(1, 0x10, task=1)
    b, _ = vm.fault(1, 0x11, task=2)
    c, _ = vm.fault(0, 0x12, task=3)
    assert (a.token, b.token, c.token) == (0x1001, 0x2001, 0x1000)


# ---------------------------------------------------------------------- enable / disable


def test_boot_writes_int_msr_before_en_and_sets_enabled() -> None:
    """``kvm_guest_cpu_init``: INT MSR first ("or interrupt #0 can get injected"), then EN."""
    vm = make_vm(n_cpus=2, boot=False)
    vm.guest.boot()
    assert vm.port.msrs == [
        (0, MSR_KVM_ASYNC_PF_INT, HYPERVISOR_CALLBACK_VECTOR),
        (0, MSR_KVM_ASYNC_PF_EN, EN_INT),
        (1, MSR_KVM_ASYNC_PF_INT, HYPERVISOR_CALLBACK_VECTOR),
        (1, MSR_KVM_ASYNC_PF_EN, EN_INT),
    ]
    assert [vm.host.arch[c].vec for c in range(2)] == [HYPERVISOR_CALLBACK_VECTOR] * 2
    assert [d.enabled for d in vm.guest.apf_reason] == [1, 1]
    assert all(vm.host.apf_enabled(c) for c in range(2))
    assert all(vm.host.arch[c].send_user_only for c in range(2))  # no SEND_ALWAYS since 5.8


@pytest.mark.parametrize(
    ("val", "enabled"),
    [
        (KVM_ASYNC_PF_ENABLED, False),
        (KVM_ASYNC_PF_DELIVERY_AS_INT, False),
        (KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_SEND_ALWAYS, False),
        (EN_INT, True),
        (EN_INT | KVM_ASYNC_PF_SEND_ALWAYS, True),
    ],
)
def test_kvm_pv_async_pf_enabled_needs_enabled_and_delivery_as_int(val: int, enabled: bool) -> None:
    """``kvm_pv_async_pf_enabled``: both bit 0 and bit 3; only then a wake-all is queued."""
    vm = make_vm(boot=False)
    assert vm.host.guest_call(0, MSR_KVM_ASYNC_PF_EN, val) == 0
    assert vm.host.apf_enabled(0) is enabled
    assert vm.host.stats.wakeup_all_queued == int(enabled)
    assert len(vm.host.apf[0].done) == int(enabled)
    # Without delivery as an interrupt, a user-mode fault only halts the vCPU.
    decision = vm.host.try_async_pf(0, 0x40, USER_VIEW, 0).decision
    assert decision is (FaultDecision.ASYNC if enabled else FaultDecision.HALT)


def test_en_msr_with_reserved_bits_is_rejected() -> None:
    """``kvm_pv_enable_async_pf``: bits 5:4 reserved, the write fails and nothing changes."""
    vm = make_vm(boot=False)
    assert vm.host.guest_call(0, MSR_KVM_ASYNC_PF_EN, EN_INT | 0x10) == 1
    assert not vm.host.apf_enabled(0)


def test_enable_queues_wake_all_delivered_as_page_ready() -> None:
    """``kvm_async_pf_wakeup_all``: token ~0 on ``done``, kick, then IRQ with the INT vector."""
    vm = make_vm(boot=False)
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_INT, 0x1EC)  # bits 7:0 only
    assert vm.host.arch[0].vec == 0xEC
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_EN, EN_INT)
    apf, arch = vm.host.apf[0], vm.host.arch[0]
    (work,) = apf.done
    assert work.wakeup_all and work.token == WAKE_ALL_TOKEN and apf.queued == 1
    assert arch.apf_ready_request and vm.kicks == [0]
    delivered = vm.host.run_loop_iteration(0, KERNEL_VIEW)
    assert delivered == [work] and work.state is WorkState.DELIVERED
    assert arch.block.token == WAKE_ALL_TOKEN and arch.pageready_pending
    assert vm.host.take_injection(0) == Injection(InjectionKind.INTERRUPT, 0xEC)
    assert vm.prefaulted == []  # no prefault for wake-all
    assert apf.queued == 0 and vm.host.stats.page_ready_injected == 1


def test_wake_all_not_queued_when_done_is_not_empty() -> None:
    """``kvm_async_pf_wakeup_all`` returns early if ``done`` already has entries."""
    vm = make_vm(boot=False)
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_EN, EN_INT)
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_EN, EN_INT)
    assert len(vm.host.apf[0].done) == 1 and vm.host.stats.wakeup_all_queued == 1


def test_disable_cancels_queue_and_done_and_resets_hash() -> None:
    """EN=0: ``kvm_clear_async_pf_completion_queue`` + ``kvm_async_pf_hash_reset``."""
    vm = make_vm()
    a, _ = vm.fault(0, 0x100, task=1)
    b, _ = vm.fault(0, 0x200, task=2)
    vm.host.worker_done(a)
    vm.guest.kvm_pv_disable_apf(0)
    apf, arch = vm.host.apf[0], vm.host.arch[0]
    assert vm.port.msrs == [(0, MSR_KVM_ASYNC_PF_EN, 0)]
    assert vm.guest.apf_reason[0].enabled == 0 and not vm.host.apf_enabled(0)
    assert not apf.queue and not apf.done and apf.queued == 0
    assert len(arch.gfns) == 0 and vm.host.stats.cancelled == 2
    assert a.state is b.state is WorkState.CANCELLED
    # The in-flight I/O still finishes, but "they will not be delivered" (msr.rst).
    assert vm.host.worker_done(b) is False
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == []
    assert vm.host.take_injection(0) is None
    assert len(vm.nodes()) == 2  # disabling alone wakes nobody
    # The hash was reset: the same gfn is a new fault (a halt now), not a repeated one.
    result = vm.host.try_async_pf(0, 0x100, USER_VIEW, 0)
    assert result.decision is FaultDecision.HALT and result.work is not None
    assert vm.host.stats.repeated_faults == 0


def test_completion_with_apf_disabled_is_drained_silently_and_ends_halt() -> None:
    """``kvm_arch_can_dequeue_async_page_present`` is true when disabled; ``halted`` cleared."""
    vm = make_vm(boot=False)
    result = vm.host.try_async_pf(0, 0x300, USER_VIEW, 0)
    work = result.work
    assert result.decision is FaultDecision.HALT and work is not None
    assert not work.notpresent_injected and vm.host.arch[0].halted
    assert vm.host.take_injection(0) is None
    assert vm.host.worker_done(work) is True and vm.kicks == [0]
    assert vm.host.vcpu_runnable(0)  # kvm_vcpu_has_events: `done` is non-empty
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == [work]
    arch = vm.host.arch[0]
    assert not arch.halted and arch.block.token == 0 and not arch.pageready_pending
    assert vm.host.take_injection(0) is None
    assert vm.prefaulted == [0x300] and len(arch.gfns) == 0 and vm.host.apf[0].queued == 0
    assert vm.host.stats.halt_ended_without_ready == 1
    assert vm.host.stats.page_ready_injected == 0


# ---------------------------------------------------------------------- fault path


def test_irqs_off_is_sync_before_anything_else() -> None:
    """``kvm_can_do_async_pf``: "If interrupts are off we cannot even use an artificial halt"."""
    vm = make_vm()
    vm.fault(0, 0x10, task=1)
    id_before = vm.host.arch[0].id
    for gfn in (0x10, 0x11):  # outstanding or not: interrupts off comes first
        result = vm.host.try_async_pf(0, gfn, IRQS_OFF_VIEW, 0)
        assert result.decision is FaultDecision.SYNC and result.cause is SyncCause.IRQS_OFF
    assert vm.host.arch[0].id == id_before and vm.host.apf[0].queued == 1
    assert vm.host.stats.repeated_faults == 0


def test_repeated_fault_halts_without_new_work() -> None:
    """``kvm_find_async_pf_gfn`` → ``kvm_async_pf_repeated_fault`` + KVM_REQ_APF_HALT."""
    vm = make_vm(n_cpus=2)
    a, _ = vm.fault(0, 0x10, task=1)
    result = vm.host.try_async_pf(0, 0x10, USER_VIEW, 0)
    assert result.decision is FaultDecision.HALT and result.work is None
    assert vm.host.stats.repeated_faults == 1 and vm.host.apf[0].queued == 1
    assert vm.host.take_injection(0) is None
    # The hash is per vCPU: the same gfn on another vCPU is an independent APF.
    b, _ = vm.fault(1, 0x10, task=2)
    assert b.token != a.token and b.vcpu_id == 1


def test_repeated_fault_sets_apf_halted() -> None:
    """KVM_REQ_APF_HALT → ``vcpu->arch.apf.halted = true``, as for a not-injected not-present."""
    vm = make_vm()
    vm.fault(0, 0x10, task=1)
    vm.host.try_async_pf(0, 0x10, USER_VIEW, 0)
    assert vm.host.arch[0].halted


def test_user_mode_fault_injects_pf_with_token_and_flags() -> None:
    """``kvm_arch_async_page_not_present``: flags = NOT_PRESENT, #PF with CR2 = token."""
    vm = make_vm()
    result = vm.host.try_async_pf(0, 0x20, USER_VIEW, 0)
    work = result.work
    assert result.decision is FaultDecision.ASYNC and work is not None
    assert work.notpresent_injected and work.token == 0x1000
    assert vm.guest.apf_reason[0].flags == KVM_PV_REASON_PAGE_NOT_PRESENT
    assert vm.host.arch[0].gfns.find(0x20) and not vm.host.arch[0].halted
    assert vm.host.take_injection(0) == Injection(PF, work.token)
    assert vm.host.take_injection(0) is None
    assert vm.host.stats.not_present_injected == 1


def test_kernel_mode_fault_halts_unless_send_always() -> None:
    """``kvm_can_deliver_async_pf``: ``send_user_only && CPL == 0`` → artificial halt."""
    vm = make_vm()
    result = vm.host.try_async_pf(0, 0x30, KERNEL_VIEW, 0)
    work = result.work
    assert result.decision is FaultDecision.HALT and work is not None
    assert not work.notpresent_injected and vm.host.arch[0].halted
    assert vm.guest.apf_reason[0].flags == 0 and vm.host.take_injection(0) is None
    assert vm.host.arch[0].gfns.find(0x30)  # the gfn stays hashed; the work still runs
    assert vm.host.stats.not_present_halted == 1
    # With SEND_ALWAYS (never set by a 5.8+ guest) the kernel-mode fault is injected.
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_EN, EN_INT | KVM_ASYNC_PF_SEND_ALWAYS)
    assert vm.host.try_async_pf(0, 0x31, KERNEL_VIEW, 0).decision is FaultDecision.ASYNC


def test_queue_full_falls_back_to_sync() -> None:
    """``kvm_setup_async_pf``: ``queued >= ASYNC_PF_PER_VCPU`` (64) → synchronous fault."""
    vm = make_vm()
    for i in range(ASYNC_PF_PER_VCPU):
        vm.fault(0, 0x1000 + i, task=i)
    assert vm.host.apf[0].queued == ASYNC_PF_PER_VCPU
    result = vm.host.try_async_pf(0, 0x5000, USER_VIEW, 0)
    assert result.decision is FaultDecision.SYNC and result.cause is SyncCause.QUEUE_FULL
    assert vm.host.apf[0].queued == ASYNC_PF_PER_VCPU
    assert not vm.host.arch[0].gfns.find(0x5000)


# ---------------------------------------------------------------------- page-ready and ACK


def test_only_one_page_ready_in_flight_until_ack() -> None:
    """Token slot + ``pageready_pending``; the ACK MSR delivers the next one inline."""
    vm = make_vm()
    arch, apf = vm.host.arch[0], vm.host.apf[0]
    a, out_a = vm.fault(0, 0x100, task=1)
    b, out_b = vm.fault(0, 0x200, task=2)
    assert out_a is out_b is AbortOutcome.WAIT_SCHEDULE
    assert vm.host.worker_done(a) is True
    assert vm.host.worker_done(b) is False  # not first on `done`: no second request
    assert vm.kicks == [0]
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == [a]
    assert arch.block.token == a.token and arch.pageready_pending
    assert list(apf.done) == [b] and b.state is WorkState.DONE
    assert vm.host.take_injection(0) == IRQ and vm.host.take_injection(0) is None
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == []  # slot busy
    # The guest's handler: wake task 1, token = 0, ACK → b is delivered inside the WRMSR.
    assert vm.guest.on_injection(0, IRQ, IRQ_REGS) is AbortOutcome.WOKE
    assert vm.port.swoken == [1] and vm.host.stats.acks == 1
    state: WorkState = b.state  # read again: mypy keeps the narrowing above
    assert state is WorkState.DELIVERED and arch.block.token == b.token
    assert arch.pageready_pending and not apf.done
    assert vm.take(0) is AbortOutcome.WOKE
    assert vm.port.swoken == [1, 2] and arch.block.token == 0 and not arch.pageready_pending
    assert vm.host.stats.page_ready_injected == 2 and vm.host.stats.acks == 2
    assert vm.prefaulted == [0x100, 0x200] and apf.queued == 0 and len(arch.gfns) == 0


def test_present_queued_kicks_only_without_page_ready_pending() -> None:
    """``kvm_arch_async_page_present_queued``: request always, kick iff !pageready_pending."""
    vm = make_vm()
    arch = vm.host.arch[0]
    a, _ = vm.fault(0, 0x100, task=1)
    b, _ = vm.fault(0, 0x200, task=2)
    vm.host.worker_done(a)
    vm.enter(0)  # a delivered and handled, ACKed: nothing pending
    vm.kicks.clear()
    c, _ = vm.fault(0, 0x300, task=3)
    vm.host.worker_done(b)
    assert vm.kicks == [0]  # nothing in flight: kick
    vm.host.run_loop_iteration(0, KERNEL_VIEW)  # b delivered; the guest has not taken it
    assert arch.pageready_pending
    kicks_before = vm.host.stats.kicks
    vm.host.worker_done(c)  # first on an empty `done`
    assert arch.apf_ready_request and vm.kicks == [0]
    assert vm.host.stats.kicks == kicks_before
    assert vm.take(0) is AbortOutcome.WOKE  # b's handler ACKs → c delivered inline
    assert c.state is WorkState.DELIVERED and arch.block.token == c.token


def test_apf_ready_request_gates_the_run_loop() -> None:
    """Completions are checked in ``vcpu_enter_guest`` only on KVM_REQ_APF_READY."""
    vm = make_vm()
    arch = vm.host.arch[0]
    a, _ = vm.fault(0, 0x100, task=1)
    vm.host.worker_done(a)
    arch.apf_ready_request = False
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == [] and list(vm.host.apf[0].done) == [a]
    arch.apf_ready_request = True
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == [a] and not arch.apf_ready_request


def test_freed_slot_without_ack_waits_for_the_ack() -> None:
    """A request consumed while the slot was busy is gone: only the ACK re-scans ``done``."""
    vm = make_vm()
    arch = vm.host.arch[0]
    a, _ = vm.fault(0, 0x100, task=1)
    b, _ = vm.fault(0, 0x200, task=2)
    vm.host.worker_done(a)
    vm.host.run_loop_iteration(0, KERNEL_VIEW)  # a in flight
    vm.host.worker_done(b)  # request, no kick
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == [] and not arch.apf_ready_request
    arch.block.token = 0  # slot free, but no ACK yet
    assert vm.host.run_loop_iteration(0, KERNEL_VIEW) == []
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_ACK, 0)  # bit 0 clear: not an ACK
    assert vm.host.stats.acks == 0 and b.state is WorkState.DONE
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_ACK, 1)
    state: WorkState = b.state  # read again: mypy keeps the narrowing above
    assert state is WorkState.DELIVERED and arch.block.token == b.token


def test_ack_with_token_not_zeroed_delivers_nothing() -> None:
    """``apf_pageready_slot_free`` reads the guest's ``token``: the ACK alone is not enough."""
    vm = make_vm()
    a, _ = vm.fault(0, 0x100, task=1)
    b, _ = vm.fault(0, 0x200, task=2)
    vm.host.worker_done(a)
    vm.host.worker_done(b)
    vm.host.run_loop_iteration(0, KERNEL_VIEW)
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_ACK, 1)
    arch = vm.host.arch[0]
    assert not arch.pageready_pending and arch.block.token == a.token
    assert b.state is WorkState.DONE


def test_not_injected_item_only_ends_the_halt() -> None:
    """``kvm_arch_async_page_present``: token + IRQ only if ``notpresent_injected``."""
    vm = make_vm()
    result = vm.host.try_async_pf(0, 0x30, KERNEL_VIEW, 0)
    work = result.work
    assert work is not None and vm.host.arch[0].halted
    vm.host.worker_done(work)
    assert vm.enter(0) == ([work], None)
    arch = vm.host.arch[0]
    assert not arch.halted and arch.block.token == 0 and not arch.pageready_pending
    assert vm.host.stats.halt_ended_without_ready == 1
    assert vm.host.stats.page_ready_injected == 0
    assert vm.prefaulted == [0x30] and len(arch.gfns) == 0


def test_injected_item_completion_is_a_page_ready() -> None:
    """The completed item is prefaulted, unhashed and its token raised as the vector."""
    vm = make_vm()
    a, _ = vm.fault(0, 0x40, task=9)
    assert vm.host.worker_done(a) and vm.host.vcpu_runnable(0)
    delivered, outcome = vm.enter(0)
    assert delivered == [a] and outcome is AbortOutcome.WOKE
    assert vm.port.swoken == [9] and vm.nodes() == [] and vm.prefaulted == [0x40]
    assert not vm.host.vcpu_runnable(0)


# ---------------------------------------------------------------------- guest driver


def test_hash_32_matches_the_kernel() -> None:
    """``hash_32(val, bits) = (val * GOLDEN_RATIO_32) >> (32 - bits)``."""
    assert hash_32(0x1000, 8) == 0x88  # 0x61C88647 << 12 mod 2^32 = 0x88647000
    assert hash_32(0x2000, 8) == 0x10
    assert hash_32(WAKE_ALL_TOKEN, 8) == 0x9E
    assert len(make_vm(boot=False).guest.async_pf_sleepers) == 1 << KVM_TASK_SLEEP_HASHBITS


def test_pf_with_flags_zero_is_an_ordinary_fault() -> None:
    """``kvm_read_and_reset_apf_flags`` returns 0: not an async PF, the normal handler runs."""
    vm = make_vm()
    outcome = vm.guest.on_injection(0, Injection(PF, 0x1000), USER_REGS)
    assert outcome is AbortOutcome.NOT_APF
    assert vm.guest.stats.spurious_pf == 1 and vm.nodes() == []
    assert vm.guest.stats.guest_panics == 0


def test_flags_ignored_while_guest_apf_disabled() -> None:
    """``kvm_read_and_reset_apf_flags`` reads ``flags`` only if ``apf_reason.enabled``."""
    vm = make_vm(boot=False)
    vm.guest.apf_reason[0].flags = KVM_PV_REASON_PAGE_NOT_PRESENT
    outcome = vm.guest.on_injection(0, Injection(PF, 0x1000), USER_REGS)
    assert outcome is AbortOutcome.NOT_APF and vm.nodes() == []
    assert vm.guest.apf_reason[0].flags == KVM_PV_REASON_PAGE_NOT_PRESENT


def test_not_present_in_user_mode_parks_node_in_global_table() -> None:
    """``kvm_async_pf_task_wait_schedule``: node (token, cpu) at the head of its bucket."""
    vm = make_vm(n_cpus=2)
    work, outcome = vm.fault(1, 0x50, task=7)
    assert outcome is AbortOutcome.WAIT_SCHEDULE
    assert vm.guest.apf_reason[1].flags == 0  # read and reset
    bucket = vm.guest.async_pf_sleepers[hash_32(work.token, 8)]
    (node,) = bucket
    assert (node.token, node.cpu, node.task, node.dummy) == (work.token, 1, 7, False)
    assert vm.nodes() == [node] and vm.guest.stats.waits_schedule == 1
    assert not vm.guest.waiter_woken(1, 7)


@pytest.mark.parametrize(
    "regs",
    [KERNEL_REGS, GuestRegs(user_mode=True, irqs_off=True), IRQ_REGS],
    ids=["kernel_mode", "irqs_off", "both"],
)
def test_not_present_in_kernel_or_irqs_off_is_a_guest_panic(regs: GuestRegs) -> None:
    """ "Host injected async #PF in kernel mode / interrupt disabled region" (B4)."""
    vm = make_vm()
    vm.guest.apf_reason[0].flags = KVM_PV_REASON_PAGE_NOT_PRESENT
    outcome = vm.guest.on_injection(0, Injection(PF, 0x1000), regs)
    assert outcome is AbortOutcome.NOT_APF
    assert vm.guest.stats.guest_panics == 1 and vm.nodes() == []
    assert vm.guest.apf_reason[0].flags == 0


def test_send_always_host_crashes_a_5_8_guest_in_kernel_mode() -> None:
    """Only a SEND_ALWAYS host injects in kernel mode, and the post-5.8 guest panics."""
    vm = make_vm()
    vm.host.guest_call(0, MSR_KVM_ASYNC_PF_EN, EN_INT | KVM_ASYNC_PF_SEND_ALWAYS)
    vm.enter(0)  # the re-enable's wake-all
    _, outcome = vm.fault(0, 0x60, view=KERNEL_VIEW, regs=KERNEL_REGS)
    assert outcome is AbortOutcome.NOT_APF and vm.guest.stats.guest_panics == 1


def test_wake_before_wait_leaves_dummy_consumed_by_the_wait() -> None:
    """``kvm_async_pf_task_wake`` inserts a dummy; ``kvm_async_pf_queue_task`` frees it."""
    vm = make_vm()
    token = 0x7000
    vm.guest.kvm_async_pf_task_wake(0, token)
    (dummy,) = vm.nodes()
    assert dummy.dummy and dummy.token == token and dummy.cpu == 0
    assert dummy in vm.guest.async_pf_sleepers[hash_32(token, 8)]
    assert vm.port.swoken == [] and vm.guest.stats.dummies_created == 1
    vm.guest.apf_reason[0].flags = KVM_PV_REASON_PAGE_NOT_PRESENT
    outcome = vm.guest.on_injection(0, Injection(PF, token), USER_REGS)
    assert outcome is AbortOutcome.DUMMY_CONSUMED
    assert vm.nodes() == [] and not dummy.hashed
    assert vm.guest.stats.dummies_consumed == 1 and vm.guest.stats.waits_schedule == 0


def test_dummy_allocation_retries_until_kzalloc_succeeds() -> None:
    """GFP_ATOMIC failure: ``cpu_relax()`` and retry."""
    vm = make_vm()
    vm.port.kzalloc_failures = 3
    vm.guest.kvm_async_pf_task_wake(0, 0x7000)
    assert vm.port.kzalloc_calls == 4 and vm.guest.stats.dummy_alloc_retries == 3
    assert [n.dummy for n in vm.nodes()] == [True]


def test_wake_of_parked_node_unhashes_and_swakes() -> None:
    """``apf_task_wake_one``: ``hlist_del_init`` then ``swake_up_one``."""
    vm = make_vm()
    work, _ = vm.fault(0, 0x50, task=5)
    (node,) = vm.nodes()
    vm.guest.kvm_async_pf_task_wake(0, work.token)
    assert not node.hashed and vm.nodes() == [] and vm.port.swoken == [5]
    assert vm.guest.waiter_woken(0, 5) and vm.port.kzalloc_calls == 0


def test_wake_all_wakes_only_this_cpus_nodes_and_leaks_dummies() -> None:
    """``apf_task_wake_all``: every bucket, ``n->cpu == smp_processor_id()`` only."""
    vm = make_vm(n_cpus=2)
    vm.fault(0, 0x10, task=1)
    remote, _ = vm.fault(1, 0x20, task=2)
    vm.guest.kvm_async_pf_task_wake(0, 0x9000)  # a dummy on CPU 0
    dummy = next(n for n in vm.nodes() if n.dummy)
    vm.guest.kvm_async_pf_task_wake(0, WAKE_ALL_TOKEN)
    assert vm.port.swoken == [1]
    assert [(n.token, n.cpu) for n in vm.nodes()] == [(remote.token, 1)]
    assert not dummy.hashed and vm.guest.stats.dummies_leaked == 1
    assert vm.guest.stats.wakes == 1 and vm.guest.stats.wake_all == 1


def test_sysvec_wakes_then_zeroes_token_then_acks() -> None:
    """``sysvec_kvm_asyncpf_interrupt``: wake, ``token = 0``, then ``wrmsr(ACK, 1)``."""
    vm = make_vm()
    a, _ = vm.fault(0, 0x10, task=4)
    vm.host.worker_done(a)
    vm.host.run_loop_iteration(0, KERNEL_VIEW)
    vm.port.forget()
    assert vm.take(0) is AbortOutcome.WOKE
    # The ACK is written with the slot already free (the host checks it inside the ACK).
    assert vm.port.log == [("swake", 4), ("wrmsr", MSR_KVM_ASYNC_PF_ACK, 1, 0)]
    assert vm.guest.stats.acks == 1 and vm.host.stats.acks == 1


def test_sysvec_with_guest_apf_disabled_does_nothing() -> None:
    """The handler tests ``apf_reason.enabled`` before reading ``token``."""
    vm = make_vm(boot=False)
    vm.guest.apf_reason[0].token = 0x1000
    assert vm.guest.on_injection(0, IRQ, IRQ_REGS) is AbortOutcome.NOT_APF
    assert vm.port.msrs == [] and vm.guest.apf_reason[0].token == 0x1000


def test_cpu_offline_disables_and_wakes_this_cpus_sleepers() -> None:
    """``kvm_guest_cpu_offline(false)``: ``kvm_pv_disable_apf`` then ``apf_task_wake_all``."""
    vm = make_vm(n_cpus=2)
    a, _ = vm.fault(0, 0x10, task=1)
    b, _ = vm.fault(1, 0x20, task=2)
    vm.guest.kvm_guest_cpu_offline(0, shutdown=False)
    assert vm.port.msrs == [(0, MSR_KVM_ASYNC_PF_EN, 0)]
    assert not vm.host.apf_enabled(0) and vm.host.apf_enabled(1)
    assert a.state is WorkState.CANCELLED and b.state is WorkState.RUNNING
    assert vm.port.swoken == [1] and [n.task for n in vm.nodes()] == [2]
    vm.guest.kvm_guest_cpu_offline(0, shutdown=False)  # already disabled: no second WRMSR
    assert vm.port.msrs == [(0, MSR_KVM_ASYNC_PF_EN, 0)]


def test_cpu_offline_for_shutdown_wakes_nobody() -> None:
    """Reboot/kexec ``kvm_guest_cpu_offline(true)``: disable only."""
    vm = make_vm()
    vm.fault(0, 0x10, task=1)
    vm.guest.kvm_guest_cpu_offline(0, shutdown=True)
    assert vm.port.msrs == [(0, MSR_KVM_ASYNC_PF_EN, 0)] and vm.guest.apf_reason[0].enabled == 0
    assert vm.port.swoken == [] and [n.task for n in vm.nodes()] == [1]


def test_no_kvmapf_leaves_apf_disabled() -> None:
    """The ``no-kvmapf`` early param: no MSR writes; every async fault is a halt."""
    vm = make_vm(kvmapf=False)
    assert vm.port.msrs == [] and vm.guest.apf_reason[0].enabled == 0
    assert not vm.host.apf_enabled(0)
    result = vm.host.try_async_pf(0, 0x10, USER_VIEW, 0)
    assert result.decision is FaultDecision.HALT and vm.host.take_injection(0) is None


# ---------------------------------------------------------------------- registry


def host_ports() -> HostPorts:
    """Inert host services: every page resident, kicks and workers ignored."""
    return HostPorts(
        prefault=lambda gfn: True,
        kick=lambda vcpu: None,
        gup_nowait=lambda gfn: None,
        start_worker=lambda work: None,
        now=lambda: 0,
    )


@pytest.mark.parametrize(("name", "guest_type"), [("x86", X86ApfGuest), ("halt-only", NoApfGuest)])
def test_registry_builds_x86_host_with_its_guest(name: str, guest_type: type) -> None:
    """``PROTOCOLS``: ``x86`` pairs the PV driver, ``halt-only`` a guest without it."""
    assert name in PROTOCOLS
    port = FakePort()
    host, guest = build_protocol(name, 2, port, host_ports(), ProtocolOptions())
    assert isinstance(host, X86Host) and isinstance(guest, guest_type)
    assert host.name == "x86"
    port.host = host
    guest.boot()
    assert bool(port.msrs) is (name == "x86") and len(host.arch) == 2
    assert all(host.apf_enabled(v) is (name == "x86") for v in range(2))


def test_registry_no_kvmapf_option_reaches_the_x86_guest() -> None:
    """``ProtocolOptions.no_kvmapf`` → ``X86ApfGuest(kvmapf=False)``."""
    port = FakePort()
    host, guest = build_protocol("x86", 1, port, host_ports(), ProtocolOptions(no_kvmapf=True))
    assert isinstance(host, X86Host)
    port.host = host
    guest.boot()
    assert port.msrs == [] and not host.apf_enabled(0)


# ---------------------------------------------------------------------- end to end


def scenario(
    *, kernel_fraction: float = 0.0, kernel_mode: str = "kernel", writers: int = 1
) -> apfsim.Scenario:
    """One vCPU, a random writer over 32 MiB with 24 MiB of host memory, plus a compute hog."""
    return apfsim.Scenario.model_validate(
        {
            "name": "x86-e2e",
            "duration_s": 1.0,
            "stop_when_done": False,
            "guest": {"vcpus": 1, "memory_mib": 64, "reserved_mib": 16},
            "host": {
                "memory_limit_mib": 24,
                "swap": {"distribution": "exponential", "mean_us": 500.0},
            },
            "initial_memory": {"resident_fraction": 0.2, "swapped_fraction": 0.5},
            "tasks": [
                {
                    "kind": "random_writer",
                    "buffer_mib": 32,
                    "count": writers,
                    "kernel_fraction": kernel_fraction,
                    "kernel_mode": kernel_mode,
                },
                {"kind": "compute"},
            ],
        }
    )


@cache
def simulate(
    protocol: str, kernel_fraction: float = 0.0, kernel_mode: str = "kernel"
) -> tuple[Simulation, ProtocolResult]:
    """One run per configuration (seed 1), shared by the tests that read it."""
    sim = Simulation(
        scenario(kernel_fraction=kernel_fraction, kernel_mode=kernel_mode), protocol, 1
    )
    return sim, sim.run()


def run_cached(
    protocol: str, kernel_fraction: float = 0.0, kernel_mode: str = "kernel"
) -> ProtocolResult:
    return simulate(protocol, kernel_fraction, kernel_mode)[1]


def test_e2e_x86_user_writer_every_page_ready_acked() -> None:
    """x86, user-mode writer: every not-present injected, every page-ready ACKed, no sync."""
    sim, r = simulate("x86")
    apf, faults = r.apf, r.faults
    host, guest = sim.host_protocol, sim.guest_protocol
    assert isinstance(host, X86Host) and isinstance(guest, X86ApfGuest)
    # `acks` in the results is the guest's count (it shadows the host's): they must agree.
    assert host.stats.acks == guest.stats.acks == apf["acks"]
    assert faults["needs_io"] > 100
    assert apf["not_present_injected"] == faults["async"] == faults["needs_io"]
    assert 0 <= apf["page_ready_injected"] - apf["acks"] <= 1
    # One boot wake-all plus one page-ready per injected not-present (one may be in flight).
    in_flight = apf["not_present_injected"] + apf["wakeup_all_queued"] - apf["page_ready_injected"]
    assert apf["wakeup_all_queued"] == 1 and 0 <= in_flight <= 1
    assert apf["guest_panics"] == 0 and apf["guest_bogus_aborts"] == 0
    assert apf["sync_fallbacks"] == 0 and faults["sync"] == 0
    assert apf["not_present_halted"] == 0 and apf["cancelled"] == 0
    assert apf["waits_schedule"] + apf["dummies_consumed"] == apf["not_present_injected"]
    assert apf["apf_sleeps"] > 0
    assert r.vcpus[0].time_s["sync_fault"] == 0.0


def test_e2e_x86_single_vcpu_leaves_no_dummy() -> None:
    """On one vCPU a page-ready never precedes its not-present: no dummy is ever made."""
    r = run_cached("x86")
    assert r.apf["dummies_created"] == 0


def test_e2e_x86_kernel_mode_faults_halt_not_panic() -> None:
    """x86 with kernel-mode accesses: not-presents there become artificial halts."""
    r = run_cached("x86", 0.3, "kernel")
    apf = r.apf
    assert apf["not_present_halted"] > 0 and apf["not_present_injected"] > 0
    assert apf["halt_ended_without_ready"] > 0
    assert apf["guest_panics"] == 0 and apf["sync_fallbacks"] == 0
    assert r.vcpus[0].time_s["apf_halt"] > 0


def test_e2e_x86_irqs_off_accesses_fall_back_to_sync() -> None:
    """x86, kernel accesses with IF=0: ``kvm_can_do_async_pf`` false → synchronous only."""
    r = run_cached("x86", 0.3, "kernel_irqs_off")
    apf, faults = r.apf, r.faults
    assert faults["sync"] > 0 and apf["sync_fallbacks"] == faults["sync"]
    assert faults["sync"] + faults["async"] == faults["needs_io"]
    for cause in SyncCause:
        if cause is not SyncCause.IRQS_OFF:
            assert apf[f"sync_fallback_{cause.value}"] == 0
    assert apf["not_present_halted"] == 0 and apf["guest_panics"] == 0
    assert r.vcpus[0].time_s["sync_fault"] > 0


def test_e2e_halt_only_injects_nothing_and_halts_every_fault() -> None:
    """halt-only: APF never enabled, so every needs-I/O fault is an artificial halt."""
    sim, r = simulate("halt-only")
    apf, faults = r.apf, r.faults
    assert isinstance(sim.host_protocol, X86Host)
    assert isinstance(sim.guest_protocol, NoApfGuest)
    assert not sim.host_protocol.apf_enabled(0) and sim.host_protocol.stats.acks == 0
    assert apf["not_present_injected"] == 0 and apf["page_ready_injected"] == 0
    assert apf["acks"] == 0 and apf["wakeup_all_queued"] == 0
    assert faults["needs_io"] > 100 and faults["sync"] == 0
    assert apf["not_present_halted"] == faults["async"] > 0
    assert apf["not_present_halted"] + apf["repeated_faults"] == faults["needs_io"]
    assert 0 <= apf["not_present_halted"] - apf["halt_ended_without_ready"] <= 1
    assert apf["guest_bogus_aborts"] == 0 and apf["apf_sleeps"] == 0
    time_s = r.vcpus[0].time_s
    assert time_s["apf_halt"] > 0 and time_s["sync_fault"] == 0


def test_e2e_halt_only_irqs_off_accesses_fall_back_to_sync() -> None:
    """halt-only with IF=0 kernel accesses: no artificial halt is possible there either."""
    r = run_cached("halt-only", 0.3, "kernel_irqs_off")
    apf, faults = r.apf, r.faults
    assert faults["sync"] > 0 and apf["sync_fallbacks"] == faults["sync"]
    assert apf["not_present_halted"] > 0 and apf["not_present_injected"] == 0
    assert r.vcpus[0].time_s["sync_fault"] > 0 and r.vcpus[0].time_s["apf_halt"] > 0


@pytest.mark.parametrize("protocol", ["x86", "halt-only"])
def test_e2e_sync_fallback_irqs_off_is_reported(protocol: str) -> None:
    """The results name the IF=0 cause (``kvm_can_do_async_pf``): ``sync_fallback_irqs_off``."""
    r = run_cached(protocol, 0.3, "kernel_irqs_off")
    assert r.apf["sync_fallback_irqs_off"] == r.faults["sync"] > 0


@pytest.mark.slow
def test_e2e_x86_ready_latency_counts_ack_deliveries() -> None:
    """Every delivered completion (run loop or ACK) has a not-present → ready sample."""
    sim = Simulation(scenario(writers=4), "x86", seed=1)
    r = sim.run()
    delivered = r.apf["prefaults"]  # one per delivered non-wake-all item
    assert r.faults["not_present_to_ready_us"]["count"] == delivered


def test_e2e_x86_same_seed_same_result() -> None:
    """Determinism: the same scenario and seed give byte-identical results."""
    again = run_protocol(scenario(), "x86", seed=1)
    assert again.to_dict() == run_cached("x86").to_dict()
    other = run_protocol(scenario(), "x86", seed=2)
    assert other.to_dict() != again.to_dict()
