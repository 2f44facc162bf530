"""The per-CPU CFS model (``kernel/sched/fair.c``, v5.7, all tasks nice 0)."""

from __future__ import annotations

import pytest

from apfsim.guest.sched import CfsParams, CfsRq, Task, TaskState

MS = 1_000_000
BASE = CfsParams()


def rq_with(curr_vruntime: int, *queued_vruntimes: int, params: CfsParams = BASE) -> CfsRq:
    """A runqueue with ``curr`` (tid 0) and one queued task per given vruntime."""
    rq = CfsRq(params)
    for tid, vr in enumerate(queued_vruntimes, start=1):
        rq.enqueue(Task(tid, f"t{tid}", cpu=0, vruntime=vr), wakeup=False)
    curr = Task(0, "curr", cpu=0, vruntime=curr_vruntime, state=TaskState.RUNNING)
    rq.curr = curr
    return rq


def run_curr(rq: CfsRq, delta_exec_ns: int) -> None:
    """``curr`` ran ``delta_exec_ns`` since it was picked."""
    assert rq.curr is not None
    rq.curr.prev_sum_exec_runtime = rq.curr.sum_exec_runtime
    rq.update_curr(delta_exec_ns)


# ---------------------------------------------------------------------- tunable scaling


def test_base_params_are_linux_defaults() -> None:
    assert (BASE.sched_latency_ns, BASE.min_granularity_ns, BASE.wakeup_granularity_ns) == (
        6 * MS,
        750_000,
        1 * MS,
    )


@pytest.mark.parametrize(
    ("ncpus", "factor"), [(1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (9, 4), (64, 4)]
)
def test_scaled_factor_is_one_plus_ilog2_of_min_ncpus_8(ncpus: int, factor: int) -> None:
    """SCHED_TUNABLESCALING_LOG: ``factor = 1 + ilog2(min(num_online_cpus(), 8))``."""
    params = CfsParams(gentle_fair_sleepers=False, wakeup_preemption=False).scaled(ncpus)
    assert params.sched_latency_ns == 6 * MS * factor
    assert params.min_granularity_ns == 750_000 * factor
    assert params.wakeup_granularity_ns == 1 * MS * factor
    assert not params.gentle_fair_sleepers and not params.wakeup_preemption


# ---------------------------------------------------------------------- sched_slice


@pytest.mark.parametrize(
    ("nr", "slice_ns"),
    [
        (1, 6 * MS),
        (2, 3 * MS),
        (3, 2 * MS),
        (8, 750_000),  # nr == sched_nr_latency: still the latency period
        (9, 750_000),  # period = 9 * min_granularity
        (12, 750_000),
    ],
)
def test_sched_slice_period_stretches_past_sched_nr_latency(nr: int, slice_ns: int) -> None:
    """``__sched_period``: latency, or ``nr * min_granularity`` when nr > sched_nr_latency."""
    rq = rq_with(0, *([0] * (nr - 1)))
    assert rq.nr_running == nr
    assert rq.sched_slice() == slice_ns


def test_sched_slice_with_scaled_params() -> None:
    """4 CPUs: factor 3, latency 18 ms; 10 tasks > 8 → 10 × 2.25 ms / 10."""
    params = BASE.scaled(4)
    assert rq_with(0, params=params).sched_slice() == 18 * MS
    assert rq_with(0, *([0] * 9), params=params).sched_slice() == 2_250_000


def test_sched_nr_latency_rounds_up() -> None:
    """6 ms / 0.8 ms: DIV_ROUND_UP → 8, so 8 tasks still share the 6 ms latency."""
    params = CfsParams(min_granularity_ns=800_000)
    assert rq_with(0, *([0] * 7), params=params).sched_slice() == 750_000


# ---------------------------------------------------------------------- place_entity


def test_place_entity_gives_half_latency_sleeper_credit() -> None:
    """GENTLE_FAIR_SLEEPERS: ``vruntime = max(vruntime, min_vruntime - latency/2)``."""
    rq = CfsRq(BASE, min_vruntime=10 * MS)
    task = Task(1, "sleeper", cpu=0, vruntime=0, state=TaskState.SLEEPING_APF)
    rq.enqueue(task, wakeup=True)
    assert task.vruntime == 7 * MS
    assert task.state is TaskState.RUNNABLE and rq.queue == [task]


def test_place_entity_without_gentle_gives_full_latency() -> None:
    rq = CfsRq(CfsParams(gentle_fair_sleepers=False), min_vruntime=10 * MS)
    task = Task(1, "sleeper", cpu=0, vruntime=0)
    rq.place_entity(task)
    assert task.vruntime == 4 * MS


def test_place_entity_never_moves_vruntime_backwards() -> None:
    rq = CfsRq(BASE, min_vruntime=10 * MS)
    task = Task(1, "short-sleeper", cpu=0, vruntime=9 * MS)
    rq.place_entity(task)
    assert task.vruntime == 9 * MS
    ahead = Task(2, "ahead", cpu=0, vruntime=20 * MS)
    rq.place_entity(ahead)
    assert ahead.vruntime == 20 * MS


def test_enqueue_without_wakeup_gets_no_credit() -> None:
    """A preempted or new task is not placed (no sleeper credit)."""
    rq = CfsRq(BASE, min_vruntime=10 * MS)
    task = Task(1, "t", cpu=0, vruntime=0)
    rq.enqueue(task, wakeup=False)
    assert task.vruntime == 0


# ---------------------------------------------------------------------- check_preempt_wakeup


@pytest.mark.parametrize(
    ("woken_vruntime", "preempt"),
    [
        (5 * MS - 1_000_001, True),  # more than wakeup_granularity behind
        (4 * MS, False),  # exactly the granularity: not strictly greater
        (4_500_000, False),
        (6 * MS, False),  # woken is ahead of curr
    ],
)
def test_check_preempt_wakeup_uses_wakeup_granularity(woken_vruntime: int, preempt: bool) -> None:
    """wakeup_preempt_entity: ``vdiff = curr - se``; preempt iff ``vdiff > gran``."""
    rq = rq_with(5 * MS)
    woken = Task(9, "woken", cpu=0, vruntime=woken_vruntime)
    assert rq.check_preempt_wakeup(woken) is preempt


def test_check_preempt_wakeup_idle_is_always_preempted() -> None:
    rq = CfsRq(BASE)
    assert rq.check_preempt_wakeup(Task(1, "t", cpu=0, vruntime=10**12))


def test_check_preempt_wakeup_disabled_feature_never_preempts() -> None:
    rq = rq_with(50 * MS, params=CfsParams(wakeup_preemption=False))
    assert not rq.check_preempt_wakeup(Task(1, "t", cpu=0, vruntime=0))


# ---------------------------------------------------------------------- check_preempt_tick


def test_check_preempt_tick_when_slice_exceeded() -> None:
    """``delta_exec > ideal_runtime`` → resched (2 tasks: slice 3 ms)."""
    rq = rq_with(0, 100 * MS)  # leftmost far ahead: only the slice rule can fire
    run_curr(rq, 3 * MS)
    assert not rq.check_preempt_tick()
    run_curr(rq, 3 * MS + 1)
    assert rq.check_preempt_tick()


def test_check_preempt_tick_min_granularity_guard() -> None:
    """``delta_exec < sysctl_sched_min_granularity`` → no preemption, however far ahead."""
    rq = rq_with(0, 0)
    run_curr(rq, 749_999)
    assert rq.curr is not None
    rq.curr.vruntime = 50 * MS
    assert not rq.check_preempt_tick()


@pytest.mark.parametrize(
    ("lead", "preempt"), [(2 * MS + 1, True), (2 * MS, False), (1 * MS, False), (-MS, False)]
)
def test_check_preempt_tick_ahead_of_leftmost_by_more_than_a_slice(
    lead: int, preempt: bool
) -> None:
    """After min_granularity: ``curr->vruntime - leftmost->vruntime > ideal_runtime``."""
    rq = rq_with(0, 30 * MS, 20 * MS)  # 3 tasks: slice 2 ms; leftmost is at 20 ms
    assert rq.sched_slice() == 2 * MS
    run_curr(rq, 1 * MS)  # past min_granularity, within the slice
    assert rq.curr is not None
    rq.curr.vruntime = 20 * MS + lead
    assert rq.check_preempt_tick() is preempt


def test_check_preempt_tick_alone_never_preempts() -> None:
    rq = rq_with(0)
    run_curr(rq, 100 * MS)
    assert not rq.check_preempt_tick()


# ---------------------------------------------------------------------- bookkeeping


def test_update_curr_charges_runtime_and_advances_min_vruntime() -> None:
    rq = rq_with(1 * MS, 5 * MS)
    rq.update_curr(2 * MS)
    assert rq.curr is not None and rq.curr.vruntime == 3 * MS
    assert rq.curr.sum_exec_runtime == 2 * MS
    assert rq.min_vruntime == 3 * MS
    rq.update_curr(10 * MS)
    assert rq.min_vruntime == 5 * MS  # leftmost queued task
    rq.update_curr(-1)
    assert rq.curr.vruntime == 13 * MS


def test_pick_next_takes_leftmost_and_min_vruntime_never_decreases() -> None:
    rq = CfsRq(BASE, min_vruntime=4 * MS)
    a, b = Task(1, "a", cpu=0, vruntime=6 * MS), Task(2, "b", cpu=0, vruntime=5 * MS)
    rq.enqueue(a, wakeup=False)
    rq.enqueue(b, wakeup=False)
    assert rq.pick_next() is b and b.state is TaskState.RUNNING
    assert rq.min_vruntime == 5 * MS
    b.sum_exec_runtime = 7
    rq.put_prev(b)
    state: TaskState = b.state  # read again: mypy keeps the narrowing above
    assert rq.curr is None and state is TaskState.RUNNABLE
    assert rq.pick_next() is b and b.prev_sum_exec_runtime == 7
