"""s390 pfault: the host hooks (kvm-s390.c, diag.c, interrupt.c under ASYNC_PF_SYNC), the
guest's ``pfault_interrupt`` state table (arch/s390/mm/pfault.c), end to end in the simulator,
and what the model checker finds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import apfsim
from apfsim.abi.s390 import (
    DIAG258_CANCEL_NOT_ESTABLISHED,
    DIAG258_INIT_ALREADY_ESTABLISHED,
    DIAG258_OK,
    DIAG_PFAULT,
    EXT_IRQ_CP_SERVICE,
    KVM_S390_PFAULT_TOKEN_INVALID,
    LPP_MAGIC,
    LPP_PID_MASK,
    PFAULT_DONE,
    PFAULT_FCODE_CANCEL,
    PFAULT_FCODE_INIT,
    PFAULT_INIT,
    PSW_MASK_EXT,
    PSW_MASK_PSTATE,
    SIGP,
    SIGP_INITIAL_CPU_RESET,
    sigp_parameter,
)
from apfsim.api import run_protocol
from apfsim.check import check
from apfsim.check.world import WorldConfig
from apfsim.guest.kvm_pfault_s390 import EOPNOTSUPP, S390PfaultGuest
from apfsim.host.async_pf import ASYNC_PF_PER_VCPU, AsyncPf, WorkState
from apfsim.invariants import check_guest, check_vcpu
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
from apfsim.protocols.common import ProtocolOptions
from apfsim.protocols.s390_pfault import FLOATING_PFAULT_CAP, S390PfaultHost, psw_mask
from apfsim.registry import PROTOCOLS, build_protocol
from apfsim.trace import TraceOptions, read_trace
from apfsim.trace import formats as tp
from apfsim.trace.hooks import traced_simulation

USER = GuestView(privileged=False)
KERNEL = GuestView(privileged=True)
USER_IRQS_OFF = GuestView(privileged=False, irqs_off=True)
KERNEL_IRQS_OFF = GuestView(privileged=True, irqs_off=True)
UREGS = GuestRegs(user_mode=True)


class Kernel:
    """A fake guest kernel (KernelPort) whose DIAG/SIGP exits reach the host directly, plus
    the host ports; records wake-ups, kicks, workers and calls."""

    def __init__(self, n_cpus: int) -> None:
        self.current = dict.fromkeys(range(n_cpus), -1)
        self.woken: list[int] = []
        self.kicks: list[int] = []
        self.workers: list[AsyncPf] = []
        self.calls: list[tuple[int, int, int, int]] = []  # (cpu, nr, arg, rc)
        self.host: Any = None

    # KernelPort
    def current_task(self, cpu: int) -> int:
        return self.current[cpu]

    def rq_is_locked(self, cpu: int) -> bool:
        return False

    def swake_up_one(self, task: int) -> None:
        self.woken.append(task)

    def smp_send_reschedule(self, cpu: int) -> None:
        pass

    def kzalloc_atomic(self, cpu: int) -> bool:
        return True

    def smccc_apf(self, cpu: int, val: int) -> int:
        raise AssertionError("s390 makes no SMCCC call")

    def smccc(self, cpu: int, function: int, val: int) -> int:
        raise AssertionError("s390 makes no SMCCC call")

    def wrmsr(self, cpu: int, msr: int, val: int) -> None:
        raise AssertionError("s390 writes no MSR")

    def hypercall(self, cpu: int, nr: int, arg: int) -> int:
        rc = int(self.host.guest_call(cpu, nr, arg))
        self.calls.append((cpu, nr, arg, rc))
        return rc

    # HostPorts
    def ports(self) -> HostPorts:
        return HostPorts(
            prefault=lambda gfn: True,
            kick=self.kicks.append,
            gup_nowait=lambda gfn: None,
            start_worker=self.workers.append,
            now=lambda: 0,
        )


def make(
    n: int = 2, no_kvmapf: bool = False, boot: bool = True
) -> tuple[S390PfaultHost, S390PfaultGuest, Kernel]:
    kernel = Kernel(n)
    host, guest = build_protocol(
        "s390-pfault", n, kernel, kernel.ports(), ProtocolOptions(no_kvmapf=no_kvmapf)
    )
    assert isinstance(host, S390PfaultHost) and isinstance(guest, S390PfaultGuest)
    kernel.host = host
    if boot:
        guest.boot()
    return host, guest, kernel


def switch(guest: S390PfaultGuest, kernel: Kernel, cpu: int, task: int) -> None:
    """``__switch_to``: ``current`` and the lowcore pid change together."""
    kernel.current[cpu] = task
    guest.on_context_switch(cpu, task)


def fault(host: S390PfaultHost, cpu: int, gfn: int, view: GuestView = USER) -> Any:
    return host.try_async_pf(cpu, gfn, view, 0)


def entry(host: S390PfaultHost, cpu: int, view: GuestView = USER) -> list[Injection]:
    """One ``vcpu_pre_run``: completions, then every injection this entry makes."""
    host.run_loop_iteration(cpu, view)
    out = []
    while (injection := host.take_injection(cpu)) is not None:
        out.append(injection)
    return out


def token(task: int) -> int:
    return (LPP_MAGIC << 32) | (task & LPP_PID_MASK)


def deliver(host: S390PfaultHost, guest: S390PfaultGuest, cpu: int) -> AbortOutcome:
    """Take this entry's one external interrupt into the guest's handler."""
    (injection,) = entry(host, cpu)
    return guest.on_injection(cpu, injection, UREGS)


# -- ABI ------------------------------------------------------------------------------------------


def test_abi_constants_are_the_kernel_headers() -> None:
    assert DIAG_PFAULT == 0x258 and (PFAULT_FCODE_INIT, PFAULT_FCODE_CANCEL) == (0, 1)
    assert PFAULT_INIT == 0x0600 and PFAULT_DONE == 0x0680 and EXT_IRQ_CP_SERVICE == 0x2603
    assert PSW_MASK_PSTATE == 0x0001_0000_0000_0000 and PSW_MASK_EXT == 0x0100_0000_0000_0000
    assert KVM_S390_PFAULT_TOKEN_INVALID == (1 << 64) - 1
    assert psw_mask(USER) == PSW_MASK_PSTATE | PSW_MASK_EXT
    assert psw_mask(KERNEL_IRQS_OFF) == 0


def test_context_switch_writes_the_pid_the_host_reads_as_the_token() -> None:
    _host, guest, kernel = make()
    switch(guest, kernel, 0, 5)
    assert guest.lowcore[0].lpp_doubleword() == token(5)
    switch(guest, kernel, 0, -1)  # idle
    assert guest.lowcore[0].current_pid == 0xFFFF_FFFF


# -- DIAG 0x258 -----------------------------------------------------------------------------------


def test_diag_init_and_cancel_return_codes() -> None:
    host, _guest, _kernel = make(boot=False)
    assert host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_CANCEL) == DIAG258_CANCEL_NOT_ESTABLISHED
    assert host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_INIT) == DIAG258_OK
    assert host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_INIT) == DIAG258_INIT_ALREADY_ESTABLISHED
    assert host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_CANCEL) == DIAG258_OK
    assert host.arch[0].pfault_token == KVM_S390_PFAULT_TOKEN_INVALID
    assert host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_CANCEL) == DIAG258_CANCEL_NOT_ESTABLISHED
    assert host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_INIT) == DIAG258_OK  # re-established


def test_boot_inits_every_cpu_and_nopfault_makes_no_diag() -> None:
    host, guest, kernel = make(n=3)
    assert [(c, nr, arg, rc) for c, nr, arg, rc in kernel.calls] == [
        (cpu, DIAG_PFAULT, PFAULT_FCODE_INIT, DIAG258_OK) for cpu in range(3)
    ]
    assert guest.registered and all(lc.enabled for lc in guest.lowcore)
    host, guest, kernel = make(no_kvmapf=True)
    assert kernel.calls == [] and not guest.registered and guest.pfault_disable
    assert fault(host, 0, 1).cause is SyncCause.NO_APF


def test_boot_cpu_init_not_zero_disables_pfault_for_good() -> None:
    """``pfault_irq_init``: rc 8 (a token left established) is not 0: handler unregistered,
    ``pfault_disable`` set, and the secondaries then make no DIAG at all."""
    host, guest, kernel = make(boot=False)
    host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_INIT)
    guest.boot()
    assert kernel.calls == [(0, DIAG_PFAULT, PFAULT_FCODE_INIT, DIAG258_INIT_ALREADY_ESTABLISHED)]
    assert guest.pfault_disable and not guest.registered
    assert guest.pfault_init(1) == EOPNOTSUPP


# -- kvm_arch_setup_async_pf ----------------------------------------------------------------------


def test_refusals_in_the_kernels_order() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 3)
    # 1. token invalid, whatever else holds
    host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_CANCEL)
    assert fault(host, 0, 1, KERNEL_IRQS_OFF).cause is SyncCause.NO_APF
    host.guest_call(0, DIAG_PFAULT, PFAULT_FCODE_INIT)
    # 2. select/compare (problem state) before 3. PSW EXT
    assert fault(host, 0, 1, KERNEL_IRQS_OFF).cause is SyncCause.GATED_CONTEXT
    assert fault(host, 0, 1, KERNEL).cause is SyncCause.GATED_CONTEXT
    assert fault(host, 0, 1, USER_IRQS_OFF).cause is SyncCause.IRQS_OFF
    # 4. kvm_s390_vcpu_has_irq: an event awaiting reinjection, a floating DONE
    pending = GuestView(privileged=False, exception_pending=True)
    assert fault(host, 0, 1, pending).cause is SyncCause.EXCEPTION_PENDING
    host.float_pfault.append(token(9))
    assert fault(host, 0, 1).cause is SyncCause.EXCEPTION_PENDING
    host.float_pfault.clear()
    # 6. gmap->pfault_enabled
    host.pfault_enabled = False
    assert fault(host, 0, 1).cause is SyncCause.NO_APF
    host.pfault_enabled = True
    # all pass: async, with INIT pending; then 4. again: that INIT is pending
    assert fault(host, 0, 1).decision is FaultDecision.ASYNC
    assert fault(host, 0, 2).cause is SyncCause.EXCEPTION_PENDING
    assert host.apf[0].queued == 1 and kernel.workers == []  # the run loop starts workers


def test_queue_full_is_the_generic_cap() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 3)
    for gfn in range(ASYNC_PF_PER_VCPU):
        assert fault(host, 0, gfn).decision is FaultDecision.ASYNC
        host.arch[0].init_pending = None  # delivered
    assert fault(host, 0, 999).cause is SyncCause.QUEUE_FULL


def test_no_gfn_lookup_a_refault_queues_a_second_item_with_the_same_token() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    first = fault(host, 0, 7).work
    entry(host, 0)
    second = fault(host, 0, 7).work
    assert first is not None and second is not None and first is not second
    assert first.token == second.token == token(4)
    assert host.apf[0].queued == 2 and len(host.arch[0].gfns) == 0
    assert not host.apf_on(0)  # no gfn table: I2's hash clause has nothing to check
    # Two live items with one token are s390's design (the token is the pid), not I1.
    assert not host.unique_tokens and check_vcpu(host, 0, True) is None


def test_token_is_the_task_running_at_fault_time() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    a = fault(host, 0, 1).work
    entry(host, 0)
    switch(guest, kernel, 0, 6)
    b = fault(host, 0, 2).work
    assert a is not None and b is not None
    assert (a.token, b.token) == (token(4), token(6))


# -- delivery -------------------------------------------------------------------------------------


def test_init_is_delivered_to_the_faulting_vcpu_with_the_lowcore_words() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    fault(host, 0, 1)
    assert host.vcpu_runnable(0) and not host.vcpu_runnable(1)
    assert entry(host, 1) == []  # INIT is local
    assert entry(host, 0) == [Injection(InjectionKind.INTERRUPT, token(4))]
    assert guest.lowcore[0].words() == (EXT_IRQ_CP_SERVICE, PFAULT_INIT, token(4))
    assert host.stats.not_present_injected == 1


def test_at_most_one_external_interrupt_per_entry_init_before_done() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    host.float_pfault.append(token(5))  # a DONE already waits
    host.arch[0].init_pending = token(4)
    assert entry(host, 0) == [Injection(InjectionKind.INTERRUPT, token(4))]  # INIT first
    assert guest.lowcore[0].ext_cpu_addr == PFAULT_INIT
    assert entry(host, 0) == [Injection(InjectionKind.INTERRUPT, token(5))]  # next entry
    assert guest.lowcore[0].ext_cpu_addr == PFAULT_DONE
    assert entry(host, 0) == []


def test_done_is_floating_and_taken_by_another_vcpu() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    work = fault(host, 0, 1).work
    assert work is not None
    entry(host, 0)  # INIT delivered on vCPU 0
    host.worker_done(work)  # the worker injects DONE (ASYNC_PF_SYNC) and kicks
    assert list(host.float_pfault) == [token(4)] and kernel.kicks == [0]
    assert host.vcpu_runnable(1)  # any vCPU in an enabled wait may take it
    assert entry(host, 1) == [Injection(InjectionKind.INTERRUPT, token(4))]
    assert guest.lowcore[1].words() == (EXT_IRQ_CP_SERVICE, PFAULT_DONE, token(4))
    assert guest.lowcore[0].ext_cpu_addr == PFAULT_INIT  # vCPU 0's lowcore untouched
    # The item is still vCPU 0's to reap: only its own vcpu_pre_run frees it (R8).
    assert host.apf[0].queued == 1 and work.state is WorkState.DONE
    assert host.run_loop_iteration(1, USER) == []
    assert host.run_loop_iteration(0, USER) == [work]
    state: WorkState = work.state  # read again: mypy keeps the narrowing above
    assert host.apf[0].queued == 0 and state is WorkState.DELIVERED


def test_a_floating_done_waits_while_external_interrupts_are_masked() -> None:
    host, _guest, _kernel = make()
    host.float_pfault.append(token(4))
    assert entry(host, 0, KERNEL_IRQS_OFF) == [] and entry(host, 1, USER_IRQS_OFF) == []
    assert host.vcpu_runnable(0) and list(host.float_pfault) == [token(4)]
    assert host.stats.done_deferred_ext_off == 2
    assert entry(host, 1, KERNEL) == [Injection(InjectionKind.INTERRUPT, token(4))]


def test_reaping_does_not_present_again_and_has_no_prefault() -> None:
    prefaults: list[int] = []
    kernel = Kernel(1)

    def prefault(gfn: int) -> bool:
        prefaults.append(gfn)
        return True

    ports = replace(kernel.ports(), prefault=prefault)
    host, guest = build_protocol("s390-pfault", 1, kernel, ports, ProtocolOptions())
    assert isinstance(host, S390PfaultHost)
    kernel.host = host
    guest.boot()
    kernel.current[0] = 2
    guest.on_context_switch(0, 2)
    work = host.try_async_pf(0, 3, USER, 0).work
    assert work is not None
    host.worker_done(work)
    assert len(host.float_pfault) == 1
    assert host.run_loop_iteration(0, KERNEL_IRQS_OFF) == [work]
    assert len(host.float_pfault) == 1 and host.stats.page_ready_injected == 1
    assert prefaults == []


def test_cancel_does_not_flush_a_queued_worker_still_injects_done() -> None:
    """diag.c: "we assume all outstanding tokens are already pending"."""
    host, guest, kernel = make()
    switch(guest, kernel, 1, 4)
    work = fault(host, 1, 1).work
    assert work is not None
    guest.pfault_fini(1)
    assert host.arch[1].pfault_token == KVM_S390_PFAULT_TOKEN_INVALID
    assert host.apf[1].queue == [work] and host.apf[1].queued == 1
    host.worker_done(work)
    assert list(host.float_pfault) == [token(4)]  # no validity re-check at injection
    assert entry(host, 0) == [Injection(InjectionKind.INTERRUPT, token(4))]


def test_sigp_initial_reset_flushes_and_drops_the_pending_init() -> None:
    """``kvm_arch_vcpu_ioctl_normal_reset``: token, flush_work of the queue (ASYNC_PF_SYNC:
    the DONE still comes), ``kvm_s390_clear_local_irqs``."""
    host, guest, kernel = make()
    switch(guest, kernel, 1, 4)
    running = fault(host, 1, 1).work
    entry(host, 1)  # its INIT is delivered
    done = fault(host, 1, 2).work  # its INIT stays pending
    assert running is not None and done is not None
    host.worker_done(done)  # DONE out, item on `done`, not yet reaped
    assert host.arch[1].init_pending == token(4) and list(host.apf[1].done) == [done]
    rc = host.guest_call(0, SIGP, sigp_parameter(SIGP_INITIAL_CPU_RESET, 1))
    assert rc == 0 and host.stats.resets == 1
    assert host.arch[1].pfault_token == KVM_S390_PFAULT_TOKEN_INVALID
    assert host.arch[1].init_pending is None and host.stats.init_dropped_by_reset == 1
    assert host.apf[1].queue == [] and not host.apf[1].done and host.apf[1].queued == 0
    assert done.state is WorkState.DELIVERED and host.flushing == [running]
    assert list(host.float_pfault) == [token(4)]
    host.worker_done(running)  # flush_work waited for it: its DONE is injected
    assert list(host.float_pfault) == [token(4), token(4)]
    assert running.state is WorkState.DELIVERED and host.flushing == []
    assert check_vcpu(host, 1, False) is None


def test_a_done_over_the_floating_cap_is_lost_and_s1_says_so() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    work = fault(host, 0, 1).work
    assert work is not None
    host.float_pfault.extend([token(9)] * FLOATING_PFAULT_CAP)
    assert host.check_arch(0, True) is None
    host.worker_done(work)
    assert len(host.float_pfault) == FLOATING_PFAULT_CAP and host.stats.done_lost == 1
    broken = host.check_arch(0, True)
    assert broken is not None and broken[0] == "S1"


# -- the guest's pfault_interrupt state table -----------------------------------------------------


def init_for(host: S390PfaultHost, guest: S390PfaultGuest, cpu: int, task: int) -> AbortOutcome:
    """A fault of ``task`` (current on ``cpu``) and its INIT delivered at the next entry."""
    assert host.try_async_pf(cpu, 1, USER, 0).decision is FaultDecision.ASYNC
    return deliver(host, guest, cpu)


def done_for(host: S390PfaultHost, guest: S390PfaultGuest, cpu: int, task: int) -> AbortOutcome:
    host.float_pfault.append(token(task))
    return deliver(host, guest, cpu)


def test_init_wait_0_goes_on_the_list_and_blocks() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    assert init_for(host, guest, 0, 4) is AbortOutcome.WAIT_SCHEDULE
    assert guest.pfault_wait == {4: 1} and guest.pfault_list == [4]
    assert not guest.waiter_woken(0, 4)
    assert guest.wait_nodes() == [(-1, 4, 4, False)]
    assert check_guest(guest, [(4, 0)], all_done=False) is None


def test_init_wait_1_blocks_again_without_a_second_list_entry() -> None:
    """Only after a spurious wake (the task was woken while still on the list)."""
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    guest.pfault_wait[4] = 1
    guest.pfault_list.append(4)
    assert init_for(host, guest, 0, 4) is AbortOutcome.WAIT_SCHEDULE
    assert guest.pfault_list == [4] and guest.stats.init_reblocks == 1


def test_init_wait_minus_1_completion_came_first_no_sleep() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    guest.pfault_wait[4] = -1
    assert init_for(host, guest, 0, 4) is AbortOutcome.RETRY
    assert guest.pfault_wait == {} and guest.pfault_list == [] and guest.waiter_woken(0, 4)


def test_init_for_a_task_that_is_not_current_warns_and_drops() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    assert host.try_async_pf(0, 1, USER, 0).decision is FaultDecision.ASYNC
    kernel.current[0] = 6  # another task is current by the time INIT is taken
    assert deliver(host, guest, 0) is AbortOutcome.RETRY
    assert guest.stats.init_not_current == 1 and guest.pfault_wait == {}


def test_done_wait_1_takes_it_off_the_list_and_wakes_it() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    init_for(host, guest, 0, 4)
    kernel.current[0] = -1  # it slept
    assert done_for(host, guest, 1, 4) is AbortOutcome.WOKE
    assert kernel.woken == [4] and guest.pfault_wait == {} and guest.pfault_list == []
    assert guest.waiter_woken(0, 4)


def test_done_wait_0_running_task_leaves_minus_1() -> None:
    """DONE before INIT (R1): the task still runs on CPU 0, DONE comes on CPU 1."""
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    assert done_for(host, guest, 1, 4) is AbortOutcome.WOKE
    assert guest.pfault_wait == {4: -1} and kernel.woken == []
    assert guest.stats.done_early == 1


def test_done_wait_minus_1_running_task_stays_minus_1() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 0, 4)
    guest.pfault_wait[4] = -1
    assert done_for(host, guest, 1, 4) is AbortOutcome.WOKE
    assert guest.pfault_wait == {4: -1}


def test_done_for_a_task_not_running_is_a_leftover_of_cancel_and_ignored() -> None:
    host, guest, kernel = make()
    assert done_for(host, guest, 1, 4) is AbortOutcome.WOKE  # task 4 runs nowhere
    assert guest.pfault_wait == {} and kernel.woken == [] and guest.stats.done_ignored == 1


def test_a_pid_with_no_task_returns_silently() -> None:
    host, guest, _kernel = make()
    assert done_for(host, guest, 0, -1) is AbortOutcome.WOKE
    assert guest.stats.pid_not_found == 1 and guest.pfault_wait == {}


def test_other_subcodes_and_an_unregistered_handler_are_not_pfault() -> None:
    _host, guest, _kernel = make()
    lc = guest.lowcore[0]
    lc.ext_int_code, lc.ext_cpu_addr, lc.ext_params2 = EXT_IRQ_CP_SERVICE, 0x0D00, token(4)
    interrupt = Injection(InjectionKind.INTERRUPT, token(4))
    assert guest.on_injection(0, interrupt, UREGS) is AbortOutcome.NOT_APF  # virtio's subcode
    guest.registered = False
    lc.ext_cpu_addr = PFAULT_DONE
    assert guest.on_injection(0, interrupt, UREGS) is AbortOutcome.NOT_APF


# -- lifecycle ------------------------------------------------------------------------------------


def test_cpu_offline_cancels_and_wakes_every_task_on_the_global_list() -> None:
    host, guest, kernel = make(n=3)
    for cpu, task in ((0, 4), (2, 6)):
        switch(guest, kernel, cpu, task)
        init_for(host, guest, cpu, task)
    guest.cpu_offline(1)  # neither sleeper faulted on CPU 1
    assert kernel.calls[-1] == (1, DIAG_PFAULT, PFAULT_FCODE_CANCEL, DIAG258_OK)
    assert sorted(kernel.woken) == [4, 6] and guest.pfault_list == [] and guest.pfault_wait == {}
    assert guest.lowcore[1].enabled == 0
    # Their DONEs still come (cancel does not cancel, R5) and find running tasks: -1 (R3).
    assert done_for(host, guest, 0, 4) is AbortOutcome.WOKE
    assert guest.pfault_wait == {4: -1}


def test_cpu_online_resets_the_vcpu_then_inits() -> None:
    host, guest, kernel = make()
    switch(guest, kernel, 1, 4)
    fault(host, 1, 1)
    guest.cpu_offline(1)
    assert host.arch[1].init_pending == token(4)  # EXT off on the dead CPU: never delivered
    guest.cpu_online(1)
    assert kernel.calls[-2:] == [
        (0, SIGP, sigp_parameter(SIGP_INITIAL_CPU_RESET, 1), 0),
        (1, DIAG_PFAULT, PFAULT_FCODE_INIT, DIAG258_OK),
    ]
    assert host.arch[1].init_pending is None and host.apf[1].queued == 0
    assert guest.lowcore[1].enabled == 1


def test_reboot_cancels_on_every_cpu_and_leaves_the_handler_to_the_next_kernel() -> None:
    host, guest, kernel = make(n=3)
    guest.reboot()
    assert [c[:3] for c in kernel.calls[-3:]] == [
        (cpu, DIAG_PFAULT, PFAULT_FCODE_CANCEL) for cpu in range(3)
    ]
    assert all(a.pfault_token == KVM_S390_PFAULT_TOKEN_INVALID for a in host.arch)
    assert not guest.registered


# -- end to end -----------------------------------------------------------------------------------


def small_scenario(kernel_fraction: float = 0.0, vcpus: int = 1) -> apfsim.Scenario:
    tasks: list[dict[str, Any]] = [
        {"kind": "random_writer", "buffer_mib": 80, "kernel_fraction": kernel_fraction},
        {"kind": "compute"},
    ]
    if vcpus > 1:
        tasks = [
            {"kind": "random_writer", "buffer_mib": 40, "count": 2, "kernel_fraction": 0.2},
            {"kind": "compute", "count": 2},
        ]
    return apfsim.Scenario.model_validate(
        {
            "name": "s390",
            "duration_s": 3.0,
            "guest": {"vcpus": vcpus, "memory_mib": 96, "reserved_mib": 8},
            "host": {"memory_limit_mib": 48},
            "initial_memory": {"resident_fraction": 0.5, "swapped_fraction": 0.5},
            "tasks": tasks,
        }
    )


def test_registered_as_an_s390_lifecycle_variant() -> None:
    v = PROTOCOLS["s390-pfault"]
    assert v.arch == "s390" and v.lifecycle
    assert v.host is S390PfaultHost and v.guest is S390PfaultGuest


def test_end_to_end_user_faults_sleep_and_wake_with_invariants_on() -> None:
    r = run_protocol(small_scenario(0.3), "s390-pfault", seed=2, check=True)
    apf = r.apf
    assert apf["not_present_injected"] == apf["init_sleeps"] > 0
    assert apf["page_ready_injected"] >= apf["done_wakes"] > 0
    assert apf["sync_fallback_gated_context"] > 0  # the kernel-mode accesses
    assert apf["guest_bogus_aborts"] == 0 and apf["done_lost"] == 0
    assert r.faults["async"] == apf["not_present_injected"]
    assert r.tracepoints["kvm_async_pf_repeated_fault"] == 0  # no gfn table, no repeated rule
    compute = next(t for t in r.tasks if t.kind == "compute")
    sync = run_protocol(small_scenario(0.3), "sync", seed=2)
    assert compute.work_s > next(t for t in sync.tasks if t.kind == "compute").work_s


@pytest.mark.slow
def test_end_to_end_two_vcpus_dones_float() -> None:
    r = run_protocol(small_scenario(vcpus=2), "s390-pfault", seed=1, check=True)
    assert r.apf["done_wakes"] > 0 and r.apf["guest_bogus_aborts"] == 0


def test_nopfault_end_to_end_is_synchronous() -> None:
    kernel = Kernel(1)
    host, guest = build_protocol(
        "s390-pfault", 1, kernel, kernel.ports(), ProtocolOptions(no_kvmapf=True)
    )
    kernel.host = host
    guest.boot()
    assert host.try_async_pf(0, 1, USER, 0).cause is SyncCause.NO_APF


def test_trace_round_trip(tmp_path: Path) -> None:
    options = TraceOptions(tmp_path / "t.json", tmp_path / "t.txt")
    result = traced_simulation(small_scenario(0.3), "s390-pfault", 0, True, options).run()
    untraced = run_protocol(small_scenario(0.3), "s390-pfault", seed=0)
    assert result.to_dict()["apf"] == untraced.to_dict()["apf"]
    stats = read_trace((tmp_path / "t.txt").read_text().splitlines())
    assert stats.malformed_count == 0
    for name in tp.APF_EVENTS:
        assert stats.events[name] == result.tracepoints[name], name
    assert stats.events["kvm_async_pf_not_present"] == result.apf["not_present_injected"] > 0
    assert stats.repeated_faults == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    tokens = [str(ev.get("args", {}).get("token", "")) for ev in doc["traceEvents"]]
    assert any(t.startswith("0x80000000") for t in tokens)  # the token is an arg, not a name


# -- the model checker ----------------------------------------------------------------------------


def _trace(result: Any) -> str:
    v = result.violation
    return "\n".join(f"{s.action}: {'; '.join(s.effects)}" for s in v.trace) if v else ""


@pytest.mark.slow
def test_checker_default_world_with_the_idle_tick_holds_every_invariant() -> None:
    """The acceptance world (2 vCPUs, 2 tasks, 2 pages, user and kernel accesses) with the
    idle tick on: complete, no violation, no task asleep forever."""
    result = check(WorldConfig(protocol="s390-pfault", idle_tick=True))
    assert result.complete and result.violation is None, _trace(result)
    assert result.goal_states > 0


@pytest.mark.slow
def test_checker_small_world_holds_every_invariant() -> None:
    result = check(WorldConfig(protocol="s390-pfault", pages=1, modes=("user",), idle_tick=True))
    assert result.complete and result.violation is None, _trace(result)


@pytest.mark.slow
def test_checker_default_world_without_the_idle_tick() -> None:
    """A DONE taken on vCPU1 wakes task0 while vCPU0 is still in __schedule's switch to idle:
    check_preempt_curr() looks at rq->curr, already idle, and preempts it (this world found
    the run loop testing ``current`` there instead)."""
    result = check(WorldConfig(protocol="s390-pfault"))
    assert result.violation is None, _trace(result)


def test_checker_hotplug_world_holds_every_invariant() -> None:
    """Offline = DIAG cancel + ``pfault_cpu_dead`` wake-all; online = SIGP initial reset +
    DIAG init. Spurious wakes and stale -1 credits (R3, R5) happen here, and never a hang."""
    result = check(
        WorldConfig(
            protocol="s390-pfault", tasks=1, pages=1, modes=("user",), hotplug=1, idle_tick=True
        )
    )
    assert result.complete and result.violation is None, _trace(result)


@pytest.mark.slow
def test_checker_hotplug_world_staying_offline_holds_every_invariant() -> None:
    """The faulting vCPU never comes back: its DONEs float to vCPU 0, its items are never
    reaped (R8: its 64-item budget stays used), and still no task sleeps forever."""
    result = check(
        WorldConfig(
            protocol="s390-pfault",
            pages=1,
            modes=("user",),
            hotplug=1,
            stay_offline=True,
            idle_tick=True,
        )
    )
    assert result.complete and result.violation is None, _trace(result)


def test_checker_kexec_finding_done_delivered_into_the_next_kernel() -> None:
    """FINDING (R5, real kernel behaviour, pinned): kexec's ``pfault_fini`` only cancels the
    token; ``__diag_page_ref_service`` flushes nothing, and the worker still in flight then
    injects its PFAULT_DONE (``__kvm_inject_pfault_token`` -> ``kvm_s390_inject_vm``, no
    validity check). The next entry delivers it (``__deliver_pfault_done``): KVM stores
    0x2603 / 0x0680 / the old kernel's pid into the new kernel's lowcore and raises the
    external interrupt there. (The lowcore is where the architecture puts interruption
    parameters, so this is a stray interrupt carrying a stale pid, not a write into memory
    the new kernel uses for something else as in x86's B14.)"""
    result = check(
        WorldConfig(protocol="s390-pfault", tasks=1, pages=1, modes=("user",), reboot=True)
    )
    v = result.violation
    assert v is not None and v.prop.startswith("I8"), _trace(result)
    actions = [s.action for s in v.trace]
    kexec = next(i for i, a in enumerate(actions) if "reboots" in a)
    assert any(a.startswith("worker") for a in actions[kexec:])
    assert f"({EXT_IRQ_CP_SERVICE}, {PFAULT_DONE}, {token(0)})" in v.detail
