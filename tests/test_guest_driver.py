"""The seed's guest driver (RFCv2 9/9, ``arch/arm64/mm/fault.c``), path by path.

The driver runs against :class:`FakeKernelPort`, whose ``smccc_apf`` forwards to a real
:class:`Arm64Rfcv2Host` sharing the guest's per-CPU ``apf_data`` (as the simulator wires
them), so enable/disable and page-ready delivery go through the host's code. The seed's
weaknesses (halted waiter never woken, offline wakes nobody, leaked dummies) are asserted
as the seed's code makes them happen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from apfsim.abi.arm64 import (
    APF_FUNC_SET_RANGE,
    APF_FUNC_UPDATE_ENABLE,
    KVM_ASYNC_PF_ENABLED,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    SMCCC_RET_NOT_SUPPORTED,
    SMCCC_RET_SUCCESS,
    SYS_RESTART,
    WAKE_ALL_TOKEN,
)
from apfsim.guest.kvm_apf_arm64 import Arm64ApfGuest, DriverCounters, SleepNode
from apfsim.host.async_pf import AsyncPf, WorkState
from apfsim.ports import (
    AbortOutcome,
    FaultDecision,
    GuestRegs,
    GuestView,
    Injection,
    InjectionKind,
)
from apfsim.protocols.arm64_rfcv2 import Arm64Rfcv2Host, HostCounters


def _far(injection: Injection | None) -> int | None:
    """The FAR of an injected data abort (RFCv2 carries the token there)."""
    if injection is None:
        return None
    assert injection.kind is InjectionKind.DATA_ABORT
    return injection.payload


USER_REGS = GuestRegs(user_mode=True)
KERNEL_REGS = GuestRegs(user_mode=False)
HANDLER_REGS = GuestRegs(user_mode=False)  # page-ready is taken wherever the CPU was
USER_VIEW = GuestView(privileged=False)
EL1_VIEW = GuestView(privileged=True)
ILLEGAL_REASON_BLOCKING = KVM_PV_REASON_PAGE_NOT_PRESENT + KVM_PV_REASON_PAGE_READY


# ---------------------------------------------------------------------- fake kernel


@dataclass
class FakeKernelPort:
    """A ``GuestKernelPort`` that records what the driver asks of the kernel.

    ``current`` maps CPU → task id (default ``100 + cpu``); ``kzalloc_failures`` makes the
    next N GFP_ATOMIC allocations fail; ``smccc_results`` (if non-empty) overrides the
    host's answer for the next calls, which are then not forwarded.
    """

    host: Arm64Rfcv2Host | None = None
    guest: Arm64ApfGuest | None = None
    current: dict[int, int] = field(default_factory=dict)
    rq_locked: set[int] = field(default_factory=set)
    kzalloc_failures: int = 0
    kzalloc_calls: int = 0
    smccc_results: list[int] = field(default_factory=list)
    swoken: list[int] = field(default_factory=list)
    resched_ipis: list[int] = field(default_factory=list)
    reasons_at_wake: list[tuple[int, ...]] = field(default_factory=list)
    smccc_calls: list[tuple[int, int]] = field(default_factory=list)

    def current_task(self, cpu: int) -> int:
        return self.current.get(cpu, 100 + cpu)

    def rq_is_locked(self, cpu: int) -> bool:
        return cpu in self.rq_locked

    def _note_reasons(self) -> None:
        if self.guest is not None:
            self.reasons_at_wake.append(tuple(d.reason for d in self.guest.apf_data))

    def swake_up_one(self, task: int) -> None:
        self._note_reasons()
        self.swoken.append(task)

    def smp_send_reschedule(self, cpu: int) -> None:
        self._note_reasons()
        self.resched_ipis.append(cpu)

    def kzalloc_atomic(self, cpu: int) -> bool:
        self.kzalloc_calls += 1
        if self.kzalloc_failures > 0:
            self.kzalloc_failures -= 1
            return False
        return True

    def smccc_apf(self, cpu: int, val: int) -> int:
        self.smccc_calls.append((cpu, val))
        if self.smccc_results:
            return self.smccc_results.pop(0)
        if self.host is None:
            return SMCCC_RET_NOT_SUPPORTED
        return self.host.smccc_apf(cpu, val)

    def smccc(self, cpu: int, function: int, val: int) -> int:
        raise AssertionError("the arm64 driver calls only smccc_apf")

    def wrmsr(self, cpu: int, msr: int, val: int) -> None:
        raise AssertionError("no MSR on arm64")

    def hypercall(self, cpu: int, nr: int, arg: int) -> int:
        raise AssertionError("no hypercall on arm64")

    def forget(self) -> None:
        """Drop the records (after boot), keeping the configuration."""
        self.swoken.clear()
        self.resched_ipis.clear()
        self.reasons_at_wake.clear()
        self.smccc_calls.clear()


@dataclass
class Vm:
    """A guest driver and an RFCv2 host wired through shared control blocks."""

    port: FakeKernelPort
    guest: Arm64ApfGuest
    host: Arm64Rfcv2Host
    prefaulted: list[int]

    def fault(
        self, cpu: int, gfn: int, view: GuestView = USER_VIEW, regs: GuestRegs = USER_REGS
    ) -> tuple[AsyncPf, AbortOutcome]:
        """A stage-2 fault that needs I/O, taken async; the guest handles the not-present."""
        result = self.host.try_async_pf(cpu, gfn, view, now_ns=0)
        assert result.decision is FaultDecision.ASYNC and result.work is not None
        far = _far(self.host.take_injection(cpu))
        assert far == result.work.token
        return result.work, self.guest.do_async_pf(cpu, far, regs)

    def deliver(self, cpu: int, view: GuestView = EL1_VIEW) -> list[AbortOutcome]:
        """One run-loop iteration; the guest handles whatever page-ready it injected."""
        delivered = self.host.run_loop_iteration(cpu, view)
        outcomes = []
        if delivered:
            far = _far(self.host.take_injection(cpu))
            assert far is not None
            outcomes.append(self.guest.do_async_pf(cpu, far, HANDLER_REGS))
        return outcomes

    def complete(self, cpu: int, work: AsyncPf, view: GuestView = EL1_VIEW) -> AbortOutcome:
        """The worker finishes and the page-ready is delivered at the next iteration."""
        self.host.worker_done(work)
        outcomes = self.deliver(cpu, view)
        assert len(outcomes) == 1
        return outcomes[0]


def make_vm(
    n_cpus: int = 2,
    *,
    boot: bool = True,
    send_always: bool = False,
    preempt_count_config: bool = True,
    async_pf_available: bool = True,
) -> Vm:
    port = FakeKernelPort()
    guest = Arm64ApfGuest(
        port,
        n_cpus,
        async_pf_available=async_pf_available,
        preempt_count_config=preempt_count_config,
        send_always=send_always,
    )
    prefaulted: list[int] = []

    def prefault(gfn: int) -> bool:
        prefaulted.append(gfn)
        return True

    host = Arm64Rfcv2Host(guest.apf_data, prefault)
    port.host, port.guest = host, guest
    vm = Vm(port, guest, host, prefaulted)
    if boot:
        guest.boot()
        for cpu in range(n_cpus):
            assert vm.deliver(cpu) == [AbortOutcome.WOKE]  # the enable's wake-all
        port.forget()
        guest.stats, host.stats = DriverCounters(), HostCounters()
    return vm


def signal(vm: Vm, cpu: int, reason: int, token: int, regs: GuestRegs = USER_REGS) -> AbortOutcome:
    """Write ``reason`` as the host would and take the data abort with FAR = ``token``."""
    vm.guest.apf_data[cpu].reason = reason
    return vm.guest.do_async_pf(cpu, token, regs)


def park(vm: Vm, cpu: int, token: int, task: int, regs: GuestRegs = USER_REGS) -> SleepNode:
    """``task`` takes a not-present for ``token`` on ``cpu``; returns its sleep node."""
    vm.port.current[cpu] = task
    signal(vm, cpu, KVM_PV_REASON_PAGE_NOT_PRESENT, token, regs)
    node = vm.guest.kvm_async_pf_find(cpu, token)
    assert node is not None
    return node


# ---------------------------------------------------------------------- do_async_pf


def test_do_async_pf_not_enabled_is_not_apf_even_with_reason_set() -> None:
    """do_async_pf: ``!kvm_async_pf_read_enabled()`` → false (ordinary abort)."""
    vm = make_vm(boot=False)
    assert signal(vm, 0, KVM_PV_REASON_PAGE_NOT_PRESENT, 0x10000) is AbortOutcome.NOT_APF
    assert vm.guest.apf_head[0] == []
    assert vm.guest.apf_data[0].reason == KVM_PV_REASON_PAGE_NOT_PRESENT  # untouched


def test_do_async_pf_reason_zero_is_not_apf() -> None:
    """do_async_pf: ``reason == 0`` → an ordinary abort for the fault table."""
    vm = make_vm()
    assert signal(vm, 0, 0, 0x10000) is AbortOutcome.NOT_APF
    assert vm.guest.apf_head[0] == []


@pytest.mark.parametrize("reason", [ILLEGAL_REASON_BLOCKING, 4, 0xFFFF_FFFF])
def test_do_async_pf_illegal_reason_is_counted_and_cleared(reason: int) -> None:
    """do_async_pf default case: pr_warn and write reason 0 (3 is delayed_wake's blocker)."""
    vm = make_vm()
    assert signal(vm, 0, reason, 0x10000) is AbortOutcome.ILLEGAL_REASON
    assert vm.guest.stats.illegal_reason == 1
    assert vm.guest.apf_data[0].reason == 0
    assert vm.guest.apf_head[0] == []


def test_do_async_pf_truncates_far_to_u32_token() -> None:
    """``kvm_async_pf_wait((u32)addr, ...)``: the upper FAR bits are dropped."""
    vm = make_vm()
    vm.port.current[0] = 7
    signal(vm, 0, KVM_PV_REASON_PAGE_NOT_PRESENT, (0xDEAD << 32) | 0x30000)
    assert [n.token for n in vm.guest.apf_head[0]] == [0x30000]


# ---------------------------------------------------------------------- kvm_async_pf_wait


def test_wait_from_user_mode_schedules_with_current_hashed_and_reason_cleared() -> None:
    """kvm_async_pf_wait: user mode, preempt_count 0 → schedule(); unlock_and_clear."""
    vm = make_vm()
    vm.port.current[1] = 42
    work, outcome = vm.fault(1, gfn=0x500)
    assert outcome is AbortOutcome.WAIT_SCHEDULE
    [node] = vm.guest.apf_head[1]
    assert (node.token, node.task, node.cpu) == (work.token, 42, 1)
    assert not node.halted and not node.delayed and not node.dummy and node.hashed
    assert vm.guest.apf_data[1].reason == 0
    assert vm.guest.stats.waits_schedule == 1 and vm.guest.stats.waits_halt == 0
    assert not vm.guest.waiter_woken(1, 42)


@pytest.mark.parametrize(
    "regs",
    [
        pytest.param(GuestRegs(user_mode=False, is_idle_task=True), id="idle-task"),
        pytest.param(GuestRegs(user_mode=False, preempt_count=2), id="preempt-count-2"),
        pytest.param(GuestRegs(user_mode=False, rcu_depth=1), id="rcu-read-side"),
    ],
)
def test_wait_halts_for_idle_atomic_or_rcu_context(regs: GuestRegs) -> None:
    """``n.halted = is_idle_task(current) || preempt_count() > 1 || rcu_preempt_depth()``."""
    vm = make_vm()
    node = park(vm, 0, 0x10000, task=5, regs=regs)
    assert node.halted
    assert vm.guest.stats.waits_halt == 1
    assert vm.guest.apf_data[0].reason == 0


def test_wait_outcome_is_wait_halt_for_halted_node() -> None:
    """The halted node's task spins in ``dsb(sy); wfi()`` (WAIT_HALT)."""
    vm = make_vm()
    vm.port.current[0] = 5
    outcome = signal(vm, 0, KVM_PV_REASON_PAGE_NOT_PRESENT, 0x10000, GuestRegs(False, 2))
    assert outcome is AbortOutcome.WAIT_HALT


def test_n_halted_is_computed_under_the_list_lock() -> None:
    """The seed tests ``preempt_count() > 1`` with the list's spinlock held, so it sees the
    faulting code's count + 1: a fault taken holding one lock (count 1) halts, and a fault
    in preemptible kernel code (count 0) schedules."""
    vm = make_vm()
    vm.port.current[0] = 5
    one_lock = GuestRegs(user_mode=False, preempt_count=1)
    outcome = signal(vm, 0, KVM_PV_REASON_PAGE_NOT_PRESENT, 0x10000, one_lock)
    assert outcome is AbortOutcome.WAIT_HALT
    assert vm.guest.apf_head[0][0].halted
    vm.port.current[0] = 6
    preemptible = GuestRegs(user_mode=False, preempt_count=0)
    outcome = signal(vm, 0, KVM_PV_REASON_PAGE_NOT_PRESENT, 0x20000, preemptible)
    assert outcome is AbortOutcome.WAIT_SCHEDULE


@pytest.mark.parametrize(
    ("regs", "halted"),
    [
        (GuestRegs(user_mode=False), True),  # in kernel, preemptible: halts anyway
        (GuestRegs(user_mode=True, preempt_count=5, rcu_depth=3), False),  # counts ignored
        (GuestRegs(user_mode=True, is_idle_task=True), True),  # idle still halts
    ],
)
def test_wait_without_preempt_count_config_halts_iff_in_kernel(
    regs: GuestRegs, halted: bool
) -> None:
    """``!CONFIG_PREEMPT_COUNT``: the rule is ``in_kernel`` (= ``!user_mode(regs)``)."""
    vm = make_vm(preempt_count_config=False)
    node = park(vm, 0, 0x10000, task=5, regs=regs)
    assert node.halted is halted


def test_wait_adds_at_list_head() -> None:
    """``hlist_add_head``: the newest node is found first."""
    vm = make_vm()
    park(vm, 0, 0x10000, task=5)
    park(vm, 0, 0x20000, task=6)
    assert [n.token for n in vm.guest.apf_head[0]] == [0x20000, 0x10000]


# ---------------------------------------------------------------------- kvm_async_pf_wake


def test_page_ready_wakes_sleeper_unhashes_and_clears_reason() -> None:
    """kvm_async_pf_wake → wake_one: ``hlist_del_init`` then ``swake_up_one(&n->wq)``."""
    vm = make_vm()
    vm.port.current[0] = 42
    work, _ = vm.fault(0, gfn=0x500)
    [node] = vm.guest.apf_head[0]
    vm.port.current[0] = 43  # another task runs while 42 sleeps
    assert vm.complete(0, work) is AbortOutcome.WOKE
    assert vm.port.swoken == [42] and vm.port.resched_ipis == []
    assert not node.hashed and vm.guest.apf_head[0] == []
    assert vm.guest.apf_data[0].reason == 0
    assert vm.guest.waiter_woken(0, 42)
    assert vm.guest.stats.wakes == 1
    assert vm.prefaulted == [0x500]


def test_wake_of_halted_node_from_other_task_sends_reschedule_ipi() -> None:
    """wake_one on a halted node: ``smp_send_reschedule(n->cpu)`` instead of swake_up_one."""
    vm = make_vm()
    node = park(vm, 1, 0x10001, task=5, regs=GuestRegs(user_mode=False, preempt_count=2))
    vm.port.current[1] = 9
    assert signal(vm, 1, KVM_PV_REASON_PAGE_READY, 0x10001) is AbortOutcome.WOKE
    assert vm.port.resched_ipis == [1] and vm.port.swoken == []
    assert not node.hashed
    assert vm.guest.stats.resched_ipis == 1


def test_page_ready_for_unknown_token_creates_dummy_owned_by_current() -> None:
    """Wake before wait: kvm_async_pf_wake adds a kzalloc'ed dummy (task = current)."""
    vm = make_vm()
    vm.port.current[0] = 77
    assert signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x50000) is AbortOutcome.WOKE
    [dummy] = vm.guest.apf_head[0]
    assert (dummy.token, dummy.task, dummy.cpu, dummy.dummy) == (0x50000, 77, 0, True)
    assert not dummy.halted and not dummy.delayed
    assert vm.guest.apf_data[0].reason == 0
    assert vm.guest.stats.dummies_created == 1
    assert vm.port.swoken == []


def test_later_wait_on_dummy_token_consumes_it_without_sleeping() -> None:
    """kvm_async_pf_wait: "dummy entry exist -> wake up was delivered ahead of PF"."""
    vm = make_vm()
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x50000)
    vm.port.current[0] = 12
    outcome = signal(vm, 0, KVM_PV_REASON_PAGE_NOT_PRESENT, 0x50000)
    assert outcome is AbortOutcome.DUMMY_CONSUMED
    assert vm.guest.apf_head[0] == []
    assert vm.guest.apf_data[0].reason == 0
    assert vm.guest.stats.dummies_consumed == 1
    assert vm.guest.stats.waits_schedule == 0 and vm.guest.stats.waits_halt == 0
    assert vm.guest.waiter_woken(0, 12)


def test_dummy_allocation_failure_is_retried_until_success() -> None:
    """``kzalloc(GFP_ATOMIC)`` failure: unlock, cpu_relax(), ``goto again``."""
    vm = make_vm()
    vm.port.kzalloc_failures = 3
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x50000)
    assert vm.port.kzalloc_calls == 4
    assert vm.guest.stats.dummy_alloc_retries == 3
    assert vm.guest.stats.dummies_created == 1
    assert len(vm.guest.apf_head[0]) == 1


# ---------------------------------------------------------------------- delayed wakes


def test_wake_by_the_sleeper_itself_is_delayed_and_stays_hashed() -> None:
    """wake_one: ``n->task == current`` → ``n->delayed = true``, no wake."""
    vm = make_vm()
    node = park(vm, 0, 0x10000, task=5)  # task 5 is still current
    assert signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x10000) is AbortOutcome.WOKE
    assert node.delayed and node.hashed
    assert vm.port.swoken == [] and vm.port.resched_ipis == []
    assert vm.guest.stats.delayed_marked == 1
    assert vm.guest.apf_data[0].reason == 0
    assert not vm.guest.waiter_woken(0, 5)


def test_wake_with_runqueue_locked_is_delayed() -> None:
    """wake_one: ``cpu_rq_is_locked(smp_processor_id())`` → delayed (patch 8/9)."""
    vm = make_vm()
    node = park(vm, 0, 0x10000, task=5)
    vm.port.current[0] = 6
    vm.port.rq_locked.add(0)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x10000)
    assert node.delayed and node.hashed and vm.port.swoken == []


def test_delayed_marked_counts_each_node_once() -> None:
    """A node delayed twice (e.g. by a wake-all) is counted once."""
    vm = make_vm()
    park(vm, 0, 0x10000, task=5)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x10000)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, WAKE_ALL_TOKEN)
    assert vm.guest.stats.delayed_marked == 1


@pytest.mark.parametrize("entry", ["on_ret_to_user", "on_idle_entry"])
def test_delayed_wake_wakes_this_cpus_delayed_nodes_with_reason_blocked(entry: str) -> None:
    """kvm_async_pf_delayed_wake: reason = NOT_PRESENT+READY during the walk, then 0."""
    vm = make_vm()
    delayed = park(vm, 0, 0x10000, task=5)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x10000)  # delayed: 5 is current
    other = park(vm, 0, 0x20000, task=6)  # hashed, not delayed: must be skipped
    assert delayed.delayed and not other.delayed
    vm.port.current[0] = 100  # ret_to_user of another task / the idle task
    getattr(vm.guest, entry)(0)
    assert vm.port.swoken == [5]
    assert vm.port.reasons_at_wake == [(ILLEGAL_REASON_BLOCKING, 0)]
    assert vm.guest.apf_data[0].reason == 0
    assert not delayed.hashed and other.hashed
    assert vm.guest.stats.delayed_wakes == 1


def test_delayed_wake_leaves_a_pending_reason_untouched() -> None:
    """Patch: "There might be pending signals. For that case, we needn't do anything."."""
    vm = make_vm()
    park(vm, 0, 0x10000, task=5)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x10000)
    vm.port.current[0] = 100
    vm.guest.apf_data[0].reason = KVM_PV_REASON_PAGE_READY  # host signalled, not yet taken
    vm.guest.on_ret_to_user(0)
    assert vm.port.swoken == [5]
    assert vm.port.reasons_at_wake == [(KVM_PV_REASON_PAGE_READY, 0)]
    assert vm.guest.apf_data[0].reason == KVM_PV_REASON_PAGE_READY


def test_delayed_wake_by_the_sleeper_itself_stays_delayed() -> None:
    """delayed_wake goes through wake_one again: still current → still delayed."""
    vm = make_vm()
    node = park(vm, 0, 0x10000, task=5)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x10000)
    vm.guest.on_ret_to_user(0)
    assert node.delayed and node.hashed and vm.port.swoken == []
    assert vm.guest.stats.delayed_wakes == 0
    assert vm.guest.apf_data[0].reason == 0


def test_delayed_wake_does_nothing_when_disabled_or_list_empty() -> None:
    """Early returns: ``!enabled`` or ``hlist_empty`` → reason is not even written."""
    vm = make_vm()
    vm.guest.on_idle_entry(0)
    assert vm.port.reasons_at_wake == [] and vm.guest.apf_data[0].reason == 0
    park(vm, 0, 0x10000, task=5)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x10000)
    vm.guest.apf_data[0].enabled = 0
    vm.port.current[0] = 100
    vm.guest.on_idle_entry(0)
    assert vm.port.swoken == [] and vm.guest.apf_head[0][0].hashed


# ---------------------------------------------------------------------- wake-all


def test_wake_all_sends_every_node_of_this_cpu_through_wake_one() -> None:
    """kvm_async_pf_wake_all (token ~0): sleeper, halted, dummy, self; other CPU untouched."""
    vm = make_vm()
    sleeper = park(vm, 0, 0x10000, task=7)
    halted = park(vm, 0, 0x20000, task=8, regs=GuestRegs(user_mode=False, preempt_count=2))
    vm.port.current[0] = 50
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x30000)  # dummy owned by task 50
    dummy = vm.guest.kvm_async_pf_find(0, 0x30000)
    own = park(vm, 0, 0x40000, task=9)  # the wake-all is taken in task 9's context
    remote = park(vm, 1, 0x50001, task=11)
    vm.port.current[1] = 12
    assert dummy is not None

    assert signal(vm, 0, KVM_PV_REASON_PAGE_READY, WAKE_ALL_TOKEN) is AbortOutcome.WOKE
    assert vm.port.swoken == [7]
    assert vm.port.resched_ipis == [0]
    assert not sleeper.hashed and not halted.hashed and not dummy.hashed
    assert own.delayed and own.hashed
    assert remote.hashed and not remote.delayed
    assert vm.guest.apf_head[0] == [own]
    assert vm.guest.stats.dummies_leaked == 1  # unlinked, never kfree'd
    assert vm.guest.stats.wake_all == 1
    assert vm.guest.apf_data[0].reason == 0


def test_wake_all_reaching_dummy_of_current_task_only_delays_it() -> None:
    """A dummy's ``task`` is its creator: if that task is current, wake_one delays it."""
    vm = make_vm()
    vm.port.current[0] = 50
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, 0x30000)
    signal(vm, 0, KVM_PV_REASON_PAGE_READY, WAKE_ALL_TOKEN)
    [dummy] = vm.guest.apf_head[0]
    assert dummy.delayed and dummy.hashed
    assert vm.guest.stats.dummies_leaked == 0


# ---------------------------------------------------------------------- seed weakness


def test_halted_wait_never_woken_seed_weakness() -> None:
    """A halted waiter is ``current`` when its page-ready arrives: the wake is only delayed,
    and the WFI loop never reaches ret_to_user or idle entry, so nothing unhashes the node.
    """
    vm = make_vm(send_always=True)  # not-present at EL1 needs SEND_ALWAYS (FIXME'd)
    vm.port.current[0] = 5
    work, outcome = vm.fault(
        0, gfn=0x700, view=EL1_VIEW, regs=GuestRegs(user_mode=False, preempt_count=2)
    )
    assert outcome is AbortOutcome.WAIT_HALT
    [node] = vm.guest.apf_head[0]
    assert node.halted

    # The page arrives; the page-ready abort is taken inside the WFI loop, task 5 current.
    assert vm.complete(0, work) is AbortOutcome.WOKE
    assert node.delayed and node.hashed
    assert work.state is WorkState.DELIVERED
    # The loop: `if (hlist_unhashed(&n.link)) break; dsb(sy); wfi();` forever.
    for _ in range(100):
        assert not vm.guest.waiter_woken(0, 5)
        assert vm.deliver(0) == []
        assert not vm.host.vcpu_runnable(0)  # nothing left that would end the WFI
    assert node.hashed and vm.guest.apf_head[0] == [node]
    assert vm.port.swoken == [] and vm.port.resched_ipis == []
    assert vm.guest.stats.delayed_wakes == 0


# ---------------------------------------------------------------------- enable / disable


def test_cpu_init_sets_range_then_enables() -> None:
    """kvm_async_pf_enable(true): BIT(62)|(max offset + 4096), then BIT(63)|ENABLED."""
    vm = make_vm(boot=False)
    assert vm.guest.kvm_async_pf_cpu_init(feature_available=True)
    assert vm.port.smccc_calls == [
        (0, APF_FUNC_SET_RANGE | (0x1000 + 4096)),
        (0, APF_FUNC_UPDATE_ENABLE | KVM_ASYNC_PF_ENABLED),
    ]
    assert vm.guest.apf_data[0].enabled == 1 and vm.guest.apf_data[1].enabled == 0
    arch = vm.host.arch[0]
    assert arch.enabled and arch.send_user_only
    assert arch.no_fault_inst_range == 0x2000


@pytest.mark.parametrize(
    ("feature", "available"), [(True, False), (False, True)], ids=["no-kvmapf", "no-feature"]
)
def test_cpu_init_without_feature_or_with_no_kvmapf_enables_nothing(
    feature: bool, available: bool
) -> None:
    """kvm_async_pf_cpu_init returns -EPERM before any SMCCC call."""
    vm = make_vm(boot=False, async_pf_available=available)
    assert not vm.guest.kvm_async_pf_cpu_init(feature_available=feature)
    assert vm.port.smccc_calls == []
    assert all(d.enabled == 0 for d in vm.guest.apf_data)
    assert not any(a.enabled for a in vm.host.arch)


def test_boot_with_no_kvmapf_leaves_every_cpu_disabled() -> None:
    """`no-kvmapf`: boot() does not run the online callbacks either."""
    vm = make_vm(boot=False, async_pf_available=False)
    vm.guest.boot()
    assert vm.port.smccc_calls == []
    assert not any(a.enabled for a in vm.host.arch)


def test_enable_when_already_enabled_is_a_noop() -> None:
    """``if (enable == enabled) return;``: no SMCCC call at all."""
    vm = make_vm()
    vm.guest.kvm_async_pf_cpu_online(0)
    vm.guest.kvm_async_pf_enable(1, True)
    assert vm.port.smccc_calls == []


def test_enable_aborts_when_set_range_fails() -> None:
    """Patch: "Async PF configuration error": the enable call is not made."""
    vm = make_vm(boot=False)
    vm.port.smccc_results = [SMCCC_RET_NOT_SUPPORTED]
    vm.guest.kvm_async_pf_enable(0, True)
    assert len(vm.port.smccc_calls) == 1
    assert vm.guest.apf_data[0].enabled == 0


def test_enable_failure_rolls_back_enabled_flag() -> None:
    """Patch: "Async PF enable error": ``kvm_async_pf_write_enabled(0)`` after the failed call."""
    vm = make_vm(boot=False)
    vm.port.smccc_results = [SMCCC_RET_SUCCESS, SMCCC_RET_NOT_SUPPORTED]
    vm.guest.kvm_async_pf_enable(0, True)
    assert len(vm.port.smccc_calls) == 2
    assert vm.guest.apf_data[0].enabled == 0


def test_disable_failure_keeps_enabled_flag() -> None:
    """Patch: "Async PF disable error": ``enabled`` is written 0 only on success."""
    vm = make_vm()
    vm.port.smccc_results = [SMCCC_RET_NOT_SUPPORTED]
    vm.guest.kvm_async_pf_cpu_offline(0)
    assert vm.guest.apf_data[0].enabled == 1


def test_cpu_offline_disables_and_wakes_nobody_seed_weakness() -> None:
    """kvm_async_pf_cpu_offline only disables: the sleeper's page-ready is dropped by the
    host (kvm_clear_async_pf_completion_queue) and nothing wakes it (x86 wakes all)."""
    vm = make_vm()
    vm.port.current[1] = 42
    work, _ = vm.fault(1, gfn=0x900)
    vm.port.current[1] = 43
    vm.guest.kvm_async_pf_cpu_offline(1)
    assert vm.port.smccc_calls == [(1, APF_FUNC_UPDATE_ENABLE)]
    assert vm.guest.apf_data[1].enabled == 0 and not vm.host.arch[1].enabled
    assert vm.host.apf[1].queued == 0 and work.state is WorkState.CANCELLED
    assert not vm.host.worker_done(work)
    assert vm.deliver(1) == []
    [node] = vm.guest.sleepers(1)
    assert node.task == 42 and node.hashed
    assert vm.port.swoken == []
    assert not vm.guest.waiter_woken(1, 42)


def test_cpu_online_again_queues_wake_all_that_wakes_old_sleepers() -> None:
    """Re-enable: the host queues wakeup_all (token ~0); wake_all then wakes the sleeper."""
    vm = make_vm()
    vm.port.current[1] = 42
    vm.fault(1, gfn=0x900)
    vm.port.current[1] = 43
    vm.guest.kvm_async_pf_cpu_offline(1)
    vm.guest.kvm_async_pf_cpu_online(1)
    assert vm.guest.apf_data[1].enabled == 1
    [item] = vm.host.apf[1].done
    assert item.wakeup_all
    delivered = vm.host.run_loop_iteration(1, EL1_VIEW)
    assert delivered == [item]
    far = _far(vm.host.take_injection(1))
    assert far == WAKE_ALL_TOKEN
    assert vm.guest.do_async_pf(1, far, HANDLER_REGS) is AbortOutcome.WOKE
    assert vm.port.swoken == [42]
    assert vm.guest.sleepers(1) == [] and vm.guest.waiter_woken(1, 42)


def test_reboot_notifier_restart_disables_every_cpu() -> None:
    """kvm_async_pf_cpu_reboot_notify: ``SYS_RESTART`` → on_each_cpu(disable)."""
    vm = make_vm(n_cpus=3)
    vm.guest.kvm_async_pf_cpu_reboot_notify(SYS_RESTART)
    assert vm.port.smccc_calls == [(cpu, APF_FUNC_UPDATE_ENABLE) for cpu in range(3)]
    assert all(d.enabled == 0 for d in vm.guest.apf_data)
    assert not any(a.enabled for a in vm.host.arch)


@pytest.mark.parametrize("code", [0x0002, 0x0003], ids=["SYS_HALT", "SYS_POWER_OFF"])
def test_reboot_notifier_other_codes_do_nothing(code: int) -> None:
    """Only SYS_RESTART disables; halt and power-off leave APF enabled."""
    vm = make_vm()
    vm.guest.kvm_async_pf_cpu_reboot_notify(code)
    assert vm.port.smccc_calls == []
    assert all(d.enabled == 1 for d in vm.guest.apf_data)
