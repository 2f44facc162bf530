"""I6 from bookkeeping (``RunChecker.guest_suspect``) against I6 from the walk.

The simulator's checker no longer walks every task and every sleep record at each APF
handler: the guest driver reports each record it links and unlinks (``hlist_add_head`` /
``hlist_del_init``, s390 ``list_add`` / ``list_del``) to a :class:`SleepLedger`, the run loop
reports tasks going to sleep and vCPUs blocking in a halt, and only the tasks those touched
are looked at. The walk (``check_guest_scan``, :func:`apfsim.invariants.check_guest`) stays as
the reference. These tests hold the two to the same verdict at every check point:

* in runs of every protocol, user-mode and atomic kernel-mode faults (halted waits), where
  the ledger's counts must also equal the walk's;
* in runs with a seeded I6 bug (a wake that unlinks without waking, a second record for
  one token, a halted waiter that halts again with its record gone): both must see it, at
  the same check point, with the walk's report;
* on random sequences of record, task and vCPU changes (hypothesis), which reach the cases
  a run rarely does: dummies left once every task is done, records in two scopes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import apfsim
from apfsim.abi.x86 import WAKE_ALL_TOKEN
from apfsim.check.mutants import MUTANTS
from apfsim.checking import InvariantViolation, RunChecker
from apfsim.guest.kvm_apf_arm64 import Arm64ApfGuest
from apfsim.guest.kvm_apf_x86 import X86ApfGuest, X86SleepNode
from apfsim.guest.kvm_apf_x86_legacy import X86LegacyApfGuest
from apfsim.guest.kvm_pfault_s390 import S390PfaultGuest
from apfsim.guest.sched import Task, TaskState
from apfsim.host.async_pf import AsyncPf, WorkState
from apfsim.host.vcpu import VcpuMode
from apfsim.invariants import SleepLedger, _core, _queue_scan
from apfsim.protocols.arm64_sdei_ppi import Arm64SdeiPpiGuest
from apfsim.registry import PROTOCOLS
from apfsim.simulation import Simulation

ARCH = {"x86": "x86", "x86-legacy": "x86", "guest-initiated": "x86", "s390-pfault": "s390"}


def scenario(arch: str, vcpus: int, kernel_mode: str | None, fast: bool) -> apfsim.Scenario:
    """Writers faulting on a half-swapped buffer and compute tasks, ``vcpus`` of each;
    with ``kernel_mode`` a third of the writers' accesses are made in that mode. A ``fast``
    swap device (a few µs) lets page-readies race their waits (dummy nodes, early wakes)."""
    swap = {"distribution": "exponential", "mean_us": 3.0, "transfer_ns_per_page": 0}
    return apfsim.Scenario.model_validate(
        {
            "name": "ledger",
            "duration_s": 1.0,
            "guest": {"arch": arch, "vcpus": vcpus, "memory_mib": 96, "reserved_mib": 8},
            "host": {"memory_limit_mib": 48, **({"swap": swap} if fast else {})},
            "initial_memory": {"resident_fraction": 0.5, "swapped_fraction": 0.5},
            "tasks": [
                {
                    "kind": "random_writer",
                    "count": vcpus,
                    "buffer_mib": 80,
                    "kernel_fraction": 0.0 if kernel_mode is None else 0.3,
                    "kernel_mode": kernel_mode or "kernel",
                },
                {"kind": "compute", "count": vcpus},
            ],
        }
    )


class Tally:
    """What the cross-checked check points saw."""

    def __init__(self) -> None:
        self.points = 0
        self.waiting = 0  # points with a task asleep or halted in its HLT
        self.broken: list[str] = []


@contextmanager
def cross_checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tally]:
    """Every ``RunChecker.check_guest`` also walks, and compares verdicts and counts."""
    tally = Tally()

    def check_guest(self: RunChecker) -> None:
        suspect = self.guest_suspect()
        broken = self.check_guest_scan()
        assert suspect == (broken is not None), (self.engine.now, broken)
        assert_ledger_counts(self)
        tally.points += 1
        tally.waiting += any(
            t.state is TaskState.SLEEPING_APF
            or (t.state is TaskState.HALTED_APF and self._in_hlt(t.cpu))
            for t in self.tasks
        )
        if broken is not None:
            tally.broken.append(broken[1])
        self._raise_if(broken)

    monkeypatch.setattr(RunChecker, "check_guest", check_guest)
    yield tally


def assert_ledger_counts(checker: RunChecker) -> None:
    """The ledger's counts equal those of the driver's records, walked."""
    nodes = checker.guest.wait_nodes()
    ledger = checker.ledger
    tokens = Counter((scope, token) for scope, _, token, _ in nodes)
    real = Counter((scope, task) for scope, task, _, dummy in nodes if not dummy)
    assert ledger.nodes == len(nodes)
    assert ledger.global_nodes == sum(scope < 0 for scope, _, _, _ in nodes)
    assert ledger.dummies == sum(dummy for _, _, _, dummy in nodes)
    assert ledger.shared_tokens == sum(n > 1 for n in tokens.values())
    assert ledger._per_task == dict(real)


def run(
    protocol: str, vcpus: int, kernel_mode: str | None, seed: int, s: float, fast: bool = False
) -> Simulation:
    arch = ARCH.get(protocol, "arm64")
    sim = Simulation(scenario(arch, vcpus, kernel_mode, fast), protocol, seed)
    sim.run(s)
    return sim


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
# Atomic kernel-mode faults (the early wakes' path) in the full tier; user mode in both.
@pytest.mark.parametrize(
    "kernel_mode", [None, pytest.param("kernel_atomic", marks=pytest.mark.slow)]
)
def test_the_ledger_agrees_with_the_walk_in_every_protocol(
    monkeypatch: pytest.MonkeyPatch, protocol: str, kernel_mode: str | None
) -> None:
    with cross_checked(monkeypatch) as tally:
        for seed, vcpus, fast in ((1, 1, False), (2, 3, False), (3, 2, True)):
            # A violation (the seed's own design bugs) ends a run; its point was compared.
            with suppress(InvariantViolation):
                run(protocol, vcpus, kernel_mode, seed, 0.03 if fast else 0.15, fast)
    if protocol not in ("sync", "halt-only", "memory-fault-exit"):  # no guest driver: no waits
        assert tally.points > 50 and tally.waiting > 0


def _mutants() -> list[Any]:
    return [
        pytest.param(name, protocol, id=f"{name}-{protocol}")
        for name, m in MUTANTS.items()
        for protocol in (m.protocol, *m.also)
    ]


@pytest.mark.parametrize(("mutant", "protocol"), _mutants())
def test_the_ledger_agrees_with_the_walk_under_every_mutant(
    monkeypatch: pytest.MonkeyPatch, mutant: str, protocol: str
) -> None:
    """The checker's mutants (none of which breaks I6 itself) run in the simulator."""
    with cross_checked(monkeypatch) as tally:
        sim = Simulation(scenario(ARCH.get(protocol, "arm64"), 2, None, True), protocol, 4)
        sim.host_protocol.mutant = sim.guest_protocol.mutant = mutant
        with suppress(InvariantViolation):
            sim.run(0.02)
    assert tally.points > 0


# -- seeded I6 bugs ------------------------------------------------------------------------


def x86_wake_without_waking(self: X86ApfGuest, bucket: list[X86SleepNode], node: Any) -> None:
    self._hlist_del_init(bucket, node)  # the node goes, the swake_up_one does not


def x86_two_nodes(self: X86ApfGuest, cpu: int, token: int, halted: bool = False) -> bool:
    bucket = self._bucket(token)
    for _ in range(2):
        self._hlist_add_head(bucket, X86SleepNode(token, cpu, self.port.current_task(cpu)))
    return True


def arm64_wake_without_waking(self: Arm64ApfGuest, cpu: int, node: Any) -> None:
    self._hlist_del(cpu, node)


def sdei_wake_without_waking(self: Arm64SdeiPpiGuest, cpu: int, token: int) -> None:
    task = self.waiting[cpu].pop(token)
    if self.sleep_log is not None:
        self.sleep_log.node_removed(cpu, task, token, False)


SEEDED: dict[str, tuple[str, type, str, Callable[..., Any], str | None, int]] = {
    "x86-lost-wake": (
        "x86",
        X86ApfGuest,
        "apf_task_wake_one",
        x86_wake_without_waking,
        None,
        2,
    ),
    "x86-two-nodes": ("x86", X86ApfGuest, "kvm_async_pf_queue_task", x86_two_nodes, None, 1),
    "arm64-lost-wake": (
        "arm64-rfcv2",
        Arm64ApfGuest,
        "kvm_async_pf_wake_one",
        arm64_wake_without_waking,
        None,
        2,
    ),
    "sdei-lost-wake": (
        "arm64-sdei-ppi",
        Arm64SdeiPpiGuest,
        "_wake",
        sdei_wake_without_waking,
        None,
        2,
    ),
}


@pytest.mark.parametrize("name", list(SEEDED))
def test_a_seeded_i6_bug_is_seen_by_both_at_the_same_check(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    protocol, cls, method, bug, kernel_mode, vcpus = SEEDED[name]
    monkeypatch.setattr(cls, method, bug)
    with cross_checked(monkeypatch) as tally, pytest.raises(InvariantViolation) as err:
        run(protocol, vcpus, kernel_mode, 1, 0.5)
    assert tally.broken and "invariant I6 broken" in str(err.value)
    assert tally.broken[-1] in str(err.value)


def test_s390_done_without_waking_is_seen_by_both(monkeypatch: pytest.MonkeyPatch) -> None:
    def done(self: S390PfaultGuest, task: int) -> Any:
        from apfsim.ports import AbortOutcome

        if self.pfault_wait.get(task, 0) == 1:
            self._set_wait(task, 0)
            self._list_del(task)  # off the list, never woken
        return AbortOutcome.WOKE

    monkeypatch.setattr(S390PfaultGuest, "pfault_done", done)
    with cross_checked(monkeypatch) as tally, pytest.raises(InvariantViolation) as err:
        run("s390-pfault", 2, None, 1, 0.5)
    assert tally.broken and "invariant I6 broken" in str(err.value)


def test_a_halted_waiter_back_in_its_hlt_without_a_node_is_seen_by_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vCPU-halt report: x86-legacy whose halt loop misses the unhash once."""
    stale: set[int] = set()
    real_wake = X86LegacyApfGuest.apf_task_wake_one

    def wake_one(self: X86LegacyApfGuest, bucket: list[X86SleepNode], node: Any) -> None:
        if node.halted and not node.dummy:
            stale.add(node.task)
        real_wake(self, bucket, node)

    def waiter_woken(self: X86LegacyApfGuest, cpu: int, task: int) -> bool:
        if task in stale:
            stale.discard(task)
            return False  # a stale "still hashed": one more HLT, with no node
        return X86ApfGuest.waiter_woken(self, cpu, task)

    monkeypatch.setattr(X86LegacyApfGuest, "apf_task_wake_one", wake_one)
    monkeypatch.setattr(X86LegacyApfGuest, "waiter_woken", waiter_woken)
    with cross_checked(monkeypatch) as tally, pytest.raises(InvariantViolation) as err:
        run("x86-legacy", 3, "kernel_atomic", 2, 1.0)
    assert tally.broken and "lost wake-up" in str(err.value)


# -- random changes --------------------------------------------------------------------------


class FakeGuest:
    """A driver's sleep records as a plain list, reported to its ``sleep_log``."""

    mutant: str | None = None
    sleep_log: Any = None

    def __init__(self) -> None:
        self.records: list[tuple[int, int, int, bool]] = []

    def wait_nodes(self) -> list[tuple[int, int, int, bool]]:
        return list(self.records)

    def add(self, record: tuple[int, int, int, bool]) -> None:
        self.records.insert(0, record)
        self.sleep_log.node_added(*record)

    def remove(self, index: int) -> None:
        record = self.records.pop(index % len(self.records))
        self.sleep_log.node_removed(*record)


class FakeVcpu:
    def __init__(self) -> None:
        self.mode = VcpuMode.GUEST
        self.block_halt = False


class Clock:
    now = 0


N_CPUS, N_TASKS = 2, 3
STATES = [TaskState.RUNNABLE, TaskState.SLEEPING_APF, TaskState.HALTED_APF, TaskState.DONE]
op = st.one_of(
    st.tuples(
        st.just("add"),
        st.sampled_from([-1, 0, 1]),
        st.integers(-1, N_TASKS - 1),
        st.integers(1, 3),
        st.booleans(),
    ),
    st.tuples(st.just("remove"), st.integers(0, 3)),
    st.tuples(st.just("state"), st.integers(0, N_TASKS - 1), st.sampled_from(STATES)),
    st.tuples(st.just("block"), st.integers(0, N_CPUS - 1), st.booleans()),
    st.tuples(st.just("unblock"), st.integers(0, N_CPUS - 1)),
    st.tuples(st.just("check")),
    st.tuples(st.just("check")),
)


@settings(max_examples=400, deadline=None)
@given(st.booleans(), st.lists(op, max_size=60))
def test_random_changes_get_the_walks_verdict(per_cpu: bool, ops: list[tuple[Any, ...]]) -> None:
    """Tasks pinned, DONE final, a task's state changed only while its vCPU runs (a sleeper
    is woken from anywhere), scopes all global or all per CPU unless a record says -1 on
    a per-CPU driver (the "two scopes" case)."""
    guest = FakeGuest()
    tasks = [Task(t, f"t{t}", t % N_CPUS) for t in range(N_TASKS)]
    checker = RunChecker(Clock(), None, guest, tasks, "fake", 0)  # type: ignore[arg-type]
    vcpus = [FakeVcpu() for _ in range(N_CPUS)]
    checker.attach(vcpus)  # type: ignore[arg-type]
    verdicts = 0
    for kind, *args in [*ops, ("check",)]:
        if kind == "add":
            scope, task, token, dummy = args
            if scope >= 0 and not per_cpu:
                scope = -1
            elif scope < 0 and per_cpu and token != 3:
                scope = 0
            guest.add((scope, task, token, dummy))
        elif kind == "remove" and guest.records:
            guest.remove(args[0])
        elif kind == "state":
            task = tasks[args[0]]
            state = args[1]
            running = vcpus[task.cpu].mode == VcpuMode.GUEST
            if task.state is TaskState.DONE or not (
                running or (task.state is TaskState.SLEEPING_APF and state is TaskState.RUNNABLE)
            ):
                continue
            task.state = state
            if state is TaskState.SLEEPING_APF:
                checker.task_slept(task.tid)
        elif kind == "block":
            vcpu = vcpus[args[0]]
            vcpu.mode, vcpu.block_halt = VcpuMode.BLOCKED, args[1]
            if args[1]:
                checker.vcpu_halted(args[0])
        elif kind == "unblock":
            vcpus[args[0]].mode = VcpuMode.GUEST
        elif kind == "check":
            suspect = checker.guest_suspect()
            broken = checker.check_guest_scan()
            assert suspect == (broken is not None), broken
            assert_ledger_counts(checker)
            verdicts += 1
    assert verdicts >= 1


def test_a_task_that_sleeps_after_its_wake_is_seen_by_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sleep report: the return to user misses that the PPI handler already cleared
    the task's flag (the page-ready came first), so it sleeps with no tag left."""
    monkeypatch.setattr(Arm64SdeiPpiGuest, "waiter_woken", lambda self, cpu, task: False)
    with cross_checked(monkeypatch) as tally, pytest.raises(InvariantViolation) as err:
        run("arm64-sdei-ppi", 4, None, 1, 0.2, fast=True)
    assert tally.broken and "lost wake-up" in str(err.value)


def test_an_sdei_tag_overwritten_for_its_token_is_one_record() -> None:
    """``TIF_ASYNC_PF`` tags per token: a second tag replaces the first (what the ledger
    must count as one record unlinked and one linked)."""

    class Port:
        def smp_send_reschedule(self, cpu: int) -> None:
            pass

        def smccc(self, cpu: int, func: int, arg: int) -> int:
            return 0

    guest = Arm64SdeiPpiGuest(port=Port(), n_cpus=1)  # type: ignore[arg-type]
    ledger = guest.sleep_log = SleepLedger()
    guest._tag(0, 7, 1)
    guest._tag(0, 7, 2)
    assert guest.wait_nodes() == [(0, 2, 7, False)]
    assert ledger.nodes == 1 and ledger.has_node(2, 0) and not ledger.has_node(1, 0)
    assert ledger.unlinked == {1}


# -- I1/I2 on a one-item queue -----------------------------------------------------------------

HOSTS = ["x86", "x86-legacy", "arm64-rfcv2", "arm64-sdei-ppi", "s390-pfault", "guest-initiated"]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(HOSTS),
    st.sampled_from(list(WorkState)),
    st.sampled_from([0, 5, 0xFFFF_FFFF, WAKE_ALL_TOKEN]),
    st.booleans(),
    st.sampled_from([3, 7]),
    st.sets(st.sampled_from([3, 7, 11])),
    st.booleans(),
)
def test_the_one_item_path_of_the_lists_check_gets_the_scans_verdict(
    protocol: str,
    state: WorkState,
    token: int,
    wakeup_all: bool,
    gfn: int,
    hashed: set[int],
    enabled: bool,
) -> None:
    """``_core``'s shortcut for a queue of one item against its item-by-item scan."""
    host: Any = _hosts()[protocol]
    apf, arch = host.apf[0], host.arch[0]
    apf.queue[:] = [AsyncPf(0, gfn, token, wakeup_all=wakeup_all, state=state)]
    apf.done.clear()
    apf.queued = 1
    arch.gfns.reset()
    for g in sorted(hashed):
        arch.gfns.add(g)
    host.apf_on = lambda v: enabled  # the gate of the gfn check, either way
    assert _core(host, 0) == _queue_scan(host, 0, apf.queue, arch.gfns)


_HOSTS: dict[str, Any] = {}


def _hosts() -> dict[str, Any]:
    if not _HOSTS:
        for protocol in HOSTS:
            sim = Simulation(scenario(ARCH.get(protocol, "arm64"), 1, None, False), protocol, 1)
            _HOSTS[protocol] = sim.host_protocol
    return _HOSTS
