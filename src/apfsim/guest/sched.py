"""A CFS-like fair scheduler per guest CPU (``kernel/sched/fair.c``, v5.7 rules).

All tasks are nice 0, so vruntime advances at the rate of the runtime charged. Modelled:

* ``update_curr``: charge runtime from the guest clock (``clock_task``); with paravirtual
  steal-time accounting the time the vCPU was stalled by the host is left out.
* ``place_entity`` with GENTLE_FAIR_SLEEPERS: a waking sleeper gets at most half a
  latency period of credit, ``vruntime = max(vruntime, min_vruntime - latency/2)``.
* ``check_preempt_tick``: preempt when the task ran past its ideal slice, or ran at
  least ``min_granularity`` and is more than a slice ahead of the leftmost task.
* ``check_preempt_wakeup``: the woken task preempts when it is more than
  ``wakeup_granularity`` behind ``curr`` in vruntime.

The tunables scale with ``1 + ilog2(min(ncpus, 8))`` (SCHED_TUNABLESCALING_LOG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from apfsim.guest.context import GuestContext

__all__ = ["CfsParams", "CfsRq", "Task", "TaskState"]


class TaskState(Enum):
    RUNNING = "running"  # curr on its CPU
    RUNNABLE = "runnable"  # on the runqueue
    SLEEPING_APF = "sleeping_apf"  # TASK_UNINTERRUPTIBLE in kvm_async_pf_wait
    HALTED_APF = "halted_apf"  # curr, spinning in the halted (WFI) wait
    DONE = "done"


@dataclass(slots=True, frozen=True)
class CfsParams:
    """Base (1-CPU) tunables; defaults are Linux's."""

    sched_latency_ns: int = 6_000_000
    min_granularity_ns: int = 750_000
    wakeup_granularity_ns: int = 1_000_000
    gentle_fair_sleepers: bool = True
    wakeup_preemption: bool = True

    def scaled(self, ncpus: int) -> CfsParams:
        factor = 1 + (min(ncpus, 8).bit_length() - 1)
        return CfsParams(
            self.sched_latency_ns * factor,
            self.min_granularity_ns * factor,
            self.wakeup_granularity_ns * factor,
            self.gentle_fair_sleepers,
            self.wakeup_preemption,
        )


@dataclass(slots=True, eq=False)
class Task:
    """``task_struct`` + ``sched_entity`` reduced to what the model needs."""

    tid: int
    name: str
    cpu: int
    state: TaskState = TaskState.RUNNABLE
    vruntime: int = 0
    sum_exec_runtime: int = 0
    prev_sum_exec_runtime: int = 0  # at the last pick, for check_preempt_tick
    completion_ns: int | None = None
    halt_ctx: GuestContext | None = None  # in the halted APF wait: the context it faulted in

    # NOTE: a flat tuple instead of the slots' dict, for performance: the model checker
    # pickles every state it reaches.
    def __getstate__(self) -> tuple[object, ...]:
        return (
            self.tid,
            self.name,
            self.cpu,
            _STATE_INDEX[self.state],
            self.vruntime,
            self.sum_exec_runtime,
            self.prev_sum_exec_runtime,
            self.completion_ns,
            self.halt_ctx,
        )

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (
            self.tid,
            self.name,
            self.cpu,
            index,
            self.vruntime,
            self.sum_exec_runtime,
            self.prev_sum_exec_runtime,
            self.completion_ns,
            self.halt_ctx,
        ) = state
        self.state = _STATES[index]


_STATES = tuple(TaskState)
_STATE_INDEX = {state: i for i, state in enumerate(_STATES)}


@dataclass
class CfsRq:
    """One CPU's runqueue: runnable tasks other than ``curr``."""

    params: CfsParams
    queue: list[Task] = field(default_factory=list)
    min_vruntime: int = 0
    curr: Task | None = None
    on_state: Callable[[Task], None] | None = None  # a tracer's view of state changes

    @property
    def nr_running(self) -> int:
        return len(self.queue) + (1 if self.curr is not None else 0)

    def _update_min_vruntime(self) -> None:
        candidates = [t.vruntime for t in self.queue]
        if self.curr is not None:
            candidates.append(self.curr.vruntime)
        if candidates:
            self.min_vruntime = max(self.min_vruntime, min(candidates))

    def update_curr(self, delta_exec_ns: int) -> None:
        """Charge ``delta_exec_ns`` of runtime to ``curr`` (nice 0: weight 1024)."""
        curr = self.curr
        if curr is None or delta_exec_ns <= 0:
            return
        curr.sum_exec_runtime += delta_exec_ns
        curr.vruntime += delta_exec_ns
        self._update_min_vruntime()

    def sched_slice(self) -> int:
        """``__sched_period(nr) / nr`` for equal weights."""
        nr = max(1, self.nr_running)
        # DIV_ROUND_UP(latency, min_granularity): 8 with the defaults.
        nr_latency = max(1, -(-self.params.sched_latency_ns // self.params.min_granularity_ns))
        period = (
            self.params.sched_latency_ns
            if nr <= nr_latency
            else nr * self.params.min_granularity_ns
        )
        return period // nr

    def place_entity(self, task: Task) -> None:
        """Sleeper credit on wakeup (never moves a task's vruntime backwards)."""
        thresh = self.params.sched_latency_ns
        if self.params.gentle_fair_sleepers:
            thresh //= 2
        task.vruntime = max(task.vruntime, self.min_vruntime - thresh)

    def enqueue(self, task: Task, wakeup: bool) -> None:
        if wakeup:
            self.place_entity(task)
        task.state = TaskState.RUNNABLE
        self.queue.append(task)
        if self.on_state is not None:
            self.on_state(task)

    def leftmost(self) -> Task | None:
        if not self.queue:
            return None
        return min(self.queue, key=lambda t: (t.vruntime, t.tid))

    def pick_next(self) -> Task | None:
        """Put ``curr`` back if still runnable, then take the leftmost task."""
        task = self.leftmost()
        if task is not None:
            self.queue.remove(task)
            task.state = TaskState.RUNNING
            task.prev_sum_exec_runtime = task.sum_exec_runtime
            if self.on_state is not None:
                self.on_state(task)
        self.curr = task
        self._update_min_vruntime()
        return task

    def put_prev(self, task: Task) -> None:
        """Preempted ``curr`` goes back on the queue (no sleeper credit)."""
        task.state = TaskState.RUNNABLE
        self.queue.append(task)
        if self.curr is task:
            self.curr = None
        if self.on_state is not None:
            self.on_state(task)

    def check_preempt_tick(self) -> bool:
        """From ``entity_tick``, which calls it only when ``nr_running > 1``."""
        curr = self.curr
        if curr is None:
            return bool(self.queue)
        if not self.queue:
            return False
        ideal = self.sched_slice()
        delta_exec = curr.sum_exec_runtime - curr.prev_sum_exec_runtime
        if delta_exec > ideal:
            return True
        if delta_exec < self.params.min_granularity_ns:
            return False
        first = self.leftmost()
        if first is None:
            return False
        delta = curr.vruntime - first.vruntime
        return delta > ideal

    def check_preempt_wakeup(self, woken: Task) -> bool:
        curr = self.curr
        if curr is None:
            return True  # the idle task is always preempted
        if not self.params.wakeup_preemption:
            return False
        return curr.vruntime - woken.vruntime > self.params.wakeup_granularity_ns
