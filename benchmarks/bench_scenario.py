"""Simulation speed on the built-in scenarios: simulated seconds per wall second, events/s.

    python benchmarks/bench_scenario.py [default|natapov]
    python -m pytest benchmarks -p no:cacheprovider --benchmark-only -o python_files='bench_*.py'

Targets: the default scenario (rfcv2-2020) runs >= 5 simulated seconds per wall second under
every protocol (issue 2); natapov-2010 (60 simulated seconds, 4 vCPUs) runs faster than real
time under each protocol of its comparison and each of the 3 seeds (issue 3). "Model events"
are the engine's live events (``events``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from apfsim.api import run_protocol
from apfsim.registry import PROTOCOLS
from apfsim.scenario import load_scenario

TARGET_SIM_S_PER_WALL_S = 5.0
SCENARIOS = ("rfcv2-2020", "rfcv2-2020-memonly")
NATAPOV_TARGET_SIM_S_PER_WALL_S = 1.0
NATAPOV_PROTOCOLS = ("sync", "halt-only", "x86")
NATAPOV_SEEDS = (0, 1, 2)


def speed(
    scenario: str, protocol: str, seed: int = 1, duration_s: float | None = None
) -> tuple[float, float, float, float]:
    """(simulated s per wall s, model events per wall s, simulated s, wall s) of one run."""
    sc = load_scenario(scenario)
    t0 = time.perf_counter()
    result = run_protocol(sc, protocol, seed, duration_s)
    wall = time.perf_counter() - t0
    return result.sim_time_s / wall, result.events / wall, result.sim_time_s, wall


# -- pytest-benchmark: 10 simulated seconds per round --------------------------------------


def _bench(benchmark: Any, scenario: str, protocol: str) -> None:
    sc = load_scenario(scenario)
    result = benchmark.pedantic(run_protocol, args=(sc, protocol, 1, 10.0), rounds=3)
    assert result.sim_time_s == 10.0


def test_default_scenario_sync(benchmark: Any) -> None:
    _bench(benchmark, "rfcv2-2020", "sync")


def test_default_scenario_arm64_rfcv2(benchmark: Any) -> None:
    _bench(benchmark, "rfcv2-2020", "arm64-rfcv2")


def test_memonly_scenario_sync(benchmark: Any) -> None:
    _bench(benchmark, "rfcv2-2020-memonly", "sync")


def test_memonly_scenario_arm64_rfcv2(benchmark: Any) -> None:
    _bench(benchmark, "rfcv2-2020-memonly", "arm64-rfcv2")


def _line(scenario: str, protocol: str, seed: int, target: float) -> None:
    rate, events, sim_s, wall = speed(scenario, protocol, seed)
    verdict = "ok" if rate >= target else "BELOW TARGET"
    print(
        f"  {scenario:20s} {protocol:12s} seed {seed} {rate:6.2f} sim-s/wall-s "
        f"{events / 1e3:6.1f} k model events/s  ({sim_s:.1f} sim-s in {wall:.2f} s)  {verdict}",
        flush=True,
    )


def main(which: str = "default") -> None:
    if which == "default":
        print(f"whole scenarios, seed 1 (target >= {TARGET_SIM_S_PER_WALL_S:g} sim-s/wall-s)")
        for scenario in SCENARIOS:
            for protocol in PROTOCOLS:
                _line(scenario, protocol, 1, TARGET_SIM_S_PER_WALL_S)
    elif which == "natapov":
        target = NATAPOV_TARGET_SIM_S_PER_WALL_S
        print(f"natapov-2010, 60 s per run (target >= {target:g}: faster than real time)")
        for protocol in NATAPOV_PROTOCOLS:
            for seed in NATAPOV_SEEDS:
                _line("natapov-2010", protocol, seed, target)
    else:
        raise SystemExit(f"unknown benchmark {which!r}: use default or natapov")


if __name__ == "__main__":
    main(*sys.argv[1:2])
