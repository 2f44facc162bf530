"""One guest CPU: what it executes, in which context, and when it schedules.

The CPU runs either a *task segment* (the current task's planned run up to its next miss)
or a stack of *frames*: kernel activity with a fixed cost and a context (exception vector
and ``kernel_entry`` code, the abort handler, an IRQ handler, ``__schedule`` holding the
runqueue lock). An exit can land anywhere: a frame keeps its remaining time, a task
segment commits what it ran. The host reads :meth:`GuestCpu.context` at every exit, so an
injection can land in the vector table, in ``__schedule``, or in the sleeper's own context
between ``kvm_async_pf_wait`` clearing ``reason`` and ``schedule()``, as on real hardware.

Call sites of the seed's driver: ``do_mem_abort`` (abort frames end in
``GuestProtocol.on_injection``), ``ret_to_user`` (``on_ret_to_user`` when a kernel frame
returns to a user-mode task) and ``__cpu_do_idle`` (``on_idle_entry`` before WFI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    GuestRegs,
    GuestServices,
    Injection,
    InjectionKind,
    Probe,
    RunCounters,
    VcpuSide,
)
from apfsim.workloads.base import Plan, StopKind

__all__ = ["Frame", "GuestCpu", "GuestParams"]

_NONE, _TASK, _FRAME = 0, 1, 2
_MAPPED = int(PageState.MAPPED)


class Frame:
    """Kernel activity of fixed cost in one context; ``on_end(arg)`` runs when it completes."""

    __slots__ = ("arg", "ctx", "on_end", "remaining")

    def __init__(
        self, ctx: GuestContext, remaining: int, on_end: Callable[[Any], None], arg: Any = None
    ) -> None:
        self.ctx = ctx
        self.remaining = remaining
        self.on_end = on_end
        self.arg = arg


@dataclass(frozen=True, slots=True)
class GuestParams:
    """The guest's costs and configuration a CPU needs (``[guest]`` of a scenario)."""

    vector_ns: int
    kernel_entry_ns: int
    apf_handler_ns: int
    apf_wait_tail_ns: int
    tick_handler_ns: int
    ipi_handler_ns: int
    context_switch_ns: int
    full_preempt: bool
    steal_time_accounting: bool
    contexts: Contexts

    @classmethod
    def of(cls, guest: Any) -> GuestParams:
        """From a scenario's ``guest`` section."""
        c = guest.costs
        return cls(
            c.vector_ns,
            c.kernel_entry_ns,
            c.apf_handler_ns,
            c.apf_wait_tail_ns,
            c.tick_handler_ns,
            c.ipi_handler_ns,
            c.context_switch_ns,
            guest.preempt == "full",
            guest.steal_time_accounting,
            Contexts(guest.vector_pc_offset, guest.kernel_entry_pc_offset),
        )


class GuestCpu:
    """Guest CPU ``cpu``: runqueue, current task, kernel frames and pending interrupts."""

    def __init__(
        self,
        cpu: int,
        clock: Clock,
        vcpu: VcpuSide,
        driver: GuestProtocol,
        kernel: GuestServices,
        sched: CfsParams,
        params: GuestParams,
        counters: RunCounters,
        checker: Checker | None = None,
    ) -> None:
        self.cpu = cpu
        self.engine = clock
        self.vcpu = vcpu
        self.driver = driver
        self.kernel = kernel
        self.params = params
        self.counters = counters
        self.checker = checker
        self.rq = CfsRq(sched)
        self.current: Task | None = None
        self.frames: list[Frame] = []
        self.need_resched = False
        self.halt_waiter: Task | None = None
        self.timer_pending = False
        self.ipi_pending = False
        self.pending_irqs: list[Injection] = []  # injected interrupts not yet taken (IRR)
        self.pending_exits = 0  # traps made by the frame now ending (calls, IPI writes)
        self.pending_exit_ns = 0  # their host handling cost
        self.in_kernel = True
        self.stolen_ns = 0
        self._stolen_mark = 0
        self.probe: Probe | None = None
        self._exec_start = 0
        self._seg = _NONE
        self._seg_start = 0
        self._plan: Plan | None = None
        self._event: EventHandle | None = None
        self._vector_ns = params.vector_ns
        self._entry_ns = params.kernel_entry_ns
        self._full_preempt = params.full_preempt
        self._steal = params.steal_time_accounting

    # -- what the host sees ------------------------------------------------------------------
    def context(self) -> GuestContext:
        if self.frames:
            return self.frames[-1].ctx
        if self.halt_waiter is not None:
            return Contexts.KERNEL_ATOMIC
        if self.current is None:
            return Contexts.IDLE
        workload = self.kernel.workload_of(self.current)
        return CONTEXT_OF_MODE[workload.current_mode()]

    def _preemptible(self, ctx: GuestContext) -> bool:
        if not ctx.privileged:
            return True
        return self._full_preempt and ctx.preemptible

    # -- the dispatcher --------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue whatever the CPU should execute now (the vCPU is in guest mode)."""
        if self.frames:
            self._start_frame()
            return
        if self.halt_waiter is not None:
            task = self.halt_waiter
            if not self.driver.waiter_woken(self.cpu, task.tid):
                self.vcpu.wfi(halt=True)  # dsb(sy); wfi() in kvm_async_pf_wait
                return
            self.halt_waiter = None
            task.state = TaskState.RUNNING
            if self.probe is not None:
                self.probe.task_woken(task)
                self.probe.task_state(task)
        curr = self.current
        if curr is None:
            self._idle()
            return
        ctx = CONTEXT_OF_MODE[self.kernel.workload_of(curr).current_mode()]
        if self.in_kernel and not ctx.privileged:
            self.in_kernel = False
            self.kernel.run_driver(self.cpu, self.driver.on_ret_to_user, self.cpu)
        if self.need_resched and self._preemptible(ctx):
            self.schedule()
            self._start_frame_or_resume()
            return
        self._start_task()

    def _start_frame_or_resume(self) -> None:
        if self.frames:
            self._start_frame()
        else:
            self.resume()

    def _idle(self) -> None:
        """The idle loop: delayed wakes on idle entry, then WFI unless work appeared."""
        if not self.rq.queue:
            self.kernel.run_driver(self.cpu, self.driver.on_idle_entry, self.cpu)
        if self.rq.queue:
            self.schedule()
            self._start_frame_or_resume()
            return
        self.vcpu.wfi(halt=False)

    def _start_task(self) -> None:
        curr = self.current
        assert curr is not None
        now = self.engine.now
        plan = self.kernel.workload_of(curr).plan(self.kernel.memory)
        self._plan = plan
        self._seg = _TASK
        self._seg_start = now
        self.vcpu.clock.switch(TimeCategory.TASK, now)
        self._event = self.engine.after(plan.run_ns, self._on_task_stop)

    def _on_task_stop(self, _: object = None) -> None:
        kernel = self.kernel
        now = self.engine.now
        curr = self.current
        plan = self._plan
        assert curr is not None and plan is not None
        self._event = None
        self._seg = _NONE
        workload = kernel.workload_of(curr)
        complete = workload.commit(kernel.memory, now - self._seg_start)
        if workload.finished or plan.kind is StopKind.DONE:
            self._task_exit(curr)
            self._start_frame_or_resume()
            return
        if plan.kind is StopKind.MISS and complete and kernel.memory.state[plan.gfn] != _MAPPED:
            self.vcpu.stage2_fault(plan.gfn, CONTEXT_OF_MODE[plan.mode])
            return
        self.resume()

    def _start_frame(self) -> None:
        frame = self.frames[-1]
        now = self.engine.now
        self._seg = _FRAME
        self._seg_start = now
        self.in_kernel = True
        self.vcpu.clock.switch(TimeCategory.GUEST_KERNEL, now)
        self._event = self.engine.after(frame.remaining, self._on_frame_end)

    def _on_frame_end(self, _: object = None) -> None:
        frame = self.frames.pop()
        self._event = None
        self._seg = _NONE
        frame.on_end(frame.arg)
        if self.pending_exits:
            # The handler wrote an MSR / made a hypercall / sent an IPI: exits before it goes on.
            exits, handling_ns = self.pending_exits, self.pending_exit_ns
            self.pending_exits = self.pending_exit_ns = 0
            self.vcpu.exit_for_guest_call(exits, handling_ns, frame.ctx)
            return
        self._take_interrupts()
        self.resume()

    def interrupt(self, now: int) -> None:
        """An exit at ``now``: stop the running segment, keeping exactly what it did."""
        self.engine.cancel(self._event)
        self._event = None
        if self._seg == _TASK and self.current is not None:
            self.kernel.workload_of(self.current).commit(self.kernel.memory, now - self._seg_start)
        elif self._seg == _FRAME:
            self.frames[-1].remaining -= now - self._seg_start
        self._seg = _NONE

    # -- exceptions and interrupts taken at guest entry -------------------------------------------
    def _push_exception(self, handler: Frame) -> None:
        """Vector stub, then kernel_entry, then the handler (pushed so the vector runs first)."""
        contexts = self.params.contexts
        self.frames.append(handler)
        self.frames.append(Frame(contexts.entry, self._entry_ns, _noop))
        self.frames.append(Frame(contexts.vector, self._vector_ns, _noop))

    def take_events(self, injections: list[Injection]) -> None:
        """At entry: injected exceptions are taken at once; interrupts (APF, timer tick,
        IPI) wait until the interrupted context has them unmasked."""
        params = self.params
        if injections:
            regs = self.context().regs()  # the interrupted context, before any frame
            for injection in injections:
                if not injection.kind.synchronous:
                    self.pending_irqs.append(injection)
                    continue
                handler = Frame(
                    Contexts.HANDLER,
                    params.apf_handler_ns,
                    self._injection_handled,
                    (injection, regs),
                )
                self._push_exception(handler)
        self._take_interrupts()

    def _take_interrupts(self) -> None:
        """Pending interrupts, taken only where IRQs are unmasked (an IRQ or abort handler,
        an SDEI handler and ``__schedule`` under the runqueue lock all run with them off)."""
        if not (self.ipi_pending or self.timer_pending or self.pending_irqs):
            return
        ctx = self.context()
        if ctx.irqs_off:
            return
        params = self.params
        if self.ipi_pending:
            self.ipi_pending = False
            self._push_exception(Frame(Contexts.IRQ, params.ipi_handler_ns, self._ipi_handled))
        if self.timer_pending:
            self.timer_pending = False
            self._push_exception(Frame(Contexts.IRQ, params.tick_handler_ns, self._tick_handled))
        if self.pending_irqs:
            regs = ctx.regs()
            for injection in self.pending_irqs:
                handler = Frame(
                    Contexts.IRQ, params.apf_handler_ns, self._injection_handled, (injection, regs)
                )
                self._push_exception(handler)
            self.pending_irqs.clear()

    def _injection_handled(self, arg: tuple[Injection, GuestRegs]) -> None:
        """The APF handler (``do_mem_abort`` -> ``do_async_pf``, or its kin) returned."""
        injection, regs = arg
        outcome: AbortOutcome = self.kernel.run_driver(
            self.cpu, self.driver.on_injection, self.cpu, injection, regs
        )
        if self.checker is not None:
            self.checker.note(self.cpu, _HANDLER_LABEL[injection.kind, outcome], injection.payload)
            self.checker.check_guest()
        if outcome is AbortOutcome.WAIT_SCHEDULE:
            task = self.current
            assert task is not None
            tail = self.params.apf_wait_tail_ns
            if self.probe is not None:
                self.probe.apf_wait(task, self.cpu, injection.payload, halted=False)
            self.frames.append(Frame(Contexts.KERNEL, tail, self._apf_sleep, task))
        elif outcome is AbortOutcome.WAIT_HALT:
            task = self.current
            assert task is not None
            task.state = TaskState.HALTED_APF
            self.halt_waiter = task
            if self.probe is not None:
                self.probe.apf_wait(task, self.cpu, injection.payload, halted=True)
        elif outcome in (AbortOutcome.NOT_APF, AbortOutcome.ILLEGAL_REASON):
            # An injected abort the driver did not claim goes down the ordinary fault path
            # with FAR = token: on real hardware a bogus fault (SIGSEGV or oops).
            self.counters.guest_bogus_aborts += 1

    def _apf_sleep(self, task: Task) -> None:
        """The wait loop: sleep unless the node was already unhashed, then schedule()."""
        if self.driver.waiter_woken(self.cpu, task.tid):
            return
        task.state = TaskState.SLEEPING_APF
        self.counters.apf_sleeps += 1
        if self.probe is not None:
            self.probe.task_state(task)
        self.schedule()

    def _tick_handled(self, _: object) -> None:
        """scheduler_tick: charge runtime, then check_preempt_tick."""
        self.update_curr(self.engine.now)
        if self.rq.check_preempt_tick():
            self.need_resched = True

    def _ipi_handled(self, _: object) -> None:
        """scheduler_ipi: the waker already set the resched flag; nothing else to do."""

    # -- scheduling --------------------------------------------------------------------------------
    def update_curr(self, now: int) -> None:
        """Charge the guest clock since the last update to ``curr`` (minus steal, if on)."""
        delta = now - self._exec_start
        self._exec_start = now
        if self._steal:
            delta -= self.stolen_ns - self._stolen_mark
            self._stolen_mark = self.stolen_ns
        self.rq.update_curr(delta)

    def schedule(self) -> None:
        """__schedule: put prev back if still runnable, pick next, switch under rq->lock."""
        now = self.engine.now
        self.update_curr(now)
        prev = self.current
        if prev is not None and prev.state is TaskState.RUNNING:
            self.rq.put_prev(prev)
        self.rq.curr = None
        nxt = self.rq.pick_next()
        self.need_resched = False
        if nxt is prev:
            self._switch_done(nxt)
            return
        cost = self.params.context_switch_ns
        self.frames.append(Frame(Contexts.RQ_LOCKED, cost, self._switch_done, nxt))

    def _switch_done(self, nxt: Task | None) -> None:
        now = self.engine.now
        if nxt is not self.current:
            self.counters.context_switches += 1
            self.driver.on_context_switch(self.cpu, -1 if nxt is None else nxt.tid)
        self.current = nxt
        self._exec_start = now
        self._stolen_mark = self.stolen_ns

    def _task_exit(self, task: Task) -> None:
        task.state = TaskState.DONE
        task.completion_ns = self.engine.now
        if self.probe is not None:
            self.probe.task_state(task)
        self.kernel.task_finished(task)
        self.schedule()

    def try_to_wake_up(self, task: Task, waker_cpu: int) -> bool:
        """Enqueue a sleeper on its CPU with sleeper credit; preempt per check_preempt_wakeup."""
        if task.state is not TaskState.SLEEPING_APF:
            return False
        self.update_curr(self.engine.now)
        if self.probe is not None:
            self.probe.task_woken(task)
        self.rq.enqueue(task, wakeup=True)
        if self.rq.check_preempt_wakeup(task) or self.current is None:
            self.need_resched = True
            if waker_cpu != self.cpu:
                self.kernel.send_ipi(self.cpu, waker_cpu)
        return True


_HANDLER_LABEL = {
    (kind, outcome): f"guest {kind.value} handler: {outcome.value}, payload"
    for kind in InjectionKind
    for outcome in AbortOutcome
}


def _noop(_: object) -> None:
    pass
