"""Invariant checks during a simulation run, where the kernel would assert.

:class:`RunChecker` is the simulator's :class:`~apfsim.ports.Checker`: it keeps the last
protocol events for the report, runs :mod:`apfsim.invariants` at every fault, entry,
completion and APF handler, and stops the run with :class:`InvariantViolation` (time, seed,
the invariant, its meaning and the recent events).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

from apfsim.guest.sched import Task, TaskState
from apfsim.host.vcpu import VcpuMode
from apfsim.invariants import INVARIANTS, SleepLedger, check_guest, check_vcpu
from apfsim.ports import Broken, Clock, GuestProtocol, HostProtocol

if TYPE_CHECKING:
    from apfsim.host.vcpu import Vcpu

__all__ = ["RECENT_EVENTS", "InvariantViolation", "RunChecker"]

RECENT_EVENTS = 16

_DONE, _SLEEPING, _HALTED = TaskState.DONE, TaskState.SLEEPING_APF, TaskState.HALTED_APF
_BLOCKED, _GUEST = VcpuMode.BLOCKED, VcpuMode.GUEST


# An exception: a Python class even in the compiled build (mypyc compiles no subclass of a
# built-in exception as a native class).
@mypyc_attr(native_class=False)
class InvariantViolation(RuntimeError):
    """A protocol invariant broke during a run; the message is the full report.

    ``partial`` holds the results of the protocols that finished before it (api.run)."""

    partial: Any = None


class RunChecker:
    """The invariants of one run, with the last :data:`RECENT_EVENTS` protocol events."""

    def __init__(
        self,
        clock: Clock,
        host: HostProtocol,
        guest: GuestProtocol,
        tasks: Sequence[Task],
        protocol: str,
        seed: int,
    ) -> None:
        self.engine = clock
        self.host = host
        self.guest = guest
        self.tasks = tasks
        self.protocol = protocol
        self.seed = seed
        self.vcpus: Sequence[Vcpu] = ()
        self.recent: deque[tuple[int, int, Any, int, Any]] = deque(maxlen=RECENT_EVENTS)
        self._apf_changed: set[int] = set()  # vCPUs with an APF event since their last check
        # I6's bookkeeping: the driver reports its sleep records to the ledger; the run loop
        # reports tasks going to sleep and vCPUs blocking in a halt (what makes a task wait).
        self.ledger = SleepLedger()
        for scope, task, token, dummy in guest.wait_nodes():
            self.ledger.node_added(scope, task, token, dummy)
        guest.sleep_log = self.ledger
        self._by_tid = {t.tid: t for t in tasks}
        self._on_cpu: list[list[Task]] = []
        self._slept: set[int] = set()
        self._halted: set[int] = set()
        self._done_prefix = 0  # tasks[:_done_prefix] are DONE (a task never leaves DONE)

    def note(self, vcpu: int, what: Any, value: int, key: Any = None) -> None:
        """Remember a protocol event for the report of a later violation; a label from a
        table (``what[key]``) is looked up only if that report is written."""
        self.recent.append((self.engine.now, vcpu, what, value, key))
        self._apf_changed.add(vcpu)

    def attach(self, vcpus: Sequence[Vcpu]) -> None:
        self.vcpus = vcpus
        self._apf_changed = set(range(len(vcpus)))
        self._on_cpu = [[] for _ in vcpus]
        for task in self.tasks:  # the simulator pins each task to its CPU
            if 0 <= task.cpu < len(vcpus):
                self._on_cpu[task.cpu].append(task)

    def check_vcpu(self, vcpu: int, in_guest: bool) -> None:
        """The host invariants of ``vcpu`` (``in_guest``: it runs guest code)."""
        broken = check_vcpu(self.host, vcpu, in_guest)
        if broken is not None:
            self._raise_if(broken)

    def check_entry(self, vcpu: int) -> None:
        """At an entry, the host invariants of ``vcpu`` only if an APF event happened since
        its last entry check (ticks and minor faults change no APF state)."""
        changed = self._apf_changed
        if vcpu in changed:
            changed.discard(vcpu)
            broken = check_vcpu(self.host, vcpu, self.vcpus[vcpu].mode == _GUEST)
            if broken is not None:
                self._raise_if(broken)

    def check_worker(self, vcpu: int, in_guest: bool) -> None:
        """After ``async_pf_execute``: the kick (I9) now; the lists at the vCPU's next entry."""
        broken = self.host.check_arch(vcpu, in_guest)
        if broken is not None:
            self._raise_if(broken)

    def check_guest(self) -> None:
        """I6 at an APF handler: the full walk (:meth:`check_guest_scan`) runs only when
        :meth:`guest_suspect`, at the cost of what changed since the last check, finds that
        I6 may be broken (the walk then gives the report)."""
        if self.guest_suspect():
            self._raise_if(self.check_guest_scan())

    def check_guest_scan(self) -> Broken:
        """I6 by walking every task and every sleep record (:func:`check_guest`): the
        reference that :meth:`guest_suspect` must agree with."""
        waiting = []
        all_done = True
        for t in self.tasks:
            state = t.state
            if state is not _DONE:
                all_done = False
                if state is _SLEEPING or (state is _HALTED and self._in_hlt(t.cpu)):
                    waiting.append((t.tid, t.cpu))
        return check_guest(self.guest, waiting, all_done)

    def guest_suspect(self) -> bool:
        """Whether :meth:`check_guest_scan` would report I6 broken, from the ledger's counts
        and the tasks that may have started to wait without a record since the last check:
        those that lost their last record (``hlist_del_init`` by ``apf_task_wake_one`` or
        its kin), went to sleep, or sit on a vCPU that blocked in a halt. Every other task
        kept what it had when the last check passed. Clears those sets when it says no."""
        ledger = self.ledger
        if ledger.shared_tokens or (ledger.dummies and self._all_done()):
            return True
        unlinked, slept, halted = ledger.unlinked, self._slept, self._halted
        if 0 < ledger.global_nodes < ledger.nodes:  # two scopes (no driver): the walk decides
            lost = self.check_guest_scan() is not None
        elif unlinked or slept or halted:
            lost = self._any_lost(unlinked, slept, halted)
        else:
            return False
        if lost:
            return True
        unlinked.clear()
        slept.clear()
        halted.clear()
        return False

    def _any_lost(self, unlinked: set[int], slept: set[int], halted: set[int]) -> bool:
        by_tid = self._by_tid
        for tid in unlinked:
            task = by_tid.get(tid)
            if task is not None and self._lost(task):
                return True
        for tid in slept:
            if self._lost(by_tid[tid]):
                return True
        for cpu in halted:
            for task in self._on_cpu[cpu]:
                if self._lost(task):
                    return True
        return False

    def _lost(self, task: Task) -> bool:
        """``task`` waits in I6's sense with no record its page-ready can find."""
        state = task.state
        if state is _SLEEPING or (state is _HALTED and self._in_hlt(task.cpu)):
            return not self.ledger.has_node(task.tid, task.cpu)
        return False

    def _all_done(self) -> bool:
        tasks = self.tasks
        i = self._done_prefix
        while i < len(tasks) and tasks[i].state is _DONE:
            i += 1
        self._done_prefix = i
        return i == len(tasks)

    def task_slept(self, task: int) -> None:
        self._slept.add(task)

    def vcpu_halted(self, vcpu: int) -> None:
        self._halted.add(vcpu)

    def _in_hlt(self, cpu: int) -> bool:
        """Whether the halted waiter on ``cpu`` sits in the HLT itself (its vCPU blocked).

        The pre-5.8 halted wait (x86 ``kvm_async_pf_task_wait``, RFCv2 ``kvm_async_pf_wait``)
        tests ``hlist_unhashed(&n.link)`` before every ``native_safe_halt()`` / ``wfi()``,
        and any interrupt or exception ends the halt. Out of the HLT (running the page-ready
        handler on top of the loop, or about to enter after the self-IPI's trap) a waiter
        whose node is gone was woken: it leaves the loop at its next test. Only in the HLT
        does it need a node its page-ready can find (I6); a wake that unhashes it there
        sends ``smp_send_reschedule(n->cpu)``, which unblocks the vCPU."""
        if cpu >= len(self.vcpus):
            return True
        vcpu = self.vcpus[cpu]
        return vcpu.mode == _BLOCKED and vcpu.block_halt

    def _raise_if(self, broken: Broken) -> None:
        if broken is None:
            return
        name, detail = broken
        lines = [
            f"{self.protocol}: invariant {name} broken at {self.engine.now / 1e6:.6f} ms "
            f"(seed {self.seed}): {detail}",
            f"  {name}: {INVARIANTS.get(name.split()[0], '')}",
            "  last events:",
        ]
        for t, vcpu, what, value, key in self.recent:
            label = what if key is None else what[key]
            lines.append(f"    {t / 1e6:12.6f} ms  vCPU{vcpu}  {label} {value:#x}")
        raise InvariantViolation("\n".join(lines))
