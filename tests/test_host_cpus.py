"""Host CPU contention (``host.cpus``, apfsim.host.sched) and steal time as ``run_delay``.

Steal time is the time the vCPU thread was runnable but had no host CPU (``run_delay``,
``record_steal_time`` / ``kvm_update_stolen_time``); a thread blocked in I/O or halt is not
runnable, so a synchronous stall, an APF halt or a repeated-fault spin is never steal.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import apfsim
from apfsim.metrics.results import ProtocolResult
from apfsim.scenario import ScenarioError, load_scenario
from apfsim.simulation import Simulation

DURATION_S = 0.2


def compute_only(vcpus: int, cpus: int, pin: bool = False, tasks: int | None = None) -> Any:
    """``tasks`` endless compute threads (default one per vCPU), round robin: no faults."""
    return {
        "name": "cpus",
        "duration_s": DURATION_S,
        "guest": {"vcpus": vcpus, "memory_mib": 64, "reserved_mib": 8},
        "host": {"memory_limit_mib": 64, "cpus": cpus, "pin_vcpus": pin},
        "tasks": [{"kind": "compute", "count": tasks or vcpus}],
    }


def faulting(vcpus: int = 1, cpus: int = 0, steal: bool = False, arch: str = "arm64") -> Any:
    """A random writer over a half-swapped buffer and a compute thread per vCPU."""
    return {
        "name": "cpus-faults",
        "duration_s": DURATION_S,
        "guest": {
            "arch": arch,
            "vcpus": vcpus,
            "memory_mib": 96,
            "reserved_mib": 8,
            "steal_time_accounting": steal,
        },
        "host": {"memory_limit_mib": 48, "cpus": cpus},
        "initial_memory": {"resident_fraction": 0.5, "swapped_fraction": 0.5},
        "tasks": [
            {"kind": "random_writer", "buffer_mib": 80, "count": vcpus},
            {"kind": "compute", "count": vcpus},
        ],
    }


def simulate(data: Any, protocol: str = "sync", seed: int = 1) -> tuple[Simulation, ProtocolResult]:
    sim = Simulation(apfsim.Scenario.model_validate(data), protocol, seed)
    return sim, sim.run()


def run_delays(result: ProtocolResult) -> list[float]:
    delays = [v.run_delay_s for v in result.vcpus]
    assert all(d is not None for d in delays)
    return [d for d in delays if d is not None]


# -- run_delay accrues only while runnable but not running ---------------------------------
def test_two_busy_vcpus_on_one_cpu_each_wait_about_half_the_time() -> None:
    _, r = simulate(compute_only(vcpus=2, cpus=1))
    for delay in run_delays(r):
        assert 0.4 * DURATION_S < delay < 0.6 * DURATION_S
    # What one waits, the other runs: the two share the CPU's time.
    assert sum(run_delays(r)) == pytest.approx(DURATION_S, rel=0.02)
    work = [t.work_s for t in r.tasks]
    assert sum(work) < 1.02 * DURATION_S
    assert min(work) > 0.4 * DURATION_S
    assert r.host_cpu is not None and r.host_cpu["preemptions"] > 0


def test_two_busy_vcpus_on_two_cpus_never_wait() -> None:
    _, r = simulate(compute_only(vcpus=2, cpus=2))
    assert run_delays(r) == [0.0, 0.0]
    assert r.host_cpu is not None and r.host_cpu["preemptions"] == 0


def test_pinned_vcpus_share_only_their_own_cpu() -> None:
    """vCPU i on CPU i mod 2: vCPUs 0 and 2 share CPU 0, vCPU 1 has CPU 1 to itself."""
    _, r = simulate(compute_only(vcpus=3, cpus=2, pin=True))
    d0, d1, d2 = run_delays(r)
    assert d1 == 0.0
    assert 0.4 * DURATION_S < d0 < 0.6 * DURATION_S
    assert 0.4 * DURATION_S < d2 < 0.6 * DURATION_S


@pytest.mark.parametrize("vcpus", [2, 3, 4])
def test_more_host_cpus_never_more_run_delay(vcpus: int) -> None:
    totals = [sum(run_delays(simulate(compute_only(vcpus, cpus))[1])) for cpus in range(1, 5)]
    assert all(b <= a for a, b in itertools.pairwise(totals)), totals
    assert totals[vcpus - 1 :] == [0.0] * (4 - vcpus + 1)
    assert totals[0] > 0


def test_idle_vcpus_do_not_wait() -> None:
    """A vCPU blocked in WFI (idle guest) sleeps: one busy vCPU of two has the one CPU,
    once the idle one has run to its WFI (it waits for one slice at boot)."""
    _, r = simulate(compute_only(vcpus=2, cpus=1, tasks=1))
    assert sum(run_delays(r)) < 0.03 * DURATION_S
    assert r.tasks[0].work_s > 0.97 * DURATION_S
    # Without the idle vCPU's boot, the same: the busy one never waits after it.
    _, longer = simulate({**compute_only(vcpus=2, cpus=1, tasks=1), "duration_s": 1.0})
    assert sum(run_delays(longer)) == sum(run_delays(r))


# -- steal time -------------------------------------------------------------------------------
def stolen(sim: Simulation) -> list[int]:
    return [cpu.stolen_ns for cpu in sim.cpus]


def test_steal_time_is_run_delay_not_sync_stall() -> None:
    """The asymmetry of issue 16: synchronous stalls used to be added to the guest's steal
    time. A thread blocked in GUP's I/O is not runnable, so it accrues no run_delay."""
    sim, r = simulate(faulting(steal=True), "sync")
    assert r.faults["sync"] > 50
    assert r.vcpus[0].time_s["sync_fault"] > 0.05
    assert stolen(sim) == [0]
    # The same with the host CPUs modelled: one vCPU thread alone on its CPU never waits.
    sim, r = simulate(faulting(steal=True, cpus=1), "sync")
    assert r.faults["sync"] > 50
    assert run_delays(r) == [0.0] and stolen(sim) == [0]


def test_apf_halt_and_repeated_fault_spin_are_not_steal() -> None:
    sim, r = simulate(faulting(steal=True, arch="x86"), "halt-only")
    assert r.vcpus[0].time_s["apf_halt"] > 0.01
    assert stolen(sim) == [0]
    # RFCv2 has no halt: three writers over one small buffer re-fault outstanding pages.
    spin = {
        "name": "spin",
        "duration_s": DURATION_S,
        "guest": {"vcpus": 1, "memory_mib": 64, "reserved_mib": 8, "steal_time_accounting": True},
        "host": {"memory_limit_mib": 24},
        "initial_memory": {"resident_fraction": 0.3, "swapped_fraction": 0.7},
        "tasks": [{"kind": "random_writer", "buffer_mib": 4, "count": 3}],
    }
    sim, r = simulate(spin, "arm64-rfcv2", seed=0)
    assert r.faults["repeated"] > 10
    assert stolen(sim) == [0]
    # On one host CPU too: the spinning thread is runnable and running, so never waiting.
    # On one host CPU: the spinning thread is running, not waiting; only the kworkers' CPU
    # time is stolen from it.
    contended = {**spin, "duration_s": 1.0, "host": {"memory_limit_mib": 24, "cpus": 1}}
    sim, r = simulate(contended, "arm64-rfcv2", seed=1)
    assert r.faults["repeated"] > 1000
    assert r.host_cpu is not None
    assert stolen(sim) == [round(run_delays(r)[0] * 1e9)]
    assert stolen(sim)[0] <= 2 * r.host_cpu["kworker_cpu_s"] * 1e9


@pytest.mark.parametrize("protocol", ["sync", "x86", "arm64-rfcv2"])
def test_steal_equals_run_delay_when_accounting_is_on(protocol: str) -> None:
    arch = "x86" if protocol == "x86" else "arm64"
    sim, _ = simulate(faulting(vcpus=2, cpus=1, steal=True, arch=arch), protocol)
    assert sim.host_sched is not None
    delays = [t.run_delay for t in sim.host_sched.vcpu_threads]
    assert sum(delays) > 0.1 * DURATION_S * 1e9
    assert stolen(sim) == delays


def test_steal_is_not_charged_to_the_guest_task_without_accounting() -> None:
    """Accounting off: the guest sees nothing stolen, whatever the host did."""
    sim, r = simulate(faulting(vcpus=2, cpus=1, arch="x86"), "x86")
    assert sum(run_delays(r)) > 0 and stolen(sim) == [0, 0]


# -- the async PF kworker -----------------------------------------------------------------------
def test_a_kworker_contending_with_the_vcpu_delays_it() -> None:
    """One vCPU on one CPU: the only other thread is the kworker (bound to the CPU that queued
    its work), whose wakeup preempts the vCPU thread for its CPU time."""
    _, r = simulate(faulting(cpus=1, arch="x86"), "x86")
    assert r.host_cpu is not None
    assert r.apf["not_present_injected"] > 20
    assert r.host_cpu["kworkers"] > 20 and r.host_cpu["kworker_cpu_s"] > 0
    (delay,) = run_delays(r)
    assert delay > 0
    # Longer kworker CPU time, longer waits for the vCPU.
    data = faulting(cpus=1, arch="x86")
    data["host"]["worker_start_ns"] = 200_000
    _, slow = simulate(data, "x86")
    assert run_delays(slow)[0] > 5 * delay


def test_kworker_finish_time_delays_the_completion_without_contention_too() -> None:
    data = faulting(arch="x86")
    base = simulate(data, "x86")[1].faults["fault_in_latency_us"]["p50"]
    data["host"]["worker_finish_ns"] = 500_000
    slower = simulate(data, "x86")[1].faults["fault_in_latency_us"]["p50"]
    assert slower > base + 400


# -- defaults, results and validation -----------------------------------------------------------
def test_default_has_no_host_cpu_results() -> None:
    _, r = simulate(faulting(), "x86")
    assert r.host_cpu is None and r.vcpus[0].run_delay_s is None
    data = r.to_dict()
    assert "host_cpu" not in data and "run_delay_s" not in data["vcpus"][0]


def test_host_cpu_results_round_trip() -> None:
    _, r = simulate(compute_only(vcpus=2, cpus=1))
    data = r.to_dict()
    assert data["host_cpu"]["cpus"] == 1 and data["vcpus"][0]["run_delay_s"] > 0
    again = ProtocolResult.from_dict(data)
    assert again.to_dict() == data
    assert again.flat(1)["host_cpu.run_delay_s"] == data["host_cpu"]["run_delay_s"]


def test_many_cpus_give_the_default_results() -> None:
    """As many pinned CPUs as vCPU threads and no kworker work: nothing waits, and the run is
    the uncontended one (the per-CPU ticks have the per-vCPU ticks' phases)."""
    base = simulate(compute_only(vcpus=2, cpus=0))[1].to_dict()
    many = simulate(compute_only(vcpus=2, cpus=2, pin=True))[1].to_dict()
    many.pop("host_cpu")
    for v in many["vcpus"]:
        assert v.pop("run_delay_s") == 0.0
    base.pop("events")
    many.pop("events")
    assert many == base


@pytest.mark.parametrize(
    ("host", "needle"),
    [
        ({"pin_vcpus": True}, "host.pin_vcpus"),
        ({"cpus": -1}, "host.cpus"),
        ({"cpus": 1.5}, "host.cpus"),
        ({"cpus": 2, "tick_hz": 0}, "host.cpus"),
    ],
)
def test_bad_host_cpus_is_one_line_naming_the_field(
    host: dict[str, Any], needle: str, tmp_path: Any
) -> None:
    lines = ["[host]"] + [f"{k} = {str(v).lower()}" for k, v in host.items()]
    lines += ["[[tasks]]", 'kind = "compute"']
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(str(path))
    message = str(err.value)
    assert "\n" not in message and needle in message


def test_tables_and_metrics_show_run_delay_only_with_host_cpus() -> None:
    from apfsim.api import compare_table, run
    from apfsim.metrics.summary import run_metrics

    for cpus in (0, 1):
        scenario = apfsim.Scenario.model_validate(compute_only(vcpus=2, cpus=cpus))
        result = run(scenario, ["sync"], seed=1)
        shown = "host CPUs: run_delay" in compare_table(result)
        metric = run_metrics(result.results[0]).get("host_cpu.run_delay_s")
        assert shown == (cpus > 0)
        assert (metric is not None) == (cpus > 0)
    assert metric is not None and metric == pytest.approx(DURATION_S, rel=0.02)


def test_run_keys_leave_out_the_host_cpu_keys_only_at_their_defaults() -> None:
    """A sweep stored before host CPUs existed resumes (its runs ran as host.cpus = 0),
    and a run with host CPUs never takes an uncontended run's stored result."""
    from apfsim.sweep.spec import one_point

    def key(cpus: int, pin: bool = False) -> str:
        scenario = apfsim.Scenario.model_validate(compute_only(vcpus=2, cpus=cpus, pin=pin))
        (spec,) = one_point(scenario, ["sync"], [0], None, True)
        return spec.key

    assert len({key(0), key(1), key(2), key(2, pin=True)}) == 4
    default = apfsim.Scenario.model_validate(compute_only(vcpus=2, cpus=0))
    recorded = default.model_dump(mode="json")  # what results files and run keys hold
    assert set(default.model_dump()["host"]) - set(recorded["host"]) == {
        "cpus",
        "pin_vcpus",
        "worker_finish_ns",
        "sched",
        "balloon",
    }
    assert default.host.cpus == 0  # the scenario itself still has every key
    changed = apfsim.Scenario.model_validate(compute_only(vcpus=2, cpus=3))
    assert changed.model_dump(mode="json")["host"]["cpus"] == 3
