"""One guest CPU on the engine's clock: the run loop's decisions (:mod:`apfsim.runloop`) in time.

The CPU runs either a *task segment* (the current task's planned run up to its next miss)
or the top *frame* (kernel code of fixed cost in one context). An exit can land anywhere: a
frame keeps its remaining time, a task segment commits what it ran. The host reads
:meth:`GuestCpu.context` at every exit, so an injection can land in the vector table, in
``__schedule``, or in the sleeper's own context between ``kvm_async_pf_wait`` clearing
``reason`` and ``schedule()``, as on real hardware. What happens at a frame's end and what
runs next are decided by :mod:`apfsim.runloop`, which the model checker drives too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apfsim.runloop as runloop
from apfsim.engine import EventHandle
from apfsim.guest.context import CONTEXT_OF_MODE, Contexts, GuestContext
from apfsim.guest.sched import CfsParams, CfsRq, Task, TaskState
from apfsim.host.memory import PageState
from apfsim.metrics.accumulators import TimeCategory
from apfsim.ports import (
    AbortOutcome,
    Checker,
    Clock,
    GuestProtocol,
    GuestServices,
    Injection,
    Probe,
    RunCounters,
    VcpuSide,
)
from apfsim.runloop import CpuState, FrameCosts, Next, RunLoopRules
from apfsim.workloads.base import Plan, StopKind, Workload

__all__ = ["GuestCpu", "GuestParams"]

_NONE, _TASK, _FRAME = 0, 1, 2
_MAPPED = int(PageState.MAPPED)
# NOTE: enum members as module constants, for performance (read at every segment).
_N_FRAME, _N_TASK, _N_WFI_HALT, _N_WFI_IDLE = Next.FRAME, Next.TASK, Next.WFI_HALT, Next.WFI_IDLE
_CAT_TASK, _CAT_GUEST_KERNEL = TimeCategory.TASK, TimeCategory.GUEST_KERNEL
_STOP_MISS, _STOP_DONE = StopKind.MISS, StopKind.DONE


@dataclass(frozen=True, slots=True)
class GuestParams:
    """The guest's costs and configuration a CPU needs (``[guest]`` of a scenario)."""

    costs: FrameCosts
    full_preempt: bool
    steal_time_accounting: bool
    contexts: Contexts

    @classmethod
    def of(cls, guest: Any) -> GuestParams:
        """From a scenario's ``guest`` section."""
        c = guest.costs
        costs = FrameCosts(
            c.vector_ns,
            c.kernel_entry_ns,
            c.apf_handler_ns,
            c.apf_wait_tail_ns,
            c.tick_handler_ns,
            c.ipi_handler_ns,
            c.context_switch_ns,
        )
        contexts = Contexts(guest.vector_pc_offset, guest.kernel_entry_pc_offset)
        return cls(costs, guest.preempt == "full", guest.steal_time_accounting, contexts)

    def rules(self, arch: str) -> RunLoopRules:
        """The run loop's rules for a guest of ``arch``."""
        c = self.contexts
        return RunLoopRules.for_arch(arch, c.vector, c.entry, self.costs, self.full_preempt)


class GuestCpu(CpuState):
    """Guest CPU ``cpu``: runqueue, current task, kernel frames and pending interrupts."""

    def __init__(
        self,
        cpu: int,
        clock: Clock,
        vcpu: VcpuSide,
        driver: GuestProtocol,
        services: GuestServices,
        sched: CfsParams,
        rules: RunLoopRules,
        steal_time_accounting: bool,
        counters: RunCounters,
        checker: Checker | None = None,
    ) -> None:
        self.init_state(cpu)
        self.engine = clock
        self.vcpu = vcpu
        self.driver = driver
        self.services = services
        self.rules = rules
        self.counters = counters
        self.checker = checker
        self.rq: runloop.Runqueue = CfsRq(sched)
        self.stolen_ns = 0
        self._stolen_mark = 0
        self.probe: Probe | None = None
        self._exec_start = 0
        self._seg = _NONE
        self._seg_start = 0
        self._plan: Plan | None = None
        self._event: EventHandle | None = None
        self._ending = False  # in _on_frame_end's resume(): the next frame may run in place
        self._inline_end = -1  # the end of the frame _start_frame left to run in place
        self._steal = steal_time_accounting
        self._workloads = services.workloads
        # In-line minor faults (workloads.base.MinorFold): a plan takes them only if it ends,
        # or stops at a fault, before the next moment the run is observed (a multiple of
        # ``fold_period``, or ``fold_until``, the run's end; 0: never).
        self.folding = False  # the running task segment has faults in line
        self.fold_period = 0
        self.fold_until = 0

    # -- what the host sees --------------------------------------------------------------------
    def task_context(self, task: Task) -> GuestContext:
        # NOTE: the workloads list indexed directly, for performance (called at every exit).
        return CONTEXT_OF_MODE[self._workloads[task.tid].current_mode()]

    def context(self) -> GuestContext:
        """What the host reads at an exit (a method, not an alias of the function: a
        compiled class does not bind a plain function as a method)."""
        return runloop.context(self)

    # -- the dispatcher: the run loop's decision, put on the clock ---------------------------
    def resume(self) -> None:
        """Continue whatever the CPU should execute now (the vCPU is in guest mode)."""
        nxt = runloop.resume(self, self.rules, self)
        if nxt is _N_FRAME:
            self._start_frame()
        elif nxt is _N_TASK:
            self._start_task()
        elif nxt is _N_WFI_HALT:
            self.vcpu.wfi(halt=True)  # dsb(sy); wfi() in kvm_async_pf_wait
        elif nxt is _N_WFI_IDLE:
            self.vcpu.wfi(halt=False)
        else:
            self._exit_for_traps(None)

    def _exit_for_traps(self, ctx: GuestContext | None) -> None:
        """The code just run wrote an MSR / made a hypercall / sent an IPI: exits first."""
        exits, handling_ns = self.pending_exits, self.pending_exit_ns
        self.pending_exits = self.pending_exit_ns = 0
        self.vcpu.exit_for_guest_call(exits, handling_ns, ctx)

    def _start_task(self) -> None:
        curr = self.current
        assert curr is not None
        now = self.engine.now
        # NOTE: the workloads list indexed directly, for performance (every task segment).
        workload = self._workloads[curr.tid]
        if workload.fold is not None:
            workload.fold_budget_ns = self._fold_budget(now)
        plan = workload.plan(self.services.memory)
        self._plan = plan
        self.folding = plan.fold is not None
        self._seg = _TASK
        self._seg_start = now
        self.vcpu.clock.switch(_CAT_TASK, now)
        end = now + plan.run_ns
        if self._ending and self.engine.next_is(end):
            self._inline_end = end  # nothing can land in it: _continue runs its end
            return
        self._event = self.engine.after(plan.run_ns, self._on_task_stop)

    def _on_task_stop(self, _: object = None) -> None:
        if self._end_task():
            self._continue()

    def _end_task(self) -> bool:
        """The task segment's end: commit what it did; False if it faulted (the vCPU exits)."""
        services = self.services
        now = self.engine.now
        curr = self.current
        plan = self._plan
        assert curr is not None and plan is not None
        self._event = None
        self._seg = _NONE
        workload = self._workloads[curr.tid]  # NOTE: indexed directly, for performance
        complete = workload.commit(services.memory, now - self._seg_start)
        if plan.fold is not None:
            self.folding = False
            self._charge_folded(workload)
        if workload.finished or plan.kind is _STOP_DONE:
            self._task_exit(curr)
            return True
        if plan.kind is _STOP_MISS and complete and services.memory.state[plan.gfn] != _MAPPED:
            self.vcpu.stage2_fault(plan.gfn, CONTEXT_OF_MODE[plan.mode])
            return False
        return True

    def _start_frame(self) -> None:
        frame = self.frames[-1]
        now = self.engine.now
        self._seg = _FRAME
        self._seg_start = now
        self.vcpu.clock.switch(_CAT_GUEST_KERNEL, now)
        end = now + frame.remaining
        if self._ending and self.engine.next_is(end):
            self._inline_end = end  # nothing can land in it: _continue runs its end
            return
        self._event = self.engine.after(frame.remaining, self._on_frame_end)

    def _on_frame_end(self, _: object = None) -> None:
        if self._end_frame():
            self._continue()

    def _end_frame(self) -> bool:
        """The top frame's end (runloop.frame_end); False if its traps exit first."""
        frame = self.frames.pop()
        self._event = None
        self._seg = _NONE
        runloop.frame_end(self, self.rules, frame, self)
        if self.pending_exits:
            self._exit_for_traps(frame.ctx)
            return False
        runloop.take_interrupts(self, self.rules)
        return True

    def _continue(self) -> None:
        """Resume after a segment's end. While the next segment's end would be the next
        event anyway (a vector stub into ``kernel_entry`` into its handler, a task's burst
        between two misses, with no exit or interrupt due before: Engine.next_is), it runs
        here, in order, without a round trip through the heap."""
        while True:
            self._ending = True
            try:
                self.resume()
            finally:
                self._ending = False
            end = self._inline_end
            if end < 0:
                return
            self._inline_end = -1
            self.engine.advance_to(end)
            if not (self._end_frame() if self._seg == _FRAME else self._end_task()):
                return

    def interrupt(self, now: int) -> None:
        """An exit at ``now``: stop the running segment, keeping exactly what it did."""
        self.engine.cancel(self._event)
        self._event = None
        seg = self._seg
        curr = self.current
        if seg == _TASK and curr is not None:
            # NOTE: the workloads list indexed directly, for performance (every exit).
            workload = self._workloads[curr.tid]
            workload.commit(self.services.memory, now - self._seg_start)
            plan = self._plan
            assert plan is not None  # a task segment runs a plan
            if plan.fold is not None:
                self.folding = False
                self._charge_folded(workload)
        elif seg == _FRAME:
            self.frames[-1].remaining -= now - self._seg_start
        self._seg = _NONE

    # -- minor faults taken in line (workloads.base.MinorFold) ---------------------------------
    def _fold_budget(self, now: int) -> int:
        """How far ahead a plan may take faults in line: never while the vCPU has something
        for its next entry (``fold_ok``) or a probe watches every exit; else up to the next
        moment the run is observed."""
        period = self.fold_period
        if not period or self.probe is not None or not self.vcpu.fold_ok:
            return 0
        return max(0, min(self.fold_until, (now // period + 1) * period) - now)

    def _charge_folded(self, workload: Workload) -> None:
        """The in-line faults the last commit took: the vCPU's counters and host time."""
        if workload.folded:
            self.vcpu.charge_folded(workload.folded)
            workload.folded = 0

    def unfold(self, now: int) -> None:
        """Something reaches the vCPU during a segment with faults in line: from here on, run
        as if each fault had been its own exit. Inside a fault's round trip the vCPU is in
        the host: the segment ends at that fault, which the vCPU finishes as its own. Between
        faults it is in the guest: the segment now stops at the next fault, so the entry
        after that fault sees whatever just happened (a page-ready, a pending request)."""
        plan = self._plan
        curr = self.current
        assert plan is not None and plan.fold is not None and curr is not None
        run = plan.fold
        self.folding = False
        offset = now - self._seg_start
        # An event at the very time of a fault's boundary (its start, its re-entry, the
        # guest running again) comes first, as an event queued before the run began (a
        # tick) does in the heap: the guest has not yet stopped, or not yet run again.
        k = run.started(offset)
        workload = self._workloads[curr.tid]
        if k and offset <= int(run.starts[k - 1]) + run.round_trip_ns:
            start = int(run.starts[k - 1])
            self.engine.cancel(self._event)
            self._event = None
            self._seg = _NONE
            workload.commit(self.services.memory, start)
            self._charge_folded(workload)
            self.vcpu.fold_fault(int(run.gfns[k - 1]), self._seg_start + start)
            return
        if k < len(run.starts):
            stop = int(run.starts[k])
            self.engine.cancel(self._event)
            self._event = self.engine.at(self._seg_start + stop, self._on_task_stop)
            plan.run_ns, plan.kind, plan.gfn = stop, _STOP_MISS, int(run.gfns[k])
            workload.truncate_fold(k)

    def take_events(self, injections: list[Injection], lapic_enabled: bool) -> None:
        """At entry: exceptions are taken at once, interrupts once unmasked (an interrupt
        into a software-disabled LAPIC is lost)."""
        runloop.take_events(self, self.rules, injections, lapic_enabled)

    # -- runloop.Kernel: the run loop's needs, met with time ---------------------------------
    def call_driver(self, cpu: CpuState, fn: Callable[..., Any], *args: Any) -> Any:
        return self.services.run_driver(self.cpu, fn, *args)

    def runqueue(self, cpu: CpuState) -> runloop.Runqueue:
        return self.rq

    def update_curr(self, cpu: CpuState | None = None) -> None:
        """Charge the guest clock since the last update to ``curr`` (minus steal, if on)."""
        now = self.engine.now
        delta = now - self._exec_start
        self._exec_start = now
        if self._steal:
            delta -= self.stolen_ns - self._stolen_mark
            self._stolen_mark = self.stolen_ns
        self.rq.update_curr(delta)

    def picked(self, cpu: CpuState, nxt: Task | None) -> None:
        self._exec_start = self.engine.now
        self._stolen_mark = self.stolen_ns

    def context_switched(self, cpu: CpuState, nxt: Task | None) -> None:
        self.counters.context_switches += 1

    def send_ipi(self, cpu: int, sender: int) -> None:
        self.services.send_ipi(cpu, sender)

    def handled(
        self, cpu: CpuState, injection: Injection, interrupted: GuestContext, outcome: AbortOutcome
    ) -> None:
        if self.checker is not None:
            key = (injection.kind, outcome)
            self.checker.note(self.cpu, runloop.HANDLER_LABEL, injection.payload, key)
            self.checker.check_guest()

    def apf_waiting(self, cpu: CpuState, task: Task, token: int, halted: bool) -> None:
        if self.probe is not None:
            self.probe.apf_wait(task, self.cpu, token, halted)

    def apf_slept(self, cpu: CpuState, task: Task) -> None:
        self.counters.apf_sleeps += 1
        if self.checker is not None:
            self.checker.task_slept(task.tid)
        if self.probe is not None:
            self.probe.task_state(task)

    def task_woken(self, task: Task) -> None:
        if self.probe is not None:
            self.probe.task_woken(task)

    def task_state(self, task: Task) -> None:
        if self.probe is not None:
            self.probe.task_state(task)

    def bogus_abort(self, cpu: CpuState) -> None:
        self.counters.guest_bogus_aborts += 1

    # -- scheduling --------------------------------------------------------------------------------
    def schedule(self) -> None:
        runloop.schedule(self, self.rules, self)

    def _task_exit(self, task: Task) -> None:
        task.state = TaskState.DONE
        task.completion_ns = self.engine.now
        if self.probe is not None:
            self.probe.task_state(task)
        self.services.task_finished(task)
        self.schedule()

    def try_to_wake_up(self, task: Task, waker_cpu: int) -> bool:
        """Enqueue a sleeper on its CPU with sleeper credit; preempt per check_preempt_wakeup."""
        return runloop.try_to_wake_up(self, task, waker_cpu, self)
