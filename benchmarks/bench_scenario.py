"""Simulation speed on the built-in scenarios: simulated seconds per wall second.

    python benchmarks/bench_scenario.py
    python -m pytest benchmarks --benchmark-only -o python_files='bench_*.py'

Target (issue 2): the default scenario simulates >= 5 simulated seconds per wall second.
"""

from __future__ import annotations

import time
from typing import Any

from apfsim.api import run_protocol


def speed(
    scenario: str, protocol: str, seed: int = 1, duration_s: float | None = None
) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = run_protocol(scenario, protocol, seed, duration_s)
    wall = time.perf_counter() - t0
    return result.sim_time_s / wall, result.events / wall


def test_default_scenario_sync(benchmark: Any) -> None:
    benchmark.pedantic(run_protocol, args=("rfcv2-2020", "sync", 1, 10.0), rounds=3)


def test_default_scenario_arm64_rfcv2(benchmark: Any) -> None:
    benchmark.pedantic(run_protocol, args=("rfcv2-2020", "arm64-rfcv2", 1, 10.0), rounds=3)


if __name__ == "__main__":
    for scenario in ("rfcv2-2020", "rfcv2-2020-memonly"):
        for protocol in ("sync", "arm64-rfcv2"):
            sim_per_wall, events = speed(scenario, protocol)
            print(
                f"{scenario:20s} {protocol:12s} {sim_per_wall:6.1f} sim-s/wall-s "
                f"{events / 1e3:7.1f} k model events/s"
            )
