"""x86-legacy: a halted waiter woken by the page-ready #PF taken in its own halt loop.

Issue 13, item 8. Before 5.8 (``arch/x86/kernel/kvm.c``, 2.6.38-5.7), a not-present taken
where the task cannot schedule (``n.halted``: the idle task, ``preempt_count() > 1`` or an
RCU read side with CONFIG_PREEMPT_COUNT, else any kernel-mode fault) parks the task in

    for (;;) {
            if (hlist_unhashed(&n.link))
                    break;
            native_safe_halt();     /* sti; hlt */
            local_irq_disable();
    }

The page-ready #PF ends the HLT on that same vCPU (``kvm_arch_async_page_present`` sets
``mp_state = KVM_MP_STATE_RUNNABLE``); its handler, ``kvm_async_pf_task_wake`` ->
``apf_task_wake_one``, unhashes the node (``hlist_del_init``) and sends
``smp_send_reschedule(n->cpu)``, and the loop sees the node unhashed as soon as the handler
returns into it. Between those two points the waiter has no node, yet nothing is lost: it is
no longer in the HLT. I6 used to call that state "a lost wake-up (it sleeps forever)"; it
holds I6 to a halted waiter only while it sits in the HLT, where a missing node with no
interrupt on its way would be one.
"""

from __future__ import annotations

import pytest

from apfsim.api import run_protocol
from apfsim.check import World, WorldConfig, check
from apfsim.check.world import Mode
from apfsim.guest.kvm_apf_x86_legacy import X86LegacyApfGuest
from apfsim.guest.sched import TaskState
from apfsim.scenario import load_scenario, with_overrides


def test_no_preempt_count_kernel_faults_halt_and_wake_cleanly() -> None:
    """rfcv2-2020 with ``preempt_count_config = false``: every kernel-mode fault halts
    (``interrupt_kernel``). I6 broke at 0.67 ms, on the first halted waiter's page-ready."""
    scenario = with_overrides(load_scenario("rfcv2-2020"), {"guest.preempt_count_config": False})
    r = run_protocol(scenario, "x86-legacy", duration_s=0.005)
    assert r.apf["waits_halt"] > 0 and r.apf["resched_ipis"] > 0


def test_kernel_atomic_faults_halt_and_wake_cleanly() -> None:
    """writer-compute with atomic kernel accesses (``preempt_count() > 1``): I6 broke at
    4.3 ms, the first halted waiter."""
    scenario = with_overrides(
        load_scenario("writer-compute"), {"tasks.0.kernel_mode": "kernel_atomic"}
    )
    r = run_protocol(scenario, "x86-legacy", duration_s=0.02)
    assert r.apf["waits_halt"] > 0 and r.apf["resched_ipis"] > 0
    assert r.apf["waits_halt"] <= r.apf["resched_ipis"] + 1  # each halted wait woken (or the last)


@pytest.mark.parametrize(("vcpus", "tasks"), [(1, 1), (1, 2)])
def test_checker_finds_no_lost_wakeup_for_halted_waiters(vcpus: int, tasks: int) -> None:
    """Every interleaving of the small world with atomic kernel accesses: no state breaks
    I6 and every task can finish (the 1x1 world used to stop at 9 steps on I6)."""
    config = WorldConfig("x86-legacy", vcpus=vcpus, tasks=tasks, pages=1, modes=("kernel_atomic",))
    result = check(config)
    assert result.violation is None, result.violation


def test_i6_still_holds_a_halted_waiter_in_the_hlt_to_its_node() -> None:
    """The precise I6: a halted waiter whose vCPU is blocked in the HLT with its node gone
    and no interrupt on its way (a wake that forgot ``smp_send_reschedule``) is a lost
    wake-up; the same waiter with its node is fine."""
    world = World(WorldConfig("x86-legacy", vcpus=1, tasks=1, pages=1, modes=("kernel_atomic",)))
    for _ in range(20):
        if world.tasks[0].state is TaskState.HALTED_APF and world.vcpus[0].mode == Mode.HALTED:
            break
        actions = world.actions()
        world.step(next((a for a in actions if "worker" not in world.describe(a)), actions[0]))
    else:
        pytest.fail("the task never halted")
    assert world.broken() is None
    guest = world.guest
    assert isinstance(guest, X86LegacyApfGuest)
    for bucket in guest.async_pf_sleepers:
        bucket.clear()  # hlist_del_init with no reschedule IPI
    broken = world.broken()
    assert broken is not None and broken[0] == "I6" and "lost wake-up" in broken[1]
