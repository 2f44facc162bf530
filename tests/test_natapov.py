"""Issue 3 acceptance: Natapov's x86 benchmark (published-results.md §2) as the CLI runs it.

Published (v7, mean of 10 runs): master : nonpv : pv = 1 : 1.128 : 1.909 in counting-thread
work. The test asserts what the unfitted model gives. x86 lands inside the tolerance
(1.91 ± 0.15). halt-only does not: it gives 1.000, not 1.13 ± 0.10. That is an honest miss,
explained in docs/validation.md §3 (CFS charges the halted time to the faulting thread exactly
as it charges a synchronous stall). This test pins that figure so that a change to it has to
be argued, not slipped in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apfsim.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def natapov(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("natapov") / "natapov.json"
    args = ["compare", "natapov-2010", "--protocol", "sync,halt-only,x86", "--seeds", "3"]
    assert main([*args, "--quiet", "--json", str(out)]) == 0
    data: dict[str, Any] = json.loads(Path(out).read_text())
    return data


def ratio(data: dict[str, Any], protocol: str, metric: str) -> tuple[float, float]:
    r = data["summary"][protocol]["ratio_to_baseline"][metric]
    return r["mean"], r["ci95"]


def runs(data: dict[str, Any], protocol: str) -> list[dict[str, Any]]:
    return [r for r in data["runs"] if r["protocol"] == protocol]


def test_pv_is_inside_the_published_tolerance(natapov: dict[str, Any]) -> None:
    mean, ci = ratio(natapov, "x86", "kind.compute.work_rate")
    assert 1.91 - 0.15 <= mean <= 1.91 + 0.15
    # 1.980 before issue 16's x86-vmx exit costs (683 ns round trips, not 2.5 µs): 1.984.
    assert mean == pytest.approx(1.984, abs=0.01)
    assert ci < 0.01
    # Through the mechanism S1 names: each fault thread sleeps on its token, so the counting
    # thread gets the vCPU; no fault on this workload falls back to a synchronous one.
    for run in runs(natapov, "x86"):
        assert run["apf"]["waits_schedule"] > 50_000
        assert run["apf"]["sync_fallbacks"] == 0


def test_nonpv_is_the_honest_miss(natapov: dict[str, Any]) -> None:
    mean, ci = ratio(natapov, "halt-only", "kind.compute.work_rate")
    assert mean == pytest.approx(1.000, abs=0.005)
    assert ci < 0.005
    assert not 1.13 - 0.10 <= mean <= 1.13 + 0.10  # published tolerance: see the docstring


def test_nonpv_halts_take_ticks_and_help_the_faulting_threads_only(
    natapov: dict[str, Any],
) -> None:
    """The halt is real (interrupts are taken, the scheduler switches), but fairness gives
    the time it frees to the faulting thread's next fault-ins, not to the counter."""
    for run in runs(natapov, "halt-only"):
        assert run["apf"]["not_present_halted"] > 50_000
        assert run["apf"]["repeated_faults"] > 50_000  # re-faults after a tick's interrupt
        assert run["faults"]["sync"] == 0
    faulters, _ = ratio(natapov, "halt-only", "kind.random_writer.work_rate")
    assert faulters > 1.15
