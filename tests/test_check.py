"""The model checker: mutants caught with shortest traces, fixed code passing, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from apfsim.check import WorldConfig, check
from apfsim.check.mutants import MUTANTS
from apfsim.check.world import Step, TaskState, World
from apfsim.cli import main
from apfsim.protocols.common import HostBase
from apfsim.protocols.x86 import X86Host

# The seed with its SEND_ALWAYS FIXME set, where an atomic kernel fault takes the halted wait.
SEED_HALTED_WAIT_WORLD = WorldConfig(
    protocol="arm64-rfcv2",
    vcpus=1,
    tasks=1,
    pages=1,
    send_always=True,
    modes=("user", "kernel_atomic"),
)


def mutant_world(name: str) -> WorldConfig:
    m = MUTANTS[name]
    return WorldConfig(protocol=m.protocol, **m.world)


EXPECTED = {
    "B1": "I4 not-present injected with an event pending (B1)",
    "B4": "I4 guest cannot take an injected async PF",
    "B5": "live: task asleep forever",
    "B8": "live: task asleep forever",
    "B9": "I1",
    "B12": "I9",
    "B14": "I8 host wrote guest memory after async PF was disabled (B14)",
    "dummy-drop": "live: task asleep forever",
}


def test_every_listed_bug_has_a_mutant() -> None:
    assert set(MUTANTS) == set(EXPECTED)
    assert {"B1", "B4", "B5", "B8", "B9", "B12", "B14", "dummy-drop"} <= set(MUTANTS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mutant_is_caught_and_its_fixed_world_passes(name: str) -> None:
    config = mutant_world(name)
    fixed = check(config)
    assert fixed.complete and fixed.violation is None, fixed.violation
    found = check(replace(config, mutant=name))
    assert found.violation is not None
    assert found.violation.prop == EXPECTED[name]
    assert found.violation.trace  # a readable trace, step by step


@pytest.mark.parametrize("name", ["B1", "B4", "B9", "B12", "B14"])
def test_safety_counterexample_is_a_shortest_one(name: str) -> None:
    """BFS: no violation exists at any smaller depth."""
    config = replace(mutant_world(name), mutant=name)
    found = check(config)
    assert found.violation is not None
    steps = len(found.violation.trace)
    shorter = check(config, max_depth=steps - 1)
    assert shorter.violation is None or shorter.violation.prop.startswith("live")
    assert not shorter.complete


def test_liveness_trace_marks_where_the_run_is_doomed() -> None:
    found = check(replace(mutant_world("B5"), mutant="B5"))
    assert found.violation is not None and found.violation.doomed_after is not None
    world = World(mutant_world("B5"))
    del world
    assert 0 < found.violation.doomed_after <= len(found.violation.trace)


def test_the_seeds_halted_waiter_is_never_woken() -> None:
    """docs/findings.md F1: with SEND_ALWAYS, an atomic kernel-mode fault takes the halted
    wait; its page-ready arrives in the waiter's own context, the wake is delayed, and the
    delayed wake only runs on return to user or idle entry, which the WFI loop never reaches."""
    found = check(SEED_HALTED_WAIT_WORLD)
    assert found.violation is not None
    assert found.violation.prop == "live: halted waiter never woken"
    effects = [e for step in found.violation.trace for e in step.effects]
    assert "guest handler: wait_halt" in effects


def test_a_halted_waiter_in_rcu_can_be_preempted_but_still_strands_when_alone() -> None:
    """docs/findings.md F1's scope: a waiter halted only for rcu_preempt_depth() runs its WFI
    loop with preempt_count 0, so a tick's el1_irq return can preempt it (CONFIG_PREEMPT),
    and a page-ready taken while another task runs wakes it. If the page-ready is delivered
    while it is back on the CPU, the wake is delayed as for an atomic waiter."""
    world = replace(SEED_HALTED_WAIT_WORLD, tasks=2, modes=("user", "kernel_rcu"), idle_tick=True)
    found = check(replace(world, syscalls=False))
    assert found.violation is not None
    assert found.violation.prop == "live: halted waiter never woken"
    switched = [e for step in found.violation.trace for e in step.effects]
    assert "guest handler: wait_halt" in switched and "vCPU0 switches to task1" in switched


def test_the_seeds_idle_delayed_wake_is_lost_without_a_tick_in_idle() -> None:
    """docs/findings.md F4: a page-ready landing in __schedule (rq->lock held) is delayed;
    __cpu_do_idle's kvm_async_pf_delayed_wake then wakes the task, but executes WFI with no
    need_resched test in between, and with NO_HZ_IDLE no tick ends that WFI: the woken task
    waits for an unrelated interrupt. With the tick running in idle, nothing is lost."""
    world = WorldConfig(protocol="arm64-rfcv2", vcpus=1, tasks=2, pages=1, syscalls=False)
    found = check(world)
    assert found.violation is not None
    assert found.violation.prop == "live: task asleep forever"
    text = [step.action for step in found.violation.trace]
    assert any("__schedule" in action for action in text)
    assert check(replace(world, idle_tick=True)).violation is None


def test_the_seeds_window_lets_an_abort_clobber_an_unread_syndrome() -> None:
    """docs/findings.md F2 (Mark Rutland's NAK): entry-common is outside [VBAR, VBAR+range),
    so a page-ready abort can land before el0_sync has read ESR_EL1/FAR_EL1."""
    config = WorldConfig(protocol="arm64-rfcv2", vcpus=1, tasks=2, pages=1, placement="one")
    found = check(config)
    assert found.violation is not None
    assert found.violation.prop == "abort injected where the guest cannot take it"
    assert "ESR_EL1/FAR_EL1" in found.violation.detail


def test_sdei_design_passes_the_window_world() -> None:
    """Not-present only at EL0, page-ready a maskable PPI: nothing lands in entry-common."""
    config = WorldConfig(protocol="arm64-sdei-ppi", vcpus=1, tasks=2, pages=1, placement="one")
    assert check(config).violation is None


def test_the_seeds_cpu_offline_strands_its_sleepers() -> None:
    """docs/findings.md F3: kvm_async_pf_cpu_offline disables APF and wakes nobody; the host
    drops the queued page-ready, so a task asleep on that CPU never wakes unless the CPU comes
    back online (the enable's wake-all). x86 wakes them locally as the CPU goes down."""
    config = WorldConfig(
        protocol="arm64-rfcv2",
        vcpus=2,
        tasks=2,
        pages=1,
        modes=("user",),
        hotplug=1,
        stay_offline=True,
        syscalls=False,
    )
    found = check(config)
    assert found.violation is not None
    assert found.violation.prop == "live: task asleep forever"
    assert check(replace(config, protocol="x86")).violation is None


def test_invariants_hold_in_the_initial_world_of_every_protocol() -> None:
    from apfsim.registry import PROTOCOLS

    for name in PROTOCOLS:
        world = World(WorldConfig(protocol=name))
        assert world.broken() is None
        assert world.actions()


def test_states_are_identified_by_content_not_history() -> None:
    a = World(WorldConfig(protocol="x86", vcpus=1, tasks=1, pages=1, modes=("user",))).copy()
    b = a.copy()
    assert a.key() == b.key()
    a.step((Step.ENTER, 0, 0))
    assert a.key() != b.key()
    b.step((Step.ENTER, 0, 0))
    assert a.key() == b.key()
    assert all(t.state == TaskState.RUNNABLE for t in a.tasks)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b9.json"
    assert main(["check", "--mutant", "B9", "--quiet", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "VIOLATION I1" in text and "shortest trace" in text
    data = json.loads(out.read_text())
    assert data["violation"]["property"] == "I1" and data["world"]["mutant"] == "B9"
    assert main(["check", "x86", "--vcpus", "1", "--tasks", "1", "--pages", "1"]) == 0
    assert "no violation" in capsys.readouterr().out


def test_cli_lists_mutants_with_their_fixes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--list-mutants"]) == 0
    text = capsys.readouterr().out
    for name in MUTANTS:
        assert f"{name} (" in text
    assert "make apf token non-zero" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["check"], "missing PROTOCOL"),
        (["check", "nope"], "PROTOCOL: unknown 'nope'"),
        (["check", "x86", "--vcpus", "0"], "--vcpus: must be 1 to 4"),
        (["check", "x86", "--mutant", "B99"], "--mutant: unknown 'B99'"),
        (["check", "arm64-rfcv2", "--mutant", "B9"], "B9 is a bug of x86"),
        (["check", "x86", "--modes", "user,sideways"], "--modes: unknown 'sideways'"),
        (["check", "x86", "--depth", "0"], "--depth: must be at least 1"),
        (["check", "arm64-sdei-ppi", "--reboot"], "models no CPU hotplug or reboot"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_a_search_cut_short_reports_no_false_liveness_violation() -> None:
    for limit in (50, 700, 3000):
        r = check(WorldConfig(protocol="x86"), max_states=limit)
        assert not r.complete and r.violation is None


# -- invariants in every simulation run -------------------------------------------------------


def test_simulation_stops_on_a_broken_invariant_with_the_last_events() -> None:
    from apfsim.simulation import InvariantViolation, Simulation
    from test_more_variants import small_scenario

    sim = Simulation(small_scenario(), "x86", seed=2)
    sim.run(0.05)
    checker = sim.checker
    assert checker is not None
    assert len(checker.recent) == checker.recent.maxlen  # events were recorded as it ran
    host = sim.host_protocol
    assert isinstance(host, HostBase)
    host.apf[0].queued += 1
    with pytest.raises(InvariantViolation) as err:
        checker.check_vcpu(0, False)
    report = str(err.value)
    assert "invariant I2 broken" in report and "last events:" in report
    assert "try_async_pf" in report or "inject" in report


def test_cli_keeps_finished_results_when_a_later_protocol_breaks_an_invariant(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import apfsim.checking as checking
    from apfsim.invariants import check_vcpu as real
    from apfsim.ports import HostProtocol

    assert checking.__dict__["check_vcpu"] is real  # the function the run checks call

    def broken_for_rfcv2(host: HostProtocol, v: int, in_guest: bool) -> tuple[str, str] | None:
        if getattr(host, "name", "") == "arm64-rfcv2":
            return "I2", "forced by the test"
        return real(host, v, in_guest)

    monkeypatch.setattr(checking, "check_vcpu", broken_for_rfcv2)
    args = ["run", "--duration", "0.5", "-p", "sync", "-p", "arm64-rfcv2"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "sync" in out and "[tasks" in out  # the finished protocol's table is printed
    assert "invariant violated" in err and "forced by the test" in err
    assert "Traceback" not in err
    assert main([*args, "--no-check"]) == 0


def test_x86_never_needs_the_dummy_node_in_a_small_world() -> None:
    """docs/findings.md: x86 delivers page-ready only to the faulting vCPU with IF=1, after
    the #PF handler queued the node with IF=0, so dropping the dummy loses nothing."""
    config = WorldConfig(protocol="x86", vcpus=1, tasks=2, pages=2, mutant="dummy-drop")
    r = check(config)
    assert r.complete and r.violation is None


def test_a_reboot_does_not_hide_a_task_asleep_forever() -> None:
    found = check(replace(SEED_HALTED_WAIT_WORLD, reboot=True))
    assert found.violation is not None
    assert found.violation.prop == "live: halted waiter never woken"


@pytest.mark.slow
def test_token_ids_do_not_wrap_in_a_world_that_could_hold_more_live_faults() -> None:
    """The narrow apf.id of a small world must not make fixed x86 reuse a live token."""
    world = World(WorldConfig(protocol="x86", vcpus=1, tasks=4, pages=4, modes=("user",)))
    assert isinstance(world.host, X86Host)
    assert world.host.token_id_mask >= 4 * 4 + 2
    r = check(
        WorldConfig(protocol="x86", vcpus=1, tasks=4, pages=4, modes=("user",)), max_states=15_000
    )
    assert r.violation is None


def test_hotplug_needs_the_guests_callbacks() -> None:
    with pytest.raises(ValueError, match="no CPU hotplug or reboot"):
        World(WorldConfig(protocol="arm64-sdei-ppi", hotplug=1))


# -- postcopy's background stream ------------------------------------------------------------


def test_postcopy_stream_is_offered_between_the_fault_and_its_worker() -> None:
    """With the stream on, a missing page can be placed at any moment, including after the
    fault queued its async PF and before the worker ran."""
    w = World(WorldConfig(protocol="x86", vcpus=1, tasks=1, pages=1, modes=("user",), stream=True))
    assert (Step.STREAM, 0, 0) in w.actions()
    for _ in range(40):
        if w.io:
            break
        acts = [a for a in w.actions() if a[0] not in (Step.STREAM, Step.TICK)]
        w.step(acts[0])
    assert w.io, "the task's access should have queued an async PF"
    acts = w.actions()
    assert (Step.WORKER, 0, 0) in acts and (Step.STREAM, 0, 0) in acts
    w.step((Step.STREAM, 0, 0))
    assert (Step.STREAM, 0, 0) not in w.actions()  # placed once


@pytest.mark.parametrize("protocol", ["x86", "arm64-sdei-ppi"])
def test_async_pf_completes_once_when_the_stream_places_its_page_first(protocol: str) -> None:
    """Every interleaving of the stream with faults, workers and ticks: each async PF is
    completed exactly once and every task finishes (the run-loop and guest invariants, and
    liveness), whether the page came by the stream or by the worker."""
    config = WorldConfig(protocol=protocol, vcpus=1, tasks=2, pages=1, stream=True)
    result = check(config)
    assert result.complete and result.violation is None
