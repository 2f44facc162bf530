"""Postcopy (issue 17): the demand-paging selftest from 1 to 256 vCPUs, and the large guest.

    python benchmarks/bench_postcopy.py                 # both
    python benchmarks/bench_postcopy.py demand-paging   # pages/s vs N, three fault paths
    python benchmarks/bench_postcopy.py large           # the large guests: sim s per CPU s

The demand-paging model is ``tools/testing/selftests/kvm/demand_paging_test.c``: N vCPUs
each touch their own 64 MiB region, one page per access, every page missing; the pages come
from a local userfaultfd handler (built-in scenario ``demand-paging``). Three fault paths:
``one uffd`` (all vCPUs' faults on one uffd and its one handler thread), ``uffd per vCPU``
(a uffd and handler each), ``memory-fault exit`` (the vCPU thread copies the page itself,
``-p memory-fault-exit``). Each run is ``DURATION_S`` simulated seconds (well inside the
regions); pages/s = pages placed / simulated time. Targets: N = 256 of all three in under 10
minutes of wall time; postcopy-large at least as fast as real time (simulated s per CPU s
>= 1, one core).
"""

from __future__ import annotations

import sys
import time

from apfsim.api import run_protocol
from apfsim.scenario import load_scenario, with_overrides

DURATION_S = 0.01
NS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PATHS = {
    "one uffd": ("sync", "one"),
    "uffd per vCPU": ("sync", "per-vcpu"),
    "memory-fault exit": ("memory-fault-exit", "one"),
}


def demand_paging(n: int, path: str) -> tuple[float, float]:
    """(pages/s, wall s) of one run at ``n`` vCPUs."""
    protocol, uffds = PATHS[path]
    sc = with_overrides(
        load_scenario("demand-paging"),
        {
            "guest.vcpus": n,
            "guest.memory_mib": 64 * n,
            "host.memory_limit_mib": 64 * n,
            "tasks.0.count": n,
            "postcopy.uffds": uffds,
        },
    )
    t0 = time.perf_counter()
    result = run_protocol(sc, protocol, 1, DURATION_S)
    wall = time.perf_counter() - t0
    assert result.postcopy is not None
    return result.postcopy["pages_requested"] / result.sim_time_s, wall


def main_demand_paging() -> float:
    total = 0.0
    print(f"demand paging, {DURATION_S * 1e3:g} ms simulated per run: pages/s (wall s)")
    print(f"{'N':>4}  " + "  ".join(f"{p:>26}" for p in PATHS))
    at_256 = 0.0
    for n in NS:
        cells = []
        for path in PATHS:
            rate, wall = demand_paging(n, path)
            total += wall
            if n == 256:
                at_256 += wall
            cells.append(f"{rate:>16,.0f} ({wall:6.1f} s)")
        print(f"{n:>4}  " + "  ".join(f"{c:>26}" for c in cells), flush=True)
    print(f"wall time: N = 256, three paths: {at_256:.1f} s (target < 600 s); all: {total:.1f} s")
    return at_256


LARGE = (
    ("postcopy-large", {}, 20.0),
    ("postcopy-dirtiers", {}, 20.0),
    # One precopy round first (libvirt's --postcopy-after-precopy): the switch-over at 12.4 s.
    ("postcopy-large", {"postcopy.precopy_rounds": 1}, 30.0),
)


def main_large() -> None:
    for scenario, overrides, duration_s in LARGE:
        for protocol in ("sync", "x86"):
            sc = with_overrides(load_scenario(scenario), overrides)
            c0 = time.process_time()
            result = run_protocol(sc, protocol, 1, duration_s)
            cpu = time.process_time() - c0
            label = scenario + "".join(f" {k}={v}" for k, v in overrides.items())
            print(
                f"{label} {protocol}: {result.sim_time_s:g} simulated s in {cpu:.1f} CPU s "
                f"= {result.sim_time_s / cpu:.2f} sim-s/CPU-s (target >= 1), "
                f"{result.events / cpu:,.0f} events/CPU-s",
                flush=True,
            )


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "both"
    if which in ("both", "demand-paging"):
        main_demand_paging()
    if which in ("both", "large"):
        main_large()
