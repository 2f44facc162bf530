"""The run loop's decisions, over explicit state and with no time in them: the one copy.

Both drivers call these functions: the simulator's :class:`~apfsim.guest.cpu.GuestCpu` and
:class:`~apfsim.host.vcpu.Vcpu` put each decision on the engine's clock; the model
checker's :class:`~apfsim.check.world.World` offers the steps between them as choices. A
frame is kernel code of fixed cost in one context; what runs when it ends is its kind.

Guest side (v5.7 arm64 entry code and ``kernel/sched``, x86 ``idtentry``):

* :func:`take_events`: injected exceptions are taken at entry (vector stub, ``kernel_entry``,
  handler); interrupts wait in the IRR until the context unmasks them (:func:`take_interrupts`).
* :func:`frame_end`: the handler's call into the driver (``do_mem_abort`` -> ``do_async_pf``,
  the page-ready IRQ), the APF wait's tail before ``schedule()``, ``scheduler_tick``, the end
  of ``__schedule``.
* :func:`resume`: what the CPU does once no frame is left: the halted wait loop, idle entry
  (``kvm_async_pf_delayed_wake(); dsb(sy); wfi()`` with no ``need_resched()`` test between),
  ``ret_to_user`` (the work-pending check, then ``finish_ret_to_user``'s delayed wake), and
  the preemption points (arm64 v5.7: only ``el1_irq`` preempts kernel code).
* :func:`schedule` and :func:`try_to_wake_up`.

Host side: :func:`vcpu_enter` (completions, then injections) and :func:`fault_outcome`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from mypy_extensions import mypyc_attr

from apfsim.guest.context import Contexts, GuestContext
from apfsim.guest.sched import Task, TaskState
from apfsim.host.async_pf import AsyncPf, WorkState
from apfsim.ports import (
    AbortOutcome,
    FaultDecision,
    FaultResult,
    GuestProtocol,
    HostProtocol,
    Injection,
    InjectionKind,
)

__all__ = [
    "HANDLER_LABEL",
    "CpuState",
    "FaultOutcome",
    "Frame",
    "FrameCosts",
    "FrameKind",
    "Kernel",
    "Next",
    "Ret",
    "RunLoopRules",
    "Runqueue",
    "context",
    "exit_request",
    "fault_outcome",
    "frame_end",
    "push_exception",
    "push_syscall",
    "resume",
    "schedule",
    "take_events",
    "take_interrupts",
    "try_to_wake_up",
    "vcpu_enter",
    "waits_for_cancelled",
    "wake_condition",
]


class FrameKind(IntEnum):
    """What happens when a frame ends."""

    NOP = 0  # vector stub, kernel_entry: nothing, but an exit can land in it
    HANDLER = 1  # an APF exception or interrupt handler: the driver's call site
    WAIT_TAIL = 2  # kvm_async_pf_wait from queueing the node to schedule()
    TICK = 3  # the timer interrupt: scheduler_tick
    IPI = 4  # the reschedule IPI: scheduler_ipi (the waker set need_resched)
    SWITCH = 5  # __schedule under rq->lock: context_switch() to ``arg``
    SYSCALL = 6  # a task's own system call (el0_svc): the base of its exception
    ENTRY_COMMON = 7  # el0_sync before read_sysreg(esr_el1/far_el1)


class Ret(IntEnum):
    """How the CPU last came back to the code it runs now."""

    NONE = 0  # it never left (a host exit is invisible to the guest)
    SCHED = 1  # from __schedule(): schedule() loops while need_resched()
    IRQ = 2  # an interrupt return (el1_irq / irqentry_exit)
    SYNC = 3  # a synchronous exception's return (el1_sync / el0_sync)


# The base frame of an exception: when it ends with nothing below, the CPU returns to the
# interrupted context.
_RETURN_KIND = {FrameKind.TICK: Ret.IRQ, FrameKind.IPI: Ret.IRQ, FrameKind.SYSCALL: Ret.SYNC}

# NOTE: the members the per-event functions test, as module constants, for performance
# (reading an enum member off its class is slow).
_NOP, _HANDLER, _WAIT_TAIL = FrameKind.NOP, FrameKind.HANDLER, FrameKind.WAIT_TAIL
_TICK, _IPI, _SWITCH = FrameKind.TICK, FrameKind.IPI, FrameKind.SWITCH
_RET_NONE, _RET_SCHED, _RET_IRQ, _RET_SYNC = Ret.NONE, Ret.SCHED, Ret.IRQ, Ret.SYNC
_RUNNING, _SLEEPING_APF, _HALTED_APF = (
    TaskState.RUNNING,
    TaskState.SLEEPING_APF,
    TaskState.HALTED_APF,
)
_PUT_BACK = (TaskState.RUNNING, TaskState.HALTED_APF)  # prev's states schedule() puts back
_WAIT_SCHEDULE, _WAIT_HALT = AbortOutcome.WAIT_SCHEDULE, AbortOutcome.WAIT_HALT
_BOGUS = (AbortOutcome.NOT_APF, AbortOutcome.ILLEGAL_REASON)


class Frame:
    """Kernel activity of fixed cost (``remaining``, ns) in one context."""

    __slots__ = ("arg", "ctx", "kind", "remaining")

    def __init__(self, ctx: GuestContext, kind: FrameKind, remaining: int, arg: Any = None) -> None:
        self.ctx = ctx
        self.kind = kind
        self.remaining = remaining
        self.arg = arg

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.ctx, int(self.kind), self.remaining, self.arg)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.ctx, kind, self.remaining, self.arg = state
        self.kind = FrameKind(kind)


@dataclass(frozen=True, slots=True)
class FrameCosts:
    """The guest's cost of each frame, ns (all 0 in the model checker)."""

    vector_ns: int = 0
    kernel_entry_ns: int = 0
    apf_handler_ns: int = 0
    apf_wait_tail_ns: int = 0
    tick_handler_ns: int = 0
    ipi_handler_ns: int = 0
    context_switch_ns: int = 0


@dataclass(frozen=True, slots=True)
class RunLoopRules:
    """The arch's entry rules and the guest's preemption model.

    ``entry_frames``: arm64 runs the vector stub and ``kernel_entry`` with ELR_EL1 not yet
    saved, and an exit can land in them; x86 delivers through the IDT with the state saved
    by the CPU and IF clear, so its entry code is part of the handler (its cost included).
    ``sync_return_preempts``: x86 ``irqentry_exit`` may preempt after an exception too;
    arm64 v5.7 ``el1_sync`` returns with ``kernel_exit 1`` and no preemption check.
    """

    vector: GuestContext
    entry: GuestContext
    costs: FrameCosts = FrameCosts()
    entry_frames: bool = True
    sync_return_preempts: bool = False
    full_preempt: bool = True

    @classmethod
    def for_arch(
        cls,
        arch: str,
        vector: GuestContext,
        entry: GuestContext,
        costs: FrameCosts = FrameCosts(),
        full_preempt: bool = True,
    ) -> RunLoopRules:
        arm64 = arch == "arm64"
        return cls(vector, entry, costs, arm64, not arm64, full_preempt)


# Subclassed by interpreted code (tracing, the model checker) in the compiled build.
@mypyc_attr(allow_interpreted_subclasses=True)
class CpuState:
    """One guest CPU's run-loop state, shared by both drivers."""

    cpu: int
    frames: list[Frame]
    current: Task | None
    need_resched: bool
    timer_pending: bool
    ipi_pending: bool
    pending_irqs: list[Injection]  # injected interrupts not yet taken (IRR)
    pending_exits: int  # traps made by the code now ending (calls, IPI writes)
    pending_exit_ns: int  # their host handling cost
    in_kernel: bool
    ret: Ret  # how the CPU last came back to the code it runs (see Ret)

    def init_state(self, cpu: int) -> None:
        self.cpu = cpu
        self.frames = []
        self.current = None
        self.need_resched = False
        self.timer_pending = False
        self.ipi_pending = False
        self.pending_irqs = []
        self.pending_exits = 0
        self.pending_exit_ns = 0
        self.in_kernel = True
        self.ret = Ret.NONE

    def task_context(self, task: Task) -> GuestContext:
        """The context ``task`` executes in now (its workload's mode)."""
        raise NotImplementedError


class Runqueue(Protocol):
    """The policy half of a CPU's runqueue the run loop calls (``kernel/sched`` class hooks):
    CFS in the simulator, round-robin in the model checker."""

    curr: Task | None

    def enqueue(self, task: Task, wakeup: bool) -> None: ...

    def pick_next(self) -> Task | None: ...

    def put_prev(self, task: Task) -> None: ...

    def check_preempt_tick(self) -> bool: ...

    def check_preempt_wakeup(self, woken: Task) -> bool: ...

    def update_curr(self, delta_exec_ns: int) -> None: ...


class Kernel(Protocol):
    """What the run loop needs around one CPU (the driver's call site, the runqueue's
    clock, the tracepoints): each driver of the run loop implements it."""

    @property
    def driver(self) -> GuestProtocol:
        """The guest's async PF driver (read only: a kernel may hold a subclass)."""
        ...

    def call_driver(self, cpu: CpuState, fn: Callable[..., Any], *args: Any) -> Any: ...

    def update_curr(self, cpu: CpuState) -> None: ...

    def picked(self, cpu: CpuState, nxt: Task | None) -> None:
        """``set_next_entity``: the next task's ``exec_start`` is now."""
        ...

    def context_switched(self, cpu: CpuState, nxt: Task | None) -> None:
        """``context_switch`` to ``nxt`` is done (``__switch_to`` ran)."""
        ...

    def send_ipi(self, cpu: int, sender: int) -> None: ...

    def handled(
        self, cpu: CpuState, injection: Injection, interrupted: GuestContext, outcome: AbortOutcome
    ) -> None:
        """The driver's handler of ``injection``, taken in ``interrupted``, returned
        ``outcome`` (the invariants look here)."""
        ...

    def apf_slept(self, cpu: CpuState, task: Task) -> None: ...

    def apf_waiting(self, cpu: CpuState, task: Task, token: int, halted: bool) -> None: ...

    def task_woken(self, task: Task) -> None: ...

    def task_state(self, task: Task) -> None: ...

    def bogus_abort(self, cpu: CpuState) -> None: ...

    def runqueue(self, cpu: CpuState) -> Any: ...


# -- the guest side -------------------------------------------------------------------------------


def context(cpu: CpuState) -> GuestContext:
    """What the host sees at an exit (and an interrupt's handler as the interrupted code)."""
    if cpu.frames:
        return cpu.frames[-1].ctx
    curr = cpu.current
    if curr is None:
        return Contexts.IDLE
    if curr.halt_ctx is not None:
        return curr.halt_ctx  # the halted WFI loop runs in the faulting context
    return cpu.task_context(curr)


def push_exception(
    cpu: CpuState, rules: RunLoopRules, kind: FrameKind, ctx: GuestContext, cost: int, arg: Any
) -> None:
    """An exception's frames: arm64 vector stub, then ``kernel_entry``, then the handler
    (pushed so the vector runs first); x86 the handler alone, its entry cost included."""
    costs = rules.costs
    cpu.in_kernel = True
    if rules.entry_frames:
        cpu.frames.append(Frame(ctx, kind, cost, arg))
        cpu.frames.append(Frame(rules.entry, _NOP, costs.kernel_entry_ns))
        cpu.frames.append(Frame(rules.vector, _NOP, costs.vector_ns))
    else:
        total = cost + costs.vector_ns + costs.kernel_entry_ns
        cpu.frames.append(Frame(ctx, kind, total, arg))


def push_syscall(cpu: CpuState, rules: RunLoopRules) -> None:
    """A task's own system call: the syscall body under entry-common (``el0_svc`` before
    ``read_sysreg(esr_el1)``), under the arch's entry frames."""
    cpu.in_kernel = True
    cpu.frames.append(Frame(Contexts.SYSCALL, FrameKind.SYSCALL, 0))
    cpu.frames.append(Frame(Contexts.ENTRY_COMMON, FrameKind.ENTRY_COMMON, 0))
    if rules.entry_frames:
        cpu.frames.append(Frame(rules.entry, FrameKind.NOP, rules.costs.kernel_entry_ns))
        cpu.frames.append(Frame(rules.vector, FrameKind.NOP, rules.costs.vector_ns))


def take_events(
    cpu: CpuState, rules: RunLoopRules, injections: list[Injection], lapic_enabled: bool = True
) -> int:
    """At entry: injected exceptions are taken at once; interrupts (APF, timer tick, IPI)
    wait until the interrupted context has them unmasked. An interrupt raised into a
    software-disabled LAPIC is lost (B8's situation); returns how many were."""
    lost = 0
    if injections:
        interrupted = context(cpu)
        handler_ns = rules.costs.apf_handler_ns
        for injection in injections:
            if not injection.kind.synchronous:
                if lapic_enabled:
                    cpu.pending_irqs.append(injection)
                else:
                    lost += 1
                continue
            arg = (injection, interrupted)
            push_exception(cpu, rules, _HANDLER, Contexts.HANDLER, handler_ns, arg)
    take_interrupts(cpu, rules)
    return lost


def take_interrupts(cpu: CpuState, rules: RunLoopRules) -> bool:
    """Pending interrupts, taken only where IRQs are unmasked (an IRQ or abort handler,
    an SDEI handler and ``__schedule`` under the runqueue lock all run with them off)."""
    if not (cpu.ipi_pending or cpu.timer_pending or cpu.pending_irqs):
        return False
    ctx = context(cpu)
    if ctx.irqs_off:
        return False
    costs = rules.costs
    if cpu.ipi_pending:
        cpu.ipi_pending = False
        push_exception(cpu, rules, _IPI, Contexts.IRQ, costs.ipi_handler_ns, None)
    if cpu.timer_pending:
        cpu.timer_pending = False
        push_exception(cpu, rules, _TICK, Contexts.IRQ, costs.tick_handler_ns, None)
    for injection in cpu.pending_irqs:
        arg = (injection, ctx)
        push_exception(cpu, rules, _HANDLER, Contexts.IRQ, costs.apf_handler_ns, arg)
    cpu.pending_irqs.clear()
    return True


def frame_end(cpu: CpuState, rules: RunLoopRules, frame: Frame, kernel: Kernel) -> None:
    """The top frame ran to its end (the caller popped it): what its code does last."""
    kind = frame.kind
    if kind is _HANDLER:
        _injection_handled(cpu, rules, frame, kernel)
        if not cpu.frames:
            cpu.ret = _RET_IRQ if frame.ctx is Contexts.IRQ else _RET_SYNC
    elif kind is _WAIT_TAIL:
        _apf_sleep(cpu, rules, frame.arg, kernel)
    elif kind is _SWITCH:
        _switch_done(cpu, frame.arg, kernel)
    elif kind is _TICK:
        kernel.update_curr(cpu)
        if kernel.runqueue(cpu).check_preempt_tick():
            cpu.need_resched = True
    if kind in _RETURN_KIND and not cpu.frames:
        cpu.ret = _RETURN_KIND[kind]


def _injection_handled(cpu: CpuState, rules: RunLoopRules, frame: Frame, kernel: Kernel) -> None:
    """The APF handler (``do_mem_abort`` -> ``do_async_pf``, or its kin) returned."""
    injection, interrupted = frame.arg
    outcome: AbortOutcome = kernel.call_driver(
        cpu, kernel.driver.on_injection, cpu.cpu, injection, interrupted.regs()
    )
    kernel.handled(cpu, injection, interrupted, outcome)
    task = cpu.current
    if outcome is _WAIT_SCHEDULE:
        assert task is not None
        kernel.apf_waiting(cpu, task, injection.payload, False)
        cost = rules.costs.apf_wait_tail_ns
        cpu.in_kernel = True
        cpu.frames.append(Frame(Contexts.KERNEL, _WAIT_TAIL, cost, task))
    elif outcome is _WAIT_HALT:
        assert task is not None
        task.state = _HALTED_APF
        task.halt_ctx = interrupted  # dsb(sy); wfi() until unhashed, in the faulting context
        kernel.apf_waiting(cpu, task, injection.payload, True)
    elif outcome in _BOGUS:
        # An injected abort the driver did not claim goes down the ordinary fault path
        # with FAR = token: on real hardware a bogus fault (SIGSEGV or oops).
        kernel.bogus_abort(cpu)


def _apf_sleep(cpu: CpuState, rules: RunLoopRules, task: Task, kernel: Kernel) -> None:
    """The wait loop: sleep unless the node was already unhashed, then schedule()."""
    if kernel.driver.waiter_woken(cpu.cpu, task.tid):
        return
    task.state = _SLEEPING_APF
    kernel.apf_slept(cpu, task)
    schedule(cpu, rules, kernel)


class Next(IntEnum):
    """What the CPU executes next, once :func:`resume` has run the decisions up to it."""

    FRAME = 0  # the top frame
    TASK = 1  # the current task's code
    WFI_HALT = 2  # the halted wait's WFI (the guest tick stays armed)
    WFI_IDLE = 3  # the idle task's WFI
    EXIT = 4  # the code just run trapped (an MSR / IPI-register write): exit first


# NOTE: module constants, for performance (resume returns one at every step).
_N_FRAME, _N_TASK, _N_EXIT = Next.FRAME, Next.TASK, Next.EXIT
_N_WFI_HALT, _N_WFI_IDLE = Next.WFI_HALT, Next.WFI_IDLE


def _preempt_on_return(rules: RunLoopRules, ret: Ret, ctx: GuestContext) -> bool:
    """Whether kernel code coming back by ``ret`` acts on need_resched: schedule() loops;
    ``el1_irq``'s ``arm64_preempt_schedule_irq`` (and x86 ``irqentry_exit``, after an
    exception too) preempts only under CONFIG_PREEMPT, with ``preempt_count() == 0`` and
    IRQs on (an RCU read side is preemptible: PREEMPT_RCU)."""
    if ret is _RET_SCHED:
        return True
    if ret is _RET_NONE or not rules.full_preempt:
        return False
    if ret is _RET_SYNC and not rules.sync_return_preempts:
        return False
    return ctx.preempt_count == 0 and not ctx.irqs_off


def resume(cpu: CpuState, rules: RunLoopRules, kernel: Kernel) -> Next:
    """Continue whatever the CPU should execute now (the vCPU is in guest mode)."""
    while True:
        if cpu.frames:
            return _N_FRAME
        curr = cpu.current
        if curr is None:
            if cpu.need_resched:  # do_idle: while (!need_resched()) ...; schedule_idle()
                schedule(cpu, rules, kernel)
                continue
            # __cpu_do_idle: kvm_async_pf_delayed_wake(); dsb(sy); wfi(): a wake-up it does
            # sets need_resched, but nothing tests it before the WFI.
            kernel.call_driver(cpu, kernel.driver.on_idle_entry, cpu.cpu)
            return _N_EXIT if cpu.pending_exits else _N_WFI_IDLE
        ret, cpu.ret = cpu.ret, _RET_NONE
        halt_ctx = curr.halt_ctx
        if halt_ctx is not None:
            if cpu.need_resched and _preempt_on_return(rules, ret, halt_ctx):
                schedule(cpu, rules, kernel)  # a waiter halted only for RCU is preemptible
                continue
            if not kernel.driver.waiter_woken(cpu.cpu, curr.tid):
                return _N_WFI_HALT
            curr.halt_ctx = None
            curr.state = _RUNNING
            kernel.task_woken(curr)
            kernel.task_state(curr)
            continue
        ctx = cpu.task_context(curr)
        if not ctx.privileged:
            if cpu.in_kernel:
                if cpu.need_resched:  # ret_to_user: _TIF_WORK_MASK first
                    schedule(cpu, rules, kernel)
                    continue
                cpu.in_kernel = False
                # finish_ret_to_user: the delayed wake comes after the work-pending check,
                # so a need_resched it sets waits for the next exception return.
                kernel.call_driver(cpu, kernel.driver.on_ret_to_user, cpu.cpu)
                if cpu.pending_exits:
                    return _N_EXIT
            return _N_TASK
        if cpu.need_resched and _preempt_on_return(rules, ret, ctx):
            schedule(cpu, rules, kernel)
            continue
        cpu.in_kernel = True  # the task runs kernel code: its return to user is ret_to_user
        return _N_TASK


def schedule(cpu: CpuState, rules: RunLoopRules, kernel: Kernel) -> None:
    """``__schedule``: put prev back if still runnable, pick next, switch under rq->lock.

    The pick sets the next task's ``exec_start`` (``set_next_entity``), so the switch's
    own cost is charged to the task switched to."""
    kernel.update_curr(cpu)
    rq = kernel.runqueue(cpu)
    prev = cpu.current
    if prev is not None and prev.state in _PUT_BACK:
        rq.put_prev(prev)
    rq.curr = None
    nxt = rq.pick_next()
    cpu.need_resched = False
    kernel.picked(cpu, nxt)
    if nxt is prev:
        _switch_done(cpu, nxt, kernel)
        return
    cost = rules.costs.context_switch_ns
    cpu.in_kernel = True
    cpu.frames.append(Frame(Contexts.RQ_LOCKED, _SWITCH, cost, nxt))


def _switch_done(cpu: CpuState, nxt: Task | None, kernel: Kernel) -> None:
    if nxt is not cpu.current:
        kernel.context_switched(cpu, nxt)
        tid = -1 if nxt is None else nxt.tid
        kernel.call_driver(cpu, kernel.driver.on_context_switch, cpu.cpu, tid)
    cpu.current = nxt
    cpu.ret = _RET_SCHED
    if nxt is not None and nxt.halt_ctx is not None:
        nxt.state = _HALTED_APF  # back in its WFI loop


def try_to_wake_up(cpu: CpuState, task: Task, waker_cpu: int, kernel: Kernel) -> bool:
    """Enqueue a sleeper on its CPU with sleeper credit; preempt per check_preempt_wakeup."""
    if task.state is not _SLEEPING_APF:
        return False
    kernel.update_curr(cpu)
    kernel.task_woken(task)
    rq = kernel.runqueue(cpu)
    rq.enqueue(task, wakeup=True)
    # check_preempt_curr looks at rq->curr, which __schedule sets at the pick: a CPU in
    # the middle of switching to idle already runs the idle task for the waker.
    if rq.check_preempt_wakeup(task) or rq.curr is None:
        cpu.need_resched = True
        if waker_cpu != cpu.cpu:
            kernel.send_ipi(cpu.cpu, waker_cpu)
    return True


# -- the host side --------------------------------------------------------------------------------


def exit_request(host: HostProtocol, vcpu: int) -> bool:
    """``vcpu_enter_guest``'s last check, in IN_GUEST_MODE: a request made after this entry's
    run-loop iteration (a worker's APF_READY whose kick found the vCPU outside the guest)
    sends it round again instead of staying in the guest."""
    return host.request_pending(vcpu)


def waits_for_cancelled(running: Iterable[AsyncPf], vcpu: int) -> bool:
    """``kvm_clear_async_pf_completion_queue``'s ``cancel_work_sync``: after the guest
    disabled async PF (or the vCPU was reset), its thread waits for every cancelled item
    whose GUP is running; ``running`` are the items whose worker has started."""
    return any(w.vcpu_id == vcpu and w.state is WorkState.CANCELLED for w in running)


def vcpu_enter(host: HostProtocol, vcpu: int, view: Any) -> tuple[list[AsyncPf], list[Injection]]:
    """One run-loop iteration (``kvm_check_async_pf_completion`` and the arch's requests),
    then the events to inject at this entry, in the order the host takes them."""
    delivered = host.run_loop_iteration(vcpu, view)
    injections: list[Injection] = []
    while (injection := host.take_injection(vcpu)) is not None:
        injections.append(injection)
    return delivered, injections


class FaultOutcome(IntEnum):
    """What the vCPU thread does after ``try_async_pf``."""

    ENTER = 0  # re-enter the guest (not-present pending, or guest-initiated)
    SPIN = 1  # RFCv2 repeated fault: re-enter and fault again until the page is in
    HALT = 2  # KVM_REQ_APF_HALT: kvm_vcpu_block until the page is in or an IRQ is pending
    SYNC = 3  # fault the page in in the vCPU thread
    USER_EXIT = 4  # KVM_RUN returns -EFAULT: the VMM's vCPU thread fetches, then re-enters


_OUTCOME = {
    FaultDecision.ASYNC: FaultOutcome.ENTER,
    FaultDecision.REPEATED: FaultOutcome.SPIN,
    FaultDecision.HALT: FaultOutcome.HALT,
    FaultDecision.SYNC: FaultOutcome.SYNC,
    FaultDecision.USER_EXIT: FaultOutcome.USER_EXIT,
}


def fault_outcome(result: FaultResult) -> FaultOutcome:
    return _OUTCOME[result.decision]


def wake_condition(timer_pending: bool, ipi_pending: bool, host: HostProtocol, vcpu: int) -> bool:
    """``kvm_vcpu_check_block``: a pending IRQ, or the arch says runnable."""
    return timer_pending or ipi_pending or host.vcpu_runnable(vcpu)


HANDLER_LABEL = {
    (kind, outcome): f"guest {kind.value} handler: {outcome.value}, payload"
    for kind in InjectionKind
    for outcome in AbortOutcome
}
"""The label of a handler's outcome among the events an invariant report lists."""
