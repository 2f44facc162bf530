"""The host's scheduler for the VM's threads on ``host.cpus`` CPUs (``kernel/sched/fair.c``).

The VM's host threads are the vCPU threads and the async PF kworkers. A thread is asleep,
queued (runnable, waiting for a CPU) or running. The policy is CFS reduced to what changes
who runs when:

* One queue of runnable threads ordered by ``vruntime`` (all nice 0), with each thread's
  affinity: a kworker is bound to the CPU that queued its work (``system_wq`` is per-CPU),
  a pinned vCPU thread to CPU ``i mod cpus``, an unpinned one may run anywhere. One queue
  stands for per-CPU runqueues under perfect load balancing.
* ``place_entity`` with GENTLE_FAIR_SLEEPERS: a waking thread gets at most half a latency
  period of credit, ``vruntime = max(vruntime, min_vruntime - latency/2)``.
* ``select_task_rq_fair`` reduced: a waking thread takes an idle allowed CPU (its previous
  one first), else it queues (``check_preempt_wakeup`` may preempt a running one).
* ``check_preempt_tick`` at the host tick: a thread that ran past its slice, or ran at
  least ``min_granularity`` and is a slice ahead of the leftmost queued one, is preempted.
* Preemption sets ``TIF_NEED_RESCHED``: a vCPU thread in the guest exits at once (the
  reschedule IPI or tick), and every vCPU thread calls ``schedule()`` only before its next
  guest entry (``xfer_to_guest_mode_handle_work`` in ``vcpu_enter_guest``'s loop); a
  kworker's short CPU burst is not preempted.
* ``run_delay`` (``sched_info_arrive`` in ``kernel/sched/stats.h``): the time a thread was
  queued, from ``sched_info_enqueue`` at its wakeup or preemption to the moment it gets a
  CPU. That is the steal time KVM reports to the guest (``record_steal_time``,
  ``kvm_update_stolen_time``).

Not modelled: host context-switch cost, other host tasks, migration cost, EEVDF's lag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mypy_extensions import mypyc_attr

from apfsim.ports import Clock

__all__ = ["ANY_CPU", "HostSched", "HostThread"]

ANY_CPU = -1
# NOTE: plain ints, not an IntEnum, for performance (compared on every switch).
SLEEPING, QUEUED, RUNNING = 0, 1, 2


def _noop() -> None:
    pass


class HostThread:
    """One host task (``task_struct`` + ``sched_entity`` + ``sched_info``).

    ``run`` is called when a queued thread gets a CPU; ``resched`` when the scheduler sets
    its ``TIF_NEED_RESCHED``; ``tick`` at the host tick while it runs.
    """

    __slots__ = (
        "affinity",
        "cpu",
        "exec_start",
        "last_delay",
        "name",
        "need_resched",
        "queued_at",
        "resched",
        "run",
        "run_delay",
        "slice_start",
        "state",
        "sum_exec",
        "tick",
        "vruntime",
    )

    def __init__(
        self,
        name: str,
        affinity: int,
        run: Callable[[], object] = _noop,
        resched: Callable[[], object] = _noop,
        tick: Callable[[], object] = _noop,
    ) -> None:
        self.name = name
        self.affinity = affinity  # ANY_CPU, or the one CPU it may run on
        self.cpu = max(0, affinity)  # the CPU it runs on, or last ran on
        self.state = SLEEPING
        self.vruntime = 0
        self.sum_exec = 0  # sum_exec_runtime
        self.exec_start = 0
        self.slice_start = 0  # prev_sum_exec_runtime: sum_exec when last picked
        self.queued_at = 0  # sched_info.last_queued
        self.run_delay = 0  # sched_info.run_delay
        self.last_delay = 0  # the wait that ended when it last got a CPU
        self.need_resched = False
        self.run = run
        self.resched = resched
        self.tick = tick

    def allowed(self, cpu: int) -> bool:
        return self.affinity < 0 or self.affinity == cpu

    def run_delay_at(self, now: int) -> int:
        """``run_delay`` including a wait still under way at ``now``."""
        return self.run_delay + (now - self.queued_at if self.state == QUEUED else 0)


@mypyc_attr(allow_interpreted_subclasses=True)
class HostSched:
    """``cpus`` host CPUs shared by the VM's threads; see the module's docstring."""

    def __init__(
        self,
        clock: Clock,
        cpus: int,
        latency_ns: int,
        min_granularity_ns: int,
        wakeup_granularity_ns: int,
        gentle_fair_sleepers: bool = True,
        wakeup_preemption: bool = True,
    ) -> None:
        # The tunables come already scaled by the CPU count (sysctl_sched_latency etc. grow
        # with log2 of the CPUs, up to 8: guest.sched.CfsParams.scaled, the same rule).
        self.engine = clock
        self.cpus = cpus
        self.latency_ns = latency_ns
        self.min_granularity_ns = min_granularity_ns
        self.wakeup_granularity_ns = wakeup_granularity_ns
        self.nr_latency = max(1, self.latency_ns // self.min_granularity_ns)
        self.sleeper_credit = self.latency_ns // 2 if gentle_fair_sleepers else self.latency_ns
        self.wakeup_preemption = wakeup_preemption
        self.curr: list[HostThread | None] = [None] * cpus
        self.queue: list[HostThread] = []  # runnable, waiting for a CPU; in arrival order
        self.min_vruntime = 0
        self.vcpu_threads: list[HostThread] = []
        self.preemptions = 0  # resched requests made (wakeup and tick)
        self.kworker_run_delay = 0
        self.kworker_cpu_ns = 0
        self.kworkers = 0

    # -- accounting ----------------------------------------------------------------------------
    def _update_curr(self, t: HostThread) -> None:
        """``update_curr``: charge the running thread since its last update."""
        now = self.engine.now
        delta = now - t.exec_start
        t.exec_start = now
        t.sum_exec += delta
        t.vruntime += delta

    def _update_min_vruntime(self) -> None:
        """``update_min_vruntime``: monotonic, the least vruntime of the runnable threads."""
        least = -1
        for t in self.curr:
            if t is not None:
                self._update_curr(t)
                if least < 0 or t.vruntime < least:
                    least = t.vruntime
        for t in self.queue:
            if least < 0 or t.vruntime < least:
                least = t.vruntime
        if least > self.min_vruntime:
            self.min_vruntime = least

    def _start(self, t: HostThread, cpu: int) -> None:
        """``set_next_entity`` + ``sched_info_arrive``: ``t`` runs on ``cpu`` from now."""
        now = self.engine.now
        delay = now - t.queued_at if t.state == QUEUED else 0
        t.run_delay += delay
        t.last_delay = delay
        t.state = RUNNING
        t.cpu = cpu
        t.exec_start = now
        t.slice_start = t.sum_exec
        t.need_resched = False
        self.curr[cpu] = t

    def _enqueue(self, t: HostThread) -> None:
        """``enqueue_entity`` + ``sched_info_enqueue``."""
        t.state = QUEUED
        t.queued_at = self.engine.now
        self.queue.append(t)

    def _leftmost(self, cpu: int) -> HostThread | None:
        """``pick_next_entity``: the queued thread allowed on ``cpu`` with least vruntime."""
        best: HostThread | None = None
        for t in self.queue:
            if t.allowed(cpu) and (best is None or t.vruntime < best.vruntime):
                best = t
        return best

    def _idle_cpu(self, t: HostThread) -> int:
        if t.affinity >= 0:
            return t.affinity if self.curr[t.affinity] is None else -1
        if self.curr[t.cpu] is None:
            return t.cpu
        for cpu, c in enumerate(self.curr):
            if c is None:
                return cpu
        return -1

    def _pick(self, cpu: int) -> None:
        """``cpu`` is free: the leftmost allowed thread runs on it (its ``run`` as an event,
        never inside the caller's own transition)."""
        self.curr[cpu] = None
        t = self._leftmost(cpu)
        if t is None:
            return
        self.queue.remove(t)
        self._start(t, cpu)
        self.engine.after(0, _dispatch, t)

    def _request_resched(self, c: HostThread) -> None:
        """``resched_curr``."""
        c.need_resched = True
        self.preemptions += 1
        c.resched()

    # -- transitions -----------------------------------------------------------------------------
    def wake(self, t: HostThread) -> bool:
        """``try_to_wake_up``: True if ``t`` runs at once; else it is queued (and may
        preempt a running thread) and its ``run`` is called when it gets a CPU."""
        assert t.state == SLEEPING, t.name
        self._update_min_vruntime()
        t.vruntime = max(t.vruntime, self.min_vruntime - self.sleeper_credit)
        cpu = self._idle_cpu(t)
        if cpu >= 0:
            self._start(t, cpu)
            return True
        self._enqueue(t)
        if self.wakeup_preemption:
            self._check_preempt_wakeup(t)
        return False

    def _check_preempt_wakeup(self, t: HostThread) -> None:
        """``check_preempt_wakeup``: preempt the allowed running thread furthest ahead, if
        it is more than ``wakeup_granularity`` ahead of ``t``."""
        victim: HostThread | None = None
        for cpu, c in enumerate(self.curr):
            if c is None or c.need_resched or not t.allowed(cpu):
                continue
            if c.vruntime - t.vruntime > self.wakeup_granularity_ns and (
                victim is None or c.vruntime > victim.vruntime
            ):
                victim = c
        if victim is not None:
            self._request_resched(victim)

    def sleep(self, t: HostThread) -> None:
        """``dequeue_task`` + ``__schedule``: running ``t`` blocks; its CPU goes to the next."""
        assert t.state == RUNNING and self.curr[t.cpu] is t, t.name
        self._update_curr(t)
        t.state = SLEEPING
        t.need_resched = False
        self._pick(t.cpu)

    def yield_cpu(self, t: HostThread) -> bool:
        """``schedule()`` at running ``t``'s resched point: True if it keeps a CPU (it is
        still the leftmost, or an allowed CPU is idle); else it is queued and its ``run``
        is called when it gets one."""
        assert t.state == RUNNING and self.curr[t.cpu] is t, t.name
        self._update_curr(t)
        t.need_resched = False
        cpu = t.cpu
        best = self._leftmost(cpu)
        if best is None or best.vruntime >= t.vruntime:
            return True
        self.queue.remove(best)
        self._enqueue(t)
        self.curr[cpu] = None
        self._start(best, cpu)
        self.engine.after(0, _dispatch, best)
        idle = self._idle_cpu(t)
        if idle >= 0:  # an unpinned thread moves to an idle CPU (idle balance)
            self.queue.remove(t)
            self._start(t, idle)
            return True
        return False

    def tick(self, cpu: int) -> None:
        """``scheduler_tick`` on ``cpu``: the running thread's tick, then
        ``check_preempt_tick``."""
        c = self.curr[cpu]
        if c is None:
            return
        c.tick()
        if c.need_resched or c.state != RUNNING:
            return
        self._update_curr(c)
        best = self._leftmost(cpu)
        if best is None:
            return
        nr = 1 + sum(1 for t in self.queue if t.allowed(cpu))
        period = self.latency_ns if nr <= self.nr_latency else nr * self.min_granularity_ns
        ideal = period // nr  # sched_slice, all weights equal
        ran = c.sum_exec - c.slice_start
        if ran > ideal or (ran >= self.min_granularity_ns and c.vruntime - best.vruntime > ideal):
            self._request_resched(c)

    # -- the async PF kworkers -----------------------------------------------------------------
    def burst(self, vcpu: int, ns: int, fn: Callable[[Any], object], arg: Any) -> None:
        """A kworker's ``ns`` of CPU on the CPU vCPU ``vcpu``'s thread runs on (the
        ``system_wq`` item is queued there), then ``fn(arg)``."""
        self.kworkers += 1
        work = _Burst(self, ns, fn, arg)
        cpu = self.vcpu_threads[vcpu].cpu if self.vcpu_threads else 0
        work.thread = HostThread("kworker", cpu, work.start)
        if self.wake(work.thread):
            work.start()


def _dispatch(t: HostThread) -> None:
    t.run()


class _Burst:
    """One kworker run: CPU time, then sleep (or exit) and the continuation."""

    __slots__ = ("arg", "fn", "ns", "sched", "thread")

    def __init__(self, sched: HostSched, ns: int, fn: Callable[[Any], object], arg: Any) -> None:
        self.sched = sched
        self.ns = ns
        self.fn = fn
        self.arg = arg
        self.thread: HostThread | None = None

    def start(self) -> None:
        self.sched.engine.after(self.ns, self.end)

    def end(self, _: object = None) -> None:
        t = self.thread
        assert t is not None
        sched = self.sched
        sched.sleep(t)
        sched.kworker_run_delay += t.run_delay
        sched.kworker_cpu_ns += t.sum_exec
        self.fn(self.arg)
