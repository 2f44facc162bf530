"""The guest kernel around its CPUs: the services a guest driver calls, and its exits.

:class:`GuestCalls` turns the drivers' paravirt calls (SMCCC, WRMSR, hypercall) into one
``_guest_call``; the simulator (:class:`SimKernel`) and the model checker each say what an
exit costs. :class:`SimKernel` is the simulator's :class:`~apfsim.ports.KernelPort` and
:class:`~apfsim.ports.GuestServices`: ``current``, ``try_to_wake_up`` through the task's CPU,
reschedule IPIs (the sender traps on its ICR / ICC_SGI1R_EL1 write), ``GFP_ATOMIC``
allocation, and the driver call site (which CPU executes the driver).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from mypy_extensions import mypyc_attr

from apfsim.abi.arm64 import ARM_SMCCC_KVM_FUNC_APF
from apfsim.guest.sched import Task
from apfsim.ports import GuestCallKind, HostProtocol, RunCounters
from apfsim.workloads.base import Workload

if TYPE_CHECKING:
    from apfsim.guest.cpu import GuestCpu
    from apfsim.host.memory import GuestMemory
    from apfsim.host.vcpu import Vcpu

__all__ = ["GuestCalls", "SimKernel"]

R = TypeVar("R")


# Subclassed by interpreted code (tracing, the model checker) in the compiled build.
@mypyc_attr(allow_interpreted_subclasses=True)
class GuestCalls:
    """The guest drivers' exits to the host (SMCCC, WRMSR, hypercall), all through one
    ``_guest_call``; the simulator and the model checker each say what an exit costs."""

    def _guest_call(self, cpu: int, call: int, val: int) -> int:
        raise NotImplementedError

    def smccc_apf(self, cpu: int, val: int) -> int:
        return self._guest_call(cpu, ARM_SMCCC_KVM_FUNC_APF, val)

    def wrmsr(self, cpu: int, msr: int, val: int) -> None:
        self._guest_call(cpu, msr, val)

    def smccc(self, cpu: int, function: int, val: int) -> int:
        return self._guest_call(cpu, function, val)

    def hypercall(self, cpu: int, nr: int, arg: int) -> int:
        return self._guest_call(cpu, nr, arg)


class SimKernel(GuestCalls):
    """The simulated guest kernel's services, over its CPUs, tasks and workloads.

    ``host``, ``cpus`` and ``vcpus`` are wired by the simulation once they exist.
    """

    def __init__(
        self,
        memory: GuestMemory,
        tasks: list[Task],
        workloads: list[Workload],
        finite: Sequence[bool],
        counters: RunCounters,
        alloc_rng: np.random.Generator,
        alloc_fail_probability: float,
        ipi_send_ns: int,
        call_ns: dict[GuestCallKind, int],
    ) -> None:
        self.memory = memory
        self.tasks = tasks
        self.workloads = workloads
        self.counters = counters
        self.host: HostProtocol | None = None
        self.cpus: list[GuestCpu] = []
        self.vcpus: list[Vcpu] = []
        self.unfinished = sum(finite)
        self.started = False
        self._finite = finite
        self._alloc_rng = alloc_rng
        self._alloc_p = alloc_fail_probability
        self._ipi_send_ns = ipi_send_ns
        self._call_ns = call_ns
        self._running_cpu = -1

    # -- GuestServices (the guest CPUs' view) ---------------------------------------------------
    def workload_of(self, task: Task) -> Workload:
        return self.workloads[task.tid]

    def run_driver(self, cpu: int, fn: Callable[..., R], *args: Any) -> R:
        """Call into the guest driver with ``cpu`` as the executing CPU."""
        self._running_cpu = cpu
        try:
            return fn(*args)
        finally:
            self._running_cpu = -1

    def send_ipi(self, cpu: int, sender: int) -> None:
        """A reschedule IPI: the sender traps on its ICR / ICC_SGI1R_EL1 write, then the
        target takes the interrupt (a running target is kicked out to take it)."""
        self.counters.ipis += 1
        self._trap(sender, self._ipi_send_ns)
        self.vcpus[cpu].on_ipi()

    def task_finished(self, task: Task) -> None:
        if self._finite[task.tid]:
            self.unfinished -= 1

    # -- KernelPort (the guest driver's view) -----------------------------------------------------
    def current_task(self, cpu: int) -> int:
        current = self.cpus[cpu].current
        return -1 if current is None else current.tid

    def rq_is_locked(self, cpu: int) -> bool:
        return self.cpus[cpu].context().rq_locked

    def swake_up_one(self, task: int) -> None:
        t = self.tasks[task]
        if not self.cpus[t.cpu].try_to_wake_up(t, self._running_cpu):
            self.counters.wake_of_non_sleeper += 1

    def smp_send_reschedule(self, cpu: int) -> None:
        self.cpus[cpu].need_resched = True
        if cpu != self._running_cpu:
            self.send_ipi(cpu, self._running_cpu)
        elif self.started:
            # A self-IPI still goes through the interrupt controller: the write traps, and
            # the IPI is pending at the next entry.
            self.counters.ipis += 1
            self.cpus[cpu].ipi_pending = True
            self._trap(cpu, self._ipi_send_ns)

    def kzalloc_atomic(self, cpu: int) -> bool:
        p = self._alloc_p
        return p == 0.0 or bool(self._alloc_rng.random() >= p)

    def _trap(self, cpu: int, handling_ns: int) -> None:
        """A guest instruction on a running CPU that exits; the exit happens when the
        handler frame executing it ends. Nothing is charged at boot or from host context."""
        if cpu >= 0 and self._running_cpu >= 0 and self.started:
            guest = self.cpus[cpu]
            guest.pending_exits += 1
            guest.pending_exit_ns += handling_ns

    def _guest_call(self, cpu: int, call: int, val: int) -> int:
        """A guest exit (SMCCC, WRMSR): applied now; a running CPU pays the round trip."""
        assert self.host is not None
        self._trap(cpu, self._call_ns[self.host.call_kind(call)])
        return self.host.guest_call(cpu, call, val)
