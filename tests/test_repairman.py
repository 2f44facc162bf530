"""Analytic check: vCPU utilisation against the machine-repairman formulas.

N tasks on one vCPU alternate exponential compute bursts (mean C) with faults whose fault-in
time is exponential (mean L). Under ``sync`` the vCPU stalls during every fault, so it is busy
C / (C + L) of the time whatever N is. With async PF the vCPU runs another task meanwhile:
the tasks are the machines of a finite-source M/M/1//N queue whose single server is the vCPU,
busy 1 - P0 with P0 = 1 / sum_k N!/(N-k)! (C/L)^k. Overheads are set to ~0 so the formulas
apply; the tolerance is statistical (spread over seeds), not a fudge.
"""

from __future__ import annotations

import math
import statistics

import pytest

import apfsim
from apfsim.api import run_protocol

ZERO_GUEST_COSTS = {
    k: 0
    for k in (
        "vector_ns",
        "kernel_entry_ns",
        "apf_handler_ns",
        "apf_wait_tail_ns",
        "tick_handler_ns",
        "ipi_handler_ns",
        "context_switch_ns",
        "guest_fault_ns",
    )
}


def repairman_scenario(
    n: int, burst_us: float, fault_us: float, duration_s: float
) -> apfsim.Scenario:
    return apfsim.Scenario.model_validate(
        {
            "name": "repairman",
            "duration_s": duration_s,
            "guest": {"vcpus": 1, "memory_mib": 2048, "reserved_mib": 0, "costs": ZERO_GUEST_COSTS},
            "host": {
                "memory_limit_mib": 2048,
                "page_cluster": 0,
                "tick_hz": 0,
                "exit_ns": 1,
                "entry_ns": 1,
                "stage2_fault_ns": 0,
                "inject_ns": 0,
                "worker_start_ns": 0,
                "minor_fault_ns": 0,
                "zero_fill_ns": 0,
                "swap": {
                    "distribution": "exponential",
                    "mean_us": fault_us,
                    "queue_depth": 4 * n,
                    "transfer_ns_per_page": 0,
                },
            },
            "initial_memory": {"resident_fraction": 0.0, "swapped_fraction": 1.0},
            "tasks": [
                {
                    "kind": "fault_loop",
                    "count": n,
                    "region_mib": 2048 // n,
                    "burst_mean_us": burst_us,
                }
            ],
        }
    )


def machine_repairman_utilisation(n: int, c: float, l_: float) -> float:
    rho = c / l_
    p0 = 1.0 / sum(math.factorial(n) / math.factorial(n - k) * rho**k for k in range(n + 1))
    return 1.0 - p0


def utilisations(sc: apfsim.Scenario, protocol: str, seeds: int) -> list[float]:
    out = []
    for seed in range(seeds):
        r = run_protocol(sc, protocol, seed)
        out.append(r.vcpus[0].time_s["task"] / r.sim_time_s)
    return out


def assert_matches(samples: list[float], expected: float) -> None:
    mean = statistics.fmean(samples)
    se = statistics.stdev(samples) / math.sqrt(len(samples))
    assert abs(mean - expected) < max(4 * se, 1e-4), (mean, expected, se)
    assert abs(mean - expected) < 0.02, (mean, expected)


@pytest.mark.parametrize(("n", "c_us", "l_us"), [(3, 1000.0, 2000.0), (2, 1000.0, 1000.0)])
def test_sync_utilisation_is_c_over_c_plus_l(n: int, c_us: float, l_us: float) -> None:
    samples = utilisations(repairman_scenario(n, c_us, l_us, 8.0), "sync", 4)
    assert_matches(samples, c_us / (c_us + l_us))


@pytest.mark.parametrize(("n", "c_us", "l_us"), [(3, 1000.0, 2000.0), (2, 1000.0, 1000.0)])
def test_apf_utilisation_is_the_machine_repairman_value(n: int, c_us: float, l_us: float) -> None:
    samples = utilisations(repairman_scenario(n, c_us, l_us, 8.0), "arm64-rfcv2", 4)
    assert_matches(samples, machine_repairman_utilisation(n, c_us, l_us))


def test_the_formulas_tell_the_protocols_apart() -> None:
    """Guards the test itself: the two expectations differ by far more than the tolerance."""
    assert machine_repairman_utilisation(3, 1.0, 2.0) - 1.0 / 3.0 > 0.4
    assert math.isclose(machine_repairman_utilisation(3, 1.0, 2.0), 0.7894736842, rel_tol=1e-9)
