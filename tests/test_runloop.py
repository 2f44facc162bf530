"""The run loop's decisions (apfsim.runloop), one test per kernel behaviour they follow.

The simulator and the model checker both drive these functions; each test sets up a CPU
state by hand, asks the run loop what happens next, and checks it against the kernel text
(arm64 v5.7 entry.S / process.c with the seed's hunks, kernel/sched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from apfsim.guest.context import Contexts, GuestContext
from apfsim.guest.sched import CfsParams, CfsRq, Task, TaskState
from apfsim.ports import AbortOutcome, Injection
from apfsim.protocols.common import GuestBase
from apfsim.runloop import (
    CpuState,
    FrameCosts,
    FrameKind,
    Next,
    Ret,
    RunLoopRules,
    frame_end,
    resume,
    schedule,
)

CTX = Contexts(0x200, 0xC00)
ARM64 = RunLoopRules.for_arch("arm64", CTX.vector, CTX.entry)
X86 = RunLoopRules.for_arch("x86", CTX.vector, CTX.entry)


class Driver(GuestBase):
    """A guest driver whose call sites run a hook (a delayed wake, say)."""

    def __init__(self) -> None:
        self.on_idle: Callable[[int], None] = lambda cpu: None
        self.on_user: Callable[[int], None] = lambda cpu: None
        self.woken: set[int] = set()
        self.calls: list[str] = []

    def on_idle_entry(self, cpu: int) -> None:
        self.calls.append("idle_entry")
        self.on_idle(cpu)

    def on_ret_to_user(self, cpu: int) -> None:
        self.calls.append("ret_to_user")
        self.on_user(cpu)

    def waiter_woken(self, cpu: int, task: int) -> bool:
        return task in self.woken


class Cpu(CpuState):
    """One CPU with a CFS runqueue and a clock that never moves; it is its own Kernel."""

    def __init__(self, ctx_of: dict[int, GuestContext] | None = None) -> None:
        self.init_state(0)
        self.driver = Driver()
        self.rq = CfsRq(CfsParams())
        self.ctx_of = ctx_of or {}
        self.picks: list[str] = []

    def task_context(self, task: Task) -> GuestContext:
        return self.ctx_of.get(task.tid, Contexts.USER)

    def call_driver(self, cpu: CpuState, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def runqueue(self, cpu: CpuState) -> CfsRq:
        return self.rq

    def update_curr(self, cpu: CpuState) -> None:
        pass

    def picked(self, cpu: CpuState, nxt: Task | None) -> None:
        self.picks.append("idle" if nxt is None else nxt.name)

    def context_switched(self, cpu: CpuState, nxt: Task | None) -> None:
        pass

    def send_ipi(self, cpu: int, sender: int) -> None:
        pass

    def handled(self, cpu: CpuState, inj: Injection, ctx: GuestContext, out: AbortOutcome) -> None:
        pass

    def apf_waiting(self, cpu: CpuState, task: Task, token: int, halted: bool) -> None:
        pass

    def apf_slept(self, cpu: CpuState, task: Task) -> None:
        pass

    def task_woken(self, task: Task) -> None:
        pass

    def task_state(self, task: Task) -> None:
        pass

    def bogus_abort(self, cpu: CpuState) -> None:
        pass

    def run(self, task: Task) -> None:
        """``task`` is current and running, far enough ahead in vruntime to be preempted."""
        task.vruntime = 50_000_000
        task.state = TaskState.RUNNING
        self.rq.curr = task
        self.current = task

    def finish_switch(self, rules: RunLoopRules) -> None:
        """Run __schedule's frame (the context switch) to its end."""
        frame = self.frames.pop()
        assert frame.kind is FrameKind.SWITCH
        frame_end(self, rules, frame, self)


def wake_local(cpu: Cpu, task: Task) -> Callable[[int], None]:
    """A delayed wake of ``task`` on this CPU: try_to_wake_up's local resched_curr only sets
    TIF_NEED_RESCHED (no IPI to itself)."""

    def wake(_: int) -> None:
        task.state = TaskState.SLEEPING_APF
        cpu.rq.enqueue(task, wakeup=True)
        cpu.need_resched = True

    return wake


def test_idle_entry_runs_the_delayed_wake_then_wfi_with_no_need_resched_test() -> None:
    """__cpu_do_idle in the seed: ``kvm_async_pf_delayed_wake(); dsb(sy); wfi();``. The wake
    sets need_resched, but nothing tests it before the WFI: the CPU still goes idle."""
    cpu = Cpu()
    sleeper = Task(1, "sleeper", 0, TaskState.SLEEPING_APF)
    cpu.driver.on_idle = wake_local(cpu, sleeper)
    assert resume(cpu, ARM64, cpu) is Next.WFI_IDLE
    assert cpu.driver.calls == ["idle_entry"]
    assert cpu.need_resched and sleeper.state is TaskState.RUNNABLE
    # The next time the CPU runs (some interrupt woke the WFI), do_idle sees need_resched.
    assert resume(cpu, ARM64, cpu) is Next.FRAME
    cpu.finish_switch(ARM64)
    assert cpu.current is sleeper


def test_idle_with_need_resched_schedules_before_idle_entry() -> None:
    """do_idle: ``while (!need_resched())``: a wake-up that came before idle entry is run."""
    cpu = Cpu()
    task = Task(1, "t", 0)
    cpu.rq.enqueue(task, wakeup=False)
    cpu.need_resched = True
    assert resume(cpu, ARM64, cpu) is Next.FRAME
    assert cpu.driver.calls == []


def test_finish_ret_to_user_delayed_wake_waits_for_the_next_exception_return() -> None:
    """ret_to_user checks _TIF_WORK_MASK first; the seed's delayed wake runs after it, in
    finish_ret_to_user, so the need_resched it sets is not acted on before the eret."""
    cpu = Cpu()
    user = Task(0, "user", 0)
    other = Task(1, "other", 0)
    cpu.run(user)
    cpu.driver.on_user = wake_local(cpu, other)
    assert resume(cpu, ARM64, cpu) is Next.TASK  # returned to user despite need_resched
    assert cpu.need_resched and not cpu.in_kernel
    # The next exception (a tick) returns through ret_to_user again: now it schedules.
    cpu.in_kernel, cpu.ret = True, Ret.IRQ
    assert resume(cpu, ARM64, cpu) is Next.FRAME
    assert cpu.picks == ["other"]


def test_ret_to_user_schedules_on_work_pending_before_the_delayed_wake() -> None:
    """With need_resched already set, ret_to_user's work loop schedules; the task switched
    in returns to user through ret_to_user (and its delayed wake) itself."""
    cpu = Cpu()
    user, other = Task(0, "user", 0), Task(1, "other", 0)
    cpu.run(user)
    cpu.rq.enqueue(other, wakeup=False)
    cpu.need_resched = True
    assert resume(cpu, ARM64, cpu) is Next.FRAME
    assert cpu.driver.calls == []
    cpu.finish_switch(ARM64)
    assert resume(cpu, ARM64, cpu) is Next.TASK
    assert cpu.current is other and cpu.driver.calls == ["ret_to_user"]


@pytest.mark.parametrize(
    ("rules", "ret", "preempted"),
    [
        (ARM64, Ret.SYNC, False),  # el1_sync: kernel_exit 1, no preemption check
        (ARM64, Ret.IRQ, True),  # el1_irq: arm64_preempt_schedule_irq
        (X86, Ret.SYNC, True),  # irqentry_exit after an exception
        (X86, Ret.IRQ, True),
        (ARM64, Ret.NONE, False),  # a host exit: the guest never left the code
    ],
)
def test_kernel_code_is_preempted_only_on_the_arch_s_preempting_returns(
    rules: RunLoopRules, ret: Ret, preempted: bool
) -> None:
    """CONFIG_PREEMPT, preempt_count 0: arm64 v5.7 preempts kernel code only on el1_irq's
    return; x86's irqentry_exit also after an exception."""
    cpu = Cpu({0: Contexts.KERNEL})
    kernel_task, other = Task(0, "k", 0), Task(1, "other", 0)
    cpu.run(kernel_task)
    cpu.rq.enqueue(other, wakeup=False)
    cpu.need_resched, cpu.ret = True, ret
    expected = Next.FRAME if preempted else Next.TASK
    assert resume(cpu, rules, cpu) is expected


def test_voluntary_preemption_never_preempts_kernel_code_on_an_irq_return() -> None:
    rules = RunLoopRules.for_arch("arm64", CTX.vector, CTX.entry, full_preempt=False)
    cpu = Cpu({0: Contexts.KERNEL})
    cpu.run(Task(0, "k", 0))
    cpu.rq.enqueue(Task(1, "other", 0), wakeup=False)
    cpu.need_resched, cpu.ret = True, Ret.IRQ
    assert resume(cpu, rules, cpu) is Next.TASK


@pytest.mark.parametrize(
    ("halt_ctx", "preempted"),
    [
        (Contexts.KERNEL_RCU, True),  # rcu_preempt_depth() only: preempt_count 0 (PREEMPT_RCU)
        (Contexts.KERNEL_ATOMIC, False),  # preempt_count() > 1: never preempted
    ],
)
def test_halted_waiter_halted_only_for_rcu_is_preempted_on_an_irq_return(
    halt_ctx: GuestContext, preempted: bool
) -> None:
    """The seed's WFI loop runs in the faulting context once the list lock is dropped: a
    waiter halted only because of rcu_preempt_depth() has preempt_count 0, so el1_irq can
    preempt it under CONFIG_PREEMPT; an atomic one spins on."""
    cpu = Cpu()
    waiter, other = Task(0, "waiter", 0), Task(1, "other", 0)
    cpu.run(waiter)
    waiter.state, waiter.halt_ctx = TaskState.HALTED_APF, halt_ctx
    cpu.rq.enqueue(other, wakeup=False)
    cpu.need_resched, cpu.ret = True, Ret.IRQ
    if not preempted:
        assert resume(cpu, ARM64, cpu) is Next.WFI_HALT
        return
    assert resume(cpu, ARM64, cpu) is Next.FRAME
    assert waiter.state is TaskState.RUNNABLE and waiter.halt_ctx is halt_ctx
    cpu.finish_switch(ARM64)
    assert cpu.current is other
    # Woken (its node unhashed) while another task ran: back on the CPU it leaves the loop.
    cpu.driver.woken.add(0)
    other.vruntime = 100_000_000  # it has run its share
    schedule(cpu, ARM64, cpu)
    cpu.finish_switch(ARM64)
    state: TaskState = waiter.state  # read again: mypy keeps the narrowing above
    assert cpu.current is waiter and state is TaskState.HALTED_APF
    assert resume(cpu, ARM64, cpu) is Next.TASK
    resumed: TaskState = waiter.state  # read again: mypy keeps the narrowing above
    assert resumed is TaskState.RUNNING and waiter.halt_ctx is None


def test_the_context_switch_is_charged_to_the_task_switched_to() -> None:
    """set_next_entity sets the next task's exec_start when __schedule picks it, so the
    switch itself is charged to that task (the simulator's GuestCpu.picked)."""
    from apfsim.guest.cpu import GuestCpu

    class Clock:
        now = 0

        def after(self, delay: int, cb: Any, arg: Any = None) -> None:
            return None

        def at(self, t: int, cb: Any, arg: Any = None) -> None:
            return None

        def cancel(self, handle: Any) -> None:
            pass

        def next_is(self, time_ns: int) -> bool:
            return False

        def advance_to(self, time_ns: int) -> None:
            raise AssertionError("next_is never allows it")

    class Vcpu:
        clock: Any = None

        def stage2_fault(self, gfn: int, ctx: Any) -> None:
            raise AssertionError("no stage-2 fault in this test")

        def wfi(self, halt: bool) -> None:
            raise AssertionError("no WFI in this test")

        def exit_for_guest_call(self, exits: int, handling_ns: int, ctx: Any = None) -> None:
            raise AssertionError("no guest call in this test")

    costs = FrameCosts(context_switch_ns=3_000)
    rules = RunLoopRules.for_arch("arm64", CTX.vector, CTX.entry, costs)
    from apfsim.ports import RunCounters

    class Services:
        memory: Any = None
        workloads: tuple[Any, ...] = ()

        def workload_of(self, task: Any) -> Any:
            raise AssertionError("no workload in this test")

        def run_driver(self, cpu: int, fn: Callable[..., Any], *args: Any) -> Any:
            return fn(*args)

        def send_ipi(self, cpu: int, sender: int) -> None:
            raise AssertionError("no IPI in this test")

        def task_finished(self, task: Any) -> None:
            raise AssertionError("no task finishes in this test")

    clock = Clock()
    cpu = GuestCpu(0, clock, Vcpu(), Driver(), Services(), CfsParams(), rules, False, RunCounters())
    prev, nxt = Task(0, "prev", 0), Task(1, "next", 0)
    cpu.rq.enqueue(nxt, wakeup=False)
    prev.state = TaskState.RUNNING
    cpu.rq.curr, cpu.current = prev, prev
    clock.now = 10_000
    cpu.schedule()  # prev is charged up to the pick
    assert prev.sum_exec_runtime == 10_000
    clock.now = 13_000  # the switch frame ran for 3 us
    frame = cpu.frames.pop()
    frame_end(cpu, rules, frame, cpu)
    clock.now = 20_000
    cpu.update_curr()
    assert nxt.sum_exec_runtime == 10_000  # 3 us of switch + 7 us of its own


def test_disable_waits_in_cancel_work_sync_for_a_running_gup() -> None:
    """kvm_clear_async_pf_completion_queue cancels every queued item with cancel_work_sync,
    which waits for a worker whose GUP is running: the vCPU thread that wrote EN = 0 stays
    blocked until that GUP returns, then its run loop goes on."""
    from apfsim.host.async_pf import AsyncPf, WorkState
    from apfsim.host.vcpu import Vcpu, VcpuMode, VcpuParams
    from apfsim.ports import RunCounters
    from apfsim.protocols.sync import SyncHost

    events: list[tuple[Any, Any]] = []

    class Clock:
        now = 0

        def after(self, delay: int, cb: Any, arg: Any = None) -> tuple[Any, Any]:
            events.append((cb, arg))
            return (cb, arg)

        def at(self, t: int, cb: Any, arg: Any = None) -> tuple[Any, Any]:
            return self.after(0, cb, arg)

        def cancel(self, handle: Any) -> None:
            pass

        def next_is(self, time_ns: int) -> bool:
            return False  # every event is recorded, none runs in place

        def advance_to(self, time_ns: int) -> None:
            raise AssertionError("next_is never allows it")

    waiting: list[Callable[[], object]] = []
    running = [AsyncPf(vcpu_id=0, gfn=7, token=1, state=WorkState.CANCELLED)]

    class Io:
        def resolve_nowait(self, gfn: int) -> int:
            raise AssertionError("no fault in this test")

        def read_page(
            self, gfn: int, on_done: Callable[[Any], object], arg: Any, vcpu: int = 0
        ) -> None:
            raise AssertionError("no fault in this test")

        def map_after_read(self, gfn: int) -> None:
            raise AssertionError("no fault in this test")

        def start_worker(self, work: AsyncPf) -> None:
            raise AssertionError("no fault in this test")

        def running_workers(self) -> list[AsyncPf]:
            return running

        def on_worker_idle(self, vcpu: int, callback: Callable[[], object]) -> None:
            waiting.append(callback)

    class Guest:
        timer_pending = ipi_pending = False
        stolen_ns = 0

        def interrupt(self, now: int) -> None:
            raise AssertionError("no interrupt in this test")

        def context(self) -> GuestContext:
            return Contexts.KERNEL

        def take_events(self, injections: list[Injection], lapic_enabled: bool) -> None:
            raise AssertionError("no injection in this test")

        def resume(self) -> None:
            raise AssertionError("the guest is not resumed in this test")

    vcpu = Vcpu(0, Clock(), SyncHost(), Io(), VcpuParams(0, 0, 0, 0, 0, 0, 0, 0), RunCounters())
    vcpu.guest = Guest()
    vcpu.exit_for_guest_call(1, 0)
    cb, arg = events.pop()
    cb(arg)  # the calls are handled: a cancelled item is mid-GUP
    assert vcpu.mode is VcpuMode.SYNC_FAULT and not events and len(waiting) == 1
    running.clear()
    waiting.pop()()  # its GUP returned: the loop goes on with an entry
    mode: VcpuMode = vcpu.mode  # read again: mypy keeps the narrowing above
    assert mode is VcpuMode.HOST
    assert [cb.__name__ for cb, _ in events] == ["_entered"]
    # Nothing cancelled mid-GUP: no wait.
    events.clear()
    vcpu.exit_for_guest_call(1, 0)
    cb, arg = events.pop()
    cb(arg)
    assert [cb.__name__ for cb, _ in events] == ["_entered"] and not waiting


def test_the_checker_holds_the_vcpu_while_a_cancelled_gup_runs() -> None:
    """The same rule in the checker (no world step of today's disables async PF on a vCPU
    that then enters again: offline and reboot idle it; the state is set up by hand)."""
    from apfsim.check.world import Mode, Step, World, WorldConfig
    from apfsim.host.async_pf import AsyncPf, WorkState

    world = World(WorldConfig(protocol="x86", vcpus=1, tasks=1, pages=1, modes=("user",)))
    world.vcpus[0].mode = Mode.ENTRY
    world.io.append(AsyncPf(vcpu_id=0, gfn=0, token=0x1000, state=WorkState.CANCELLED))
    assert (Step.ENTER, 0, 0) not in world.actions()
    world.step((Step.WORKER, 0, 0))
    assert (Step.ENTER, 0, 0) in world.actions()
